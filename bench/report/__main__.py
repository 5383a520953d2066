"""``python -m bench.report``: the report's command line (``bench.report.main``)."""

import sys

from bench.report import main

__all__: list[str] = []

sys.exit(main())

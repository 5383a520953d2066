"""``python -m bench.audit``: the correctness audit's command line (``bench.audit.main``)."""

import sys

from bench.audit import main

__all__: list[str] = []

sys.exit(main())

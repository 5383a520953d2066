"""The benchmark's pytest plugin, loaded here for ``pytest bench``: it lives in ``bench.run.plugin``.

Run as ``pytest bench --benchmark-json results/<run>.json [--grid smoke|default|full]``.
pytest reads the plugin's hooks and its fixture from this module's names.
"""

from __future__ import annotations

from bench.run.plugin import *  # noqa: F403
from bench.run.plugin import __all__  # noqa: F401

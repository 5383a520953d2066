"""The benchmark run: the pytest plugin, the per-cell policy, the session, the worker, the cell.

``bench/conftest.py`` loads the plugin (``bench.run.plugin``) for ``pytest bench``.
"""

__all__: list[str] = []

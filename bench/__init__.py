"""The benchmark, the correctness audit and the report of hessbench (see docs/DESIGN.md)."""

__all__: list[str] = []

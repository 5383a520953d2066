"""The problems the benchmark and the audit compute: the grid of cases, their nets, the zoo.

``grid`` (the cases and the named grids), ``models`` (a case's seeded net, batch, loss and
chosen params), ``zoo`` (the audit's small models beyond MLPs). docs/DESIGN.md, "bench/, one
module per job".
"""

__all__: list[str] = []

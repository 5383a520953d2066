"""The analysis of benchmark and audit JSON, pandas over the files, one module per job.

``tidy`` reads, checks and merges the runs into one tidy frame (case and strategy families
too); ``rule`` is the recommendation rule and its significance test; ``numbers`` computes the
numbers of the report's summary; ``audit_tables`` makes the tables of the audits. Each name
is imported from the module that owns it: the package re-exports nothing.
"""

__all__: list[str] = []

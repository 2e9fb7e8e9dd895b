"""``chatdb bench``: the application's query patterns under concurrent load, with pgbench,
judged against the specification's latency budgets.

- ``workload``: the patterns as pgbench scripts (compiled from ``chatdb.patterns``), the
  keys they ask for, the mix and the budgets;
- ``pgbench``: finding pgbench, running it, reading its per-transaction log;
- ``stats``: percentiles, histograms and verdicts;
- ``runner``: a whole run (checks, bench's own users, phases, capacity search, cleanup);
- ``report``: the JUnit and HTML reports.
"""

from chatdb.bench.runner import BenchRequest, BenchResult, Phase, Removed, cleanup, run

__all__ = ["BenchRequest", "BenchResult", "Phase", "Removed", "cleanup", "run"]

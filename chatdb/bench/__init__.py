"""``chatdb bench``: the application's query patterns under concurrent load, with pgbench,
judged against the specification's latency budgets.

- ``workload``: the patterns as pgbench scripts (compiled from ``chatdb.patterns``), the
  keys they ask for, the mix and the budgets;
- ``pgbench``: finding pgbench, running it, reading its per-transaction log;
- ``stats``: percentiles, histograms and verdicts;
- ``model``: the request and the result;
- ``rows``: bench's own users and conversations, the run guard, and cleanup;
- ``phases``: running pgbench at a rate, during a --while command, and the key cost;
- ``capacity``: the capacity search;
- ``runner``: a whole run (checks, bench's own rows, phases, capacity search, cleanup);
- ``report``: the JUnit and HTML reports.
"""

from chatdb.bench.model import BenchRequest, BenchResult, Phase, Removed
from chatdb.bench.rows import cleanup
from chatdb.bench.runner import run

__all__ = ["BenchRequest", "BenchResult", "Phase", "Removed", "cleanup", "run"]

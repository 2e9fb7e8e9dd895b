"""``chatdb bench``: the application's query patterns under concurrent load, with pgbench,
judged against the specification's latency budgets.

- ``budgets``: the mix and the budgets, parsed and shown with no database library (what
  ``chatdb bench --help`` needs);
- ``workload``: the patterns as pgbench scripts (compiled from ``chatdb.patterns``) and the
  keys they ask for;
- ``pgbench``: finding pgbench, running it, reading its per-transaction log;
- ``stats``: percentiles, histograms and verdicts;
- ``model``: the request and the result;
- ``rows``: bench's own users and conversations, the run guard, and cleanup;
- ``phases``: running pgbench at a rate, during a --while command, and the key cost;
- ``capacity``: the capacity search;
- ``runner``: a whole run (checks, bench's own rows, phases, capacity search, cleanup);
- ``report``: the JUnit and HTML reports.

The package itself imports nothing: ``chatdb bench`` imports the modules it runs.
"""

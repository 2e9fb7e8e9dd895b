"""``chatdb doctor``: seed 000's monitoring and maintenance list as checks with fixes.

Each check returns findings (``chatdb.doctor.model.Finding``): the object, the check,
``ok``/``warn``/``fail``/``skipped``, the value measured, the threshold, what it means and
the statement that fixes it. Nothing here prints.

By default every check reads the catalog and the statistics only, so a run takes about as
long on a large database as on a small one; ``--deep`` reads tables and indexes
(pgstattuple, amcheck, exact retention counts). Each check runs in a transaction of its own
with local timeouts, and leaves no session state (PgBouncer in transaction mode is fine).
A check that lacks a privilege or an extension is ``skipped`` with the reason, never a
failure. The one write: a sample of the tables' sizes in ``chatdb_size_history``.

The checks run from ``chatdb.doctor.run``; this package's own names are its model, which
imports no database library, so that ``chatdb doctor --help`` needs none.
"""

from chatdb.doctor.model import (
    AREAS,
    FAIL,
    OK,
    SKIPPED,
    STATUSES,
    WARN,
    Finding,
    Options,
    Report,
    Thresholds,
    parse_size,
)

__all__ = [
    "AREAS",
    "FAIL",
    "OK",
    "SKIPPED",
    "STATUSES",
    "WARN",
    "Finding",
    "Options",
    "Report",
    "Thresholds",
    "parse_size",
]

"""Retention outlook: how many conversations and messages pass an archive or purge cutoff
now, within 7 days and within 30 days, so that a team sees what the next scheduled runs
will do. The cutoffs are ``--older-than`` when given, else those of the latest archive and
purge runs in ``chatdb_runs``.

By default the counts are the planner's estimates (EXPLAIN: statistics only); ``--deep``
counts exactly. The predicates are archive's and purge's own (chatdb.lifecycle)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Select, and_, func, literal, or_, select, tuple_

from chatdb import lifecycle
from chatdb.doctor.model import OK, SKIPPED, Finding
from chatdb.doctor.probe import Probe
from chatdb.errors import UsageError
from chatdb.schema import conversations, conversations_archive, messages, messages_archive

#: The horizons of the outlook, in days.
AHEAD = (0, 7, 30)


def _cutoff(older_than: lifecycle.Duration, days: int) -> Any:
    """The database clock's cutoff ``days`` from now: rows older than it then."""
    return func.now() - func.make_interval(0, 0, 0, 0, 0, 0, literal(older_than.seconds - days * 86400))


def _archive_queries(
    older_than: lifecycle.Duration, days: int, colocated: bool = False
) -> list[tuple[str, Select]]:
    """``colocated``: a message joins its conversation by its owner key, ``user_id``
    included, so that Citus runs the query on each shard by itself (the same rows)."""
    chosen = select(conversations.c.id).where(lifecycle.archivable(_cutoff(older_than, days)))
    owned: Any = messages.c.conversation_id.in_(chosen)
    if colocated:
        owners = select(conversations.c.id, conversations.c.user_id)
        owned = tuple_(messages.c.conversation_id, messages.c.user_id).in_(
            owners.where(lifecycle.archivable(_cutoff(older_than, days)))
        )
    return [("conversations", chosen), ("messages", select(messages.c.id).where(owned))]


def _purge_queries(
    older_than: lifecycle.Duration, grace: lifecycle.Duration, days: int, colocated: bool = False
) -> list[tuple[str, Select]]:
    cutoff, deleted_cutoff = _cutoff(older_than, days), _cutoff(grace, days)
    found = []
    for parent, child in ((conversations, messages), (conversations_archive, messages_archive)):
        gone = lifecycle.purgeable(parent, cutoff, deleted_cutoff)
        found.append(("conversations", select(parent.c.id).where(gone)))
        key = child.c.conversation_id == parent.c.id
        owned = child.join(parent, and_(key, child.c.user_id == parent.c.user_id) if colocated else key)
        found.append(
            (
                "messages",
                select(child.c.id).select_from(owned).where(or_(gone, child.c.deleted_at < deleted_cutoff)),
            )
        )
    return found


def _estimate(probe: Probe, query: Select) -> int:
    """The planner's row estimate. On Citus, the coordinator's plan of a distributed
    query carries no estimate of its own: the shards' plans do (``explain_all_tasks``)."""
    compiled = query.compile(dialect=probe.connection.dialect)
    if probe.sharded:
        probe.connection.exec_driver_sql("SET LOCAL citus.explain_all_tasks = on")
    plan = probe.connection.exec_driver_sql(f"EXPLAIN (FORMAT JSON) {compiled}", compiled.params).scalar_one()
    top = plan[0]["Plan"]
    job = top.get("Distributed Query", {}).get("Job")
    if job is None:
        return int(top["Plan Rows"])
    return sum(int(task["Remote Plan"][0][0]["Plan"]["Plan Rows"]) for task in job["Tasks"])


def _exact(probe: Probe, query: Select) -> int:
    return int(probe.connection.execute(select(func.count()).select_from(query.subquery())).scalar_one())


def _cutoffs(probe: Probe) -> list[tuple[str, str, lifecycle.Duration, lifecycle.Duration | None]]:
    """(label, command, older_than, deleted grace) for each cutoff to look ahead at."""
    given = probe.options.older_than
    if given is not None:
        grace = lifecycle.parse_duration(lifecycle.DEFAULT_DELETED_GRACE)
        return [
            (f"archive --older-than {given.text}", "archive", given, None),
            (f"purge --older-than {given.text}", "purge", given, grace),
        ]
    if "chatdb_runs" not in probe.tables:
        return []
    found = []
    for command in ("archive", "purge"):
        row = probe.rows(
            "SELECT id, arguments FROM chatdb_runs WHERE command = :command AND outcome = 'succeeded'"
            " ORDER BY started_at DESC LIMIT 1",
            command=command,
        )
        if not row:
            continue
        arguments = row[0].arguments or {}
        try:
            older_than = lifecycle.parse_duration(str(arguments.get("older_than")))
            grace = lifecycle.parse_duration(
                str(arguments.get("deleted_grace") or lifecycle.DEFAULT_DELETED_GRACE)
            )
        except UsageError:
            continue
        found.append(
            (
                f"{command} --older-than {older_than.text} (as run {row[0].id})",
                command,
                older_than,
                grace if command == "purge" else None,
            )
        )
    return found


def _no_outlook(why: str) -> list[Finding]:
    return [Finding("retention", None, "outlook", SKIPPED, detail=why)]


def retention(probe: Probe) -> list[Finding]:
    cutoffs = _cutoffs(probe)
    if not cutoffs:
        return _no_outlook(
            "no --older-than given, and no archive or purge run recorded: "
            "give --older-than (e.g. 180d) to see what a run would take"
        )
    if not {"conversations", "messages", "conversations_archive", "messages_archive"} <= set(probe.tables):
        return _no_outlook("chatdb's tables are missing: run `chatdb migrate`")
    deep = probe.options.deep
    measure = _exact if deep else _estimate
    approx = "" if deep else "~"
    colocated = "messages" in probe.sharded
    found = []
    for label, command, older_than, grace in cutoffs:
        totals = []
        for days in AHEAD:
            if command == "archive":
                queries = _archive_queries(older_than, days, colocated)
            else:
                assert grace is not None  # a purge always has its grace period
                queries = _purge_queries(older_than, grace, days, colocated)
            tally = {"conversations": 0, "messages": 0}
            for kind, query in queries:
                tally[kind] += measure(probe, query)
            totals.append(tally)
        now, week, month = totals
        where = "from the hot tables" if command == "archive" else "from the hot and archive tables"
        detail = (
            f"due now: {approx}{now['conversations']:,} conversations, {approx}{now['messages']:,} messages "
            f"{where}; within 7 days {approx}{week['conversations']:,} and {approx}{week['messages']:,}; "
            f"within 30 days {approx}{month['conversations']:,} and {approx}{month['messages']:,}"
            + ("" if deep else " (the planner's estimates; --deep counts exactly)")
        )
        found.append(
            Finding("retention", label, "outlook", OK, now["conversations"], None, detail, unit="rows")
        )
    return found

"""Planning a run: its cutoffs, from the database clock, and exact counts of what matches
them (see docs/architecture.md, "What is counted, and in which transaction")."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, Engine, Select, any_, exists, func, literal, or_, select

from chatdb import migrations
from chatdb.errors import StateError, UsageError
from chatdb.lifecycle import distributed
from chatdb.lifecycle.durations import Duration
from chatdb.lifecycle.models import Plan, Tally
from chatdb.lifecycle.statements import archivable, ids_param, purgeable, restorable
from chatdb.schema import conversations, conversations_archive, messages, messages_archive, users


def cutoff(connection: Connection, duration: Duration) -> dt.datetime:
    """``now() - duration`` by the database clock, in exact seconds whatever the session's
    time zone."""
    return connection.execute(
        select(func.now() - func.make_interval(0, 0, 0, 0, 0, 0, literal(duration.seconds)))
    ).scalar_one()


def _count(connection: Connection, query: Select) -> int:
    return int(connection.execute(select(func.count()).select_from(query.subquery())).scalar_one())


def archive_counts(connection: Connection, cutoff: Any) -> Tally:
    """What an archive with this cutoff would move now."""
    chosen = select(conversations.c.id).where(archivable(cutoff))
    return Tally(
        conversations=_count(connection, chosen),
        messages=_count(connection, select(messages.c.id).where(messages.c.conversation_id.in_(chosen))),
    )


def purge_counts(connection: Connection, cutoff: Any, deleted_cutoff: Any) -> Tally:
    """What a purge with these cutoffs would delete now, from the hot and the archive
    tables."""
    found = []
    for parent, child in ((conversations, messages), (conversations_archive, messages_archive)):
        gone = purgeable(parent, cutoff, deleted_cutoff)
        found.append(_count(connection, select(parent.c.id).where(gone)))
        # A message goes with its conversation, or on its own once soft-deleted. Counted
        # through a join (every message has its conversation): `IN (subquery)` under an OR
        # cannot become a semi-join, and is a SubPlan that turns quadratic once the ids no
        # longer fit in work_mem.
        # On user_id too, which the owner key holds: on Citus the join is then co-located.
        owned = child.join(
            parent, (child.c.conversation_id == parent.c.id) & (child.c.user_id == parent.c.user_id)
        )
        found.append(
            _count(
                connection,
                select(child.c.id).select_from(owned).where(or_(gone, child.c.deleted_at < deleted_cutoff)),
            )
        )
    return Tally(*found)


def _require_ready(engine: Engine) -> None:
    """Refuse to plan a run the run itself would refuse: a database below head, or, on
    Citus, tables distributed otherwise than chatdb needs (``distributed.applies``)."""
    migrations.require_head(engine)
    distributed.applies(engine)


def plan_archive(engine: Engine, older_than: Duration, *, count: bool = True) -> Plan:
    """The cutoff of an archive run and, with ``count``, what it would move now."""
    _require_ready(engine)
    with engine.connect() as connection:
        at = cutoff(connection, older_than)
        counts = archive_counts(connection, at) if count else None
    return Plan("archive", cutoff=at, counts=counts)


def plan_purge(engine: Engine, older_than: Duration, deleted_grace: Duration, *, count: bool = True) -> Plan:
    """The cutoffs of a purge run and, with ``count``, what it would delete now."""
    _require_ready(engine)
    with engine.connect() as connection:
        at = cutoff(connection, older_than)
        deleted_cutoff = cutoff(connection, deleted_grace)
        counts = purge_counts(connection, at, deleted_cutoff) if count else None
    return Plan("purge", cutoff=at, deleted_cutoff=deleted_cutoff, counts=counts)


def plan_restore(
    engine: Engine, conversation_ids: Sequence[uuid.UUID] = (), user_id: str | None = None
) -> Plan:
    """What ``archive restore`` would bring back. A named conversation already in the hot
    tables (restored by an earlier run that stopped, say) needs nothing; if any named
    conversation is in neither, nothing is restored."""
    if bool(conversation_ids) == (user_id is not None):
        raise UsageError("give either --conversation (one or more) or --user")
    _require_ready(engine)
    ids = tuple(dict.fromkeys(conversation_ids))
    hot: tuple[uuid.UUID, ...] = ()
    with engine.connect() as connection:
        if (
            user_id is not None
            and not connection.execute(select(exists().where(users.c.id == user_id))).scalar_one()
        ):
            raise StateError(f"no user {user_id!r} in the users table; nothing was restored")
        chosen = restorable(ids, user_id)
        found = set(connection.execute(chosen).scalars())
        if ids and len(found) < len(ids):
            in_hot = set(
                connection.execute(
                    select(conversations.c.id).where(conversations.c.id == any_(ids_param(ids)))
                ).scalars()
            )
            missing = [str(i) for i in ids if i not in found and i not in in_hot]
            if missing:
                more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
                are = "is" if len(missing) == 1 else "are"
                raise StateError(
                    f"{len(missing)} of the given conversations {are} in neither the archive nor the "
                    f"hot tables: {', '.join(missing[:5])}{more}",
                    hint="nothing was restored",
                )
            hot = tuple(i for i in ids if i not in found)
        counts = Tally(
            archive_conversations=len(found),
            archive_messages=_count(
                connection,
                select(messages_archive.c.id).where(messages_archive.c.conversation_id.in_(chosen)),
            ),
        )
    return Plan("archive restore", counts=counts, conversation_ids=ids, user_id=user_id, already_hot=hot)


def remaining(engine: Engine, plan: Plan) -> Tally | None:
    """What still matches the run's cutoffs, when it stopped early."""
    if plan.command not in ("archive", "purge"):
        return None
    with engine.connect() as connection:
        if plan.command == "archive":
            return archive_counts(connection, plan.cutoff)
        return purge_counts(connection, plan.cutoff, plan.deleted_cutoff)

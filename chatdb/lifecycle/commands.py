"""The commands: ``archive``, ``purge`` and ``archive restore``, each a plan run through
its phases by the runner."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from sqlalchemy import Engine

from chatdb.lifecycle import audit, distributed
from chatdb.lifecycle.export import ExportFile, kept_length
from chatdb.lifecycle.models import Plan, RunOptions, RunResult
from chatdb.lifecycle.phases import Phase, archive_phases, purge_phases, restore_phases
from chatdb.lifecycle.runner import Runner
from chatdb.lifecycle.vacuuming import dead_left


def _phases(engine: Engine, plan: Plan, local: Callable[[Plan], Sequence[Phase]]) -> Sequence[Phase]:
    """The command's phases: one server's (``local``), or, when chatdb's tables are
    distributed on Citus, the same work one shard per batch (``distributed``)."""
    if distributed.applies(engine):
        return distributed.phases_for(plan.command, plan)
    return local(plan)


def archive(
    engine: Engine,
    plan: Plan,
    options: RunOptions,
    export: Path | None = None,
    *,
    phases: Sequence[Phase] | None = None,
) -> RunResult:
    """Move every hot conversation idle since before ``plan.cutoff`` (and not soft-deleted),
    with all its messages, into the archive tables. ``phases`` replaces
    ``archive_phases(plan)``: the same run (guard, audit row, export, retries) over other
    statements."""
    options.validate()
    writer = ExportFile(export) if export is not None else None
    try:
        result = Runner(engine, plan, options, writer).run(
            _phases(engine, plan, archive_phases) if phases is None else phases
        )
    finally:
        if writer is not None:
            writer.close()
    result.vacuum = dead_left(engine, result)
    return result


def check_export_contents(engine: Engine, export: Path) -> None:
    """Refuse an existing ``export`` file as a run exporting to it would, before it
    appends (``ExportFile.repair``), reading the file and the audit rows and changing
    nothing: ``archive --dry-run`` refuses what the run would."""
    try:
        size = export.stat().st_size
    except FileNotFoundError:
        return
    with engine.connect() as connection:
        kept_length(export, size, *audit.exported_before(connection, str(export.resolve())))


def purge(
    engine: Engine, plan: Plan, options: RunOptions, *, phases: Sequence[Phase] | None = None
) -> RunResult:
    """Delete, from the hot and the archive tables, conversations idle since before
    ``plan.cutoff`` and soft-deleted conversations and messages older than
    ``plan.deleted_cutoff``. ``phases`` replaces ``purge_phases(plan)``: the same run over
    other statements."""
    options.validate()
    result = Runner(engine, plan, options, None).run(
        _phases(engine, plan, purge_phases) if phases is None else phases
    )
    result.vacuum = dead_left(engine, result)
    return result


def restore(
    engine: Engine, plan: Plan, options: RunOptions, *, phases: Sequence[Phase] | None = None
) -> RunResult:
    """Move archived conversations back to the hot tables, exactly as they were.
    ``phases`` replaces ``restore_phases(plan)``."""
    options.validate()
    return Runner(engine, plan, options, None).run(
        _phases(engine, plan, restore_phases) if phases is None else phases
    )

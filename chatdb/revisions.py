"""chatdb's migration chain as Alembic reads it, read once per process.

Each of Alembic's ``command`` functions reads the scripts again, and resolving a target,
comparing positions and reporting what was applied each read them too: one ``chatdb
migrate`` read every revision file eight times. Here one ``ScriptDirectory`` is read, the
first time a command needs it, and every lookup and every Alembic run goes through it.
A command that only needs to know whether a database is at head reads no script at all
(``schema.HEAD_REVISION``, which a test keeps equal to the chain's head).
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chatdb.defaults import BASE
from chatdb.errors import StateError, UsageError

if TYPE_CHECKING:
    from alembic.config import Config
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory


@dataclass(frozen=True)
class Revision:
    id: str
    down: str | None
    message: str


def script_location() -> Path:
    """The migration scripts: inside the installed package, or at the top of a checkout."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "_alembic", package.parent / "alembic"):
        if (candidate / "env.py").is_file():
            return candidate
    raise StateError(f"chatdb's migration scripts are missing (looked in {package})")


def config(output_buffer: io.StringIO | None = None, **attributes: object) -> Config:
    """An Alembic configuration of chatdb's scripts; ``attributes`` reach ``env.py``
    (``connection``, ``lock_timeout``...)."""
    from alembic.config import Config

    result = Config(output_buffer=output_buffer or io.StringIO())
    result.set_main_option("script_location", str(script_location()))
    result.attributes.update(attributes)
    return result


class Chain:
    """The revisions, oldest first, and the ``ScriptDirectory`` that read them."""

    def __init__(self, script: ScriptDirectory) -> None:
        self.script = script
        found = []
        for revision in reversed(list(script.walk_revisions())):
            down = revision.down_revision
            assert down is None or isinstance(down, str)  # the chain is linear: no merge revisions
            message = (revision.doc or "").strip().splitlines()[0] if revision.doc else ""
            found.append(Revision(revision.revision, down, message))
        self.revisions = tuple(found)
        self.ids = [revision.id for revision in found]

    @property
    def head(self) -> str:
        return self.ids[-1]

    def position(self, revision: str | None) -> int:
        """0 for base, 1 for the first revision, and so on."""
        return 0 if revision is None else self.ids.index(revision) + 1

    def between(self, lower: str | None, upper: str | None) -> list[Revision]:
        """The revisions above ``lower`` up to ``upper``, oldest first."""
        return list(self.revisions[self.position(lower) : self.position(upper)])

    def resolve(self, spec: str, current: str | None = None) -> str | None:
        """An absolute revision id (None for base) from an id, a unique prefix of one,
        ``head``, ``base``, or ``-N``/``+N`` relative to ``current``."""
        from alembic.util import CommandError

        spec = spec.strip()
        if spec == BASE:
            return None
        if spec[:1] in "+-" and spec[1:].isdigit():
            target = self.position(current if current in self.ids else None) + int(spec)
            if not 0 <= target <= len(self.ids):
                raise UsageError(f"revision {spec} is out of range (the chain has {len(self.ids)} revisions)")
            return self.ids[target - 1] if target else None
        if spec:
            try:  # Alembic's own reading: an id, a unique prefix of one, or head
                return self.script.get_revision(spec).revision
            except CommandError:
                pass
        matches = [rev for rev in self.ids if rev.startswith(spec)]
        if len(matches) > 1:
            raise UsageError(f"revision {spec!r} is ambiguous: {', '.join(matches)}")
        raise UsageError(f"unknown revision {spec!r}; `chatdb migrate history` lists them")

    def refusals(self, revisions: Iterable[str]) -> list[tuple[str, str]]:
        """(revision, its DOWNGRADE_REFUSAL query) of the revisions that have one, in order."""
        found = (
            (r, getattr(self.script.get_revision(r).module, "DOWNGRADE_REFUSAL", None)) for r in revisions
        )
        return [(revision, query) for revision, query in found if query]

    def run(
        self, run_config: Config, action: str, target: str, *, sql: bool = False, start: str | None = None
    ) -> None:
        """What ``alembic.command.<action>(run_config, target)`` does ("upgrade",
        "downgrade" or "stamp"; ``start:target`` with ``sql``), with this chain's scripts
        instead of reading them again. The steps come from the same ``ScriptDirectory``
        methods the commands hand to their environment."""
        from alembic.runtime.environment import EnvironmentContext

        script = self.script
        steps: dict[str, Callable[[Any, MigrationContext], Any]] = {
            "upgrade": lambda current, _context: script._upgrade_revs(target, current),
            "downgrade": lambda current, _context: script._downgrade_revs(target, current),
            "stamp": lambda current, _context: script._stamp_revs((target,), current),
        }
        destination: str | tuple[str, ...] = (target,) if action == "stamp" else target
        with EnvironmentContext(
            run_config, script, fn=steps[action], as_sql=sql, starting_rev=start, destination_rev=destination
        ):
            script.run_env()


@functools.cache
def load() -> Chain:
    """The chain, read the first time a command asks for it. The scripts do not change
    under a running chatdb, so the process keeps what it read."""
    from alembic.script import ScriptDirectory

    return Chain(ScriptDirectory.from_config(config()))

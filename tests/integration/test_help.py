"""What `--help` shows: the commands in the order a user meets them, each paragraph flowed to
the terminal's width, no type label beside a flag, an option or an argument, and a listing's summary
that is the command's own first paragraph. No database is needed."""

from __future__ import annotations

import itertools
import re

import pytest

#: README, "Commands": the order `chatdb --help` lists them in.
ORDER = [
    "migrate",
    "seed",
    "archive",
    "purge",
    "verify-indexes",
    "status",
    "grants",
    "doctor",
    "bench",
    "embedded",
]
GROUPS = {
    "migrate": ["up", "down", "status", "history", "stamp", "sql"],
    "archive": ["restore"],
    "embedded": ["stop", "url"],
}
EVERY_COMMAND = [
    [],
    *([name] for name in ORDER),
    *([group, sub] for group, subs in GROUPS.items() for sub in subs),
]
ids = " ".join


def help_of(cli, command: list[str], columns: int) -> str:
    result = cli(*command, "--help", env={"COLUMNS": str(columns)})
    assert result.exit_code == 0, result.output
    return result.stdout


def listing(text: str) -> dict[str, str]:
    """The Commands panel: each command and its summary, continuation rows joined."""
    rows: dict[str, str] = {}
    name = ""
    for line in text[text.index("─ Commands ─") :].splitlines()[1:]:
        cells = line.strip("│ ").split(maxsplit=1)
        if not cells or line.startswith("╰"):
            continue
        if line.startswith("│ ") and not line.startswith("│  "):
            name = cells[0]
            rows[name] = cells[1] if len(cells) > 1 else ""
        else:
            rows[name] += " " + " ".join(cells)
    return rows


def description(text: str) -> list[str]:
    """The lines between the usage line and the first panel: the command's help."""
    body = text[text.index("Usage:") :].split("╭", 1)[0]
    return [line.strip() for line in body.splitlines()[1:]]


def test_the_commands_are_listed_in_the_order_a_user_meets_them(cli):
    assert list(listing(help_of(cli, [], 200))) == ORDER


@pytest.mark.parametrize("group", GROUPS, ids=str)
def test_a_groups_subcommands_are_listed_in_their_order(cli, group):
    assert list(listing(help_of(cli, [group], 200))) == GROUPS[group]


@pytest.mark.parametrize("command", [[], *([name] for name in GROUPS)], ids=ids)
def test_a_listing_shows_each_commands_own_first_paragraph(cli, command):
    for name, summary in listing(help_of(cli, command, 1000)).items():
        own = [line for line in description(help_of(cli, [*command, name], 1000)) if line]
        assert own[0] == summary, name


@pytest.mark.parametrize("command", EVERY_COMMAND, ids=ids)
def test_paragraphs_are_flowed_and_wrapped_at_the_terminals_width(cli, command):
    """At a width no paragraph needs, every paragraph is one line: no hard line break of
    a docstring reaches the help. At 80 columns, lines wrap there."""
    wide = description(help_of(cli, command, 1000))
    for above, below in itertools.pairwise(wide):
        assert not (above and below), f"one paragraph on two lines:\n{above}\n{below}"
    assert sum(map(len, wide)) > 40
    assert all(len(line) <= 80 for line in help_of(cli, command, 80).splitlines())


#: A type label as Typer writes one: <str>, <int>, <bool>, <float>, <path>, <list[str]>, <int range>.
TYPE_LABEL = re.compile(r"<[a-z][\w \[\]|,.]*>")


@pytest.mark.parametrize("columns", [80, 200])
@pytest.mark.parametrize("command", EVERY_COMMAND, ids=ids)
def test_no_type_label_beside_an_option(cli, command, columns):
    """A flag takes no value and shows none; an option that takes one names it (URL,
    DURATION, N) instead of Typer's <str>, <int>, <bool>."""
    text = help_of(cli, command, columns)
    options = text[text.index("─ Options ─") :].split("╰", 1)[0]
    assert "--help" in options
    for row in options.splitlines()[1:]:
        assert not TYPE_LABEL.search(row), row


@pytest.mark.parametrize("columns", [80, 200])
@pytest.mark.parametrize("command", EVERY_COMMAND, ids=ids)
def test_no_type_label_anywhere_in_the_help(cli, command, columns):
    """Nor beside an argument (`migrate down REVISION`), nor anywhere else in the help."""
    text = help_of(cli, command, columns)
    assert not TYPE_LABEL.search(text), TYPE_LABEL.search(text)


@pytest.mark.parametrize("command", [["migrate", "down"], ["migrate", "stamp"]], ids=ids)
def test_an_argument_shows_its_name_and_help_without_a_type_label(cli, command):
    text = help_of(cli, command, 200)
    arguments = text[text.index("─ Arguments ─") :].split("╰", 1)[0]
    (row,) = [line for line in arguments.splitlines()[1:] if "revision" in line]
    assert re.search(r"revision +[A-Z]", row), row
    assert not TYPE_LABEL.search(row), row

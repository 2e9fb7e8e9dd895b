"""How verify-indexes compares two indexes, on facts written by hand: what it says differs
between a declared index and a live one, and which index makes another one redundant."""

from __future__ import annotations

import dataclasses

import pytest

from chatdb.index_facts import IndexFacts, KeyColumn, definition_differences, duplicate_of, prefix_of


def key(name: str, *, descending: bool = False, nulls_first: bool | None = None, **facts) -> KeyColumn:
    """A key column with the defaults PostgreSQL gives it: NULLS LAST ascending, NULLS FIRST
    descending."""
    return KeyColumn(
        definition=facts.pop("definition", name),
        column=name,
        opclass=facts.pop("opclass", "uuid_ops"),
        collation=facts.pop("collation", None),
        descending=descending,
        nulls_first=descending if nulls_first is None else nulls_first,
    )


def index(name: str = "idx_messages_conversation_created", *keys: KeyColumn, **facts) -> IndexFacts:
    return IndexFacts(
        table=facts.pop("table", "messages"),
        name=name,
        method=facts.pop("method", "btree"),
        unique=facts.pop("unique", False),
        constraint_kind=facts.pop("constraint_kind", None),
        constraint_name=facts.pop("constraint_name", None),
        keys=keys or (key("conversation_id"), key("created_at", descending=True, opclass="timestamptz_ops")),
        include=facts.pop("include", ()),
        predicate=facts.pop("predicate", None),
        valid=facts.pop("valid", True),
        ready=facts.pop("ready", True),
    )


DECLARED = index()


def test_the_same_definition_has_no_difference():
    assert definition_differences(DECLARED, index()) == []
    # Validity is a check of its own, not a difference of definition.
    assert definition_differences(DECLARED, index(valid=False, ready=False)) == []


@pytest.mark.parametrize(
    ("live", "said"),
    [
        (index(method="hash"), ["access method hash, expected btree"]),
        (
            index("i", key("created_at", descending=True, opclass="timestamptz_ops"), key("conversation_id")),
            [
                "key columns in another order: (created_at DESC, conversation_id), "
                "expected (conversation_id, created_at DESC)"
            ],
        ),
        (
            index("i", key("conversation_id")),
            ["key columns: (conversation_id), expected (conversation_id, created_at DESC)"],
        ),
        (
            # Each with its direction's default NULLS order: only the direction differs.
            index("i", key("conversation_id"), key("created_at", opclass="timestamptz_ops")),
            ["created_at ASC, expected DESC"],
        ),
        (
            index(
                "i",
                key("conversation_id"),
                key("created_at", descending=True, nulls_first=False, opclass="timestamptz_ops"),
            ),
            ["created_at NULLS LAST, expected NULLS FIRST"],
        ),
        (
            index("i", key("conversation_id"), key("created_at", descending=True, opclass="timestamp_ops")),
            ["created_at operator class timestamp_ops, expected timestamptz_ops"],
        ),
        (
            index(
                "i",
                key("conversation_id"),
                key("created_at", descending=True, opclass="timestamptz_ops", collation='"C"'),
            ),
            ['created_at collation "C", expected none'],
        ),
        (index(include=("role",)), ["INCLUDE (role), expected no INCLUDE columns"]),
        (
            index(predicate="(deleted_at IS NULL)"),
            ["partial WHERE (deleted_at IS NULL), expected no predicate"],
        ),
        (index(unique=True), ["UNIQUE, expected not unique"]),
        (
            index(unique=True, constraint_kind="u", constraint_name="uq_x"),
            ["UNIQUE, expected not unique", "enforces UNIQUE uq_x, expected no constraint"],
        ),
    ],
)
def test_each_difference_is_named_with_both_sides(live, said):
    assert definition_differences(DECLARED, live) == said


def test_the_summary_reads_like_the_definition():
    partial = index(include=("role",), predicate="(deleted_at IS NULL)", unique=True)
    assert partial.summary == (
        "UNIQUE btree (conversation_id, created_at DESC) INCLUDE (role) WHERE (deleted_at IS NULL)"
    )
    primary = index(
        "messages_pkey", key("id"), unique=True, constraint_kind="p", constraint_name="messages_pkey"
    )
    assert primary.enforces == "PRIMARY KEY messages_pkey"
    assert index().enforces is None


def test_an_exact_duplicate_names_the_index_to_keep():
    declared = {"idx_messages_conversation_created"}
    kept = index()
    copy = index("idx_copy")
    assert duplicate_of(copy, [kept, copy], declared) == kept
    assert duplicate_of(kept, [kept, copy], declared) is None  # the declared one is kept
    assert duplicate_of(copy, [dataclasses.replace(kept, valid=False), copy], declared) is None
    enforcing = index("uq", unique=True, constraint_kind="u", constraint_name="uq")
    assert duplicate_of(enforcing, [index("plain", unique=True), enforcing], set()) is None


def test_a_left_prefix_is_redundant_only_where_the_wider_index_serves_the_same_queries():
    wider = index()
    prefix = index("idx_messages_conversation_id", key("conversation_id"))
    assert prefix_of(prefix, [wider, prefix], set()) == wider
    assert prefix_of(wider, [wider, prefix], set()) is None
    # Not when it is unique, enforces a constraint, has another predicate, or includes a
    # column the wider one does not hold; nor against an invalid or another kind of index.
    for narrower in (
        dataclasses.replace(prefix, unique=True),
        dataclasses.replace(prefix, constraint_kind="p", constraint_name="pk"),
        dataclasses.replace(prefix, predicate="(deleted_at IS NULL)"),
        dataclasses.replace(prefix, include=("role",)),
    ):
        assert prefix_of(narrower, [wider, narrower], set()) is None, narrower
    for other in (dataclasses.replace(wider, valid=False), dataclasses.replace(wider, method="hash")):
        assert prefix_of(prefix, [other, prefix], set()) is None, other
    covering = dataclasses.replace(wider, include=("role",))
    assert prefix_of(dataclasses.replace(prefix, include=("role",)), [covering], set()) == covering
    # A different direction on the shared column is another index.
    flipped = index("i", key("conversation_id", descending=True))
    assert prefix_of(flipped, [wider, flipped], set()) is None

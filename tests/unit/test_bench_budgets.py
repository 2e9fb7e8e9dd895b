"""The mix and the budgets are parsed and shown without a database library
(``chatdb.bench.budgets``); the patterns they name are the ones ``workload`` compiles."""

from __future__ import annotations

from chatdb.bench import budgets, workload
from chatdb.defaults import DEFAULT_MIX


def test_the_patterns_a_mix_can_name_are_those_bench_compiles():
    assert tuple(workload.WORKLOADS) == budgets.PATTERNS
    assert set(DEFAULT_MIX) == set(workload.WORKLOADS)


def test_every_default_budget_is_of_a_pattern_of_the_default_mix():
    assert {b.pattern for b in budgets.DEFAULT_BUDGETS} <= set(DEFAULT_MIX)
    assert budgets.parse_mix(budgets.mix_text(DEFAULT_MIX)) == DEFAULT_MIX

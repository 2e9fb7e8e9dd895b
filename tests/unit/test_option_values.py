"""chatdb converts its options' plain values without pydantic (``chatdb.cli.values``): for
every parameter of every command, each value it converts itself comes out exactly as
Typer's own conversion makes it (equal, of the same type), and each value Typer refuses
is left to Typer, so that the error is Typer's."""

from __future__ import annotations

import importlib
import math
from pathlib import Path
from typing import Any

import pytest
from typer._click import Context
from typer._click.exceptions import BadParameter
from typer._coercion import build_runtime_param
from typer.core import TyperArgument, TyperOption
from typer.main import get_command

from chatdb.cli import root, values

SAMPLES: dict[Any, list[Any]] = {
    str: ["x", "", " spaced ", "30d", "é", "\udcff", "١٢", "0"],
    int: [
        *("0", "1", "8", "9", "007", "10", "1000", "-1", "+5", " 5", "5 ", "1_000", "١٢", "1.0", "x", ""),
        *(0, 1, 5, 1000),
    ],
    float: ["0", "5", "5.5", "0.1", "-1", "1e3", "inf", "nan", ".5", "5.", " 5", "x", "٣", 10.0, 10, 0, 0.5],
    bool: [True, False],
    list[str]: [(), ("a",), ["a", "b"], ("a", "\udcff"), ("", " x ")],
    Path: ["x", "/tmp", "-"],
}


def _commands() -> list[tuple[str, Any]]:
    found = []
    for entry in root.COMMANDS:
        command = get_command(importlib.import_module(f"chatdb.cli.{entry.module}").app)
        found.append((entry.name, command))
        for name, sub in getattr(command, "commands", {}).items():
            found.append((f"{entry.name} {name}", sub))
    return found


PARAMETERS = [
    (f"{name} {param.name}", command, param)
    for name, command in _commands()
    for param in command.params
    if isinstance(param, (TyperOption, TyperArgument))
]


def _same(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


@pytest.mark.parametrize(("label", "command", "param"), PARAMETERS, ids=[p[0] for p in PARAMETERS])
def test_a_plain_value_converts_as_typer_converts_it(label, command, param):
    descriptor = param.type_descriptor
    samples = SAMPLES[descriptor.annotation]
    ctx = Context(command)
    typer_side = build_runtime_param(descriptor)
    decided = 0
    for value in samples:
        try:
            expected: Any = typer_side.coerce(value, param=param, ctx=ctx)
            refused = False
        except BadParameter:
            refused = True
        ours = values.plain_value(descriptor.annotation, descriptor, value)
        if ours is values.UNDECIDED:
            continue
        decided += 1
        assert not refused, f"{label}: {value!r} is refused by Typer, converted by chatdb to {ours!r}"
        assert _same(ours, expected), f"{label}: {value!r} -> {ours!r}, Typer: {expected!r}"
    if descriptor.annotation is not Path:
        assert decided, f"{label}: no plain value of {descriptor.annotation} was converted here"


def test_every_parameter_of_every_command_gets_the_plain_conversion():
    """The conversion is installed on the parameters Typer parses (its command classes'
    ``get_params``): none keeps Typer's pydantic conversion."""
    for _, command, param in PARAMETERS:
        command.get_params(Context(command))
        assert isinstance(param._runtime_param, values.PlainValues)

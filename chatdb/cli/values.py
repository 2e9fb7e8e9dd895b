"""Option values converted without pydantic.

Typer (0.29) converts the value of every option a command declares through a pydantic
TypeAdapter, built as the command parses its arguments: importing pydantic and building
the adapters is about a tenth of a second of every command's start, more than chatdb's
own modules. chatdb's options take plain values: a string, a whole or decimal number
within its bounds, a flag, a repeated string. Those convert here to exactly what Typer
makes of them (``tests/unit/test_option_values.py`` holds the two alike, value by value,
for every option of every command). Anything else, a path, a number out of its bounds or
written another way, goes to Typer's own conversion, built only then: its checks and its
error messages are Typer's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, get_args, get_origin

from typer._coercion import RuntimeParam, TypeDescriptor, build_runtime_param
from typer.core import TyperArgument, TyperOption

if TYPE_CHECKING:
    from typer._click import Context, Parameter
    from typer.core import _TyperParameter

#: What Typer would convert the same way: ASCII digits (another script's digits, a sign,
#: an exponent or spaces go to Typer, which decides).
_WHOLE = re.compile(r"[0-9]+", re.ASCII)
_DECIMAL = re.compile(r"[0-9]+(?:\.[0-9]+)?", re.ASCII)
_SURROGATE = re.compile("[\ud800-\udfff]")
#: Not a plain value: Typer's conversion decides.
UNDECIDED = object()


def plain_value(annotation: Any, descriptor: TypeDescriptor, value: Any) -> Any:
    """``value`` converted as Typer converts it for ``annotation``, or UNDECIDED."""
    info = descriptor.parameter_info
    if annotation is str:
        # A string that cannot be encoded (bytes of argv that are not UTF-8) is Typer's.
        return value if type(value) is str and not _SURROGATE.search(value) else UNDECIDED
    if annotation is bool:
        return value if type(value) is bool else UNDECIDED
    if annotation is int or annotation is float:
        written = _WHOLE if annotation is int else _DECIMAL
        numeric = type(value) is int or (annotation is float and type(value) is float)
        if not (numeric or (type(value) is str and written.fullmatch(value))):
            return UNDECIDED
        number = annotation(value)
        if getattr(info, "clamp", False):
            return UNDECIDED
        if (info.min is not None and number < info.min) or (info.max is not None and number > info.max):
            return UNDECIDED
        return number
    if get_origin(annotation) is list and get_args(annotation) == (str,) and isinstance(value, (list, tuple)):
        items = [plain_value(str, descriptor, item) for item in value]
        return items if all(item is not UNDECIDED for item in items) else UNDECIDED
    return UNDECIDED


@dataclass(frozen=True)
class PlainValues(RuntimeParam):
    """A parameter's conversion: plain values here, the rest by Typer's own."""

    descriptor: TypeDescriptor

    def _coerce_value(self, value: Any, param: _TyperParameter, ctx: Context) -> Any:
        converted = plain_value(self.annotation, self.descriptor, value)
        if converted is not UNDECIDED:
            return converted
        return build_runtime_param(self.descriptor)._coerce_value(value, param=param, ctx=ctx)


def convert_plainly(params: list[Parameter]) -> None:
    """Give each of a command's parameters the conversion above, once."""
    for param in params:
        if isinstance(param, (TyperOption, TyperArgument)) and param._runtime_param is None:
            descriptor = param.type_descriptor
            param._runtime_param = PlainValues(
                annotation=descriptor.annotation,
                parameter_info=descriptor.parameter_info,
                descriptor=descriptor,
            )

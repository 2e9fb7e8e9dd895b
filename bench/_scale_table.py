"""The table bench_scale.py prints: each figure at each size, the largest/smallest ratio,
and what it should be (linear in the data, flat, a rate, a count that should be 0)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Row:
    command: str
    figure: str
    unit: str  # s, /s, bytes, ms, count, x
    expect: str  # linear, flat, rate, count, aim, info
    values: dict[int, float] = field(default_factory=dict)
    aim: float = 1.2

    def shown(self, value: float | None) -> str:
        if value is None:
            return "-"
        if self.unit == "s":
            return f"{value:.2f} s"
        if self.unit == "/s":
            return f"{value:,.0f}/s"
        if self.unit == "bytes":
            return f"{value / 2**30:.2f} GB" if value >= 2**30 else f"{value / 2**20:.0f} MB"
        if self.unit == "ms":
            return f"{value * 1000:.2f} ms" if value < 0.01 else f"{value * 1000:.0f} ms"
        if self.unit == "bytes/s":
            return f"{value / 2**20:,.0f} MB/s"
        if self.unit == "x":
            return f"{value:.2f}x"
        return f"{value:,.0f}"


class Table:
    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], Row] = {}

    def add(self, command: str, figure: str, unit: str, expect: str, size: int, value: float, **kw) -> None:
        row = self.rows.setdefault((command, figure), Row(command, figure, unit, expect, **kw))
        row.values[size] = value

    def print(self, sizes: list[int]) -> None:
        factor = sizes[-1] / sizes[0]
        header = ["command", "figure", *(f"{size:,}" for size in sizes)]
        lines = []
        for row in self.rows.values():
            cells = [row.command, row.figure, *(row.shown(row.values.get(size)) for size in sizes)]
            first, last = row.values.get(sizes[0]), row.values.get(sizes[-1])
            ratio, verdict, flag = "-", "", ""
            comparable = len(sizes) > 1 and first and last is not None
            if row.expect in ("linear", "flat", "rate") and comparable:
                value = last / first
                ratio = f"{value:.2f}x"
                if row.expect == "linear":
                    verdict = f"linear (~{factor:g}x ok)"
                    flag = "  <- more than linear" if value > 1.5 * factor else ""
                elif row.expect == "flat":
                    verdict = f"flat (aim <= {row.aim:g}x)"
                    flag = "  <- over" if value > row.aim else ""
                else:
                    verdict = "rate of linear work (~1x)"
                    flag = "  <- slower" if value < 1 / 1.5 else ""
            elif row.expect == "flat":
                verdict = f"flat (aim <= {row.aim:g}x)"
            elif row.expect == "count":
                verdict = "aim 0"
                flag = "  <- over" if any(row.values.values()) else ""
            elif row.expect == "aim":
                verdict = f"aim >= {row.aim:.1f}x"
                flag = "  <- under" if any(v < row.aim for v in row.values.values()) else ""
            lines.append([*cells, ratio, verdict + flag])
        header += [f"{sizes[-1]:,}/{sizes[0]:,}", "expected"]
        widths = [max(len(line[i]) for line in [header, *lines]) for i in range(len(header))]

        def render(line: list[str]) -> str:
            return "  ".join(
                cell.ljust(width) if i in (0, 1, len(line) - 1) else cell.rjust(width)
                for i, (cell, width) in enumerate(zip(line, widths, strict=True))
            ).rstrip()

        print(render(header))
        print("  ".join("-" * width for width in widths))
        for line in lines:
            print(render(line))

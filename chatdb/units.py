"""How chatdb writes byte sizes, for the data layer and the CLI alike (no database import)."""

from __future__ import annotations

from rich import filesize

_SIZE_SUFFIXES = ["B", "kB", "MB", "GB", "TB"]


def size(count: float | None) -> str:
    """Bytes as pg_size_pretty writes them (1024-based units), one decimal: "512 B", "1.5 MB", "12.0 GB"."""
    if count is None:
        return "?"
    unit, suffix = filesize.pick_unit_and_suffix(int(abs(count)), _SIZE_SUFFIXES, 1024)
    return f"{count / unit:.{0 if unit == 1 else 1}f} {suffix}"

"""Growth: from the size history each ``status`` and ``doctor`` run records
(``chatdb.size_history``), doctor turns the history into growth per day and per week, charts,
and the date a size limit will be reached."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field

from chatdb.doctor.model import FAIL, OK, SKIPPED, WARN, Finding, duration, size
from chatdb.doctor.probe import Probe
from chatdb.size_history import HISTORY, tracked_tables

#: The chart's days and weeks, and the span the projection is fitted over.
CHART_DAYS = 14
CHART_WEEKS = 8
FIT_DAYS = 28
#: The database's own row in the history (``table_name`` NULL), as findings name it.
DATABASE = None


@dataclass(frozen=True)
class Sample:
    at: dt.datetime
    total_bytes: int
    rows: int | None


@dataclass(frozen=True)
class Point:
    """One bar of a chart: the size at the end of a day or week, and its change."""

    label: str  # "2026-11-30" or "2026-W48"
    total_bytes: int
    change: int | None


@dataclass
class Growth:
    """The whole database's growth, for the charts and the projection."""

    now: dt.datetime
    daily: list[Point] = field(default_factory=list)
    weekly: list[Point] = field(default_factory=list)
    per_day: float | None = None  # bytes per day, fitted over FIT_DAYS
    size_limit: int | None = None
    reaches_limit: dt.datetime | None = None
    samples: int = 0


#: Samples per table (None: the database as a whole).
Series = dict[str | None, list[Sample]]


def _series(probe: Probe) -> tuple[dt.datetime, Series, dict[str | None, dt.datetime]]:
    """The last sample of each day (UTC) of the last weeks, per table, oldest first; and
    when each table's first sample of those weeks was recorded."""
    now = probe.scalar("SELECT now()")
    rows = probe.rows(
        "SELECT DISTINCT ON (table_name, day) table_name, recorded_at, total_bytes, row_estimate,"
        "  min(recorded_at) OVER (PARTITION BY table_name) AS first_at"
        " FROM (SELECT h.*, (h.recorded_at AT TIME ZONE 'UTC')::date AS day"
        f"  FROM {HISTORY} h WHERE h.recorded_at >= now() - make_interval(days => :days)) h"
        " ORDER BY table_name, day, recorded_at DESC",
        days=7 * CHART_WEEKS + 1,
    )
    series: Series = {}
    first: dict[str | None, dt.datetime] = {}
    for row in rows:
        series.setdefault(row.table_name, []).append(
            Sample(row.recorded_at, int(row.total_bytes), row.row_estimate)
        )
        first[row.table_name] = row.first_at
    for samples in series.values():
        samples.sort(key=lambda sample: sample.at)
    return now, series, first


def _change(samples: Sequence[Sample], days: float) -> tuple[float, float] | None:
    """(bytes, rows) gained over ``days``, from the newest sample back to the newest one at
    least that old (scaled to exactly ``days``); None without such a sample."""
    latest = samples[-1]
    base = next((s for s in reversed(samples) if s.at <= latest.at - dt.timedelta(days=days)), None)
    if base is None:
        return None
    scale = days * 86400 / (latest.at - base.at).total_seconds()
    rows = ((latest.rows or 0) - (base.rows or 0)) * scale
    return (latest.total_bytes - base.total_bytes) * scale, rows


def _fit(samples: Sequence[Sample], now: dt.datetime) -> float | None:
    """Bytes per day by least squares over the last FIT_DAYS; None with less than a day."""
    recent = [s for s in samples if s.at >= now - dt.timedelta(days=FIT_DAYS)]
    if len(recent) < 2 or (recent[-1].at - recent[0].at) < dt.timedelta(days=1):
        return None
    xs = [(s.at - recent[0].at).total_seconds() / 86400 for s in recent]
    ys = [float(s.total_bytes) for s in recent]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / spread


def _chart(samples: Sequence[Sample], now: dt.datetime) -> tuple[list[Point], list[Point]]:
    daily: list[Point] = []
    by_day = {s.at.astimezone(dt.UTC).date(): s for s in samples}
    today = now.astimezone(dt.UTC).date()
    for offset in range(CHART_DAYS - 1, -1, -1):
        day = today - dt.timedelta(days=offset)
        if day in by_day:
            before = by_day.get(day - dt.timedelta(days=1))
            change = by_day[day].total_bytes - before.total_bytes if before else None
            daily.append(Point(day.isoformat(), by_day[day].total_bytes, change))
    weeks: dict[tuple[int, int], Sample] = {}
    for sample in samples:
        weeks[sample.at.astimezone(dt.UTC).isocalendar()[:2]] = sample  # the last of each week
    keys = sorted(weeks)[-CHART_WEEKS:]
    weekly = []
    for key in keys:
        monday = dt.date.fromisocalendar(key[0], key[1], 1)
        before = weeks.get((monday - dt.timedelta(days=7)).isocalendar()[:2])
        change = weeks[key].total_bytes - before.total_bytes if before else None
        weekly.append(Point(f"{key[0]}-W{key[1]:02d}", weeks[key].total_bytes, change))
    return daily, weekly


def _rate(change: float) -> str:
    return f"{'+' if change >= 0 else '-'}{size(abs(change))}"


def growth(probe: Probe, recorded: bool) -> tuple[list[Finding], Growth | None]:
    limit = probe.options.size_limit
    if HISTORY not in probe.tables:
        return [
            Finding(
                "growth",
                None,
                "growth",
                SKIPPED,
                detail=f"the database has no {HISTORY} table yet: run `chatdb migrate`",
            )
        ], None
    now, series, first_at = _series(probe)
    found = []
    note = (
        ""
        if recorded
        else f" (this run could not record a sample: role {probe.user} may not INSERT into {HISTORY},"
        " or the database is read-only)"
    )
    if not series:
        found.append(
            Finding(
                "growth",
                probe.database,
                "growth",
                OK,
                detail=f"no sample in {HISTORY} yet; each status and doctor run records one{note}",
                unit="bytes",
            )
        )
    order = [DATABASE, *tracked_tables()]
    for name in (n for n in order if n in series):
        samples = series[name]
        latest = samples[-1]
        day, week = _change(samples, 1), _change(samples, 7)
        object_ = probe.database if name is None else name
        parts = []
        if day is not None:
            parts.append(f"{_rate(day[0])}/day")
        if week is not None:
            parts.append(f"{_rate(week[0])}/week")
        if not parts and name is DATABASE:
            since = duration((now - first_at[name]).total_seconds())
            parts.append(
                f"not enough history yet for growth (samples since {since} ago; each status and"
                " doctor run records one, and a day of them shows growth)"
            )
        rows = ""
        if name is not None and latest.rows is not None:
            rows = f", ~{latest.rows:,} {'row' if latest.rows == 1 else 'rows'}"
            if day is not None:
                rows += f" ({'+' if day[1] >= 0 else '-'}{abs(day[1]):,.0f}/day)"
        found.append(
            Finding(
                "growth",
                object_,
                "growth",
                OK,
                round(day[0]) if day is not None else None,
                None,
                f"{size(latest.total_bytes)} now{rows}"
                + "".join(f"; {part}" for part in parts[:1])
                + "".join(f", {part}" for part in parts[1:])
                + (note if name is None else ""),
                unit="bytes",
            )
        )
    database = series.get(DATABASE, [])
    result = Growth(now, samples=sum(len(s) for s in series.values()), size_limit=limit)
    if database:
        result.daily, result.weekly = _chart(database, now)
        result.per_day = _fit(database, now)
    if limit is not None:
        found.append(_limit(probe, database, result, limit))
    return found, result


def _limit(probe: Probe, database: list[Sample], result: Growth, limit: int) -> Finding:
    days = probe.thresholds.size_limit_days
    current = (
        database[-1].total_bytes
        if database
        else int(probe.scalar("SELECT pg_database_size(current_database())"))
    )
    fix = (
        "-- chatdb archive and chatdb purge move and delete old conversations (the retention area says how"
        " many); VACUUM makes their space reusable, pg_repack gives it back (see the bloat area)"
    )

    def judged(status: str, detail: str) -> Finding:
        shown = fix if status != OK else None
        return Finding("growth", probe.database, "size limit", status, current, limit, detail, shown, "bytes")

    if current >= limit:
        return judged(FAIL, f"{size(current)}: past the limit of {size(limit)}")
    per_day = result.per_day
    if per_day is None:
        return judged(
            OK, f"{size(current)} of {size(limit)}; not enough history to project (a day of samples at least)"
        )
    if per_day <= 0:
        return judged(
            OK,
            f"{size(current)} of {size(limit)}; not growing"
            f" ({_rate(per_day)}/day over the last {FIT_DAYS} days)",
        )
    left = (limit - current) / per_day
    result.reaches_limit = result.now + dt.timedelta(days=left)
    detail = (
        f"{size(current)} of {size(limit)}; {_rate(per_day)}/day over the last {FIT_DAYS} days: reaches "
        f"{size(limit)} around {result.reaches_limit:%Y-%m-%d} (in {left:,.0f} days)"
    )
    return judged(WARN if left <= days else OK, detail)

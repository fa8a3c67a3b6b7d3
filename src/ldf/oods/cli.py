"""``ldf oods``: the Observatory Operations Data Service's cache, pins and expiry."""

from __future__ import annotations

import getpass
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from ldf.cliutil import console, print_json, settings_from
from ldf.errors import UserInputError

if TYPE_CHECKING:
    from ldf.oods.service import Oods

app = typer.Typer(
    help="Observatory Operations Data Service: the cache of recent data.", no_args_is_help=True
)

Json = Annotated[bool, typer.Option("--json", help="Print JSON.")]
Instrument = Annotated[str | None, typer.Option("--instrument", "-i", help="LSSTCam, LATISS.")]
DayObs = Annotated[int | None, typer.Option("--day-obs", help="Observing day YYYYMMDD.")]
Exposure = Annotated[int | None, typer.Option("--exposure", help="Exposure id.")]
ObsId = Annotated[str | None, typer.Option("--obs-id", help="Observation id.")]


@contextmanager
def _oods(ctx: typer.Context) -> Iterator[Oods]:
    from ldf.oods.service import Oods

    oods = Oods.open(settings_from(ctx))
    try:
        yield oods
    finally:
        oods.close()


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def _time(value: str | None, option: str) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise UserInputError(
            f"{option} takes an ISO time such as 2026-11-21T23:00:00Z, got {value!r}"
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _entries_table(rows: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title)
    for col in ("id", "obs_id", "detector", "type", "dataset", "size", "arrived", "pinned"):
        table.add_column(col, no_wrap=col in ("obs_id", "detector"))
    for r in rows:
        table.add_row(
            str(r["id"]), r["obs_id"], r["detector"], r["obs_type"], r["dataset_type"],
            _human(r["size"]), str(r["arrived_at"])[:19], "yes" if r["pinned"] else "",
        )  # fmt: skip
    return table


@app.command("ls")
def ls(
    ctx: typer.Context,
    instrument: Instrument = None,
    day_obs: DayObs = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="Most exposures.")] = 50,
    as_json: Json = False,
) -> None:
    """Cached exposures, newest first: files, bytes, pinned files."""
    with _oods(ctx) as oods:
        rows = oods.store.exposures(instrument=instrument, day_obs=day_obs, limit=limit)
    if as_json:
        print_json(rows)
        return
    table = Table(title=f"OODS cache ({len(rows)} exposures)")
    for col in ("instrument", "day_obs", "obs_id", "type", "files", "bytes", "pinned", "last"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["instrument"], str(r["day_obs"]), r["obs_id"], r["obs_type"], str(r["files"]),
            _human(r["bytes"]), str(r["pinned_files"] or ""), str(r["last_arrival"])[:19],
        )  # fmt: skip
    console.print(table)


@app.command("find")
def find(
    ctx: typer.Context,
    instrument: Instrument = None,
    day_obs: DayObs = None,
    exposure: Exposure = None,
    obs_id: ObsId = None,
    detector: Annotated[str | None, typer.Option("--detector", help="e.g. R22_S11.")] = None,
    obs_type: Annotated[str | None, typer.Option("--obs-type", help="science, bias…")] = None,
    dataset_type: Annotated[str | None, typer.Option("--dataset-type")] = None,
    since: Annotated[
        str | None, typer.Option("--since", help="Arrived at or after (ISO time, UTC default).")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="Most files.")] = 1000,
    as_json: Json = False,
) -> None:
    """Cached files matching every filter given."""
    with _oods(ctx) as oods:
        entries = oods.find(
            instrument=instrument,
            day_obs=day_obs,
            exposure=exposure,
            obs_id=obs_id,
            detector=detector,
            obs_type=obs_type,
            dataset_type=dataset_type,
            since=_time(since, "--since"),
            limit=limit,
        )
    rows = [e.model_dump(mode="json") for e in entries]
    if as_json:
        print_json(rows)
        return
    console.print(_entries_table(rows, f"{len(rows)} cached files"))


@app.command("get")
def get(
    ctx: typer.Context,
    instrument: Annotated[str, typer.Argument(help="Instrument.")],
    obs_id: Annotated[str, typer.Argument(help="Observation id.")],
    detector: Annotated[str, typer.Argument(help="Detector name.")],
    dest: Annotated[Path, typer.Argument(help="Destination file or directory.")] = Path(),
    as_json: Json = False,
) -> None:
    """Copy a cached file to DEST, verified against its checksum."""
    with _oods(ctx) as oods:
        entry = oods.get(instrument, obs_id, detector)
        target = oods.copy_to(entry, dest)
    if as_json:
        print_json({"path": str(target), "size": entry.size, "checksum": entry.checksum})
        return
    console.print(f"{target} ({_human(entry.size)}, checksum {entry.checksum} verified)")


@app.command("pin")
def pin(
    ctx: typer.Context,
    obs_id: ObsId = None,
    exposure: Exposure = None,
    day_obs: DayObs = None,
    instrument: Instrument = None,
    reason: Annotated[str, typer.Option("--reason", help="Why (shown in status).")] = "",
    by: Annotated[str | None, typer.Option("--by", help="Who (default: login name).")] = None,
    as_json: Json = False,
) -> None:
    """Pin files (by obs_id, exposure or day_obs) so they never expire."""
    with _oods(ctx) as oods:
        p = oods.pin(
            obs_id=obs_id,
            exposure=exposure,
            day_obs=day_obs,
            instrument=instrument,
            reason=reason,
            by=by or getpass.getuser(),
        )
    if as_json:
        print_json(p.model_dump(mode="json"))
        return
    console.print(f"pinned {p.describe()}: {p.files} cached files")


@app.command("unpin")
def unpin(
    ctx: typer.Context,
    obs_id: ObsId = None,
    exposure: Exposure = None,
    day_obs: DayObs = None,
    instrument: Instrument = None,
    as_json: Json = False,
) -> None:
    """Remove a pin (the same selector it was made with)."""
    with _oods(ctx) as oods:
        removed = oods.unpin(
            obs_id=obs_id, exposure=exposure, day_obs=day_obs, instrument=instrument
        )
    if as_json:
        print_json({"removed": removed})
        return
    console.print(f"removed {removed} pin(s)")


@app.command("expire")
def expire(
    ctx: typer.Context,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Report; remove nothing.")] = False,
    now: Annotated[
        str | None, typer.Option("--now", help="Pretend it is this time (ISO, UTC default).")
    ] = None,
    as_json: Json = False,
) -> None:
    """Remove files past their retention window (never pinned or leased ones)."""
    with _oods(ctx) as oods:
        report = oods.expire(now=_time(now, "--now"), dry_run=dry_run)
    if as_json:
        print_json(report.as_dict())
        return
    verb = "would remove" if dry_run else "removed"
    console.print(
        f"{verb} {report.removed} files ({_human(report.bytes)}); kept {report.kept_pinned} "
        f"pinned, {report.kept_leased} being read"
    )
    for error in report.errors:
        console.print(f"[red]error:[/red] {error}")


@app.command("status")
def status(ctx: typer.Context, as_json: Json = False) -> None:
    """What the cache holds per instrument and dataset type, pins, free disk."""
    with _oods(ctx) as oods:
        st = oods.status()
    if as_json:
        print_json(st)
        return
    console.print(
        f"OODS at {st['root']}: {st['files']} files, {_human(st['bytes'])}; "
        f"free {_human(st['free_bytes'])}; {st['pinned_files']} pinned; "
        f"{st['active_leases']} being read"
    )
    table = Table()
    for col in ("instrument", "dataset", "files", "bytes", "oldest", "newest", "keep days"):
        table.add_column(col)
    for c in st["classes"]:
        days = st["retention_days"]
        keep = days.get(f"{c['instrument']}/{c['dataset_type']}", days.get(c["dataset_type"]))
        table.add_row(
            c["instrument"], c["dataset_type"], str(c["files"]), _human(c["bytes"]),
            str(c["oldest"])[:19], str(c["newest"])[:19], "forever" if keep is None else str(keep),
        )  # fmt: skip
    console.print(table)
    for p in st["pin_list"]:
        console.print(f"pin {p['id']}: {_describe(p)} by {p['pinned_by']}: {p['reason']}")


def _describe(pin: dict[str, Any]) -> str:
    from ldf.oods.models import Pin

    return Pin.model_validate(pin).describe()

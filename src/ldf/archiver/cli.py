"""``ldf archiver``: the archivers' queues, status and offline catch-up."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from ldf.cliutil import console, err_console, print_json, settings_from
from ldf.errors import UserInputError

if TYPE_CHECKING:
    from ldf.archiver.service import Archiver

app = typer.Typer(help="Camera archivers (LSSTCam, LATISS).", no_args_is_help=True)

Json = Annotated[bool, typer.Option("--json", help="Print JSON.")]
Instrument = Annotated[str, typer.Argument(help="LSSTCam or LATISS.")]


@contextmanager
def _archiver(ctx: typer.Context, instrument: str) -> Iterator[Archiver]:
    from ldf.archiver.service import Archiver

    if instrument not in ("LSSTCam", "LATISS"):
        raise UserInputError(f"unknown instrument {instrument!r}; expected LSSTCam or LATISS")
    arch = Archiver.open(instrument, settings_from(ctx), publish=_print_event)
    try:
        yield arch
    finally:
        arch.close()


def _print_event(name: str, payload: dict[str, object]) -> None:
    if name in ("missingDetector", "archiverAlarm"):
        err_console.print(f"[yellow]{name}[/] {payload}")


@app.command("status")
def status(
    ctx: typer.Context,
    instrument: Annotated[
        str | None, typer.Argument(help="LSSTCam or LATISS (default both).")
    ] = None,
    as_json: Json = False,
) -> None:
    """Queue, exposures, bytes, readout→OODS latency and policies of the archivers."""
    names = [instrument] if instrument else ["LSSTCam", "LATISS"]
    out = []
    for name in names:
        with _archiver(ctx, name) as arch:
            out.append(arch.status())
    if as_json:
        print_json(out)
        return
    table = Table(title="Archivers")
    for col in ("instrument", "exposures", "in OODS", "archived", "flagged", "queue", "p50", "p99"):
        table.add_column(col)
    for st in out:
        lat = st["latency_s"]
        table.add_row(
            st["instrument"],
            f"{st['exposures_complete']}/{st['exposures']}",
            str(st["files_in_oods"]),
            str(st["files_archived"]),
            str(st["flagged"]),
            ", ".join(f"{k} {v}" for k, v in st["jobs"].items()) or "empty",
            f"{lat['p50']} s" if lat["p50"] is not None else "-",
            f"{lat['p99']} s" if lat["p99"] is not None else "-",
        )
    console.print(table)


@app.command("run")
def run(
    ctx: typer.Context,
    instrument: Instrument,
    retry_failed: Annotated[
        bool, typer.Option("--retry-failed", help="Retry failed files.")
    ] = False,
    as_json: Json = False,
) -> None:
    """Catch up offline: archive every readout in the DAQ not yet archived, then stop."""
    with _archiver(ctx, instrument) as arch:
        requeued = arch.store.retry_failed(instrument) if retry_failed else 0
        found = arch.rescan_daq()
        report = arch.run().as_dict()
        data = {"instrument": instrument, "new_exposures": found, "requeued": requeued, **report}
    if as_json:
        print_json(data)
        return
    console.print(
        f"{instrument}: {found} new exposure(s); {data['in_oods']} file(s) to the OODS, "
        f"{data['archived']} archived, {data['retried']} to retry, {data['failed']} failed · "
        f"{data['MB_per_s']} MB/s"
    )
    for e in data["errors"]:
        err_console.print(f"  {e}")

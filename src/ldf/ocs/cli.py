"""``ldf ocs``: see and command the OCS-commandable devices on the bus."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import sys
from collections.abc import Callable
from typing import Annotated

import typer
from rich.table import Table

from ldf.cliutil import console, print_json, settings_from
from ldf.config import Settings
from ldf.ocs.bus import open_bus
from ldf.ocs.models import Ack, DeviceStatus, Message
from ldf.ocs.service import device_events, device_status, parse_params

app = typer.Typer(help="OCS devices: status, commands, events.", no_args_is_help=True)


async def _status(settings: Settings) -> list[DeviceStatus]:
    async with await open_bus(settings.bus, settings.home) as bus:
        return await device_status(bus)


async def _command(
    settings: Settings, device: str, name: str, params: dict[str, object], wait_s: float | None
) -> Ack:
    async with await open_bus(settings.bus, settings.home) as bus:
        return await bus.command(device, name, params, wait_s)


async def _events(
    settings: Settings,
    device: str,
    follow: bool,
    limit: int | None,
    show: Callable[[Message], None],
) -> None:
    async with await open_bus(settings.bus, settings.home) as bus:
        if not follow:
            for message in await device_events(bus, device):
                show(message)
            return
        count = 0
        async with bus.subscribe(f"ocs.{device}.evt.*") as sub:
            async for message in sub:
                show(message)
                count += 1
                if limit is not None and count >= limit:
                    return


def _show_json(message: Message) -> None:
    sys.stdout.write(message.model_dump_json() + "\n")
    sys.stdout.flush()


def _show_text(message: Message) -> None:
    when = dt.datetime.fromtimestamp(message.timestamp, dt.UTC).strftime("%H:%M:%S.%f")[:-3]
    console.print(
        f"{when} {message.device} {message.name} {json.dumps(message.payload)}",
        highlight=False,
        markup=False,
    )


def _age(seconds: float | None) -> str:
    return "never" if seconds is None else f"{seconds:.1f} s ago"


@app.command("status")
def status(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Every device seen on the bus: summary state, last heartbeat, error."""
    rows = asyncio.run(_status(settings_from(ctx)))
    if as_json:
        print_json([r.model_dump(mode="json") for r in rows])
        return
    if not rows:
        console.print("no device has published on the bus yet")
        return
    table = Table("device", "state", "heartbeat", "error")
    for row in rows:
        error = f"{row.error_code}: {row.error_report}" if row.error_code else ""
        table.add_row(row.name, row.state or "?", _age(row.heartbeat_age_s), error)
    console.print(table)


@app.command("command")
def command(
    ctx: typer.Context,
    device: Annotated[str, typer.Argument(help="Device name, e.g. MTCamera.")],
    name: Annotated[
        str, typer.Argument(help="start, enable, disable, standby, exitControl, or the device's.")
    ],
    configuration: Annotated[
        str | None, typer.Option("--configuration", help="start: configuration name.")
    ] = None,
    param: Annotated[
        list[str] | None, typer.Option("--param", "-p", help="Extra parameter key=value.")
    ] = None,
    timeout: Annotated[
        float | None, typer.Option("--timeout", help="Seconds to wait (default: bus setting).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Send a command and wait for the device's acknowledgement."""
    params = parse_params(param or [])
    if configuration is not None:
        params["configuration"] = configuration
    ack = asyncio.run(_command(settings_from(ctx), device, name, params, timeout))
    if as_json:
        print_json({**ack.model_dump(mode="json"), "code": ack.code.name})
    else:
        console.print(f"{device} {name}: done. {ack.result}".rstrip(), highlight=False)


@app.command("events")
def events(
    ctx: typer.Context,
    device: Annotated[str, typer.Argument(help="Device name.")],
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new events.")
    ] = False,
    limit: Annotated[
        int | None, typer.Option("--limit", help="With --follow: stop after N events.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON message per line.")] = False,
) -> None:
    """The latest of each event of a device, or (``--follow``) events as they happen."""
    show = _show_json if as_json else _show_text
    asyncio.run(_events(settings_from(ctx), device, follow, limit, show))

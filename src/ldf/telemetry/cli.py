"""``ldf telemetry``: the Telemetry Gateway's topics, producers, status and audit trail."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from ldf.cliutil import console, err_console, print_json, settings_from
from ldf.errors import UserInputError

if TYPE_CHECKING:
    from ldf.telemetry.service import TelemetryGateway
    from ldf.telemetry.tokens import ProducerFile

app = typer.Typer(
    help="Telemetry Gateway: trusted producers' telemetry into the OCS bus.",
    no_args_is_help=True,
)
producers_app = typer.Typer(help="Producers and their tokens.", no_args_is_help=True)
app.add_typer(producers_app, name="producers")

Json = Annotated[bool, typer.Option("--json", help="Print JSON.")]


@contextmanager
def _gateway(ctx: typer.Context) -> Iterator[TelemetryGateway]:
    from ldf.telemetry.service import TelemetryGateway

    gateway = TelemetryGateway.open(settings_from(ctx))
    try:
        yield gateway
    finally:
        gateway.close()


def _producers(ctx: typer.Context) -> ProducerFile:
    from ldf.telemetry.service import producers_path
    from ldf.telemetry.tokens import ProducerFile

    return ProducerFile(producers_path(settings_from(ctx)))


def _when(value: Any) -> str:
    return "" if value is None else str(value)[:19].replace("T", " ")


@app.command("topics")
def topics(as_json: Json = False) -> None:
    """The topics the gateway accepts."""
    from ldf.telemetry.models import TOPICS

    rows = [
        {"name": s.name, "description": s.description, "bus_topic": f"ocs.<device>.tel.{s.name}"}
        for s in TOPICS.values()
    ]
    if as_json:
        print_json(rows)
        return
    table = Table(title="telemetry topics")
    for col in ("topic", "on the bus", "what"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], r["bus_topic"], r["description"])
    console.print(table)


@app.command("schema")
def schema(topic: Annotated[str, typer.Argument(help="Topic name, e.g. imageQuality.")]) -> None:
    """Print a topic's payload schema (JSON Schema)."""
    from ldf.telemetry.errors import UnknownTopicError
    from ldf.telemetry.models import TOPICS

    if topic not in TOPICS:
        raise UnknownTopicError(f"unknown topic {topic!r}; known: {', '.join(TOPICS)}")
    print_json(TOPICS[topic].schema())


@app.command("status")
def status(ctx: typer.Context, as_json: Json = False) -> None:
    """Per-producer counts, backlog, last injection and errors (from the gateway's database)."""
    with _gateway(ctx) as gateway:
        st = gateway.status()
    if as_json:
        print_json(st.model_dump(mode="json"))
        return
    console.print(
        f"{st.device}: backlog {st.backlog}; {st.rejected_unauthenticated} requests "
        "without a valid token"
    )
    table = Table()
    cols = ("producer", "device", "accepted", "dup", "rejected", "injected", "backlog",
            "last injection", "last error")  # fmt: skip
    for col in cols:
        table.add_column(col)
    for p in st.producers:
        error = f"{_when(p.last_error_at)} {p.last_error}" if p.last_error else ""
        table.add_row(
            p.producer, p.device or "", str(p.accepted), str(p.duplicates), str(p.rejected),
            str(p.injected), str(p.backlog), _when(p.last_injected_at),
            f"[red]{error}[/red]" if p.failing else error,
        )  # fmt: skip
    console.print(table)


@app.command("audit")
def audit(
    ctx: typer.Context,
    producer: Annotated[str | None, typer.Option("--producer", "-p", help="One producer.")] = None,
    outcome: Annotated[
        str | None, typer.Option("--outcome", help="accepted, duplicate or rejected.")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="Most rows.")] = 50,
    as_json: Json = False,
) -> None:
    """The audit trail, newest first."""
    with _gateway(ctx) as gateway:
        rows = gateway.audit(producer=producer, outcome=outcome, limit=limit)
    if as_json:
        print_json([r.model_dump(mode="json") for r in rows])
        return
    table = Table(title=f"telemetry audit ({len(rows)} rows)")
    for col in ("at", "producer", "topic", "message id", "outcome", "status", "injected", "why"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            _when(r.at), r.producer, r.topic or "", r.message_id or "", r.outcome, str(r.status),
            _when(r.injected_at), r.reason,
        )  # fmt: skip
    console.print(table)


@app.command("purge")
def purge(ctx: typer.Context, as_json: Json = False) -> None:
    """Forget injected messages and audit rows older than policies.telemetry.retention_days."""
    with _gateway(ctx) as gateway:
        messages, audits = gateway.purge()
    if as_json:
        print_json({"messages": messages, "audit": audits})
        return
    console.print(f"purged {messages} injected messages and {audits} audit rows")


@app.command("send")
def send(
    topic: Annotated[str, typer.Argument(help="Topic, e.g. imageQuality.")],
    payload: Annotated[str, typer.Argument(help="The payload: JSON, or @file.json.")],
    url: Annotated[
        str, typer.Option("--url", envvar="LDF_TELEMETRY_URL", help="Gateway base URL.")
    ] = "http://127.0.0.1:8022",
    token: Annotated[
        str | None,
        typer.Option("--token", envvar="LDF_TELEMETRY_TOKEN", help="Bearer token (env better)."),
    ] = None,
    message_id: Annotated[
        str | None, typer.Option("--message-id", help="Default: from topic and payload.")
    ] = None,
    as_json: Json = False,
) -> None:
    """Send one message to a gateway, as a producer would."""
    from ldf.errors import TransportError
    from ldf.telemetry.client import TelemetryClient, default_message_id

    if not token:
        raise UserInputError("give the producer's token with --token or LDF_TELEMETRY_TOKEN")
    text = Path(payload[1:]).read_text() if payload.startswith("@") else payload
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise UserInputError(f"payload is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise UserInputError("payload must be a JSON object")
    mid = message_id or default_message_id(topic, data)
    with TelemetryClient(url, token) as client:
        if not client.send(topic, data, message_id=mid):
            raise TransportError(f"the telemetry gateway at {url} cannot take messages now")
    if as_json:
        print_json({"message_id": mid, "sent": True})
        return
    console.print(f"sent {topic} {mid}")


# -- producers ----------------------------------------------------------------------------------


def _producer_row(p: Any) -> dict[str, Any]:
    return {
        "name": p.name,
        "device": p.device,
        "topics": list(p.topics),
        "operator": p.operator,
    }


@producers_app.command("list")
def producers_list(ctx: typer.Context, as_json: Json = False) -> None:
    """The producers (never their tokens: only hashes are kept)."""
    pf = _producers(ctx)
    rows = [_producer_row(p) for p in pf.producers()]
    if as_json:
        print_json(rows)
        return
    table = Table(title=f"telemetry producers ({pf.path})")
    for col in ("name", "device", "topics", "operator"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["name"], r["device"] or "", ", ".join(r["topics"]), "yes" if r["operator"] else ""
        )
    console.print(table)


@producers_app.command("add")
def producers_add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Producer name, e.g. prompt-lsstcam.")],
    device: Annotated[
        str | None, typer.Option("--device", "-d", help="OCS device it publishes as (MTPrompt).")
    ] = None,
    topics: Annotated[
        str, typer.Option("--topics", "-t", help="Comma-separated topics it may send.")
    ] = "",
    operator: Annotated[
        bool, typer.Option("--operator", help="May read status and the audit trail.")
    ] = False,
    as_json: Json = False,
) -> None:
    """Add a producer; prints its new token once (only its hash is kept)."""
    pf = _producers(ctx)
    wanted = [t.strip() for t in topics.split(",") if t.strip()]
    token = pf.add(name, device=device, topics=wanted, operator=operator)
    row = {**_producer_row(pf.get(name)), "token": token, "file": str(pf.path)}
    if as_json:
        print_json(row)
        return
    err_console.print(f"added {name} to {pf.path}; its token (shown only now):")
    typer.echo(token)


@producers_app.command("rotate")
def producers_rotate(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Producer name.")],
    as_json: Json = False,
) -> None:
    """Give a producer a new token (the old one stops working at once)."""
    pf = _producers(ctx)
    token = pf.rotate(name)
    if as_json:
        print_json({**_producer_row(pf.get(name)), "token": token})
        return
    err_console.print(f"new token of {name} (shown only now):")
    typer.echo(token)


@producers_app.command("remove")
def producers_remove(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Producer name.")],
    as_json: Json = False,
) -> None:
    """Remove a producer (its token stops working at once; its history stays)."""
    pf = _producers(ctx)
    pf.remove(name)
    if as_json:
        print_json({"removed": name})
        return
    console.print(f"removed {name}")

"""``ldf alerts``: feeds, replays, the archive, credentials, status and the smoke test."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ldf.cliutil import console, err_console, print_json, settings_from
from ldf.errors import UserInputError

app = typer.Typer(
    help="Alert distribution: feeds to brokers, replays, the archive, the smoke test.",
    no_args_is_help=True,
)
feeds_app = typer.Typer(help="Brokers' feeds.", no_args_is_help=True)
creds_app = typer.Typer(help="Brokers', producers', operators' and users' tokens.",
                        no_args_is_help=True)  # fmt: skip
app.add_typer(feeds_app, name="feeds")
app.add_typer(creds_app, name="credentials")

Json = Annotated[bool, typer.Option("--json", help="Print JSON.")]


@contextmanager
def _service(ctx: typer.Context) -> Iterator[object]:
    from ldf.alerts.service import AlertService

    service = AlertService.open(settings_from(ctx))
    try:
        yield service
    finally:
        service.close()


def _ago(t: float | None) -> str:
    return "never" if t is None else f"{time.time() - t:.0f}s ago"


@app.command()
def status(ctx: typer.Context, as_json: Json = False) -> None:
    """Per feed: delivered, lag, rate, last acknowledgement, errors."""
    from ldf.alerts.service import AlertService

    with _service(ctx) as svc:
        assert isinstance(svc, AlertService)
        st = svc.status()
    if as_json:
        print_json(st)
        return
    store = st["store"]
    table = Table(title="Alert distribution")
    table.caption = (
        f"{store['alerts']:,} alerts · {store['visits']:,} visits · "
        f"{store['manifests']:,} manifests · log head {st['head']:,}"
    )
    for col in ("feed", "broker", "format", "delivered", "lag", "lag age", "rate", "last ack",
                "errors"):  # fmt: skip
        table.add_column(col, justify="left" if col in ("feed", "broker", "format") else "right")
    for f in st["feeds"]:
        table.add_row(
            f["name"] + (" [red]LAGGING[/]" if f["lagging"] else ""),
            f["broker"],
            f["format"],
            f"{f['delivered']:,}",
            f"{f['lag_entries']:,}",
            f"{f['lag_s']:.0f}s",
            f"{f['rate_per_s']:.0f}/s",
            _ago(f["last_ack_unix"]),
            str(f["errors"]),
        )
    console.print(table)


@feeds_app.command("create")
def feeds_create(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Feed name, e.g. fink-full.")],
    broker: Annotated[str, typer.Option(help="The broker that reads it.")],
    format: Annotated[str, typer.Option(help="full, nocutouts or notification.")] = "full",
    schema_version: Annotated[
        str | None, typer.Option(help="Deliver in an older minor schema, e.g. 11.0.")
    ] = None,
    transport: Annotated[str, typer.Option(help="http or nats.")] = "http",
    start: Annotated[str, typer.Option(help="now, earliest, or a position.")] = "now",
    as_json: Json = False,
) -> None:
    """Create a feed."""
    from pydantic import ValidationError

    from ldf.alerts.models import FeedSpec
    from ldf.alerts.service import AlertService

    try:
        spec = FeedSpec(
            name=name, broker=broker, format=format, schema_version=schema_version,
            transport=transport, start=int(start) if start.isdigit() else start,
        )  # fmt: skip
    except ValidationError as exc:
        first = exc.errors()[0]
        raise UserInputError(f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    with _service(ctx) as svc:
        assert isinstance(svc, AlertService)
        feed = svc.create_feed(spec, "operator")
    if as_json:
        print_json(feed.model_dump(mode="json"))
    else:
        console.print(f"feed {feed.name} for {feed.broker}: {feed.format}, cursor {feed.cursor}")


@feeds_app.command("list")
def feeds_list(ctx: typer.Context, as_json: Json = False) -> None:
    """Every feed."""
    from ldf.alerts.service import AlertService

    with _service(ctx) as svc:
        assert isinstance(svc, AlertService)
        feeds = svc.feeds()
    if as_json:
        print_json([f.model_dump(mode="json") for f in feeds])
        return
    for f in feeds:
        console.print(f"{f.name}\t{f.broker}\t{f.format}\t{f.transport}\tcursor {f.cursor}")


@feeds_app.command("delete")
def feeds_delete(ctx: typer.Context, name: str) -> None:
    """Remove a feed."""
    from ldf.alerts.service import AlertService

    with _service(ctx) as svc:
        assert isinstance(svc, AlertService)
        svc.delete_feed(name)
    console.print(f"feed {name} removed")


@app.command()
def replay(
    ctx: typer.Context,
    feed: Annotated[str, typer.Argument(help="Target feed (created, not live, if new).")],
    visits: Annotated[str | None, typer.Option(help="Comma-separated visit ids.")] = None,
    since: Annotated[float | None, typer.Option(help="Ingested since (Unix time).")] = None,
    until: Annotated[float | None, typer.Option(help="Ingested before (Unix time).")] = None,
    alert_ids: Annotated[str | None, typer.Option(help="An alertId range A-B.")] = None,
    broker: Annotated[str | None, typer.Option(help="Owner of a new feed.")] = None,
    as_json: Json = False,
) -> None:
    """Re-send alerts into a feed at full rate (by visits, time range or alertId range)."""
    from pydantic import ValidationError

    from ldf.alerts.models import ReplaySpec
    from ldf.alerts.service import AlertService

    lo = hi = None
    if alert_ids is not None:
        a, sep, b = alert_ids.partition("-")
        if not (sep and a.isdigit() and b.isdigit()):
            raise UserInputError(f"--alert-ids {alert_ids!r} must be A-B")
        lo, hi = int(a), int(b)
    try:
        spec = ReplaySpec(
            feed=feed, broker=broker, since_unix=since, until_unix=until, alert_id_min=lo,
            alert_id_max=hi, visits=[int(v) for v in visits.split(",")] if visits else None,
        )  # fmt: skip
    except (ValidationError, ValueError) as exc:
        msg = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else str(exc)
        raise UserInputError(msg) from None
    with _service(ctx) as svc:
        assert isinstance(svc, AlertService)
        out = svc.replay(spec, "operator")
    if as_json:
        print_json(out)
    else:
        console.print(f"replayed {out['alerts']} alerts of {len(out['visits'])} visits into {feed}")


@app.command()
def get(
    ctx: typer.Context,
    alert_id: Annotated[int, typer.Argument(help="The alertId.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write the packet here.")] = None,
    as_json: Json = False,
) -> None:
    """One archived alert: its indexed fields, or its packet with --out."""
    from ldf.alerts.service import AlertService

    with _service(ctx) as svc:
        assert isinstance(svc, AlertService)
        info = svc.alert_info(alert_id)
        if out is not None:
            out.write_bytes(svc.get_alert(alert_id))
    if as_json:
        print_json(info)
    else:
        for k, v in info.items():
            console.print(f"{k}: {v}")


@app.command()
def visit(ctx: typer.Context, visit: int, as_json: Json = False) -> None:
    """A visit's alertIds and manifest."""
    from ldf.alerts.service import AlertService
    from ldf.errors import NotFoundError

    with _service(ctx) as svc:
        assert isinstance(svc, AlertService)
        ids = svc.store.alert_ids(visit=visit)
        try:
            manifest = svc.store.manifest(visit).model_dump()
        except NotFoundError:
            manifest = None
    if as_json:
        print_json({"visit": visit, "alert_ids": ids, "manifest": manifest})
    else:
        console.print(f"visit {visit}: {len(ids)} alerts; manifest: {manifest or 'not closed'}")


@app.command()
def audit(
    ctx: typer.Context,
    feed: Annotated[str | None, typer.Option(help="One feed only.")] = None,
    limit: int = 50,
    as_json: Json = False,
) -> None:
    """The audit trail: feeds created, replays, lag alarms, errors (newest first)."""
    from ldf.alerts.service import AlertService

    with _service(ctx) as svc:
        assert isinstance(svc, AlertService)
        rows = svc.store.audit_trail(feed, limit)
    if as_json:
        print_json(rows)
        return
    for r in rows:
        when = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(r["time_unix"]))
        console.print(
            f"{when}Z  {r['event']:<12} {r['feed'] or '-':<20} {r['actor']}  {r['detail']}"
        )


@creds_app.command("add")
def creds_add(
    ctx: typer.Context,
    name: str,
    role: Annotated[str, typer.Option(help="broker, producer, operator or user.")] = "broker",
    as_json: Json = False,
) -> None:
    """Add a principal; its token is printed once (only its SHA-256 is kept)."""
    from ldf.alerts.auth import Credentials, Role
    from ldf.alerts.daemon import credentials_path

    try:
        r = Role(role)
    except ValueError:
        raise UserInputError(f"unknown role {role!r}; known: {', '.join(Role)}") from None
    creds = Credentials(credentials_path(settings_from(ctx)))
    token = creds.add(name, r)
    if as_json:
        print_json({"name": name, "role": r.value, "token": token})
    else:
        console.print(f"{name} ({r.value}): token {token}")
        err_console.print("the token is shown once; store it now")


@creds_app.command("remove")
def creds_remove(ctx: typer.Context, name: str) -> None:
    """Revoke a principal's token (at once, no restart)."""
    from ldf.alerts.auth import Credentials
    from ldf.alerts.daemon import credentials_path
    from ldf.errors import NotFoundError

    if not Credentials(credentials_path(settings_from(ctx))).remove(name):
        raise NotFoundError(f"no principal {name!r}")
    console.print(f"{name} removed")


@creds_app.command("list")
def creds_list(ctx: typer.Context, as_json: Json = False) -> None:
    """Principals and their roles (never their tokens)."""
    from ldf.alerts.auth import Credentials
    from ldf.alerts.daemon import credentials_path

    principals = Credentials(credentials_path(settings_from(ctx))).principals()
    if as_json:
        print_json([{"name": p.name, "role": p.role.value} for p in principals])
    else:
        for p in principals:
            console.print(f"{p.name}\t{p.role.value}")


@app.command()
def smoke(
    visits: Annotated[int, typer.Option(help="Visits to produce.")] = 3,
    alerts: Annotated[int, typer.Option(help="Alerts per visit (~80 KB each).")] = 200,
    as_json: Json = False,
) -> None:
    """End-to-end smoke test: producer → scratch service → validation endpoint (full and
    notification feeds); fails unless every alert arrives exactly once and manifests verify."""
    from ldf.alerts.smoke import run_smoke

    if visits < 1 or alerts < 1:
        raise UserInputError("--visits and --alerts must be at least 1")
    report = run_smoke(visits=visits, alerts=alerts,
                       status=None if as_json else err_console.print)  # fmt: skip
    if as_json:
        print_json(report)
    else:
        for name, r in report["feeds"].items():
            console.print(
                f"{name}: delivered {r['delivered']:,}, duplicates {r['duplicates']}, missing "
                f"{r['missing']}, manifests verified {r['manifests_verified']}/{r['visits']}"
            )
        console.print(("[green]PASSED[/]" if report["passed"] else "[red]FAILED[/]")
                      + f" in {report['total_s']} s")  # fmt: skip
    if not report["passed"]:
        raise typer.Exit(1)


filters_app = typer.Typer(help="The mini-broker: users' filters and their streams.",
                          no_args_is_help=True)  # fmt: skip
app.add_typer(filters_app, name="filters")


@contextmanager
def _broker(ctx: typer.Context) -> Iterator[object]:
    from ldf.alerts.minibroker import MiniBroker

    with _service(ctx) as svc:
        broker = MiniBroker(svc)  # type: ignore[arg-type]
        try:
            yield broker
        finally:
            broker.close()


@filters_app.command("add")
def filters_add(
    ctx: typer.Context,
    user: Annotated[str, typer.Argument(help="The user (a principal with role user).")],
    name: Annotated[str, typer.Argument(help="The filter's name.")],
    expression: Annotated[str, typer.Argument(help="e.g. \"snr > 10 and band in ('g','r')\"")],
    as_json: Json = False,
) -> None:
    """Register a filter; its matches go to the feed user-<user>-<name>."""
    from ldf.alerts.minibroker import MiniBroker

    with _broker(ctx) as broker:
        assert isinstance(broker, MiniBroker)
        flt = broker.register(user, name, expression)
    if as_json:
        print_json(flt.model_dump(mode="json"))
    else:
        console.print(f"filter {flt.name} of {flt.user} → feed {flt.feed}")


@filters_app.command("list")
def filters_list(
    ctx: typer.Context,
    user: Annotated[str | None, typer.Option(help="One user's only.")] = None,
    as_json: Json = False,
) -> None:
    """Registered filters."""
    from ldf.alerts.minibroker import MiniBroker

    with _broker(ctx) as broker:
        assert isinstance(broker, MiniBroker)
        flts = broker.filters(user)
    if as_json:
        print_json([f.model_dump(mode="json") for f in flts])
        return
    for f in flts:
        state = "" if f.active else " (inactive)"
        console.print(f"{f.user}/{f.name}{state}\t{f.feed}\t{f.expression}")


@filters_app.command("delete")
def filters_delete(ctx: typer.Context, user: str, name: str) -> None:
    """Stop a filter and remove its feed."""
    from ldf.alerts.minibroker import MiniBroker

    with _broker(ctx) as broker:
        assert isinstance(broker, MiniBroker)
        broker.delete(user, name)
    console.print(f"filter {user}/{name} deleted")


@filters_app.command("check")
def filters_check(
    expression: Annotated[str, typer.Argument(help="A filter expression to validate.")],
) -> None:
    """Validate an expression (an error points at the offending token)."""
    from ldf.alerts.minibroker import MiniBroker

    MiniBroker.validate(expression)
    console.print("ok")


@app.command("nats-config")
def nats_config(
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the server config.")],
    brokers: Annotated[list[str], typer.Option("--broker", "-b", help="A broker (repeat).")],
    publisher: Annotated[str, typer.Option(help="The service's publisher user.")] = "ldf-alerts",
    as_json: Json = False,
) -> None:
    """Write the NATS server's authorization block for the brokers' feeds (mode 0600) with a
    new password each; the passwords are printed once."""
    import os

    from ldf.alerts.nats import nats_authorization, new_password

    if not brokers:
        raise UserInputError("name at least one --broker")
    passwords = {b: new_password() for b in brokers}
    pub_password = new_password()
    text = nats_authorization(passwords, publisher=(publisher, pub_password))
    tmp = out.with_name(f".{out.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    tmp.replace(out)
    result = {"config": str(out), "publisher": {"user": publisher, "password": pub_password},
              "brokers": passwords}  # fmt: skip
    if as_json:
        print_json(result)
    else:
        console.print(f"wrote {out}; include it in the nats-server configuration")
        console.print(f"publisher {publisher}: {pub_password} (policies.alerts.nats_user/password)")
        for b, pw in passwords.items():
            console.print(f"broker {b}: {pw}")

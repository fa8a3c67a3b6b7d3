"""``ldf backbone``: the Data Backbone's catalog, replication, integrity and retention."""

from __future__ import annotations

import getpass
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ldf.cliutil import console, err_console, print_json, settings_from
from ldf.errors import UserInputError

if TYPE_CHECKING:
    from ldf.backbone.service import Backbone

app = typer.Typer(
    help="Data Backbone: catalog, replication, integrity, retention.", no_args_is_help=True
)
rules_app = typer.Typer(help="Replication rules.", no_args_is_help=True)
delete_app = typer.Typer(help="Deletion requests and retention.", no_args_is_help=True)
app.add_typer(rules_app, name="rules")
app.add_typer(delete_app, name="delete")

Json = Annotated[bool, typer.Option("--json", help="Print JSON.")]
Site = Annotated[str | None, typer.Option("--site", help="Site (default: the ingest site).")]
By = Annotated[str | None, typer.Option("--by", help="Who (default: your login name).")]


@contextmanager
def _backbone(ctx: typer.Context) -> Iterator[Backbone]:
    from ldf.backbone.service import Backbone

    bb = Backbone.open(settings_from(ctx))
    try:
        yield bb
    finally:
        bb.close()


def _who(by: str | None) -> str:
    return by or getpass.getuser()


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"  # pragma: no cover


def _parse_meta(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserInputError(f"--meta takes key=value, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


@app.command("sites")
def sites(ctx: typer.Context, as_json: Json = False) -> None:
    """Sites, their endpoints and tiers, free space and what the catalog holds there."""
    with _backbone(ctx) as bb:
        summary = bb.store.replica_summary()
        rows = []
        for ep in bb.endpoints():
            held = [s for s in summary if (s["site"], s["endpoint"]) == (ep.site, ep.name)]
            avail = [s for s in held if s["state"] == "available"]
            rows.append(
                {
                    "site": ep.site,
                    "endpoint": ep.name,
                    "tier": ep.tier.value,
                    "uri": ep.root_uri,
                    "free_bytes": ep.free_bytes(),
                    "replicas": sum(s["replicas"] for s in avail),
                    "bytes": sum(s["bytes"] for s in avail),
                    "other_states": {
                        s["state"]: s["replicas"] for s in held if s["state"] != "available"
                    },
                }
            )
    if as_json:
        print_json(rows)
        return
    table = Table(title="Data Backbone sites")
    for col in ("site", "endpoint", "tier", "replicas", "bytes", "free", "other", "root"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["site"], r["endpoint"], r["tier"], str(r["replicas"]), _human(r["bytes"]),
            _human(r["free_bytes"]), ", ".join(f"{k} {v}" for k, v in r["other_states"].items()),
            r["uri"],
        )  # fmt: skip
    console.print(table)


@app.command("ingest")
def ingest(
    ctx: typer.Context,
    paths: Annotated[list[Path], typer.Argument(help="Files to ingest.")],
    lfn: Annotated[str | None, typer.Option("--lfn", help="LFN (one file only).")] = None,
    prefix: Annotated[str, typer.Option("--prefix", help="LFN prefix: LFN = prefix/name.")] = "",
    site: Site = None,
    endpoint: Annotated[str | None, typer.Option("--endpoint")] = None,
    meta: Annotated[list[str], typer.Option("--meta", "-m", help="key=value metadata.")] = [],  # noqa: B006
    dataset: Annotated[list[str], typer.Option("--dataset", help="Dataset(s) to add to.")] = [],  # noqa: B006
    producer: Annotated[str, typer.Option("--producer", help="Producing service/campaign.")] = "",
    inputs: Annotated[
        list[str], typer.Option("--input", help="LFN this file was made from (provenance).")
    ] = [],  # noqa: B006
    retention: Annotated[
        str, typer.Option("--retention", help="permanent|scratch|campaign")
    ] = "permanent",
    lifetime_days: Annotated[float | None, typer.Option("--lifetime-days")] = None,
    as_json: Json = False,
) -> None:
    """Store files at a site and catalogue them (idempotent); rules replicate them at once."""
    from ldf.backbone.models import Retention

    if lfn and len(paths) != 1:
        raise UserInputError("--lfn names one file; use --prefix for several")
    try:
        ret = Retention(retention)
    except ValueError:
        raise UserInputError(
            f"--retention must be permanent, scratch or campaign; got {retention!r}"
        ) from None
    metadata = _parse_meta(meta)
    results: list[dict[str, Any]] = []
    progress = Progress(
        TextColumn("ingest"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err_console, disable=as_json or len(paths) < 2,
    )  # fmt: skip
    with _backbone(ctx) as bb, progress:
        task = progress.add_task("ingest", total=len(paths))
        for path in paths:
            name = lfn or "/".join(p for p in (prefix.strip("/"), path.name) if p)
            r = bb.ingest(
                path, name, site=site, endpoint=endpoint, metadata=metadata, producer=producer,
                inputs=inputs, datasets=dataset, retention=ret,
                lifetime_s=lifetime_days * 86400 if lifetime_days else None,
            )  # fmt: skip
            results.append(r.model_dump(mode="json"))
            progress.advance(task)
    if as_json:
        print_json(results)
        return
    for row in results:
        verb = "ingested" if row["created"] else "already catalogued"
        console.print(
            f"{verb} {row['lfn']} at {row['site']}/{row['endpoint']} ({_human(row['size'])}, "
            f"adler32 {row['adler32']}); {row['transfers_queued']} transfer(s) queued"
            + ("; registered in Butler" if row["butler"] else "")
        )


def _file_rows(files: list[Any]) -> list[dict[str, Any]]:
    return [f.model_dump(mode="json") for f in files]


def _print_files(files: list[Any]) -> None:
    table = Table()
    for col in ("lfn", "size", "state", "retention", "producer"):
        table.add_column(col)
    for f in files:
        table.add_row(f.lfn, _human(f.size), f.state.value, f.retention.value, f.producer)
    console.print(table)


@app.command("ls")
def ls(
    ctx: typer.Context,
    prefix: Annotated[str, typer.Argument(help="LFN prefix.")] = "",
    dataset: Annotated[str | None, typer.Option("--dataset", help="Only this dataset.")] = None,
    limit: Annotated[int, typer.Option("--limit")] = 100,
    as_json: Json = False,
) -> None:
    """List catalogued files under an LFN prefix (or of a dataset)."""
    import itertools

    with _backbone(ctx) as bb:
        if dataset is not None:
            lfns = [n for n in bb.store.dataset_files(dataset) if n.startswith(prefix)]
            files = [f for n in lfns[:limit] if (f := bb.store.get_file(n)) is not None]
        else:
            files = list(itertools.islice(bb.store.iter_files(prefix=prefix or None), limit))
    if as_json:
        print_json(_file_rows(files))
    else:
        _print_files(files)


@app.command("find")
def find(
    ctx: typer.Context,
    expression: Annotated[
        str, typer.Argument(help="e.g. \"instrument == 'LSSTCam' and day_obs >= 20261121\"")
    ],
    limit: Annotated[int, typer.Option("--limit")] = 100,
    as_json: Json = False,
) -> None:
    """Find files whose metadata matches an expression."""
    from ldf.backbone.service import file_record
    from ldf.expr import parse

    expr = parse(expression)
    with _backbone(ctx) as bb:
        files = []
        for f in bb.store.iter_files():
            if expr.matches(file_record(f)):
                files.append(f)
                if len(files) >= limit:
                    break
    if as_json:
        print_json(_file_rows(files))
    else:
        _print_files(files)


@app.command("stat")
def stat(ctx: typer.Context, lfn: Annotated[str, typer.Argument()], as_json: Json = False) -> None:
    """A file's catalog record and every replica."""
    from ldf.backbone.endpoints import validate_lfn
    from ldf.errors import NotFoundError

    lfn = validate_lfn(lfn)
    with _backbone(ctx) as bb:
        f = bb.store.get_file(lfn)
        if f is None:
            raise NotFoundError(f"{lfn}: not in the catalog")
        reps = bb.store.replicas(lfn)
    data = {**f.model_dump(mode="json"), "replicas": [r.model_dump(mode="json") for r in reps]}
    if as_json:
        print_json(data)
        return
    console.print(f"[bold]{f.lfn}[/] {_human(f.size)} adler32 {f.adler32} blake3 {f.blake3[:16]}…")
    console.print(
        f"state {f.state.value} · retention {f.retention.value} · producer {f.producer or '-'}"
    )
    if f.metadata:
        console.print("metadata " + ", ".join(f"{k}={v}" for k, v in f.metadata.items()))
    table = Table(title="replicas")
    for col in ("site", "endpoint", "tier", "state", "verified", "uri"):
        table.add_column(col)
    for r in reps:
        verified = r.verified_at.isoformat(timespec="seconds") if r.verified_at else ""
        table.add_row(r.site, r.endpoint, r.tier.value, r.state.value, verified, r.uri)
    console.print(table)


@app.command("get")
def get(
    ctx: typer.Context,
    lfn: Annotated[str, typer.Argument()],
    dest: Annotated[Path, typer.Argument(help="File or directory.")],
    site: Annotated[str | None, typer.Option("--site", help="Preferred site.")] = None,
    wait: Annotated[
        float, typer.Option("--wait", help="Seconds to wait for nearline staging.")
    ] = 0.0,
    as_json: Json = False,
) -> None:
    """Copy a file from its best replica (staging from nearline if needed), verified."""
    with _backbone(ctx) as bb:
        path, rep = bb.get(lfn, dest, prefer_site=site, wait_s=wait)
    if as_json:
        print_json({"lfn": rep.lfn, "path": str(path), "site": rep.site, "endpoint": rep.endpoint})
    else:
        console.print(f"{rep.lfn} → {path} (from {rep.site}/{rep.endpoint}, verified)")


@rules_app.command("list")
def rules_list(
    ctx: typer.Context,
    all_rules: Annotated[bool, typer.Option("--all")] = False,
    as_json: Json = False,
) -> None:
    """Replication rules (active ones unless --all)."""
    with _backbone(ctx) as bb:
        rules = bb.store.rules(active_only=not all_rules)
    if as_json:
        print_json([r.model_dump(mode="json") for r in rules])
        return
    table = Table(title="replication rules")
    for col in ("name", "expression", "copies", "sites", "tier", "priority", "expires", "active"):
        table.add_column(col)
    for r in rules:
        table.add_row(
            r.name, r.expression, str(r.copies), ",".join(r.sites),
            r.tier.value if r.tier else "any", str(r.priority),
            r.expires_at.isoformat(timespec="seconds") if r.expires_at else "never",
            "yes" if r.active else "no",
        )  # fmt: skip
    console.print(table)


@rules_app.command("add")
def rules_add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument()],
    expression: Annotated[str, typer.Option("--expr", help="Which files (metadata expression).")],
    sites: Annotated[
        str, typer.Option("--sites", help="Comma-separated sites, in preference order.")
    ],
    copies: Annotated[int, typer.Option("--copies")] = 1,
    tier: Annotated[str | None, typer.Option("--tier", help="disk|nearline|dr")] = None,
    priority: Annotated[int, typer.Option("--priority", help="1 highest … 5 lowest")] = 3,
    lifetime_days: Annotated[float | None, typer.Option("--lifetime-days")] = None,
    as_json: Json = False,
) -> None:
    """Add a rule; it applies at once to files already catalogued and to every new one."""
    from pydantic import ValidationError

    from ldf.backbone.models import Rule
    from ldf.config import Tier

    try:
        rule = Rule(
            name=name, expression=expression, copies=copies,
            sites=[s.strip() for s in sites.split(",") if s.strip()],
            tier=Tier(tier) if tier else None, priority=priority,
            lifetime_s=lifetime_days * 86400 if lifetime_days else None,
        )  # fmt: skip
    except (ValidationError, ValueError) as exc:
        raise UserInputError(f"bad rule: {str(exc).splitlines()[-1].strip()}") from None
    with _backbone(ctx) as bb:
        stored, queued = bb.add_rule(rule)
    if as_json:
        print_json({"rule": stored.model_dump(mode="json"), "transfers_queued": queued})
    else:
        console.print(f"rule {stored.name} added; {queued} transfer(s) queued for existing files")


@rules_app.command("remove")
def rules_remove(
    ctx: typer.Context, name: Annotated[str, typer.Argument()], as_json: Json = False
) -> None:
    """Stop enforcing a rule (existing replicas stay)."""
    with _backbone(ctx) as bb:
        rule = bb.store.deactivate_rule(name)
    if as_json:
        print_json(rule.model_dump(mode="json"))
    else:
        console.print(f"rule {name} deactivated")


@app.command("replicate")
def replicate(
    ctx: typer.Context,
    workers: Annotated[int | None, typer.Option("--workers")] = None,
    retry_failed: Annotated[
        bool, typer.Option("--retry-failed", help="Queue given-up transfers again.")
    ] = False,
    tables: Annotated[
        bool, typer.Option("--tables", help="Also replicate designated database tables.")
    ] = False,
    as_json: Json = False,
) -> None:
    """Run the transfer queue until nothing is due (the daemon does this continuously)."""
    out: dict[str, Any] = {}
    with _backbone(ctx) as bb:
        if retry_failed:
            out["requeued"] = bb.store.retry_failed()
        out["transfers"] = bb.run_transfers(workers=workers).as_dict()
        if tables:
            from ldf.backbone.tablesync import replicate_tables

            out["tables"] = replicate_tables(bb)
        out["queue"] = bb.store.queue_counts()
    if as_json:
        print_json(out)
        return
    t = out["transfers"]
    console.print(
        f"{t['done']} done, {t['retried']} to retry, {t['failed']} failed · {_human(t['bytes'])} "
        f"in {t['seconds']} s ({t['MB_per_s']} MB/s) · queue {out['queue']}"
    )
    for e in t["errors"]:
        err_console.print(f"  {e}")
    for item in out.get("tables", []):
        console.print(f"table snapshot {item['lfn']} → {', '.join(item['sites'])}")


@app.command("audit")
def audit_cmd(
    ctx: typer.Context,
    site: Annotated[str, typer.Argument(help="Site to audit.")],
    checksums: Annotated[
        bool, typer.Option("--checksums", help="Re-checksum contents (slow).")
    ] = False,
    no_quarantine: Annotated[
        bool, typer.Option("--no-quarantine", help="Report dark files only.")
    ] = False,
    as_json: Json = False,
) -> None:
    """Compare catalog and storage at a site: lost, corrupt and dark files (a report per run)."""
    from ldf.backbone.integrity import audit

    with _backbone(ctx) as bb:
        report = audit(bb, site, checksums=checksums, quarantine=not no_quarantine)
    if as_json:
        print_json(report.model_dump(mode="json"))
        return
    console.print(
        f"audit #{report.id} of {site}: {report.checked} checked · {report.lost} lost · "
        f"{report.corrupt} corrupt · {report.dark} dark"
    )
    for f in report.findings[:50]:
        console.print(
            f"  {f.kind.value:7} {f.endpoint}:{f.lfn} — {f.detail}"
            + (f" ({f.action})" if f.action else "")
        )


@app.command("repair")
def repair_cmd(
    ctx: typer.Context,
    site: Annotated[str | None, typer.Option("--site")] = None,
    as_json: Json = False,
) -> None:
    """Restore lost and corrupt replicas from a verified good copy."""
    from ldf.backbone.integrity import repair

    with _backbone(ctx) as bb:
        report = repair(bb, site)
    data = report.as_dict()
    if as_json:
        print_json(data)
        return
    console.print(
        f"{data['repaired']} replica(s) repaired; {data['unrepairable']} file(s) have no good copy"
    )
    for e in data["errors"]:
        err_console.print(f"  {e}")


@delete_app.command("request")
def delete_request(
    ctx: typer.Context,
    expression: Annotated[str, typer.Argument(help="Which files, e.g. \"lfn like 'scratch/*'\".")],
    reason: Annotated[str, typer.Option("--reason")],
    by: By = None,
    as_json: Json = False,
) -> None:
    """Ask to delete files; nothing happens until someone else approves and it is executed."""
    from ldf.backbone.integrity import request_deletion

    with _backbone(ctx) as bb:
        req = request_deletion(bb, expression, reason, _who(by))
    if as_json:
        print_json(req.model_dump(mode="json"))
    else:
        console.print(
            f"deletion request #{req.id}: {req.files} file(s), {_human(req.bytes)}; "
            "awaiting approval"
        )


@delete_app.command("approve")
def delete_approve(
    ctx: typer.Context,
    request_id: Annotated[int, typer.Argument()],
    by: By = None,
    as_json: Json = False,
) -> None:
    """Approve a deletion request (not your own)."""
    from ldf.backbone.integrity import approve_deletion

    with _backbone(ctx) as bb:
        req = approve_deletion(bb, request_id, _who(by))
    if as_json:
        print_json(req.model_dump(mode="json"))
    else:
        console.print(f"deletion request #{req.id} approved by {req.decided_by}")


@delete_app.command("reject")
def delete_reject(
    ctx: typer.Context,
    request_id: Annotated[int, typer.Argument()],
    by: By = None,
    as_json: Json = False,
) -> None:
    """Reject a deletion request."""
    from ldf.backbone.integrity import reject_deletion

    with _backbone(ctx) as bb:
        req = reject_deletion(bb, request_id, _who(by))
    if as_json:
        print_json(req.model_dump(mode="json"))
    else:
        console.print(f"deletion request #{req.id} rejected by {req.decided_by}")


@delete_app.command("execute")
def delete_execute(
    ctx: typer.Context,
    request_id: Annotated[int, typer.Argument()],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the effect only.")] = False,
    as_json: Json = False,
) -> None:
    """Execute an approved deletion request (or show its effect with --dry-run)."""
    from ldf.backbone.integrity import execute_deletion

    with _backbone(ctx) as bb:
        plan = execute_deletion(bb, request_id, dry_run=dry_run)
    _print_plan(plan.as_dict(), as_json, f"request #{request_id}")


@delete_app.command("expire")
def delete_expire(
    ctx: typer.Context,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the effect only.")] = False,
    as_json: Json = False,
) -> None:
    """Delete scratch and campaign files whose lifetime has ended (never the survey record)."""
    from ldf.backbone.integrity import expire

    with _backbone(ctx) as bb:
        plan = expire(bb, dry_run=dry_run)
    _print_plan(plan.as_dict(), as_json, "expiry")


@delete_app.command("list")
def delete_list(ctx: typer.Context, as_json: Json = False) -> None:
    """Deletion requests, newest first."""
    with _backbone(ctx) as bb:
        reqs = bb.store.deletions()
    if as_json:
        print_json([r.model_dump(mode="json") for r in reqs])
        return
    table = Table(title="deletion requests")
    for col in (
        "id",
        "state",
        "files",
        "bytes",
        "requested by",
        "decided by",
        "reason",
        "expression",
    ):
        table.add_column(col)
    for r in reqs:
        table.add_row(
            str(r.id), r.state.value, str(r.files), _human(r.bytes), r.requested_by,
            r.decided_by or "", r.reason, r.expression,
        )  # fmt: skip
    console.print(table)


def _print_plan(data: dict[str, Any], as_json: bool, what: str) -> None:
    if as_json:
        print_json(data)
        return
    verb = "deleted" if data["executed"] else "would delete"
    console.print(
        f"{what}: {verb} {data['files']} file(s), {_human(data['bytes'])}; replicas per site: "
        f"{data['replicas_per_site'] or '-'}"
    )


@app.command("status")
def status(ctx: typer.Context, as_json: Json = False) -> None:
    """Catalog, replicas per site, transfer queue, last audit per site."""
    with _backbone(ctx) as bb:
        data: dict[str, Any] = {
            "files": bb.store.file_counts(),
            "replicas": bb.store.replica_summary(),
            "queue": bb.store.queue_counts(),
            "rules": len(bb.store.rules()),
            "audits": {
                site: (
                    a[0].model_dump(mode="json", exclude={"findings"})
                    if (a := bb.store.audits(site=site, limit=1))
                    else None
                )
                for site in bb.settings.sites
            },
            "failed_transfers": [
                t.model_dump(mode="json")
                for t in bb.store.transfers(states=(_failed_state(),), limit=10)
            ],
        }
    if as_json:
        print_json(data)
        return
    console.print(
        f"files: {data['files'] or 'none'} · rules: {data['rules']} · "
        f"queue: {data['queue'] or 'empty'}"
    )
    table = Table(title="replicas")
    for col in ("site", "endpoint", "state", "replicas", "bytes"):
        table.add_column(col)
    for r in data["replicas"]:
        table.add_row(r["site"], r["endpoint"], r["state"], str(r["replicas"]), _human(r["bytes"]))
    console.print(table)
    for site, a in data["audits"].items():
        if a:
            console.print(
                f"last audit of {site}: {a['finished_at']} · {a['lost']} lost · "
                f"{a['corrupt']} corrupt · {a['dark']} dark"
            )
        else:
            console.print(f"{site}: never audited")
    for t in data["failed_transfers"]:
        err_console.print(f"failed: {t['lfn']} → {t['dst_site']}: {t['last_error']}")


def _failed_state() -> Any:
    from ldf.backbone.models import TransferState

    return TransferState.FAILED

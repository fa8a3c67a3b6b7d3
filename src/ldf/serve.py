"""``ldf serve SERVICE``: run one service as its own long-lived process."""

from __future__ import annotations

import signal
import threading
from typing import Annotated, Any

import typer

from ldf.cliutil import err_console, settings_from

app = typer.Typer(help="Run a service as a long-lived process.", no_args_is_help=True)


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handler(signum: int, _frame: Any) -> None:
        err_console.print(
            f"{signal.Signals(signum).name}: finishing copies in flight, then stopping"
        )
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


@app.command("backbone")
def serve_backbone(
    ctx: typer.Context,
    once: Annotated[
        bool, typer.Option("--once", help="One maintenance round, drain, exit.")
    ] = False,
) -> None:
    """Replicate continuously; audit, repair, expire and snapshot tables periodically."""
    from ldf.backbone.daemon import maintenance, run_daemon
    from ldf.backbone.service import Backbone

    bb = Backbone.open(settings_from(ctx))
    try:
        if once:
            report = bb.run_transfers()
            summary = maintenance(bb)
            err_console.print(f"transfers: {report.as_dict()}; maintenance: {summary}")
            return
        stop = _stop_on_signals()
        err_console.print(
            f"backbone daemon: {len(bb.endpoints())} endpoints at {len(bb.settings.sites)} sites; "
            f"polling every {bb.policy.poll_s} s, auditing every {bb.policy.audit_interval_s} s"
        )
        run_daemon(bb, stop, on_round=lambda s: err_console.print(f"maintenance: {s['audits']}"))
    finally:
        bb.close()

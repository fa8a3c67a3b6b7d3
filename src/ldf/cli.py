"""The ``ldf`` command: one CLI for every service.

Each service package contributes a typer sub-app from its ``cli.py``; this module wires them
together and turns errors into one clear line instead of a traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from ldf import __version__
from ldf.config.cli import app as config_app
from ldf.errors import ConfigError, LdfError


class _LdfGroup(TyperGroup):
    """Root command group: any `LdfError` becomes one line on stderr and its exit code."""

    # Typed Any: typer vendors click, and its Context class is private to typer.
    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except LdfError as exc:
            raise typer.Exit(_report(exc)) from None


app = typer.Typer(
    name="ldf",
    cls=_LdfGroup,
    help="The data facility of a survey telescope (LDM-230's services).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(config_app, name="config")


def _register_subapps() -> None:
    # Sub-app modules import only typer and rich at module level; heavy imports (numpy,
    # astropy, nats) happen inside commands, so `ldf --help` stays fast.
    from ldf.alerts.cli import app as alerts_app
    from ldf.archiver.cli import app as archiver_app
    from ldf.backbone.cli import app as backbone_app
    from ldf.bench import app as bench_app
    from ldf.night import night as night_cmd
    from ldf.ocs.cli import app as ocs_app
    from ldf.oods.cli import app as oods_app
    from ldf.prompt.cli import app as prompt_app
    from ldf.prompt.cli import calibs_app, refcat_app, templates_app
    from ldf.sim.cli import app as sim_app
    from ldf.telemetry.cli import app as telemetry_app

    app.command("night")(night_cmd)
    app.add_typer(sim_app, name="sim")
    app.add_typer(ocs_app, name="ocs")
    app.add_typer(backbone_app, name="backbone")
    app.add_typer(archiver_app, name="archiver")
    app.add_typer(oods_app, name="oods")
    app.add_typer(prompt_app, name="prompt")
    app.add_typer(templates_app, name="templates")
    app.add_typer(calibs_app, name="calibs")
    app.add_typer(refcat_app, name="refcat")
    app.add_typer(alerts_app, name="alerts")
    app.add_typer(telemetry_app, name="telemetry")
    from ldf.serve import app as serve_app

    app.add_typer(serve_app, name="serve")
    app.add_typer(bench_app, name="bench")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ldf {__version__}")
        raise typer.Exit


@app.callback()
def root(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="Site configuration file (default: $LDF_CONFIG)."),
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show version.")
    ] = False,
) -> None:
    """The data facility of a survey telescope."""
    ctx.obj = {"config_path": config}


def _report(exc: LdfError) -> int:
    wants_json = "--json" in sys.argv
    if wants_json:
        body = {"error": {"code": exc.code, "message": str(exc).splitlines()[0]}}
        if isinstance(exc, ConfigError):
            body["error"]["problems"] = exc.problems  # type: ignore[assignment]
        sys.stdout.write(json.dumps(body) + "\n")
    sys.stderr.write(f"error: {exc}\n")
    return exc.exit_code


_register_subapps()


def main() -> None:
    """Entry point of the ``ldf`` command."""
    # Standalone mode: typer reports usage errors (exit 2) and Ctrl-C itself; `_LdfGroup`
    # has already turned our own errors into one line and an exit code.
    app()

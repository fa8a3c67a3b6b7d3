"""``ldf config``: show the resolved configuration, validate a file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
import yaml

from ldf.cliutil import console, print_json, settings_from
from ldf.config.loader import masked_dump, validate_file

app = typer.Typer(help="Site configuration.", no_args_is_help=True)


@app.command("show")
def show(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Print the resolved configuration (defaults, file and LDF_* overrides; secrets masked)."""
    data = masked_dump(settings_from(ctx))
    if as_json:
        print_json(data)
    else:
        console.print(yaml.safe_dump(data, sort_keys=False), end="", highlight=False)


@app.command("validate")
def validate(
    file: Annotated[Path, typer.Argument(help="Configuration file to check.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Check a configuration file; list every error with its location (exit code 2)."""
    settings = validate_file(file)
    if as_json:
        print_json({"file": str(file), "valid": True, "sites": sorted(settings.sites)})
    else:
        console.print(f"{file}: valid ({len(settings.sites)} sites, bus {settings.bus.url})")

"""Helpers every command-line module shares: consoles, JSON output, the current settings."""

from __future__ import annotations

import json
import sys
from typing import Any

import typer
from rich.console import Console

from ldf.config import Settings, load_settings

__all__ = ["console", "err_console", "print_json", "settings_from"]

console = Console()
"""Console for normal output."""

err_console = Console(stderr=True)
"""Console for errors and progress, so stdout stays clean for --json."""


def print_json(data: Any) -> None:
    """Write data as JSON on stdout (no colour, no wrapping: scripts read it)."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def settings_from(ctx: typer.Context) -> Settings:
    """The settings for this invocation, loaded once from the root ``--config`` option."""
    root = ctx.find_root()
    obj = root.obj if isinstance(root.obj, dict) else {}
    if "settings" not in obj:
        obj["settings"] = load_settings(obj.get("config_path"))
        root.obj = obj
    settings = obj["settings"]
    assert isinstance(settings, Settings)
    return settings

"""``ldf bench``: run the benchmarks in the repository's ``benchmarks/`` folder.

Each benchmark is a script that prints one JSON object: the figure, the comparison run in the
same process (raw disk, raw library or peer tool) and the ratio. ``ldf bench all`` runs every
script and prints a JSON list.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

from ldf.cliutil import print_json
from ldf.errors import NotFoundError

app = typer.Typer(
    help="Benchmarks (JSON figures with their same-run baselines).", no_args_is_help=True
)


def benchmarks_dir() -> Path:
    """The ``benchmarks/`` folder of the source tree ldf runs from."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent / "benchmarks"
        if candidate.is_dir() and (parent / "pyproject.toml").exists():
            return candidate
    raise NotFoundError("no benchmarks/ folder: run ldf bench from a source checkout (make bench)")


def available() -> list[str]:
    """Names of the benchmarks (script names without .py)."""
    return sorted(p.stem for p in benchmarks_dir().glob("*.py") if not p.stem.startswith("_"))


def run(name: str, args: list[str]) -> dict[str, object]:
    """Run one benchmark script; return its JSON result."""
    script = benchmarks_dir() / f"{name}.py"
    if not script.exists():
        raise NotFoundError(f"no benchmark {name!r}; available: {', '.join(available())}")
    proc = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"benchmark": name, "error": tail, "exit_code": proc.returncode}
    result: dict[str, object] = json.loads(proc.stdout)
    return result


@app.command("all")
def run_all() -> None:
    """Run every benchmark with its defaults; print a JSON list."""
    print_json([run(name, []) for name in available()])


@app.command("run", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def run_one(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Benchmark name, e.g. 'sim'.")],
) -> None:
    """Run one benchmark; extra options go to its script (e.g. ldf bench run sim --detectors 2)."""
    print_json(run(name, list(ctx.args)))


@app.command("list")
def list_benchmarks() -> None:
    """List the benchmarks."""
    for name in available():
        typer.echo(name)

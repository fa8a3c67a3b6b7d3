"""Loading and validating configuration files, with every error located in its file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import SecretStr, ValidationError

from ldf.config.models import Settings, yaml_data
from ldf.errors import ConfigError

__all__ = ["load_settings", "masked_dump", "validate_file"]

CONFIG_ENV = "LDF_CONFIG"
"""Environment variable naming the configuration file when none is given."""


def _compose(text: str, path: Path) -> tuple[dict[str, Any], yaml.Node | None]:
    """Parse YAML text into data and its node tree (the tree keeps line numbers)."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{path} is not valid YAML", [f"{where}: {exc.problem or exc}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML", [f"{path}: {exc}"]) from None
    if data is None:
        return {}, node
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path} must hold a mapping of settings", [f"{path}:1:1: top level is not a mapping"]
        )
    return data, node


def _locate(
    node: yaml.Node | None, loc: tuple[int | str, ...], *, at_key: bool = False
) -> yaml.Node | None:
    """Follow a pydantic error location through the YAML node tree, as far as it goes.

    With ``at_key`` the last part's key is returned instead of its value (unknown keys).
    """
    found = node
    for i, part in enumerate(loc):
        if isinstance(found, yaml.MappingNode):
            pair = next(((k, v) for k, v in found.value if k.value == str(part)), None)
            if pair is None:
                return found
            found = pair[0] if at_key and i == len(loc) - 1 else pair[1]
        elif isinstance(found, yaml.SequenceNode) and isinstance(part, int):
            if part >= len(found.value):
                return found
            found = found.value[part]
        else:
            return found
    return found


def _env_for(loc: tuple[int | str, ...]) -> str | None:
    """Name the LDF_* environment variable that set this location, if one did."""
    for depth in range(len(loc), 0, -1):
        name = "LDF_" + "__".join(str(p).upper() for p in loc[:depth])
        if name in os.environ:
            return name
    return None


def _problems(
    exc: ValidationError,
    path: Path | None,
    node: yaml.Node | None,
    data: dict[str, Any],
    overrides: dict[str, Any] | None = None,
) -> list[str]:
    problems = []
    for err in exc.errors(include_url=False):
        # Drop pydantic's internal location parts (e.g. 'function-after[...]').
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and "[" in p))
        dotted = ".".join(str(p) for p in loc) or "(top level)"
        env = _env_for(loc)
        if env:
            where = f"environment {env}"
        elif path is not None and loc and loc[0] in data:
            target = _locate(node, loc, at_key=err["type"] == "extra_forbidden")
            mark = target.start_mark if target is not None else None
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        elif overrides and loc and loc[0] in overrides:
            where = "(arguments)"
        else:
            where = str(path) if path is not None else "(defaults)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown setting (check the spelling; see 'ldf config show' for valid keys)"
        problems.append(f"{where}: {dotted}: {msg}")
    return problems


def load_settings(path: str | Path | None = None, **overrides: Any) -> Settings:
    """Load the site configuration.

    Parameters
    ----------
    path
        YAML file; when None, ``$LDF_CONFIG`` if set, else embedded defaults only.
    **overrides
        Values that win over everything else (used by tests and the CLI).

    Raises
    ------
    ConfigError
        The file is missing, not YAML, or has invalid values; every problem is listed with
        its location.
    """
    if path is None and os.environ.get(CONFIG_ENV):
        path = os.environ[CONFIG_ENV]
    file = Path(path) if path is not None else None
    data: dict[str, Any] = {}
    node: yaml.Node | None = None
    if file is not None:
        try:
            text = file.read_text()
        except FileNotFoundError:
            raise ConfigError(f"configuration file {file} does not exist") from None
        except OSError as exc:
            raise ConfigError(f"cannot read configuration file {file}: {exc.strerror}") from None
        data, node = _compose(text, file)
    token = yaml_data.set(data)
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = _problems(exc, file, node, data, overrides)
        n = len(problems)
        raise ConfigError(
            f"{file or 'configuration'}: {n} error{'s' if n != 1 else ''}", problems
        ) from None
    finally:
        yaml_data.reset(token)


def validate_file(path: str | Path) -> Settings:
    """Validate a configuration file; raises `ConfigError` listing every problem."""
    return load_settings(path)


def _mask_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def masked_dump(settings: Settings) -> dict[str, Any]:
    """Resolved settings as plain data, with secrets and URL passwords masked."""

    def walk(value: Any, key: str = "") -> Any:
        if isinstance(value, SecretStr):
            return "***" if value.get_secret_value() else ""
        if isinstance(value, dict):
            return {k: walk(v, str(k)) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, key) for v in value]
        if isinstance(value, str) and ("://" in value):
            return _mask_url(value)
        return value

    raw = settings.model_dump(mode="python")
    raw["databases"] = {
        role: settings.database_url(role)
        for role in sorted({"catalog", "apdb", "efd", *settings.databases})
    }
    dumped = walk(raw)
    return yaml.safe_load(yaml.safe_dump(_plain(dumped)))


def _plain(value: Any) -> Any:
    """Turn enums and paths into plain YAML-safe values."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "value") and not isinstance(value, int | float | str | bool):
        return value.value
    if isinstance(value, str):
        return str(value)
    return value

"""Settings dataclasses from defaults < TOML file < explicit overrides, with unknown keys refused."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

from edge_runtime.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def read_toml(path: str | Path) -> dict[str, Any]:
    """Parse a TOML file, translating errors into ConfigError."""
    try:
        return tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None


def merge_settings(cls, config_file: str | None, overrides: dict[str, Any], base: dict[str, Any] | None = None) -> dict[str, Any]:
    """``base`` < TOML file < non-None ``overrides``; refuses keys ``cls`` does not have."""
    values: dict[str, Any] = dict(base or {})
    if config_file:
        values.update(read_toml(config_file))
    values.update({k: v for k, v in overrides.items() if v is not None})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ConfigError(f"unknown settings {sorted(unknown)}; known: {sorted(names)}")
    return values

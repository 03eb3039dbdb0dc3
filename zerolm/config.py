"""Config loading shared by every stage: one YAML file plus `--set a.b=c` overrides.

Each component declares its own pydantic model deriving from `StrictModel`
(`extra="forbid"`), so a misspelt key is an error rather than silently ignored. This
module merges the YAML, CLI flags and overrides into a plain dict, validates it against
the stage's model, and turns pydantic's multi-line report into one line that names
the offending key (raised as UserError: exit code 2).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Mapping, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from zerolm.errors import UserError


class StrictModel(BaseModel):
    """Base for every config model: unknown keys are errors, values are validated.

    A section whose default is a factory with the stage's own values (RL's optimizer:
    lr 1e-6, no weight decay, a flat schedule) keeps those values for the keys a user
    leaves out: `optim: {lr: 1e-5}` changes the lr only, instead of silently falling
    back to the section class's defaults for everything else."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @model_validator(mode="before")
    @classmethod
    def _keep_stage_defaults(cls, data):
        if not isinstance(data, Mapping):
            return data
        merged = None
        for name, field in cls.model_fields.items():
            given = data.get(name)
            if not isinstance(given, Mapping) or field.default_factory is None:
                continue
            base = field.default_factory()
            if isinstance(base, BaseModel) and base.model_fields_set:
                merged = dict(data) if merged is None else merged
                merged[name] = {**base.model_dump(include=base.model_fields_set), **given}
        return data if merged is None else merged


M = TypeVar("M", bound=BaseModel)


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise UserError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping at the top level")
    return data


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a","b","c"], value) with the value parsed as YAML
    (so `3`, `0.5`, `true`, `[a, b]` get their types; plain words stay strings)."""
    if "=" not in item:
        raise UserError(f"--set expects key=value, got {item!r}")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise UserError(f"--set has an empty key in {item!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def set_path(data: dict, path: list[str], value: Any) -> None:
    """Set data[p0][p1]...= value, creating mappings on the way. A list element is
    addressed by its index (`inputs.0.source=x`)."""
    node: Any = data
    for i, part in enumerate(path[:-1]):
        if isinstance(node, list):
            node = node[_index(node, part, path[: i + 1])]
            continue
        if part not in node or node[part] is None:
            node[part] = {}
        elif not isinstance(node[part], (dict, list)):
            raise UserError(f"--set {'.'.join(path)}: {'.'.join(path[: i + 1])} is not a mapping")
        node = node[part]
    last = path[-1]
    if isinstance(node, list):
        node[_index(node, last, path)] = value
    else:
        node[last] = value


def _index(node: list, part: str, path: list[str]) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise UserError(f"--set {'.'.join(path)}: no list element {part!r}")
    return int(part)


def deep_merge(base: dict, extra: Mapping) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def format_validation_error(exc: ValidationError) -> str:
    """One line per problem, key path first: `filters.length.min_chars: Input should be
    a valid integer (got 'abc')`. Usually there is only one."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ())) or "(top level)"
        if err.get("type") == "extra_forbidden":
            parts.append(f"{loc}: unknown key")
            continue
        msg = err.get("msg", "invalid value")
        got = err.get("input")
        if err.get("type") != "missing" and not isinstance(got, (dict, list)):
            msg += f" (got {got!r})"
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


def build_config(
    model: type[M],
    *,
    config_file: str | Path | None = None,
    base: Mapping | None = None,
    flags: Mapping | None = None,
    overrides: Iterable[str] = (),
) -> M:
    """Validate base < YAML file < CLI flags < --set overrides against `model`."""
    data: dict = dict(base or {})
    if config_file:
        data = deep_merge(data, load_yaml(config_file))
    if flags:
        data = deep_merge(data, {k: v for k, v in flags.items() if v is not None})
    for item in overrides:
        path, value = parse_override(item)
        set_path(data, path, value)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise UserError(f"config error: {format_validation_error(exc)}") from None


def config_hash(cfg: BaseModel | Mapping, *, exclude: set[str] | None = None) -> str:
    """Stable sha256 of a config (key order does not matter); the `_SUCCESS` markers
    carry it so a rerun with the same config is a no-op."""
    data = cfg.model_dump(mode="json", exclude=exclude) if isinstance(cfg, BaseModel) else dict(cfg)
    blob = json.dumps(data, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()

"""Structured configs on OmegaConf: dataclass schemas, YAML files with ``extends``, dotted overrides.

Every configuration of the package (training, the comparison study) is a dataclass schema. Values come
from layers merged in order onto :func:`omegaconf.OmegaConf.structured` of the schema, which checks
every key and converts every value to its annotated type:

* YAML files, where ``extends: NAME`` (a file next to it, or a name in a config folder) inherits
  another file first;
* dotted overrides ``section.key=value`` (YAML values: ``1e-3``, ``[0.9, 0.95]``, ``null``, ``true``)
  or a flat mapping ``{"section.key": value}``.

Any bad key or value raises :class:`ConfigError` with a one-line message naming it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

T = TypeVar("T")
Overrides = Iterable[str] | Mapping[str, Any] | None
MAX_EXTENDS_DEPTH = 8


class ConfigError(ValueError):
    """An invalid configuration: unknown file, section or key, a value of the wrong type or range."""


def _valid_keys(schema: type, dotted_parent: str) -> list[str]:
    """Field names of the dataclass at ``dotted_parent`` in the schema's defaults ([] if not one)."""
    node: Any = schema()
    for part in [p for p in dotted_parent.split(".") if p]:
        node = getattr(node, part, None)
    return [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else []


def _error(e: OmegaConfBaseException, schema: type, where: str = "") -> ConfigError:
    key = e.full_key or ""
    if isinstance(e, ConfigKeyError) or "not in" in str(e):
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        valid = _valid_keys(schema, parent)
        scope = f"'{parent}'" if parent else "the config"
        return ConfigError(f"unknown key {key!r}{where}; valid keys of {scope}: {valid}")
    first = str(getattr(e, "msg", "") or e).splitlines()[0]
    return ConfigError(f"{key}: {first}{where}" if key else f"{first}{where}")


def resolve_file(path_or_name: str | Path, config_dir: Path | None = None) -> Path:
    """A YAML path, or the name of a file in ``config_dir`` (``"tiny"`` -> ``config_dir/tiny.yaml``)."""
    p = Path(path_or_name)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        return p
    if config_dir is not None and (config_dir / f"{p}.yaml").is_file():
        return config_dir / f"{p}.yaml"
    shipped = sorted(f.stem for f in config_dir.glob("*.yaml")) if config_dir is not None else []
    raise ConfigError(f"unknown config {str(path_or_name)!r}: not a file, and not a shipped config "
                      f"(choose from {shipped})")


def read_yaml(path_or_name: str | Path, config_dir: Path | None = None, depth: int = 0) -> DictConfig:
    """A YAML file as an OmegaConf node, with its ``extends`` chain merged underneath it."""
    if depth > MAX_EXTENDS_DEPTH:
        raise ConfigError(f"config 'extends' chain deeper than {MAX_EXTENDS_DEPTH} (a cycle?)")
    path = resolve_file(path_or_name, config_dir)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config {str(path)!r} is not valid YAML: {str(e).splitlines()[0]}") from None
    raw = raw if raw is not None else {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config {str(path)!r} must be a mapping of sections, got {type(raw).__name__}")
    parent = raw.pop("extends", None)
    node = OmegaConf.create(raw)
    if parent is None:
        return node
    near = path.parent / f"{parent}.yaml"
    base = read_yaml(near if near.is_file() else str(parent), config_dir, depth + 1)
    return OmegaConf.merge(base, node)


def override_node(overrides: Overrides) -> DictConfig:
    """Dotted overrides (``["a.b=1", ...]`` or ``{"a.b": 1}``) as one nested OmegaConf node."""
    if not overrides:
        return OmegaConf.create({})
    if isinstance(overrides, Mapping):
        node = OmegaConf.create({})
        for key, value in overrides.items():
            OmegaConf.update(node, str(key), value, merge=True, force_add=True)
        return node
    items = list(overrides)
    bad = [o for o in items if "=" not in o or not o.split("=", 1)[0].strip()]
    if bad:
        raise ConfigError(f"override {bad[0]!r} must look like section.key=value")
    try:
        return OmegaConf.from_dotlist([o.strip() for o in items])
    except OmegaConfBaseException as e:
        raise ConfigError(f"bad override: {str(e).splitlines()[0]}") from None


def build(schema: type[T], *layers: DictConfig | Mapping[str, Any]) -> T:
    """Merge ``layers`` onto the schema's defaults; return the typed dataclass instance."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), *layers)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        raise _error(e, schema) from None


def to_yaml(obj: Any) -> str:
    """YAML text of a config dataclass (or a plain mapping), keys in declaration order."""
    data = dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else dict(obj)
    return yaml.safe_dump(data, sort_keys=False)


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": {}}`` -> ``{"a.b": 1}`` (mappings are walked, lists are values)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


__all__ = ["ConfigError", "build", "flatten", "override_node", "read_yaml", "resolve_file", "to_yaml"]

"""YAML configs with one level of inheritance and typed dotted overrides.

A config file is a nested mapping. It may name one ``base`` file (a path relative to it); the
base may not name another. Keys are merged recursively, and a child may only set keys its base
has, so a typo is an error rather than a silently ignored setting. Command-line overrides
``key.sub=value`` are parsed as YAML and must keep the type of the value they replace.
The resolved config is a plain dict, saved with every run and checkpoint.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parent


class UserError(Exception):
    """An error the user can fix (bad config, missing file); scripts print it without a traceback."""


def error_message(err: Exception) -> str:
    """The text to show for an error, without the worker traceback a DataLoader wraps around it."""
    text = str(err)
    if "Original Traceback" in text and "UserError: " in text:
        return text.rsplit("UserError: ", 1)[1].strip()
    return text


def resolve_config_path(name: str) -> Path:
    """Find a config given as a path or as a bare name in ``configs/`` (``demo`` or ``demo.yaml``)."""
    candidates = [Path(name), CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml"]
    for path in candidates:
        if path.is_file():
            return path.resolve()
    available = ", ".join(sorted(p.name for p in CONFIG_DIR.glob("*.yaml")))
    raise UserError(
        f"config file '{name}' not found (looked for {', '.join(str(p) for p in candidates)}). "
        f"Give a path to a YAML file or one of the configs in {CONFIG_DIR}: {available}."
    )


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"config file {path} is not valid YAML: {err}. Fix the syntax and try again.") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of keys to values, not {type(data).__name__}.")
    return data


def _type_ok(old: Any, new: Any) -> bool:
    """True if ``new`` may replace ``old``: same type, an int where a float was, or None for None."""
    if old is None:
        return True
    if isinstance(old, bool) or isinstance(new, bool):
        return isinstance(old, bool) and isinstance(new, bool)
    if isinstance(old, float) and isinstance(new, int):
        return True
    return isinstance(new, type(old))


def _merge(base: dict[str, Any], child: dict[str, Any], source: str, prefix: str = "") -> dict[str, Any]:
    """Return ``base`` updated by ``child``; every key of ``child`` must exist in ``base`` with the same type."""
    merged = copy.deepcopy(base)
    for key, value in child.items():
        dotted = f"{prefix}{key}"
        if key not in merged:
            known = ", ".join(f"{prefix}{k}" for k in merged)
            raise UserError(f"unknown config key '{dotted}' in {source}. Known keys here: {known}. Check the spelling.")
        old = merged[key]
        if isinstance(old, dict):
            if not isinstance(value, dict):
                raise UserError(f"config key '{dotted}' in {source} must be a mapping, got {value!r}.")
            merged[key] = _merge(old, value, source, f"{dotted}.")
        elif not _type_ok(old, value):
            raise UserError(
                f"config key '{dotted}' in {source} must be of type {type(old).__name__} "
                f"(like the default {old!r}), got {value!r} of type {type(value).__name__}."
            )
        else:
            merged[key] = float(value) if isinstance(old, float) else value
    return merged


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``key.sub=value`` into the dotted key and the YAML-parsed value."""
    if "=" not in text or text.startswith("="):
        raise UserError(f"override '{text}' must look like key.sub=value (for example train.iters=1000).")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def apply_overrides(config: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` strings to ``config``, keeping each key's type."""
    for text in overrides:
        key, value = parse_override(text)
        nested: Any = value
        for part in reversed(key.split(".")):
            nested = {part: nested}
        config = _merge(config, nested, f"command-line override '{text}'")
    return config


def load_config(name: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """Load a config by path or bare name, merge it over its base and apply overrides.

    The returned dict has a ``config_name`` key (the file's stem), used for the default work dir.
    """
    path = resolve_config_path(name)
    data = _read_yaml(path)
    base_name = data.pop("base", None)
    if base_name is None:
        config = data
    else:
        base_path = (path.parent / str(base_name)).resolve()
        if not base_path.is_file():
            raise UserError(f"config {path} names base '{base_name}', but {base_path} does not exist.")
        base = _read_yaml(base_path)
        if "base" in base:
            raise UserError(
                f"config {base_path} (the base of {path}) names a base itself; only one level of "
                f"inheritance is allowed. Copy the settings into {base_path.name} instead."
            )
        config = _merge(base, data, str(path))
    config = apply_overrides(config, overrides or [])
    config["config_name"] = path.stem
    return config


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config to ``{"a.b": value}`` (the dotted keys that overrides use)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_same_model(saved: dict[str, Any], wanted: dict[str, Any], saved_name: str, wanted_name: str) -> None:
    """Raise UserError if two configs describe different models (the ``model`` section differs)."""
    keys = ("num_classes", "aux_head", "deform")
    diffs = [k for k in keys if saved["model"].get(k) != wanted["model"].get(k)]
    if diffs:
        details = "; ".join(f"model.{k}: {saved['model'].get(k)} vs {wanted['model'].get(k)}" for k in diffs)
        raise UserError(
            f"{saved_name} holds a model that does not match {wanted_name} ({details}). "
            f"Use the config the checkpoint was trained with, or leave --config out to use the one stored in it."
        )

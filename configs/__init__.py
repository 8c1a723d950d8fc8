"""YAML configs with one level of inheritance and typed dotted overrides.

A config file is a nested mapping. It may name one ``base`` file (a path relative to it); the
base may not name another. Keys are merged recursively, and a child may only set keys its base
has, so a typo is an error rather than a silently ignored setting. Command-line overrides
``key.sub=value`` are parsed as YAML and must keep the type of the value they replace.
The resolved config is a plain dict, saved with every run and checkpoint.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parent
BASE_CONFIG = CONFIG_DIR / "ade20k-base.yaml"

# ResNet-50's stages: blocks per stage and the channels of their 3x3 conv2 (what model.deform.* may select).
STAGE_BLOCKS = {"layer1": 3, "layer2": 4, "layer3": 6, "layer4": 3}
STAGE_WIDTHS = {"layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512}
# Values of the enumerated keys. The op keys share one vocabulary: "reference" (PyTorch/torchvision) or "triton".
CHOICES = {
    "model.deform_op": ("reference", "triton"),
    "model.head": ("torchvision", "mmseg"),
    "data.dataset": ("ade20k", "demo"),
    "data.resize_filter": ("antialias", "bilinear"),
    "train.amp": ("auto", "bf16", "fp16", "none"),
    "train.loss_op": ("reference", "triton"),
    "train.loss_norm": ("labelled", "all"),
    "eval.mode": ("whole", "slide"),
}


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, except that ``1e-3`` is a float (YAML 1.1 reads it as a string)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)(?:[eE][-+]?[0-9]+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)
# Integers must stay integers: the int resolver, added first for these characters, is tried before the float one.
_Loader.yaml_implicit_resolvers = {
    k: sorted(v, key=lambda tag_re: tag_re[0] != "tag:yaml.org,2002:int") for k, v in _Loader.yaml_implicit_resolvers.items()
}


def read_yaml_text(text: str) -> Any:
    """Parse YAML text with the config loader (safe; ``1e-3`` is a float)."""
    return yaml.load(text, Loader=_Loader)


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
        data = read_yaml_text(path.read_text())
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
        value = read_yaml_text(raw) if raw != "" else ""
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
    validate_config(config, str(path))
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


# The keys that decide the model's architecture (its state-dict keys and shapes). Everything else, the
# offset learning-rate multiplier and the op implementation included, may differ between a checkpoint and a config.
ARCHITECTURE_KEYS = (
    "model.num_classes", "model.aux_head", "model.head", "model.deform.version", "model.deform.stages",
    "model.deform.blocks", "model.deform.groups", "model.deform.dilation",
)


def check_same_model(saved: dict[str, Any], wanted: dict[str, Any], saved_name: str, wanted_name: str) -> None:
    """Raise UserError if two configs describe different architectures (``ARCHITECTURE_KEYS`` differ)."""
    a, b = flatten(saved), flatten(wanted)
    diffs = [k for k in ARCHITECTURE_KEYS if a.get(k) != b.get(k)]
    if diffs:
        details = "; ".join(f"{k}: {a.get(k)} vs {b.get(k)}" for k in diffs)
        raise UserError(
            f"{saved_name} holds a model that does not match {wanted_name} ({details}). "
            f"Use the config the checkpoint was trained with."
        )


# ------------------------------------------------------------------------------------------ validation
def _fail(source: str, key: str, requirement: str, value: Any) -> UserError:
    return UserError(
        f"config key '{key}' in {source} must be {requirement}, got {value!r}. Fix it in the config file or "
        f"override it on the command line ({key}=...)."
    )


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# key -> (test, what the value must be); each test sees the key's value.
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "seed": (lambda v: _integer(v) and v >= 0, "a non-negative integer"),
    "model.num_classes": (lambda v: _integer(v) and v >= 1, "a positive integer"),
    "model.aux_loss_weight": (lambda v: _number(v) and v >= 0, "a number >= 0"),
    "model.deform.version": (lambda v: v in (0, 1, 2) and _integer(v), "0 (plain conv), 1 (DCNv1) or 2 (DCNv2)"),
    "model.deform.groups": (lambda v: _integer(v) and v >= 1, "a positive integer"),
    "model.deform.offset_lr_mult": (lambda v: _number(v) and v >= 0, "a number >= 0"),
    "model.deform.dilation": (lambda v: _integer(v) and v >= 0, "an integer >= 0 (0 = the network's own)"),
    "data.root": (lambda v: isinstance(v, str) and v != "", "a folder path"),
    "data.scale": (lambda v: isinstance(v, list) and len(v) == 2 and all(_number(x) and x > 0 for x in v),
                   "a list of two positive numbers (long side, short side), like [2048, 512]"),
    "data.ratio_range": (lambda v: isinstance(v, list) and len(v) == 2 and all(_number(x) and x > 0 for x in v)
                         and v[0] <= v[1], "a list of two positive numbers [low, high] with low <= high, like [0.5, 2.0]"),
    "data.crop_size": (lambda v: _integer(v) and v >= 8, "an integer >= 8, like 512"),
    "data.cat_max_ratio": (lambda v: _number(v) and 0 < v <= 1, "a number in (0, 1] (1 turns the test off)"),
    "data.num_workers": (lambda v: _integer(v) and v >= 0, "an integer >= 0"),
    "data.train_eval_images": (lambda v: _integer(v) and v >= 0, "an integer >= 0 (0 = all)"),
    "train.iters": (lambda v: _integer(v) and v >= 1, "a positive integer"),
    "train.batch_size": (lambda v: _integer(v) and v >= 1, "a positive integer"),
    "train.accum_steps": (lambda v: _integer(v) and v >= 1, "a positive integer (micro-batches per optimizer step)"),
    "train.lr": (lambda v: _number(v) and v > 0, "a positive number"),
    "train.min_lr": (lambda v: _number(v) and v >= 0, "a number >= 0"),
    "train.poly_power": (lambda v: _number(v) and v >= 0, "a number >= 0"),
    "train.momentum": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "train.weight_decay": (lambda v: _number(v) and v >= 0, "a number >= 0"),
    "train.log_interval": (lambda v: _integer(v) and v >= 1, "a positive integer"),
    "train.val_interval": (lambda v: _integer(v) and v >= 1, "a positive integer"),
    "train.ckpt_interval": (lambda v: _integer(v) and v >= 1, "a positive integer"),
    "train.val_max_images": (lambda v: _integer(v) and v >= 0, "an integer >= 0 (0 = all)"),
    "train.tb_images": (lambda v: _integer(v) and v >= 0, "an integer >= 0"),
    "eval.slide_crop": (lambda v: _integer(v) and v >= 8, "an integer >= 8"),
    "eval.slide_stride": (lambda v: _integer(v) and v >= 1, "a positive integer"),
}
_BOOLEANS = (
    "model.pretrained_backbone", "model.aux_head", "data.photometric", "train.no_decay_norm_bias",
    "train.channels_last", "train.compile", "train.sync_bn",
)


def validate_config(config: dict[str, Any], source: str) -> None:
    """Check every value of a resolved config (types, ranges, choices, ResNet-50 stage and block indices).

    Raises UserError naming the key, the rule and the fix. Builders and the training loop trust a
    config that passed; checks that depend on the launch (batch size vs processes) stay with the launch.
    """
    flat = flatten(config)
    base_keys = flatten(_read_yaml(BASE_CONFIG))
    missing = [k for k in base_keys if k not in flat]
    if missing:
        raise UserError(
            f"config {source} lacks the keys {', '.join(missing)}. Name configs/ade20k-base.yaml as its base "
            f"(base: ade20k-base.yaml) or add them."
        )
    for key, (test, requirement) in _RULES.items():
        if not test(flat[key]):
            raise _fail(source, key, requirement, flat[key])
    for key in _BOOLEANS:
        if not isinstance(flat[key], bool):
            raise _fail(source, key, "true or false", flat[key])
    for key, choices in CHOICES.items():
        if flat[key] not in choices:
            raise _fail(source, key, "one of " + ", ".join(choices), flat[key])
    if flat["train.min_lr"] > flat["train.lr"]:
        raise _fail(source, "train.min_lr", f"at most train.lr ({flat['train.lr']})", flat["train.min_lr"])
    if flat["eval.slide_stride"] > flat["eval.slide_crop"]:
        raise _fail(source, "eval.slide_stride", f"at most eval.slide_crop ({flat['eval.slide_crop']})",
                    flat["eval.slide_stride"])
    _validate_deform(flat, source)


def _validate_deform(flat: dict[str, Any], source: str) -> None:
    """model.deform.stages/blocks/groups against ResNet-50's stages (only when deformable layers are on)."""
    stages, blocks, groups = flat["model.deform.stages"], flat["model.deform.blocks"], flat["model.deform.groups"]
    if not isinstance(stages, list) or any(s not in STAGE_BLOCKS for s in stages) or len(set(stages)) != len(stages):
        raise _fail(source, "model.deform.stages", f"a list of distinct stages from {list(STAGE_BLOCKS)}", stages)
    if not isinstance(blocks, list) or any(not _integer(b) or b < 0 for b in blocks) or len(set(blocks)) != len(blocks):
        raise _fail(source, "model.deform.blocks", "a list of distinct block indices >= 0 ([] = every block)", blocks)
    if flat["model.deform.version"] == 0 and flat["model.deform.dilation"] == 0:
        return
    if not stages:
        raise _fail(source, "model.deform.stages", "non-empty when model.deform.version or dilation is set", stages)
    for stage in stages:
        if blocks and max(blocks) >= STAGE_BLOCKS[stage]:
            raise _fail(source, "model.deform.blocks", f"block indices that exist in {stage} (0..{STAGE_BLOCKS[stage] - 1})",
                        blocks)
        if STAGE_WIDTHS[stage] % groups:
            raise _fail(source, "model.deform.groups",
                        f"a divisor of the {STAGE_WIDTHS[stage]} input channels of {stage}'s conv2 (a power of 2)", groups)


# ------------------------------------------------------------------------------ configs of older runs
# Values renamed since earlier versions of this repository: (dotted key, old value) -> new value.
_RENAMED_VALUES = {("model.deform_op", "torchvision"): "reference"}


def upgrade_config(saved: dict[str, Any], source: str) -> dict[str, Any]:
    """A config saved by an earlier version (in a checkpoint or run folder) completed for today's code.

    Keys added since then take their values from configs/ade20k-base.yaml, which are chosen to behave
    as the code did before they existed; renamed values are translated. The result is validated.
    """
    def fill(base: dict[str, Any], old: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        merged = copy.deepcopy(old)
        for key, value in base.items():
            if isinstance(value, dict):
                merged[key] = fill(value, old.get(key, {}) if isinstance(old.get(key), dict) else {}, f"{prefix}{key}.")
            elif key not in merged:
                merged[key] = copy.deepcopy(value)
            elif isinstance(merged[key], str):
                merged[key] = _RENAMED_VALUES.get((f"{prefix}{key}", merged[key]), merged[key])
        return merged

    config = fill(_read_yaml(BASE_CONFIG), saved)
    validate_config(config, source)
    return config


# ------------------------------------------------------------------------------------------ resuming
# What may differ between a run's checkpoint and the config it is resumed with. The learning rate and its
# schedule, the optimizer's settings and everything about speed, logging and locations may change: they apply
# from the resume iteration on and are recorded. Whatever decides the data a step sees (seed, batch size,
# augmentation) may not: the run would silently become another experiment.
RESUME_FIXED = ARCHITECTURE_KEYS + (
    "seed", "model.pretrained_backbone", "model.aux_loss_weight", "data.dataset", "data.scale", "data.ratio_range",
    "data.crop_size", "data.cat_max_ratio", "data.photometric", "data.resize_filter", "train.batch_size",
    "train.loss_norm",
)
RESUME_IGNORED = ("config_name",)


def resume_changes(saved: dict[str, Any], wanted: dict[str, Any], source: str) -> dict[str, list[Any]]:
    """The keys whose values differ between a checkpoint's config and the resumed one: ``{key: [old, new]}``.

    Raises UserError for keys in ``RESUME_FIXED``, naming them and what to do instead.
    """
    a, b = flatten(saved), flatten(wanted)
    changes = {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and k not in RESUME_IGNORED}
    fixed = [k for k in changes if k in RESUME_FIXED]
    if fixed:
        details = "; ".join(f"{k}: {changes[k][0]} vs {changes[k][1]}" for k in fixed)
        raise UserError(
            f"--resume cannot change {', '.join(fixed)} ({details}; {source} has the first values): they decide the "
            f"model or the data every step sees, so the resumed run would be another experiment. Resume with the "
            f"run's own settings, or start a new run in another --work-dir. (train.lr, the schedule, intervals and "
            f"speed settings may change on resume.)"
        )
    return changes

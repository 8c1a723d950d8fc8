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
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parent

# ResNet-50's stages: blocks per stage and the channels of their 3x3 conv2 (what model.deform.* may select).
STAGE_BLOCKS = {"layer1": 3, "layer2": 4, "layer3": 6, "layer4": 3}
STAGE_WIDTHS = {"layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512}


class UserError(Exception):
    """An error the user can fix (bad config, missing file); command lines print it without a traceback and exit
    with ``exit_code``."""

    exit_code = 2


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
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise UserError(f"config file {path} is not valid YAML: {err}. Fix the syntax and try again.") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of keys to values, not {type(data).__name__}.")
    return data


def _typed(old: Any, new: Any) -> Any:
    """``new`` as the type of ``old`` (an int or a number like ``1e-3``, which YAML reads as a string, where a float
    was; in a list of floats, each item so), or raise TypeError."""
    if isinstance(old, bool) or isinstance(new, bool):
        if isinstance(old, bool) and isinstance(new, bool):
            return new
    elif isinstance(old, float) and isinstance(new, (int, str)):
        return float(new)  # ValueError for a string that is not a number
    elif isinstance(old, list) and isinstance(new, list) and any(isinstance(x, float) for x in old):
        return [_as_number(x) for x in new]
    elif isinstance(new, type(old)):
        return new
    raise TypeError


def _as_number(value: Any) -> Any:
    """A string that is a number (YAML reads ``1e-9`` as a string) as a float; anything else as it is."""
    try:
        return float(value) if isinstance(value, str) else value
    except ValueError:
        return value


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
        else:
            (test, requirement), _ = KEYS.get(dotted, ((lambda v: False, f"of type {type(old).__name__}"), ""))
            try:
                merged[key] = _typed(old, value)
            except (TypeError, ValueError):
                if not test(value):  # a key of two types takes either (train.accum_steps: auto or N)
                    raise UserError(
                        f"config key '{dotted}' in {source} must be {requirement} (like the default {old!r}), got "
                        f"{value!r} of type {type(value).__name__}."
                    ) from None
                merged[key] = value
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


def set_values(config: dict[str, Any], values: dict[str, Any], source: str) -> dict[str, Any]:
    """``config`` with the dotted keys of ``values`` set, each keeping its type (UserError naming ``source``)."""
    for key, value in values.items():
        nested: Any = value
        for part in reversed(key.split(".")):
            nested = {part: nested}
        config = _merge(config, nested, source)
    return config


def apply_overrides(config: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` strings to ``config``, keeping each key's type."""
    for text in overrides:
        config = set_values(config, dict([parse_override(text)]), f"command-line override '{text}'")
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


# ------------------------------------------------------------------------------------------ the key table
Rule = tuple[Callable[[Any], bool], str]  # a test of a value, and what the value must be


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(low: int, text: str = "", high: float = math.inf) -> Rule:
    return ((lambda v: isinstance(v, int) and not isinstance(v, bool) and low <= v <= high),
            text or (f"an integer >= {low}" if high == math.inf else f"an integer in {low}..{high}"))


def _real(low: float) -> Rule:
    return (lambda v: _is_number(v) and v >= low), f"a number >= {low}"


def _choice(*values: Any) -> Rule:
    return (lambda v: v in values), "one of " + ", ".join(str(v) for v in values)


def _pair(text: str, ordered: bool = False) -> Rule:
    return (lambda v: isinstance(v, list) and len(v) == 2 and all(_is_number(x) and x > 0 for x in v)
            and (not ordered or v[0] <= v[1])), text


_BOOL: Rule = (lambda v: isinstance(v, bool), "true or false")
_STAGES: Rule = (lambda v: isinstance(v, list) and len(set(v)) == len(v) and all(s in STAGE_BLOCKS for s in v),
                 f"a list of distinct stages from {list(STAGE_BLOCKS)}")
_BLOCKS: Rule = (lambda v: isinstance(v, list) and len(set(v)) == len(v)
                 and all(isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in v),
                 "a list of distinct block indices >= 0 ([] = every block)")
_SCALES: Rule = (lambda v: isinstance(v, list) and len(v) > 0 and all(_is_number(x) and x > 0 for x in v),
                 "a non-empty list of positive test scales, like [1.0]")

# Every key of configs/ade20k-base.yaml: the rule its value must follow and its kind. The kind says what a
# key decides, and every list of keys the code needs derives from it:
#   architecture  the model's state dict (checkpoint and config must agree); fixed on resume; differs between variants
#   variant       how a variant trains (offset learning rate); may change on resume; may differ between variants
#   recipe        what every step sees (data, seed, batch, loss); fixed on resume; the same in compared runs
#   schedule      the optimisation and evaluation settings; may change on resume (recorded); the same in compared runs
#   run           speed, logging and locations: change no number; free on resume; ignored by comparisons
KEYS: dict[str, tuple[Rule, str]] = {
    "seed": (_integer(0, "an integer in 0..2**64 - 1 (torch's seed range)", 2**64 - 1), "recipe"),
    "model.num_classes": (_integer(1, "an integer in 1..255 (labels are 8-bit, 255 = ignore; ADE20K has 150)", 255),
                          "architecture"),
    "model.pretrained_backbone": (_BOOL, "recipe"),
    "model.aux_head": (_BOOL, "architecture"),
    "model.aux_loss_weight": (_real(0), "recipe"),
    "model.deform.version": (_choice(0, 1, 2), "architecture"),
    "model.deform.stages": (_STAGES, "architecture"),
    "model.deform.blocks": (_BLOCKS, "architecture"),
    "model.deform.groups": (_integer(1), "architecture"),
    "model.deform.offset_lr_mult": (_real(0), "variant"),
    "model.deform.dilation": (_integer(0, "an integer >= 0 (0 = the network's own)"), "architecture"),
    "model.deform_op": (_choice("reference", "triton"), "run"),
    "model.head": (_choice("torchvision", "mmseg"), "architecture"),
    "data.dataset": (_choice("ade20k", "demo"), "recipe"),
    "data.root": (((lambda v: isinstance(v, str) and v != ""), "a folder path"), "run"),
    "data.scale": (_pair("a list of two positive numbers (long side, short side), like [2048, 512]"), "recipe"),
    "data.ratio_range": (_pair("a list of two positive numbers [low, high] with low <= high, like [0.5, 2.0]", True),
                         "recipe"),
    "data.crop_size": (_integer(8, "an integer >= 8, like 512"), "recipe"),
    "data.cat_max_ratio": (((lambda v: _is_number(v) and 0 < v <= 1), "a number in (0, 1] (1 turns the test off)"),
                           "recipe"),
    "data.photometric": (_BOOL, "recipe"),
    "data.resize_filter": (_choice("antialias", "bilinear"), "recipe"),
    "data.num_workers": (_integer(0), "run"),
    "data.train_eval_images": (_integer(0, "an integer >= 0 (0 = all)"), "schedule"),
    "train.iters": (_integer(1), "schedule"),
    "train.batch_size": (_integer(1), "recipe"),
    "train.accum_steps": (((lambda v: v == "auto" or _integer(1)[0](v)),
                           "auto or a positive integer (micro-batches per optimizer step)"), "schedule"),
    "train.lr": (((lambda v: _is_number(v) and v > 0), "a positive number"), "schedule"),
    "train.min_lr": (_real(0), "schedule"),
    "train.poly_power": (_real(0), "schedule"),
    "train.momentum": (((lambda v: _is_number(v) and 0 <= v < 1), "a number in [0, 1)"), "schedule"),
    "train.weight_decay": (_real(0), "schedule"),
    "train.no_decay_norm_bias": (_BOOL, "schedule"),
    "train.amp": (_choice("auto", "bf16", "fp16", "none"), "schedule"),
    "train.channels_last": (_BOOL, "run"),
    "train.compile": (_BOOL, "run"),
    "train.loss_op": (_choice("reference", "triton"), "run"),
    "train.loss_norm": (_choice("labelled", "all"), "recipe"),
    "train.sync_bn": (_BOOL, "schedule"),
    "train.log_interval": (_integer(1), "run"),
    "train.val_interval": (_integer(1), "run"),
    "train.ckpt_interval": (_integer(1), "run"),
    "train.val_max_images": (_integer(0, "an integer >= 0 (0 = all)"), "run"),
    "train.tb_images": (_integer(0), "run"),
    "eval.mode": (_choice("whole", "slide"), "schedule"),
    "eval.slide_crop": (_integer(8), "schedule"),
    "eval.slide_stride": (_integer(1), "schedule"),
    "eval.scales": (_SCALES, "schedule"),
    "eval.flip": (_BOOL, "schedule"),
}


def keys_of(*kinds: str) -> tuple[str, ...]:
    """The dotted keys of the given kinds (``KEYS``), in table order."""
    return tuple(key for key, (_, kind) in KEYS.items() if kind in kinds)


ARCHITECTURE_KEYS = keys_of("architecture")
RESUME_FIXED = keys_of("architecture", "recipe")


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config to ``{"a.b": value}`` (the dotted keys that overrides use)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _fail(source: str, key: str, requirement: str, value: Any) -> UserError:
    return UserError(
        f"config key '{key}' in {source} must be {requirement}, got {value!r}. Fix it in the config file or "
        f"override it on the command line ({key}=...)."
    )


def validate_config(config: dict[str, Any], source: str) -> None:
    """Check every value of a resolved config against ``KEYS``, and the rules that tie keys together.

    Raises UserError naming the key, the rule and the fix. Builders and the training loop trust a config that
    passed; checks that depend on the launch (batch size vs processes) stay with the launch.
    """
    flat = {k: v for k, v in flatten(config).items() if k != "config_name"}
    missing, unknown = [k for k in KEYS if k not in flat], [k for k in flat if k not in KEYS]
    if missing or unknown:
        raise UserError(
            f"config {source} does not have the keys of this version of the repository (missing: "
            f"{', '.join(missing) or 'none'}; unknown: {', '.join(unknown) or 'none'}). A config file names "
            f"configs/ade20k-base.yaml as its base; a run or checkpoint made by another version is read by that version."
        )
    for key, ((test, requirement), _) in KEYS.items():
        if not test(flat[key]):
            raise _fail(source, key, requirement, flat[key])
    if flat["train.min_lr"] > flat["train.lr"]:
        raise _fail(source, "train.min_lr", f"at most train.lr ({flat['train.lr']})", flat["train.min_lr"])
    accum = 1 if flat["train.accum_steps"] == "auto" else flat["train.accum_steps"]
    if (why := batch_split_error(flat["train.batch_size"], accum, 1)) is not None:
        raise UserError(f"config {source}: {why}")
    if flat["eval.slide_stride"] > flat["eval.slide_crop"]:
        raise _fail(source, "eval.slide_stride", f"at most eval.slide_crop ({flat['eval.slide_crop']})",
                    flat["eval.slide_stride"])
    _validate_deform(flat, source)


MIN_PER_FORWARD = 2  # images BatchNorm's statistics need in one forward (over one image they are noise, or fail)


def batch_split_error(batch_size: int, accum_steps: int, processes: int, synced: bool = False) -> str | None:
    """Why ``train.batch_size`` cannot run as ``processes`` x ``accum_steps`` forwards (None: it can).

    Each forward runs batch_size / (processes x accum_steps) images, and BatchNorm computes its statistics over
    them (over every process's with SyncBatchNorm, ``synced``): at least ``MIN_PER_FORWARD``.
    """
    split = f"train.batch_size={batch_size} (the global batch) over {processes} process(es) x train.accum_steps={accum_steps}"
    if batch_size % (processes * accum_steps):
        return f"{split} does not divide evenly: the batch must be divisible by processes x train.accum_steps."
    per_forward = batch_size // (processes * accum_steps)
    if per_forward * (processes if synced else 1) < MIN_PER_FORWARD:
        ways = ["raise train.batch_size (the recipe's is 16)"]
        ways += ["lower train.accum_steps"] if accum_steps > 1 else []
        ways += ["use fewer processes"] if processes > 1 else []
        return (f"{split} gives {per_forward} image per forward, and BatchNorm needs its statistics over at least "
                f"{MIN_PER_FORWARD} images: {'; or '.join(ways)}.")
    return None


def _validate_deform(flat: dict[str, Any], source: str) -> None:
    """model.deform.stages/blocks/groups against ResNet-50's stages (only when deformable or dilated layers are on)."""
    stages, blocks, groups = flat["model.deform.stages"], flat["model.deform.blocks"], flat["model.deform.groups"]
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


def differences(saved: dict[str, Any], wanted: dict[str, Any], keys: Iterable[str]) -> dict[str, list[Any]]:
    """``{key: [saved value, wanted value]}`` for the dotted ``keys`` whose values differ between two configs."""
    a, b = flatten(saved), flatten(wanted)
    return {k: [a.get(k), b.get(k)] for k in keys if a.get(k) != b.get(k)}


def check_same_model(saved: dict[str, Any], wanted: dict[str, Any], saved_name: str, wanted_name: str) -> None:
    """Raise UserError if two configs describe different architectures (``ARCHITECTURE_KEYS`` differ)."""
    if diffs := differences(saved, wanted, ARCHITECTURE_KEYS):
        details = "; ".join(f"{k}: {old} vs {new}" for k, (old, new) in diffs.items())
        raise UserError(
            f"{saved_name} holds a model that does not match {wanted_name} ({details}). "
            f"Use the config the checkpoint was trained with."
        )


def resume_changes(saved: dict[str, Any], wanted: dict[str, Any], source: str) -> dict[str, list[Any]]:
    """The keys whose values differ between a checkpoint's config and the resumed one: ``{key: [old, new]}``.

    Raises UserError for keys in ``RESUME_FIXED`` (the model, or what a step sees: the run would become another
    experiment), naming them and what to do instead.
    """
    changes = differences(saved, wanted, KEYS)
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

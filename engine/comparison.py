"""Comparing training runs: the study's table of mIoU, parameters and speed, with seeds grouped.

Each run folder is one written by train.py (``config.yaml``, ``last.pt``/``best.pt``, ``tb/``). Runs
whose resolved configs differ only in the seed (and in settings that do not change the result: loader
workers, data location, logging and checkpoint intervals) are one group, shown as mean ± sample std
over its runs. The group with ``model.deform.version: 0`` is the norm-conv reference; every other
group's difference to it is set against the seed-to-seed spread, so a difference smaller than the
noise of re-running with another seed is not read as an effect.

Validation and training mIoU come from ``RUN/eval_validation.json`` and ``RUN/eval_training.json``;
missing files are made with ``engine.evaluation.evaluate_checkpoint`` on the run's final checkpoint.
"""

from __future__ import annotations

import copy
import json
import math
import re
import statistics
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from configs import UserError, flatten, validate_config
from engine.checkpoint import load_checkpoint
from data.dataset import load_class_info
from engine.evaluation import EvalOptions, evaluate_checkpoint
from engine.statistics import PerImageCounts, compare_variants
from models.segmentor import build_model, count_parameters

# Config keys that do not change what a run learns: runs differing only in these are seeds of one group.
IGNORED_KEYS = (
    "seed", "data.num_workers", "data.root", "train.log_interval", "train.ckpt_interval", "train.tb_images",
    "train.val_interval", "train.val_max_images",
)
VAL_JSON, TRAIN_JSON = "eval_validation.json", "eval_training.json"
VAL_COUNTS = "per_image_validation.npz"  # per-image counts of the validation evaluation (the paired bootstrap)
NO_EVAL_MARK = "*"


@dataclass
class Run:
    """One run folder and the numbers read from it."""

    path: Path
    config: dict[str, Any]
    checkpoint: Path
    seed: int = 0
    val_miou: float | None = None  # of the final checkpoint (last.pt)
    val_from_checkpoint: bool = False  # True: the validation logged at the final iteration (--no-eval), not evaluate.py
    best_of_n: float | None = None  # the best of the validations logged during training (selected on val: optimistic)
    num_validations: int = 0
    train_miou: float | None = None
    val_images_per_s: float | None = None
    train_images_per_s: float | None = None
    params: int = 0
    deform_params: int = 0
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    perturbed: dict[str, float | None] = field(default_factory=dict)  # val mIoU under each perturbation


@dataclass
class Group:
    """Runs of one configuration that differ only in the seed."""

    key: str
    config: dict[str, Any]
    runs: list[Run]
    label: str = ""


@dataclass
class CompareOptions:
    """What compare.py was asked for (see its --help)."""

    runs: list[Path]
    out: Path | None = None
    no_eval: bool = False
    train_images: int | None = None
    val_images: int = 0
    data_root: str | None = None
    device: str | None = None
    ignore_key: list[str] = field(default_factory=list)
    resamples: int = 1000
    perturb: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------- reading
def load_run(path: Path) -> Run:
    """Read a run folder's config and its final checkpoint (last.pt; best.pt only where last.pt is gone)."""
    if not path.is_dir():
        raise UserError(
            f"run dir {path} does not exist or is not a folder. Give folders written by train.py "
            f"(runs/<config name> by default, or the --work-dir of a run)."
        )
    checkpoint = next((path / n for n in ("last.pt", "best.pt") if (path / n).is_file()), None)
    if checkpoint is None:
        raise UserError(
            f"run dir {path} holds no last.pt or best.pt, so there is nothing to compare. Wait until the run writes "
            f"its first checkpoint (every train.ckpt_interval iterations), or leave this folder out."
        )
    if checkpoint.name != "last.pt":
        print(f"warning: {path} has no last.pt; comparing its best.pt (the best validation, not the final model)",
              file=sys.stderr)
    config_path = path / "config.yaml"
    if config_path.is_file():
        try:
            saved = yaml.safe_load(config_path.read_text())
        except yaml.YAMLError:
            saved = None
        if not isinstance(saved, dict) or not isinstance(saved.get("model"), dict):
            raise UserError(f"{config_path} holds no usable config (no 'model' section); is {path} a run dir of train.py?")
        config = saved
        validate_config(config, str(config_path))
    else:
        config = load_checkpoint(checkpoint)["config"]
    return Run(path=path, config=config, checkpoint=checkpoint, seed=int(config["seed"]))


def read_json(path: Path) -> dict[str, Any]:
    """Read an evaluation JSON written by evaluate.py (one checkpoint: a dict)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"could not read {path} ({err}). Delete it and run compare.py again to re-evaluate.") from None
    if isinstance(data, list) and len(data) == 1:
        data = data[0]
    if not isinstance(data, dict) or "mIoU" not in data:
        raise UserError(f"{path} is not an evaluation of one checkpoint (no 'mIoU'). Delete it to re-evaluate.")
    return data


def json_is_current(path: Path, checkpoint: Path, max_images: int) -> bool:
    """True if an evaluation JSON exists, is newer than the checkpoint and used the same image limit (0 = all)."""
    if not path.is_file() or path.stat().st_mtime < checkpoint.stat().st_mtime:
        return False
    data = read_json(path)
    if data.get("checkpoint") is not None and Path(data["checkpoint"]).name != checkpoint.name:
        return False  # an evaluation of the run's other checkpoint
    if "max_images" in data:
        return data["max_images"] == max_images
    if data.get("split") == "validation":  # older evaluate.py JSONs: its default is the whole split
        return max_images == 0
    return data.get("num_images") == max_images


def perturbed_json(perturb: str) -> str:
    """The run-folder file of the validation evaluation under ``perturb`` (``rotate=15`` -> eval_validation_rotate-15.json)."""
    return f"eval_validation_{perturb.replace('=', '-').replace(':', '-')}.json"


def run_evaluation(
    run: Run, split: str, json_path: Path, max_images: int, options: CompareOptions, perturb: str | None = None
) -> None:
    """Evaluate the run's checkpoint on ``split`` (``max_images`` 0 = all) and save the record at ``json_path``."""
    device = torch.device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    what = f"{split}{f' (first {max_images} images)' if max_images else ''}{f', perturbed {perturb}' if perturb else ''}"
    print(f"evaluating {run.checkpoint} on {what} ...", file=sys.stderr)
    per_image = run.path / VAL_COUNTS if split == "validation" and perturb is None else None
    eval_options = EvalOptions(split=split, max_images=max_images, data_root=options.data_root, progress=False,
                               per_image=per_image, perturb=perturb)
    try:
        record = evaluate_checkpoint(run.checkpoint, eval_options, device)
    except UserError as err:
        raise UserError(
            f"evaluating {run.checkpoint} ({split} split) failed: {err} (Often data.root: pass --data-root DIR; or "
            f"use --no-eval to compare the mIoU logged during training.)"
        ) from None
    json_path.write_text(json.dumps(record, indent=2) + "\n")


def fill_metrics(run: Run, options: CompareOptions) -> None:
    """Val/train mIoU and val img/s from the eval JSONs (evaluating where missing or stale)."""
    val_path = run.path / VAL_JSON
    current = json_is_current(val_path, run.checkpoint, options.val_images) and (run.path / VAL_COUNTS).is_file()
    if not options.no_eval and not current:
        run_evaluation(run, "validation", val_path, options.val_images, options)
    if val_path.is_file():
        data = read_json(val_path)
        run.val_miou, run.val_images_per_s = data["mIoU"], data.get("images_per_s")
    else:  # --no-eval: the validation logged at the checkpoint's iteration, if any
        iteration = load_checkpoint(run.checkpoint)["iteration"]
        logged = dict(run.curves.get("val/mIoU", []))
        run.val_miou = logged.get(iteration)
        run.val_from_checkpoint = True

    train_images = options.train_images if options.train_images is not None else run.config["data"].get("train_eval_images", 0)
    train_path = run.path / TRAIN_JSON
    if not options.no_eval and not json_is_current(train_path, run.checkpoint, train_images):
        run_evaluation(run, "training", train_path, train_images, options)
    if train_path.is_file():
        run.train_miou = read_json(train_path)["mIoU"]
    for perturb in options.perturb:
        path = run.path / perturbed_json(perturb)
        if not options.no_eval and not json_is_current(path, run.checkpoint, options.val_images):
            run_evaluation(run, "validation", path, options.val_images, options, perturb)
        run.perturbed[perturb] = read_json(path)["mIoU"] if path.is_file() else None


def fill_curves(run: Run) -> None:
    """Training curves from TensorBoard and the median training images/s."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = run.path / "tb"
    if not tb.is_dir():
        print(f"warning: {tb} does not exist; no curves or training speed for this run", file=sys.stderr)
        return
    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags().get("scalars", []))
    for tag in ("val/mIoU", "train/loss", "train/images_per_s"):
        if tag in tags:
            run.curves[tag] = [(e.step, e.value) for e in acc.Scalars(tag)]
    speeds = [v for _, v in run.curves.get("train/images_per_s", [])]
    run.train_images_per_s = statistics.median(speeds) if speeds else None
    validations = [v for _, v in run.curves.get("val/mIoU", [])]
    run.best_of_n, run.num_validations = (max(validations), len(validations)) if validations else (None, 0)


def fill_params(runs: list[Run]) -> None:
    """Inference and offset/mask parameter counts from each run's model (built once per distinct model)."""
    cache: dict[str, dict[str, int]] = {}
    for run in runs:
        key = json.dumps(run.config["model"], sort_keys=True)
        if key not in cache:
            config = copy.deepcopy(run.config)
            config["model"]["pretrained_backbone"] = False
            model, _ = build_model(config, load_pretrained=False)
            cache[key] = count_parameters(model)
        run.params, run.deform_params = cache[key]["params"], cache[key]["deform_params"]


# ------------------------------------------------------------------------------------------ grouping

def group_runs(runs: list[Run], ignored: list[str]) -> list[Group]:
    """Group runs whose configs agree outside ``ignored`` keys; label groups by config name (+ differing keys)."""
    groups: dict[str, Group] = {}
    for run in runs:
        flat = {k: v for k, v in flatten(run.config).items() if k not in ignored}
        key = json.dumps(flat, sort_keys=True, default=str)
        groups.setdefault(key, Group(key=key, config=flat, runs=[])).runs.append(run)
    result = list(groups.values())
    for group in result:
        name = str(group.config.get("config_name", group.runs[0].path.name))
        same_name = [g for g in result if g.config.get("config_name") == group.config.get("config_name")]
        keys = {k for g in same_name for k in g.config}
        diffs = sorted(k for k in keys if any(g.config.get(k) != group.config.get(k) for g in same_name))
        if len(same_name) > 1 and diffs:
            shown = ", ".join(f"{k}={group.config.get(k)}" for k in diffs[:3]) + (", ..." if len(diffs) > 3 else "")
            name = f"{name} ({shown})"
        group.label = name
    return result


def pick_reference(groups: list[Group]) -> Group | None:
    """The norm-conv group: ``model.deform.version`` 0, preferring config_name norm-conv, then the most runs."""
    plain = [g for g in groups if g.config.get("model.deform.version") == 0]
    if not plain:
        return None
    return sorted(plain, key=lambda g: (g.config.get("config_name") != "norm-conv", -len(g.runs)))[0]


# ------------------------------------------------------------------------------------------- numbers
def stats(values: list[float | None]) -> dict[str, Any]:
    """Mean, sample std (n-1; None for n<2) and the values, ignoring missing ones."""
    present = [v for v in values if v is not None]
    return {
        "mean": statistics.fmean(present) if present else None,
        "std": statistics.stdev(present) if len(present) > 1 else None,
        "n": len(present),
        "values": values,
    }


def pooled_std(*parts: dict[str, Any]) -> float | None:
    """Pooled sample std of several groups: sqrt(sum (n_i - 1) s_i^2 / sum (n_i - 1)); None without any n >= 2."""
    dof = sum(p["n"] - 1 for p in parts if p["std"] is not None)
    if dof == 0:
        return None
    return math.sqrt(sum((p["n"] - 1) * p["std"] ** 2 for p in parts if p["std"] is not None) / dof)


def summarize(groups: list[Group], reference: Group | None) -> dict[str, Any]:
    """All numbers of the comparison as a JSON-ready dict (groups in table order, runs listed)."""
    records = []
    ref_val = stats([r.val_miou for r in reference.runs]) if reference else None
    ref_train = stats([r.train_miou for r in reference.runs]) if reference else None
    for group in groups:
        val = stats([r.val_miou for r in group.runs])
        train = stats([r.train_miou for r in group.runs])
        record: dict[str, Any] = {
            "label": group.label,
            "config_name": group.config.get("config_name"),
            "deform_version": group.config.get("model.deform.version"),
            "reference": group is reference,
            "runs": [str(r.path) for r in group.runs],
            "seeds": [r.seed for r in group.runs],
            "n": len(group.runs),
            "val_miou": val,
            "val_miou_from_checkpoint": any(r.val_from_checkpoint for r in group.runs),
            "best_of_n_val_miou": stats([r.best_of_n for r in group.runs]),
            "num_validations": [r.num_validations for r in group.runs],
            "train_miou": train,
            "params": group.runs[0].params,
            "deform_params": group.runs[0].deform_params,
            "train_images_per_s": stats([r.train_images_per_s for r in group.runs]),
            "val_images_per_s": stats([r.val_images_per_s for r in group.runs]),
        }
        for name, mine, ref in (("val", val, ref_val), ("train", train, ref_train)):
            delta = spread = None
            if ref is not None and mine["mean"] is not None and ref["mean"] is not None:
                delta = mine["mean"] - ref["mean"]
                spread = pooled_std(mine) if group is reference else pooled_std(mine, ref)
            record[f"delta_{name}_miou"] = delta
            record[f"{name}_seed_spread"] = spread
        records.append(record)
    runs = [
        {
            "run": str(r.path), "group": g.label, "seed": r.seed, "checkpoint": str(r.checkpoint),
            "val_miou": r.val_miou, "val_miou_from_checkpoint": r.val_from_checkpoint, "train_miou": r.train_miou,
            "best_of_n_val_miou": r.best_of_n, "num_validations": r.num_validations,
            "train_images_per_s": r.train_images_per_s, "val_images_per_s": r.val_images_per_s,
            "params": r.params, "deform_params": r.deform_params,
        }
        for g in groups for r in g.runs
    ]
    return {"reference": reference.label if reference else None, "groups": records, "runs": runs}


def robustness(groups: list[Group], perturbs: list[str]) -> list[dict[str, Any]]:
    """Per group: the val mIoU under each perturbation (mean over runs) and its drop from the unperturbed one."""
    records = []
    for group in groups:
        clean = stats([r.val_miou for r in group.runs])["mean"]
        cells = {}
        for perturb in perturbs:
            value = stats([r.perturbed.get(perturb) for r in group.runs])["mean"]
            drop = clean - value if value is not None and clean is not None else None
            cells[perturb] = {"miou": value, "drop": drop}
        records.append({"label": group.label, "clean": clean, "perturbed": cells})
    return records


def robustness_markdown(records: list[dict[str, Any]], perturbs: list[str]) -> str:
    """Geometric robustness: each group's val mIoU under each perturbation, with the drop from the clean value."""
    if not perturbs:
        return ""
    lines = ["", "## Geometric robustness (val mIoU under each perturbation, drop from the unperturbed in brackets)", "",
             "| model | unperturbed | " + " | ".join(perturbs) + " |", "|" + "---|" * (len(perturbs) + 2)]
    for r in records:
        cells = [f"{c['miou']:.2f} (-{c['drop']:.2f})" if c["miou"] is not None else "-" for c in r["perturbed"].values()]
        clean = f"{r['clean']:.2f}" if r["clean"] is not None else "-"
        lines.append(f"| {r['label']} | {clean} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def warn_mixed_environments(groups: list[Group]) -> None:
    """Warn when the runs of one group were trained with different package versions (numbers may differ a little)."""
    for group in groups:
        seen = {}
        for run in group.runs:
            env = load_checkpoint(run.checkpoint).get("environment") or {}
            seen[str(run.path)] = json.dumps(env.get("packages"), sort_keys=True)
        if len(set(seen.values())) > 1:
            print(f"warning: the runs of {group.label} were trained with different package versions "
                  f"(the 'environment' of their checkpoints): {', '.join(seen)}", file=sys.stderr)


def bootstrap(groups: list[Group], reference: Group | None, resamples: int) -> list[dict[str, Any]]:
    """Each variant against the norm-conv group on the same validation images: ``engine.statistics.compare_variants``.

    Needs every run's per-image counts (``RUN/per_image_validation.npz``, written by the evaluation);
    groups without them are skipped. Each record holds the verdict line, the two kinds of interval, the
    per-class differences, the frequency thirds and the object-size buckets.
    """
    if reference is None:
        return []
    def counts(group: Group) -> list[PerImageCounts] | None:
        paths = [r.path / VAL_COUNTS for r in group.runs]
        return [PerImageCounts.load(p) for p in paths] if all(p.is_file() for p in paths) else None

    ref = counts(reference)
    if ref is None:
        return []
    names = load_class_info()[0]
    records = []
    for group in groups:
        mine = counts(group) if group is not reference else None
        if mine is None:
            continue
        try:
            result = compare_variants(ref, mine, labels=(reference.label, group.label), class_names=names,
                                      resamples=resamples, seed=0)
        except ValueError as err:  # evaluated on different images
            print(f"warning: no bootstrap for {group.label} vs {reference.label}: {err}", file=sys.stderr)
            continue
        records.append({"label": group.label, "reference": reference.label, **result})
    return records


# ------------------------------------------------------------------------------------------- output
def fmt(s: dict[str, Any], digits: int = 2) -> str:
    """``mean ± std`` (or the mean alone for one run; ``-`` when missing)."""
    if s["mean"] is None:
        return "-"
    text = f"{s['mean']:.{digits}f}"
    return f"{text} ± {s['std']:.{digits}f}" if s["std"] is not None else text


def best_of_n(group: dict[str, Any]) -> str:
    """``mean (N=..)`` of the best logged validation per run, or ``-``."""
    counts = sorted(set(group["num_validations"]))
    if group["best_of_n_val_miou"]["mean"] is None:
        return "-"
    return f"{fmt(group['best_of_n_val_miou'])} (N={'/'.join(map(str, counts))})"


def signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2f}"


def next_seeds(used: list[int], count: int = 2) -> list[int]:
    """The smallest ``count`` seeds not used yet."""
    seeds, s = [], 0
    while len(seeds) < count:
        if s not in used:
            seeds.append(s)
        s += 1
    return seeds


def markdown(summary: dict[str, Any], val_images: int = 0) -> str:
    """The comparison table with its notes (spread of each difference, footnotes)."""
    ref = summary["reference"] or "norm-conv"
    header = (
        "| model | runs | val mIoU (final) | train mIoU | Δ val vs norm-conv | Δ train vs norm-conv | best-of-N val † "
        "| params | added params | train img/s | val img/s |"
    )
    lines = [header, "|" + "---|" * 11]
    for g in summary["groups"]:
        mark = NO_EVAL_MARK if g["val_miou_from_checkpoint"] else ""
        delta_val = "ref" if g["reference"] else signed(g["delta_val_miou"])
        delta_train = "ref" if g["reference"] else signed(g["delta_train_miou"])
        lines.append(
            f"| {g['label']} | {g['n']} | {fmt(g['val_miou'])}{mark} | {fmt(g['train_miou'])} | {delta_val} | "
            f"{delta_train} | {best_of_n(g)} | {g['params'] / 1e6:.2f}M | +{g['deform_params'] / 1e6:.3f}M | "
            f"{fmt(g['train_images_per_s'], 1)} | {fmt(g['val_images_per_s'], 1)} |"
        )
    notes = []
    if summary["reference"] is None:
        notes.append("No norm-conv run (model.deform.version=0) among the runs: the Δ columns are empty.")
    elif ref != "norm-conv":
        notes.append(f"norm-conv reference (model.deform.version=0): {ref}.")
    for g in summary["groups"]:
        if g["reference"] or g["delta_val_miou"] is None:
            continue
        text = f"{g['label']}: {g['delta_val_miou']:+.2f} val mIoU vs {ref}; "
        spread = g["val_seed_spread"]
        single = [x["label"] for x in summary["groups"] if (x is g or x["reference"]) and x["n"] < 2]
        if spread is None:
            seeds = next_seeds(g["seeds"])
            text += f"n=1: no seed spread known, run more seeds ({', '.join(f'seed={s}' for s in seeds)})"
        elif spread == 0:
            text += "seed spread (pooled std) 0.00: the seeds gave identical numbers"
        else:
            ratio = abs(g["delta_val_miou"]) / spread
            verdict = "exceeds the spread" if ratio > 2 else "not clearly above the spread" if ratio >= 1 else "within the seed noise"
            text += f"seed spread (pooled std) {spread:.2f} → difference {ratio:.1f}x the spread ({verdict})"
            if single:
                text += f"; n=1 for {', '.join(single)}: run more seeds"
        notes.append(text)
    if any(g["val_miou_from_checkpoint"] for g in summary["groups"]):
        notes.append(
            f"{NO_EVAL_MARK} the val mIoU logged during training at the final iteration (on train.val_max_images images "
            f"if set), not an evaluate.py evaluation: run without --no-eval for evaluate.py numbers."
        )
    notes.append(
        "val mIoU (final): the final checkpoint (last.pt), the headline number, as mmsegmentation reports. † best-of-N "
        "val: the best of the N validations logged during training; chosen on the validation set itself, so it is "
        "optimistic and not a result."
    )
    if val_images:
        notes.append(f"val mIoU on the first {val_images} validation images only (--val-images), not the whole split.")
    notes.append("params: inference model (aux head excluded); added params: offset/mask predictors. Speeds: median "
                 "train/images_per_s of TensorBoard, images_per_s of the validation evaluation.")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def _interval(r: dict[str, Any]) -> str:
    if r.get("low") is None:
        return f"{r['diff']:+.2f}" if r.get("diff") is not None else "-"
    return f"{r['diff']:+.2f} [{r['low']:+.2f}, {r['high']:+.2f}]"


def bootstrap_markdown(records: list[dict[str, Any]], top: int = 10) -> str:
    """The "is the difference real?" section: verdicts, frequency thirds, object sizes, largest per-class changes."""
    if not records:
        return ""
    lines = ["", "## Is the difference real? (95% intervals, variant minus norm-conv)", ""]
    lines += [f"- {r['verdict']}" for r in records]
    lines += ["", "test-set sampling: paired bootstrap over the validation images (would the difference hold on other "
              "images like these?); training randomness: Welch t interval over seeds (would it hold for other seeds?).", ""]
    for r in records:
        lines += [f"### {r['label']} vs {r['reference']}", "", "| classes | Δ mIoU [95% CI] |", "|---|---|"]
        lines += [f"| {name} ({len(v['classes'])} classes) | {_interval(v)} |" for name, v in r["thirds"].items()]
        if r.get("sizes"):
            lines += ["", "| object size (GT components) | Δ pixel recall [95% CI] |", "|---|---|"]
            lines += [f"| {name} | {_interval(v)} |" for name, v in r["sizes"].items()]
        defined = [c for c in r["per_class"] if c["diff"] is not None]
        ranked = sorted(defined, key=lambda c: c["diff"])
        lines += ["", "| largest gains and losses | Δ IoU [95% CI] |", "|---|---|"]
        lines += [f"| {c['name']} | {_interval(c)} |" for c in ranked[::-1][:top]]
        lines += [f"| {c['name']} | {_interval(c)} |" for c in ranked[:top][::-1] if c not in ranked[::-1][:top]]
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(groups: list[Group], summary: dict[str, Any], out: Path) -> None:
    """curves.png (val mIoU and training loss vs iteration, colour per group) and final_miou.png (bars ± std)."""
    import matplotlib.pyplot as plt  # only where figures are drawn
    from matplotlib.ticker import MaxNLocator

    plt.switch_backend("Agg")

    colours = plt.get_cmap("tab10")
    styles = ["-", "--", ":", "-."]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for gi, group in enumerate(groups):
        for ri, run in enumerate(group.runs):
            label = f"{group.label}, seed {run.seed}"
            for ax, tag in zip(axes, ("val/mIoU", "train/loss")):
                points = run.curves.get(tag, [])
                if points:
                    steps, values = zip(*points)
                    ax.plot(steps, values, styles[ri % len(styles)], color=colours(gi % 10), label=label,
                            marker="o" if len(points) < 20 else None, markersize=3)
    axes[0].set(title="Validation mIoU logged during training", xlabel="iteration", ylabel="mIoU (%)")
    axes[1].set(title="Training loss (main + aux)", xlabel="iteration", ylabel="loss")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles, labels = axes[1].get_legend_handles_labels()
    if not handles:
        handles, labels = axes[0].get_legend_handles_labels()
    columns = min(3 if max(map(len, labels), default=0) <= 40 else 1, max(len(labels), 1))
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=columns, fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.045 * math.ceil(len(labels) / columns), 1, 1))
    fig.savefig(out / "curves.png", dpi=120)
    plt.close(fig)

    records = summary["groups"]
    fig, ax = plt.subplots(figsize=(max(5.5, 2.2 * len(records) + 1.5), 5.0))
    x = list(range(len(records)))
    means = [g["val_miou"]["mean"] or 0.0 for g in records]
    errs = [g["val_miou"]["std"] or 0.0 for g in records]
    ax.bar(x, means, yerr=errs, capsize=6, color=[colours(i % 10) for i in x], alpha=0.8, label="mean ± std over seeds")
    for i, g in enumerate(records):
        values = [v for v in g["val_miou"]["values"] if v is not None]
        ax.plot([i] * len(values), values, "k.", markersize=9, label="single runs" if i == 0 else None)
        ax.annotate(f"{means[i]:.2f}", (i, means[i] + errs[i]), xytext=(0, 4), textcoords="offset points", ha="center")
    ticks = [g["label"].replace(" (", "\n(").replace(", ", ",\n") + f"\nn={g['n']}" for g in records]
    ax.set_xticks(x, ticks, fontsize=9)
    singles = [v for g in records for v in g["val_miou"]["values"] if v is not None]
    top = max([m + e for m, e in zip(means, errs)] + singles + [1.0])
    ax.set_ylim(0, top * 1.3)
    marked = any(g["val_miou_from_checkpoint"] for g in records)
    ax.set(title="Final validation mIoU per model" + (" (* from checkpoint best_miou)" if marked else ""),
           ylabel="val mIoU (%)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", ncol=2, fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "final_miou.png", dpi=120)
    plt.close(fig)
    for record in summary.get("bootstrap", []):
        plot_per_class(record, out / f"per_class_{_file_label(record['label'])}.png")


def _file_label(label: str) -> str:
    """A group label as a file-name part: letters, digits, '-', '_' and '.'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_")


def plot_per_class(record: dict[str, Any], path: Path) -> None:
    """Per-class IoU differences (variant minus reference), sorted, with their 95% bootstrap intervals."""
    import matplotlib.pyplot as plt

    plt.switch_backend("Agg")
    rows = sorted((c for c in record["per_class"] if c["diff"] is not None), key=lambda c: c["diff"])
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(max(6.0, 0.14 * len(rows) + 2), 4.8))
    x = list(range(len(rows)))
    diffs = [c["diff"] for c in rows]
    low = [c["diff"] - c["low"] if c["low"] is not None else 0.0 for c in rows]
    high = [c["high"] - c["diff"] if c["high"] is not None else 0.0 for c in rows]
    colours = ["tab:green" if d > 0 else "tab:red" for d in diffs]
    ax.bar(x, diffs, color=colours, alpha=0.8)
    ax.errorbar(x, diffs, yerr=[low, high], fmt="none", ecolor="black", elinewidth=0.8, capsize=1.5)
    ax.axhline(0, color="black", linewidth=0.8)
    if len(rows) <= 40:
        ax.set_xticks(x, [c["name"] for c in rows], rotation=90, fontsize=7)
    else:  # name only the ten largest changes each way
        shown = set(x[:10]) | set(x[-10:])
        ax.set_xticks(sorted(shown), [rows[i]["name"] for i in sorted(shown)], rotation=90, fontsize=7)
    title = f"Per-class IoU: {record['label']} minus {record['reference']} (95% bootstrap intervals over images)"
    ax.set_title("\n".join(textwrap.wrap(title, width=int(fig.get_figwidth() * 11))), fontsize=9)
    ax.set_ylabel("Δ IoU (points)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------- main
def compare(options: CompareOptions) -> str:
    """Read, evaluate and group the runs; write the files of ``options.out``; return the markdown table."""
    for name in ("train_images", "val_images"):
        value = getattr(options, name)
        if value is not None and value < 0:
            raise UserError(f"--{name.replace('_', '-')} must be 0 (all images of the split) or positive, got {value}.")
    paths, seen = [], set()
    for p in map(Path, options.runs):
        if p.resolve() not in seen:
            seen.add(p.resolve())
            paths.append(p)
    runs = [load_run(p) for p in paths]  # every folder is checked before the slow part starts
    for run in runs:
        fill_curves(run)
        fill_metrics(run, options)
    fill_params(runs)
    groups = group_runs(runs, list(IGNORED_KEYS) + options.ignore_key)
    reference = pick_reference(groups)
    if reference is not None:  # the reference row first, the others in command-line order
        groups.remove(reference)
        groups.insert(0, reference)
    warn_mixed_environments(groups)
    summary = summarize(groups, reference)
    summary["bootstrap"] = bootstrap(groups, reference, options.resamples)
    summary["robustness"] = robustness(groups, options.perturb)
    summary["settings"] = {"val_images": options.val_images, "train_images": options.train_images, "no_eval": options.no_eval,
                           "ignored_keys": list(IGNORED_KEYS) + options.ignore_key}
    table = (markdown(summary, options.val_images) + robustness_markdown(summary["robustness"], options.perturb)
             + bootstrap_markdown(summary["bootstrap"]))
    if options.out is not None:
        try:
            options.out.mkdir(parents=True, exist_ok=True)
            (options.out / "comparison.md").write_text(table)
            (options.out / "comparison.json").write_text(json.dumps(summary, indent=2) + "\n")
            plot(groups, summary, options.out)
        except OSError as err:
            raise UserError(f"could not write the results to {options.out}: {err}. Choose another --out folder.") from None
    return table

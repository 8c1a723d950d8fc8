"""Comparing training runs: the study's table, and one verdict per question with the statistic that answers it.

Runs are compared only when they share the recipe: every config key outside :data:`MODEL_KEYS` and
:data:`BOOKKEEPING` (data, schedule, iterations, crop, evaluation settings), the changes of those made on resume, the
training data and the package versions their checkpoints record, and the classes. Runs with the same model are the
seeds of one group, named by the config file and, where one file holds several models, by the model's variant
(``demo-def-conv-v2``); folders holding the same weights are one run. Every number comes from evaluations whose
recorded sha256 is that of the run's final checkpoint (``last.pt``) and whose settings that change predictions are
the run's own; missing or stale ones are made again and saved in the run folder. The statistics are
``engine.statistics.compare_sides``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import statistics
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from configs import UserError, flatten, keys_of
from data.dataset import load_class_info
from data.perturb import parse_perturbation
from engine.checkpoint import load_checkpoint
from engine.device import inference_device
from engine.diagnosis import read_device_info
from engine.evaluation import checkpoint_digest, evaluate_checkpoint
from engine.lock import lock_holder
from engine.workdir import write_json, write_whole
from engine.statistics import MIN_IMAGES, MIN_SEEDS, SIZE_BUCKETS, STUDY_DIFFERENCE, PerImageCounts, compare_sides
from engine.statistics import seed_spread, seeds_needed, spread_range
from models.segmentor import build_model, count_parameters

MODEL_KEYS = keys_of("architecture", "variant")  # what may differ between the compared models (configs.KEYS)
BOOKKEEPING = keys_of("run") + ("seed", "config_name")  # what changes no number (and the seed, which groups runs)
# Model keys that mean nothing for a plain network (no offsets); the stages only matter with a dilation.
OFFSET_KEYS = ("model.deform.offset_lr_mult", "model.deform.groups", "model.deform_op")
VARIANTS = ("norm-conv", "def-conv-v1", "def-conv-v2")
# What an evaluation must share with the one compare.py would make, besides the checkpoint: every setting that
# changes predictions (the images, their resizing, the inference mode and the operator).
TEST_TIME_KEYS = ("data.dataset", "data.root", "data.scale", "data.resize_filter", "eval.mode", "eval.slide_crop",
                  "eval.slide_stride", "eval.scales", "eval.flip", "model.deform_op")
EVALUATION = {"eval.scales": [1.0], "eval.flip": False}  # compare.py's evaluations: single scale, no flip (and fp32)


@dataclass
class Run:
    """One run folder: its final checkpoint's digest, flat config and package versions, and what was measured."""

    path: Path
    digest: str  # of the last.pt file: what evaluations record
    weights: str  # of the weights alone: a checkpoint re-saved with other settings holds the same run
    config: dict[str, Any]
    packages: dict[str, Any]
    training_data: dict[str, Any] | None  # what engine.environment.training_data recorded at the start
    resumed_with: list[dict[str, Any]]  # the config changes made on resume (the checkpoint's config_changes)
    evals: dict[str, dict[str, Any]] = field(default_factory=dict)  # "training", "validation", "validation rotate=15"
    counts: dict[str, PerImageCounts] = field(default_factory=dict)  # "validation", "validation rotate=15"
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


@dataclass
class Group:
    """The runs of one model (seeds), with its model settings and its short label."""

    model: dict[str, Any]
    runs: list[Run]
    label: str = ""


# ------------------------------------------------------------------------------------------- reading runs
def load_run(path: Path) -> Run:
    """Read a finished run folder; UserError for a missing folder or checkpoint and for a run still training."""
    checkpoint = path / "last.pt"
    if not checkpoint.is_file():
        raise UserError(f"run dir {path} holds no last.pt (or is no folder), so there is no final model to compare. "
                        f"Give folders written by train.py (runs/<config name>, or the --work-dir of a run).")
    holder = lock_holder(path / ".lock")
    if holder is not None:
        raise UserError(f"run dir {path} is still training ({holder} holds {path / '.lock'}): its last.pt is not the "
                        f"final model. Wait until it ends, or leave it out.")
    state = load_checkpoint(checkpoint)
    config = flatten(state["config"])
    if state["iteration"] < config["train.iters"]:
        raise UserError(f"run dir {path} stopped at iteration {state['iteration']} of {config['train.iters']} (its "
                        f"last.pt is not the final model). Continue it with train.py --resume auto --work-dir {path}, or "
                        f"leave it out.")
    environment = state.get("environment") or {}
    return Run(path=path, digest=checkpoint_digest(checkpoint), weights=weights_digest(state["model"]), config=config,
               packages=environment.get("packages") or {}, training_data=environment.get("training_data"),
               resumed_with=state.get("config_changes") or [])


def weights_digest(weights: dict[str, torch.Tensor]) -> str:
    """sha256 of a state dict's names, dtypes, shapes and bytes: the same for the same weights in any file."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        tensor = weights[name].detach().cpu().contiguous()
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def model_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The model keys of a flat config, without those that mean nothing for it (offset settings of a plain network)."""
    model = {k: config[k] for k in MODEL_KEYS}
    if model["model.deform.version"] == 0:
        unused = OFFSET_KEYS if model["model.deform.dilation"] else OFFSET_KEYS + ("model.deform.stages",
                                                                                   "model.deform.blocks")
        model = {k: v for k, v in model.items() if k not in unused}
    return model


def check_classes(runs: list[Run]) -> None:
    """UserError naming model.num_classes where the runs predict different sets of classes: no mIoU or class of one
    is comparable with the other's."""
    counts = {r.config["model.num_classes"] for r in runs}
    if len(counts) > 1:
        details = ", ".join(f"{r.config['model.num_classes']} ({r.path})" for r in runs)
        raise UserError(f"these runs predict different numbers of classes (model.num_classes: {details}), so neither "
                        f"their mIoU nor their classes can be compared. Compare runs trained for the same classes.")


def _schedule_changes(run: Run) -> list[str]:
    """The changes of recipe and schedule keys made on resume, as text (changes of bookkeeping keys left out)."""
    return [f"{k} {old} -> {new} at iteration {change['iteration']}" for change in run.resumed_with
            for k, (old, new) in change["changes"].items() if k not in MODEL_KEYS + BOOKKEEPING]


def _training_data(run: Run) -> str:
    data = run.training_data
    if data is None:
        return "not recorded (a run of an older version)"
    return f"{data['images']} images listed with sha256 {data['sha256'][:12]} (in {data['root']})"


def check_comparable(runs: list[Run], allow: bool) -> dict[str, list[Any]]:
    """The recipe keys, changes on resume, training data and package versions on which the runs disagree, ``{key:
    value per run}``; UserError naming them unless ``allow``."""
    recipes = [{**{k: v for k, v in r.config.items() if k not in MODEL_KEYS + BOOKKEEPING},
                "changes on resume": "; ".join(_schedule_changes(r)) or "none",
                "training data": {k: (r.training_data or {}).get(k) for k in ("images", "sha256")},
                **{f"package {k}": v for k, v in r.packages.items()}} for r in runs]
    differences = {k: [rec.get(k) for rec in recipes] for k in sorted(set().union(*recipes))
                   if len({json.dumps(rec.get(k)) for rec in recipes}) > 1}
    if differences and not allow:
        shown = dict(differences)
        if "training data" in shown:
            shown["training data"] = [_training_data(r) for r in runs]
        details = "; ".join(f"{k}: " + ", ".join(f"{v} ({r.path})" for v, r in zip(values, runs))
                            for k, values in shown.items())
        raise UserError(
            f"these runs do not share one recipe, so their differences would not be the model's: {details}. Compare "
            f"runs trained on the same data with the same settings (also after a resume) and package versions that "
            f"differ only in the model ({', '.join(MODEL_KEYS)}) and the seed, or pass --allow-differences to compare "
            f"them anyway."
        )
    return differences


def variant(model: dict[str, Any]) -> str:
    return VARIANTS[model["model.deform.version"]] + ("-dilated" if model["model.deform.dilation"] else "")


def group_runs(runs: list[Run], differences: dict[str, list[Any]]) -> list[Group]:
    """Runs of one model (and of one value of each differing recipe key) are one group; labels: the config file name,
    plus the variant where one file holds several models, plus the differing keys where labels still collide."""
    groups: dict[str, Group] = {}
    for run in runs:
        model = {**model_settings(run.config), **{k: run.config.get(k) for k in differences if k in run.config},
                 "config_name": run.config["config_name"]}
        groups.setdefault(json.dumps(model, sort_keys=True, default=str), Group(model, [])).runs.append(run)
    result = list(groups.values())
    for group in result:
        name = group.model["config_name"]
        shared = sum(g.model["config_name"] == name for g in result) > 1 and name != variant(group.model)
        group.label = f"{name}-{variant(group.model)}" if shared else name
    labels = [g.label for g in result]
    for group, label in zip(result, labels):
        same = [g for g, other in zip(result, labels) if other == label]
        keys = sorted({k for g in same for k in g.model if len({json.dumps(h.model.get(k)) for h in same}) > 1})
        suffix = ", ".join(f"{k.removeprefix('model.')}={group.model.get(k)}" for k in keys)
        group.label += f" ({suffix})" if keys else ""
    for group in result:
        seeds = [r.config["seed"] for r in group.runs]
        repeated = sorted({s for s in seeds if seeds.count(s) > 1})
        if repeated:
            dirs = ", ".join(str(r.path) for r in group.runs if r.config["seed"] in repeated)
            raise UserError(f"{dirs} are runs of {group.label} with the same seed ({repeated}) but different "
                            f"checkpoints: seeds are the runs' only difference, so one of them is a re-run, not "
                            f"another seed. Leave all but one out, or train another seed (seed=N).")
    return result


# ------------------------------------------------------------------------------------------- evaluations
def _stale(run: Run, json_path: Path, counts_path: Path | None, wanted: dict[str, Any]) -> str | None:
    """Why the saved evaluation cannot be used for this run (None: it can)."""
    if not json_path.is_file() or (counts_path is not None and not counts_path.is_file()):
        return "no saved evaluation"
    try:
        record = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return f"{json_path} is unreadable ({err})"
    if not isinstance(record, dict) or record.get("checkpoint_sha256") != run.digest:
        return f"{json_path} was not made from this last.pt (another sha256)"
    settings = {**{k: record.get(k) for k in ("split", "max_images", "perturb", "amp")},
                **flatten(record.get("config") if isinstance(record.get("config"), dict) else {})}
    differ = [f"{k}={settings.get(k)} instead of {v}" for k, v in wanted.items() if settings.get(k) != v]
    if differ:
        return f"{json_path} used other settings ({', '.join(differ)})"
    if counts_path is not None and PerImageCounts.load(counts_path).checkpoint != run.digest:
        return f"{counts_path} was not made from this last.pt (another sha256)"
    return None


def evaluate_run(run: Run, split: str, max_images: int, perturb: str | None, options: argparse.Namespace) -> None:
    """Fill ``run.evals`` (and ``run.counts`` for validation) from the saved evaluation, made again where stale."""
    key = split + (f" {perturb}" if perturb else "")
    stem = key.replace(" ", "_").replace("=", "-").replace(":", "-")
    json_path = run.path / f"eval_{stem}.json"
    counts_path = run.path / f"per_image_{stem}.npz" if split == "validation" else None
    changes = {**EVALUATION, **({"data.root": options.data_root} if options.data_root else {})}
    config = {**run.config, **changes}  # what evaluate_checkpoint will use
    wanted = {"split": split, "max_images": max_images, "perturb": perturb, "amp": "none",
              **{k: config[k] for k in TEST_TIME_KEYS}}
    reason = _stale(run, json_path, counts_path, wanted)
    if reason is not None:
        if options.no_eval:
            print(f"note: {run.path}: {key} not evaluated ({reason}; --no-eval)", file=sys.stderr)
            return
        print(f"evaluating {run.path / 'last.pt'} on {key} ({reason}) ...", file=sys.stderr)
        device = torch.device(inference_device(options.device, read_device_info()))
        try:
            record = evaluate_checkpoint(run.path / "last.pt", device, split, max_images, changes=changes,
                                         perturb=perturb, per_image=counts_path)
        except UserError as err:
            raise UserError(f"evaluating {run.path / 'last.pt'} ({key}) failed: {err} (Often data.root: pass "
                            f"--data-root DIR; or use --no-eval to compare what was evaluated before.)") from None
        write_json(json_path, record)
    run.evals[key] = json.loads(json_path.read_text(encoding="utf-8"))
    if counts_path is not None:
        run.counts[key] = PerImageCounts.load(counts_path)


def read_curves(run: Run) -> None:
    """Validation mIoU, training loss and images/s logged in TensorBoard (none, with a warning, without ``tb/``)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not (run.path / "tb").is_dir():
        print(f"warning: {run.path / 'tb'} does not exist; no curves or training speed for this run", file=sys.stderr)
        return
    acc = EventAccumulator(str(run.path / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    for tag in set(acc.Tags().get("scalars", [])) & {"val/mIoU", "train/loss", "train/images_per_s"}:
        run.curves[tag] = [(e.step, e.value) for e in acc.Scalars(tag)]


# ------------------------------------------------------------------------------------------- numbers
def spread(values: list[float | None]) -> dict[str, Any]:
    present = [v for v in values if v is not None]
    return {"mean": statistics.fmean(present) if present else None,
            "std": statistics.stdev(present) if len(present) > 1 else None, "n": len(present), "values": values}


def group_record(group: Group, perturbs: list[str]) -> dict[str, Any]:
    """One row of the table (and of the robustness table)."""
    def mean(key: str) -> dict[str, Any]:
        return spread([r.evals[key]["mIoU"] if key in r.evals else None for r in group.runs])

    best = [max((v for _, v in r.curves.get("val/mIoU", [])), default=None) for r in group.runs]
    model = build_model(load_checkpoint(group.runs[0].path / "last.pt")["config"], load_pretrained=False)[0]
    return {
        "label": group.label, "model": group.model, "runs": [str(r.path) for r in group.runs],
        "seeds": [r.config["seed"] for r in group.runs], "n": len(group.runs), "val_miou": mean("validation"),
        "train_miou": mean("training"), "best_logged_val_miou": spread(best),
        "validations": [len(r.curves.get("val/mIoU", [])) for r in group.runs], **count_parameters(model),
        "train_images_per_s": spread([statistics.median([v for _, v in r.curves["train/images_per_s"]])
                                      if r.curves.get("train/images_per_s") else None for r in group.runs]),
        "val_images_per_s": spread([r.evals.get("validation", {}).get("images_per_s") for r in group.runs]),
        "perturbed": {p: mean(f"validation {p}")["mean"] for p in perturbs},
    }


def compare_pair(b: Group, a: Group, perturbs: list[str]) -> dict[str, Any] | None:
    """b against a: ``engine.statistics.compare_sides`` plus the seeds needed where there are too few; None (with a
    note) where a run lacks per-image counts or the runs were evaluated on different images."""
    keys = ["validation"] + [f"validation {p}" for p in perturbs]
    if any(k not in r.counts for r in a.runs + b.runs for k in keys):
        print(f"note: no statistics for {b.label} vs {a.label}: some runs have no per-image counts", file=sys.stderr)
        return None
    side = {name: [[r.counts[k] for r in g.runs] for k in keys] for name, g in (("a", a), ("b", b))}
    try:
        result = compare_sides(side["a"][0], side["b"][0], perturbed=list(zip(side["a"][1:], side["b"][1:])))
    except ValueError as err:
        raise UserError(f"{b.label} and {a.label} cannot be paired: {err}. Evaluate every run on the same "
                        f"validation images (the same --val-images and data).") from None
    models = [model_settings(g.runs[0].config) for g in (a, b)]
    shared = [k for k in MODEL_KEYS if k in models[0] and k in models[1]]  # a plain network has no offset settings
    result.update(b_label=b.label, a_label=a.label,
                  model_differences={k: [m[k] for m in models] for k in shared if models[0][k] != models[1][k]})
    spread = seed_spread(*result["seed_mious"])
    result.update(seed_spread=None, seed_spread_df=None, seeds_needed=None)
    if spread is not None:
        sd, dof = spread
        low, high = spread_range(sd, dof)
        result.update(seed_spread=sd, seed_spread_df=dof, seeds_needed={
            name: {"about": seeds_needed(diff, sd), "low": seeds_needed(diff, low), "high": seeds_needed(diff, high)}
            for name, diff in (("observed", result["miou"]["diff"]), ("study", STUDY_DIFFERENCE))})
    return result


def choose_pairs(groups: list[Group], options: argparse.Namespace) -> tuple[Group | None, list[tuple[Group, Group]]]:
    """The reference (``--reference``, default the plain norm-conv group) and the pairs (b, a): every group against
    the reference, then the ``--pair``s."""
    by_label = {g.label: g for g in groups}
    for name in ([options.reference] if options.reference else []) + [n for pair in options.pair for n in pair]:
        if name not in by_label:
            raise UserError(f"no group is called '{name}' (--reference/--pair); the groups here are: "
                            f"{', '.join(by_label)}.")
    plain = [g for g in groups if variant(g.model) == "norm-conv"]
    reference = by_label[options.reference] if options.reference else (plain[0] if plain else None)
    pairs = [(g, reference) for g in groups if reference is not None and g is not reference]
    extra = [(by_label[b], by_label[a]) for b, a in options.pair]
    return reference, pairs + [pair for pair in extra if pair not in pairs]


# ------------------------------------------------------------------------------------------- markdown
def _formatted(x: float | None, sign: str = "", digits: int = 2) -> str:
    return "-" if x is None else f"{x:{sign}.{digits}f}"


def _mean_std(s: dict[str, Any], digits: int = 2) -> str:
    """mean ± std over the runs that have a value, saying how many those are where some have none."""
    if s["mean"] is None:
        return "-"
    text = f"{s['mean']:.{digits}f}" + (f" ± {s['std']:.{digits}f}" if s["std"] is not None else "")
    return text + (f" ({s['n']} of {len(s['values'])} runs)" if s["n"] < len(s["values"]) else "")


def table(summary: dict[str, Any]) -> str:
    """The study's table (n = seeds; mean ± std over them) and its notes."""
    lines = []
    if summary["differences"]:
        lines += [f"**Not one recipe** (--allow-differences): the runs also differ in "
                  f"{', '.join(summary['differences'])}, so the differences below are not the model's alone.", ""]
    lines += ["| model | n | val mIoU (final) | train mIoU | Δ val | Δ train | best logged val † | params "
              "| added params | train img/s | val img/s |", "|" + "---|" * 11]
    for g in summary["groups"]:
        ref = g["label"] == summary["reference"]
        deltas = ["ref" if ref else _formatted(g[f"delta_{k}"], "+") for k in ("val_miou", "train_miou")]
        validations = "/".join(map(str, sorted(set(g["validations"]))))
        lines.append(
            f"| {g['label']} | {g['n']} | {_mean_std(g['val_miou'])} | {_mean_std(g['train_miou'])} | {deltas[0]} | "
            f"{deltas[1]} | {_mean_std(g['best_logged_val_miou'])} (of {validations}) | {g['params'] / 1e6:.2f}M | "
            f"+{g['deform_params'] / 1e6:.3f}M | {_mean_std(g['train_images_per_s'], 1)} | "
            f"{_mean_std(g['val_images_per_s'], 1)} |"
        )
    notes = [f"{g['label']}: " + ", ".join(f"{r} (seed {s})" for r, s in zip(g["runs"], g["seeds"]))
             for g in summary["groups"]]
    notes.append(f"Δ: minus {summary['reference'] or 'a reference (none here: give --reference GROUP)'}. n: seeds "
                 f"(runs); ± the standard deviation over them. val mIoU (final): the final checkpoint (last.pt), as "
                 f"mmsegmentation reports. † the best of the validations logged during training (how many in "
                 f"brackets): chosen on the validation set itself, so optimistic and not a result.")
    if summary["val_images"]:
        notes.append(f"val mIoU on the first {summary['val_images']} validation images only (--val-images).")
    if summary["train_images"]:
        source = "--train-images" if summary["train_images_given"] else "data.train_eval_images of the runs"
        notes.append(f"train mIoU on the first {' / '.join(map(str, summary['train_images']))} training images only "
                     f"({source}).")
    notes.append("params: inference model (aux head excluded); added params: offset/mask predictors. Speeds: median "
                 "train/images_per_s of TensorBoard, images_per_s of the validation evaluation.")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def _bound(x: float) -> str:
    """A bound with 2 decimals, or 2 significant digits where 2 decimals would round it to 0 (and hide its sign)."""
    text = f"{x:+.2f}"
    return f"{x:+.2g}" if x != 0 and float(text) == 0 else text


def _p(p: float, alpha: float = 0.05) -> str:
    """A p-value with 2 significant digits, more where rounding would move it onto or across ``alpha``."""
    for digits in range(2, 7):
        text = f"{p:.{digits}g}"
        if (float(text) < alpha) == (p < alpha) and (float(text) != alpha or p == alpha):
            break
    return text


def _interval(row: dict[str, Any], key: str = "") -> str:
    """``[low, high], p = ...`` of the row's interval ``key`` (the one over images by default), or why there is none."""
    part = row[key] if key else row
    if part["low"] is not None:
        return f"[{_bound(part['low'])}, {_bound(part['high'])}], p = {_p(part['p'])}"
    if row["images"] < MIN_IMAGES:
        return f"n/a: in {row['images']} images (an interval needs {MIN_IMAGES})"
    return "n/a: undefined (no union on either side)"


ABOUT = {"": "these checkpoints, on other images like these", "seeds": "the recipe (other seeds), on these images",
         "seeds_and_images": "the recipe (other seeds), on other images like these"}


def verdict(pair: dict[str, Any]) -> list[str]:
    """The models' differences, the mIoU difference and one line per question: these checkpoints on other images,
    the recipe on these images, the recipe on other images."""
    n_a, n_b = pair["seeds"]
    m = pair["miou"]
    models = ", ".join(f"{k} ({a} vs {b})" for k, (a, b) in pair["model_differences"].items())
    lines = [f"The models differ in {models}."] if models else []
    lines += [f"mIoU {_formatted(m['b'])} - {_formatted(m['a'])} = {_formatted(m['diff'], '+')} (these checkpoints on these "
              f"{pair['images']} images: means over {n_b} vs {n_a} seeds)",
              f"- {ABOUT['']}: 95% CI {_interval(m)} (paired jackknife over the {pair['images']} images, t with "
              f"{_formatted(m['df'], digits=1)} degrees of freedom)"]
    if m["seeds"] is not None:
        return lines + [
            f"- {ABOUT['seeds']}: 95% CI {_interval(m, 'seeds')} (Welch t over the seeds, "
            f"{_formatted(m['seeds']['df'], digits=1)} degrees of freedom)",
            f"- {ABOUT['seeds_and_images']}: 95% CI {_interval(m, 'seeds_and_images')} (seeds x images: the seeds' "
            f"variance and the recipe-by-image variance, t with {_formatted(m['seeds_and_images']['df'], digits=1)} "
            f"degrees of freedom)"]
    line = f"- the recipe (other seeds): no claim ({n_b} vs {n_a} seeds; an interval needs >= {MIN_SEEDS} a side)."
    if pair["seed_spread"] is None:
        return lines + [line + " The seed spread is unknown with one run each: train seed=1 and seed=2 of both."]

    def seeds(n: int | None) -> str:
        return str(n) if n is not None else "more than 1000"

    needed = {k: f"about {seeds(v['about'])} ({seeds(v['low'])} to {seeds(v['high'])})"
              for k, v in pair["seeds_needed"].items()}
    return lines + [
        f"{line} At the seed spread seen here (pooled sd {pair['seed_spread']:.2f} of the mIoU over the seeds, "
        f"{pair['seed_spread_df']} degree{'s' if pair['seed_spread_df'] > 1 else ''} of freedom), a two-sided 5% t "
        f"test detects {_formatted(m['diff'], '+')} with 80% power with {needed['observed']} seeds a side, the "
        f"reference study's +{STUDY_DIFFERENCE} with {needed['study']}; in brackets, the same at the ends of the spread's 80% confidence interval (assumes normal "
        f"seed-to-seed variation with one spread on both sides)."]


def breakdown(pair: dict[str, Any], perturbs: list[str], class_names: list[str], top: int = 10) -> list[str]:
    """Frequency thirds, object sizes, robustness and the largest per-class changes, each with its interval: the
    recipe on other images where there are enough seeds, else these checkpoints (and then no BH marks)."""
    key = "seeds_and_images" if pair["miou"]["seeds_and_images"] is not None else ""
    method = "seeds x images" if key else "paired jackknife over images"
    rows = [(f"{t} classes ({len(r['classes'])})", "mean IoU", r) for t, r in pair["thirds"].items()]
    rows += [(f"{b} regions", "pixel recall", pair["sizes"][b]) for b in SIZE_BUCKETS]
    rows += [(p, "change of mIoU", r) for p, r in zip(perturbs, pair["perturbed"])]
    lines = ["", f"| subset | measure | {pair['a_label']} | {pair['b_label']} | Δ | 95% CI: {ABOUT[key]} ({method}) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {name} | {what} | {_formatted(r['a'])} | {_formatted(r['b'])} | {_formatted(r['diff'], '+')} | "
              f"{_interval(r, key)} |" for name, what, r in rows]
    shown = sorted((c for c in pair["classes"] if c["low"] is not None), key=lambda c: -c["diff"])
    if not shown:
        return lines + ["", f"No per-class intervals: no class has ground truth in >= {MIN_IMAGES} of the images."]
    chosen = shown[:top] + shown[max(top, len(shown) - top):]
    chance = f"about {0.05 * len(shown):.0f} of {len(shown)} intervals would exclude 0 by chance"
    header = f"| class | images | IoU {pair['a_label']} | IoU {pair['b_label']} | Δ | 95% CI |"
    if key:
        lines += ["", f"Largest per-class gains and losses among the {len(shown)} classes with ground truth in >= "
                  f"{MIN_IMAGES} images, chosen after looking; intervals: {ABOUT[key]}. Were the recipes no different, "
                  f"{chance}. BH: survives a Benjamini-Hochberg correction over these {len(shown)} classes "
                  f"(false-discovery rate 5%).", "", header + " BH |", "|---|---|---|---|---|---|---|"]
        return lines + [f"| {class_names[c['class']]} | {c['images']} | {_formatted(c['a'])} | {_formatted(c['b'])} | "
                        f"{_formatted(c['diff'], '+')} | {_interval(c, key)} | {'yes' if c['bh'] else ''} |"
                        for c in chosen]
    lines += ["", f"Largest per-class differences of these checkpoints among the {len(shown)} classes with ground "
              f"truth in >= {MIN_IMAGES} images, chosen after looking; intervals: {ABOUT[key]}. These are checkpoint "
              f"differences, not evidence about the recipes: two seeds of one recipe differ class by class too, and "
              f"with fewer than {MIN_SEEDS} seeds a side nothing here separates that from the recipe. Were these "
              f"checkpoints no different on images like these, {chance}; checkpoints of two seeds of one recipe do "
              f"differ, so more will. No Benjamini-Hochberg marks without {MIN_SEEDS} seeds a side.", "", header,
              "|---|---|---|---|---|---|"]
    return lines + [f"| {class_names[c['class']]} | {c['images']} | {_formatted(c['a'])} | {_formatted(c['b'])} | "
                    f"{_formatted(c['diff'], '+')} | {_interval(c)} |" for c in chosen]


def robustness_table(summary: dict[str, Any]) -> str:
    perturbs = summary["perturb"]
    if not perturbs:
        return ""
    lines = ["", "## Geometric robustness (val mIoU under each perturbation; change from the clean images)", "",
             "| model | n | clean | " + " | ".join(perturbs) + " |", "|" + "---|" * (len(perturbs) + 3)]
    for g in summary["groups"]:
        clean = g["val_miou"]["mean"]
        cells = [f"{v:.2f} ({v - clean:+.2f})" if v is not None and clean is not None else "-"
                 for v in (g["perturbed"][p] for p in perturbs)]
        lines.append(f"| {g['label']} | {g['n']} | {_formatted(clean)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def pairs_markdown(summary: dict[str, Any], class_names: list[str]) -> str:
    if not summary["pairs"]:
        return ""
    lines = ["", "## Is the difference real? (95% intervals)"]
    for pair in summary["pairs"]:
        lines += ["", f"### {pair['b_label']} vs {pair['a_label']}", ""]
        lines += verdict(pair) + breakdown(pair, summary["perturb"], class_names)
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------- figures
def plot_curves(groups: list[Group], path: Path) -> None:
    """Validation mIoU and training loss against iteration, a colour per group, a line style per seed."""
    import matplotlib.pyplot as plt  # only where figures are drawn
    from matplotlib.ticker import MaxNLocator

    plt.switch_backend("Agg")
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for gi, group in enumerate(groups):
        for ri, run in enumerate(group.runs):
            for ax, tag in zip(axes, ("val/mIoU", "train/loss")):
                if run.curves.get(tag):
                    steps, values = zip(*run.curves[tag])
                    ax.plot(steps, values, ["-", "--", ":", "-."][ri % 4], color=plt.get_cmap("tab10")(gi % 10),
                            label=f"{group.label}, seed {run.config['seed']}", marker="o" if len(steps) < 20 else None,
                            markersize=3)
    axes[0].set(title="Validation mIoU logged during training", xlabel="iteration", ylabel="mIoU (%)")
    axes[1].set(title="Training loss (main + aux)", xlabel="iteration", ylabel="loss")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles, labels = axes[1].get_legend_handles_labels()
    columns = max(1, min(3, len(labels)))
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=columns, fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.045 * -(-len(labels) // columns), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_per_class(pair: dict[str, Any], class_names: list[str], path: Path) -> bool:
    """Per-class IoU differences with an interval, sorted, whiskers the 95% interval (the recipe on other images
    where there are enough seeds, else these checkpoints); dark bars survive BH. False (nothing written) where no
    class has an interval."""
    import matplotlib.pyplot as plt

    plt.switch_backend("Agg")
    key = "seeds_and_images" if pair["miou"]["seeds_and_images"] is not None else ""
    rows = sorted((c for c in pair["classes"] if c["low"] is not None), key=lambda c: c["diff"])
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(max(6.0, 0.14 * len(rows) + 2), 4.8))
    x = np.arange(len(rows))
    diffs = np.array([c["diff"] for c in rows])
    bounds = np.array([[(c[key] if key else c)["low"], (c[key] if key else c)["high"]] for c in rows])
    colours = [("darkgreen" if d > 0 else "darkred") if c["bh"] else ("tab:green" if d > 0 else "tab:red")
               for c, d in zip(rows, diffs)]
    ax.bar(x, diffs, color=colours, alpha=0.8)
    ax.errorbar(x, diffs, yerr=[diffs - bounds[:, 0], bounds[:, 1] - diffs], fmt="none", ecolor="black", elinewidth=0.8,
                capsize=1.5)
    ax.axhline(0, color="black", linewidth=0.8)
    shown = x if len(rows) <= 40 else np.concatenate([x[:10], x[-10:]])
    ax.set_xticks(shown, [class_names[rows[i]["class"]] for i in shown], rotation=90, fontsize=7)
    marks = (f"dark bars survive a Benjamini-Hochberg correction over the {len(rows)} classes shown" if key else
             f"checkpoint differences, not evidence about the recipes (fewer than {MIN_SEEDS} seeds a side)")
    title = f"Per-class IoU: {pair['b_label']} minus {pair['a_label']}, 95% intervals: {ABOUT[key]}; {marks}"
    ax.set_title("\n".join(textwrap.wrap(title, width=int(fig.get_figwidth() * 11))), fontsize=9)
    ax.set_ylabel("Δ IoU (points)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------------- main
def compare(options: argparse.Namespace) -> tuple[str, list[str]]:
    """Read, check, evaluate and group the runs; write the files of ``options.out``; return the markdown and the
    names of the files written. The options are scripts/compare.py's, checked there."""
    perturbs = [str(parse_perturbation(p)) for p in options.perturb]
    paths: dict[Path, Path] = {}
    for path in map(Path, options.runs):
        paths.setdefault(path.resolve(), path)
    runs: list[Run] = []
    for path in paths.values():  # every folder is read before the slow part
        run = load_run(path)
        twin = next((r for r in runs if r.weights == run.weights), None)
        if twin is not None:
            print(f"note: {path} holds the same weights as {twin.path} (weights sha256 {run.weights[:12]}): one run, "
                  f"counted once", file=sys.stderr)
            continue
        runs.append(run)
    check_classes(runs)
    differences = check_comparable(runs, options.allow_differences)
    groups = group_runs(runs, differences)
    reference, pairs = choose_pairs(groups, options)
    if reference is not None:  # the reference row first
        groups.insert(0, groups.pop(groups.index(reference)))
    train_images = {r.path: r.config["data.train_eval_images"] if options.train_images is None else options.train_images
                    for r in runs}
    for run in runs:
        read_curves(run)
        evaluate_run(run, "training", train_images[run.path], None, options)
        for perturb in [None] + perturbs:
            evaluate_run(run, "validation", options.val_images, perturb, options)
    records = [group_record(g, perturbs) for g in groups]
    for record in records:
        for key in ("val_miou", "train_miou"):
            mine, base = record[key]["mean"], records[0][key]["mean"] if reference is not None else None
            record[f"delta_{key}"] = None if mine is None or base is None else mine - base
    summary = {"groups": records, "reference": reference and reference.label, "differences": list(differences),
               "perturb": perturbs, "val_images": options.val_images,
               "train_images": sorted(set(train_images.values()) - {0}),
               "train_images_given": options.train_images is not None,
               "pairs": [p for p in (compare_pair(b, a, perturbs) for b, a in pairs) if p is not None]}
    class_names = load_class_info()[0]
    markdown = table(summary) + robustness_table(summary) + pairs_markdown(summary, class_names)
    written: list[str] = []
    if options.out is not None:
        try:
            options.out.mkdir(parents=True, exist_ok=True)
            write_whole(options.out / "comparison.md", markdown)
            write_json(options.out / "comparison.json", summary)
            plot_curves(groups, options.out / "curves.png")
            written += ["comparison.md", "comparison.json", "curves.png"]
            for pair in summary["pairs"]:
                name = re.sub(r"[^A-Za-z0-9._-]+", "_", f"per_class_{pair['b_label']}_vs_{pair['a_label']}") + ".png"
                if plot_per_class(pair, class_names, options.out / name):
                    written.append(name)
        except OSError as err:
            message = f"could not write the results to {options.out}: {err}. Choose another --out folder."
            raise UserError(message) from None
    return markdown, written

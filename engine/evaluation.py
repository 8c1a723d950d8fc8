"""Evaluating a checkpoint: the function behind evaluate.py, compare.py and any other caller.

``evaluate_checkpoint`` reads a checkpoint, builds its model, runs ``engine.inference.evaluate_loader``
on a split and returns one JSON-ready record (metrics, per-class table, settings, speed).
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from configs import UserError
from data.dataset import build_val_loader, load_class_info
from data.perturb import parse_perturbation
from engine.checkpoint import build_model_from_checkpoint, load_checkpoint
from engine.inference import evaluate_loader
from engine.precision import AMP_DTYPES, memory_format
from engine.statistics import PerImageCounts, count_image


@dataclass
class EvalOptions:
    """How to evaluate: the split, image count, inference mode and test-time augmentation, precision.

    ``mode`` None uses ``eval.mode`` of the checkpoint's config; ``max_images`` None evaluates all of
    validation and ``data.train_eval_images`` of training (0 = all). ``amp`` is ``none`` (fp32, as
    mmsegmentation evaluates), ``bf16`` or ``fp16`` (CUDA only). ``per_image``: also save every image's
    per-class and object-size counts there (``engine.statistics.PerImageCounts``, .npz) for compare.py.
    ``perturb``: ``KIND=VALUE`` (data/perturb.py), every image and its label warped before inference.
    """

    split: str = "validation"
    max_images: int | None = None
    mode: str | None = None
    scales: list[float] = field(default_factory=lambda: [1.0])
    flip: bool = False
    amp: str = "none"
    data_root: str | None = None
    save_dir: Path | None = None
    per_image: Path | None = None
    perturb: str | None = None
    progress: bool = True


def checkpoint_digest(path: Path) -> str:
    """The sha256 of a checkpoint file, recorded with every evaluation so that a result names the weights it used."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _save_per_image(per_image: PerImageCounts, path: Path, rank: int, world_size: int) -> None:
    """Gather every rank's per-image counts on rank 0 and save them sorted by image name."""
    if world_size > 1:
        parts: list[Any] = [None] * world_size
        dist.all_gather_object(parts, per_image)
        per_image = PerImageCounts.concatenate(parts)
    if rank == 0:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        per_image.sorted().save(path)


def _json_number(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else value


def evaluate_checkpoint(
    path: Path, options: EvalOptions, device: torch.device, rank: int = 0, world_size: int = 1,
    config_override: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate one checkpoint; return its record: mIoU, aAcc, mAcc, score, per-class IoU/Acc, settings, img/s.

    Metrics are in percent (None where undefined). Under torchrun every rank calls this with its rank;
    the confusion matrix is summed over ranks, so every rank returns the same numbers.
    """
    try:
        perturb = parse_perturbation(options.perturb) if options.perturb else None
    except ValueError as err:
        raise UserError(f"--perturb: {err}") from None
    if options.amp not in AMP_DTYPES:
        raise UserError(f"amp must be one of {', '.join(AMP_DTYPES)}, got {options.amp!r}.")
    if device.type != "cuda" and options.amp != "none":
        raise UserError(
            f"--amp {options.amp} is for CUDA: on the CPU torchvision's deformable convolution has no bf16/fp16 "
            f"kernel. Leave --amp out (fp32) with --device cpu."
        )
    digest = checkpoint_digest(path)
    checkpoint = load_checkpoint(path)
    model, config = build_model_from_checkpoint(checkpoint, path, config_override)
    del checkpoint
    if options.data_root:
        config["data"]["root"] = options.data_root
    eval_cfg = config["eval"]
    channels_last = memory_format(device, config["train"]["channels_last"])
    model.to(device, memory_format=channels_last)
    mode = options.mode or eval_cfg["mode"]
    max_images = options.max_images
    if max_images is None:
        max_images = config["data"]["train_eval_images"] if options.split == "training" else 0
    loader = build_val_loader(config, options.split, rank, world_size, max_images=max_images, perturb=perturb)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    num_classes = config["model"]["num_classes"]
    rows: list[tuple[str, np.ndarray, np.ndarray]] = []

    def count(name: str, pred: torch.Tensor, label: torch.Tensor) -> None:
        rows.append((name, *count_image(pred, label, num_classes)))

    start = time.perf_counter()
    matrix = evaluate_loader(
        model, loader, device, config["model"]["num_classes"], mode=mode, scales=options.scales, flip=options.flip,
        crop=eval_cfg["slide_crop"], stride=eval_cfg["slide_stride"], amp_dtype=AMP_DTYPES[options.amp],
        memory_format=channels_last, save_dir=options.save_dir, progress=options.progress,
        on_prediction=count if options.per_image is not None else None,
    )
    seconds = time.perf_counter() - start  # all_reduce at the end waits for the slowest rank
    if options.per_image is not None:
        _save_per_image(PerImageCounts.from_rows(rows, num_classes, digest), options.per_image, rank, world_size)
    m = matrix.metrics()
    class_names = list(load_class_info()[0])
    if len(class_names) != len(m["iou"]):
        class_names = [f"class {i}" for i in range(len(m["iou"]))]
    return {
        "mIoU": _json_number(m["mIoU"]),
        "aAcc": _json_number(m["aAcc"]),
        "mAcc": _json_number(m["mAcc"]),
        "score": _json_number(m["score"]),
        "per_class": [{"name": n, "iou": v, "acc": a} for n, v, a in zip(class_names, m["iou"], m["acc"])],
        "num_images": matrix.num_images,
        "max_images": max_images,
        "checkpoint": str(path),
        "checkpoint_sha256": digest,
        "config": config,
        "split": options.split,
        "mode": mode,
        "scales": list(options.scales),
        "flip": options.flip,
        "amp": options.amp,
        "images_per_s": matrix.num_images / seconds if seconds > 0 else 0.0,
        "per_image": str(options.per_image) if options.per_image is not None else None,
        "perturb": str(perturb) if perturb is not None else None,
    }

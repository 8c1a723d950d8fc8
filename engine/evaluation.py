"""Evaluation: the one loop that scores a model on a split, and evaluating a checkpoint with it.

``score`` serves training's validation (train.py) and ``evaluate_checkpoint`` (evaluate.py, compare.py) alike: every
image of a split predicted with ``engine.inference.predictions`` and counted in one confusion matrix (``engine.metric``).
``evaluate_checkpoint`` reads a checkpoint, builds its model, scores it and returns one JSON-ready record (metrics,
per-class table, settings, speed, and the sha256 of the checkpoint, so that a result names the weights it came from).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from configs import UserError, set_values, validate_config
from data.dataset import build_val_loader, load_class_info
from data.perturb import parse_perturbation
from engine.checkpoint import build_model_from_checkpoint, load_checkpoint
from engine.device import memory_format
from engine.distributed import any_rank, is_initialized, is_rank0
from engine.inference import predictions
from engine.memory import is_out_of_memory, memory_gib, out_of_memory_message
from engine.metric import ConfusionMatrix, json_value
from engine.signals import Stop
from engine.statistics import PerImageCounts, count_image
from engine.workdir import write_image


def checkpoint_digest(path: Path) -> str:
    """The sha256 of a checkpoint file, recorded with every evaluation so that a result names the weights it used."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _save_per_image(per_image: PerImageCounts, path: Path) -> None:
    """Gather every rank's per-image counts on rank 0 and save them sorted by image name."""
    if is_initialized():
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, per_image)
        per_image = PerImageCounts.concatenate(parts)
    if is_rank0():
        per_image.sorted().save(path)


def score(model: torch.nn.Module, loader: Any, device: torch.device, config: dict[str, Any], amp: str, where: str,
          context: str, stop: Stop | None = None, on_image: Callable[[str, torch.Tensor, torch.Tensor], None] | None = None,
          ) -> tuple[ConfusionMatrix, float] | None:
    """Predict every image of this rank's shard of ``loader`` (``data.dataset.build_val_loader``): the confusion
    matrix summed over the ranks and the seconds it took.

    With ``stop`` (training's validation) the ranks agree after every image whether a stop signal came, as many
    times as the longest shard has images (a rank whose shard is shorter, or whose loader workers the signal ended,
    still takes part); None when they stop. ``on_image(name, prediction, label)`` sees every image. Out of memory
    is the one paragraph of ``engine.memory`` (``where``: validation or evaluation; ``context``: at iteration N, of
    checkpoint X), not a traceback.
    """
    world, start = dist.get_world_size() if is_initialized() else 1, time.perf_counter()
    images = predictions(model, loader, device, config, amp)
    matrix = ConfusionMatrix(config["model"]["num_classes"], device)
    try:
        with closing(images), tqdm(total=len(loader), desc="eval", disable=stop is not None or not is_rank0()) as bar:
            for _ in range(-(-len(loader.dataset.dataset) // world)):
                try:
                    name, pred, label = next(images, (None, None, None))
                except (RuntimeError, OSError):  # OSError: a connection reset while a worker passed an image
                    if stop is None or stop.reason is None:  # not the loader workers that the stop signal ended too
                        raise
                else:
                    if pred is not None:
                        matrix.update(pred, label)
                        matrix.num_images += 1
                        bar.update()
                        if on_image is not None:
                            on_image(name, pred, label)
                if stop is not None and any_rank(stop.reason is not None):
                    return None
        matrix.all_reduce()
    except RuntimeError as err:
        if not is_out_of_memory(err):
            raise
        raise UserError(out_of_memory_message(where, config, amp, world, device.type, memory_gib(device),
                                              context)) from None
    return matrix, time.perf_counter() - start  # all_reduce waited for the slowest rank


def evaluate_checkpoint(
    path: Path, device: torch.device, split: str = "validation", max_images: int | None = None, amp: str = "none",
    changes: dict[str, Any] | None = None, config: dict[str, Any] | None = None, perturb: str | None = None,
    save_dir: Path | None = None, per_image: Path | None = None,
) -> dict[str, Any]:
    """Evaluate one checkpoint; return its record: mIoU, aAcc, mAcc, score, per-class IoU/Acc, settings, img/s.

    The checkpoint's config decides the model; ``config`` (a user's ``--config``) must describe the same model and
    then gives the data and evaluation settings, ``changes`` (dotted keys) set more. ``max_images`` None means all
    of validation or ``data.train_eval_images`` of training; ``amp`` is CUDA autocast, resolved (``resolve_amp``;
    ``none``: fp32, as mmsegmentation evaluates); ``perturb`` (``KIND=VALUE``, data/perturb.py) warps every image and label first.
    ``save_dir`` receives every prediction as ``NAME.png`` (the ADE20K submission format, class + 1), ``per_image``
    every image's per-class and object-size counts (``PerImageCounts``, .npz). Metrics are in percent (None where
    undefined). Under torchrun every rank calls this and returns the same numbers (the matrix is summed).
    """
    try:
        warp = parse_perturbation(perturb) if perturb else None
    except ValueError as err:
        raise UserError(f"--perturb: {err}") from None
    digest, checkpoint = checkpoint_digest(path), load_checkpoint(path)
    model, config = build_model_from_checkpoint(checkpoint, path, config)
    del checkpoint
    config = set_values(config, changes or {}, "the evaluation's options")
    validate_config(config, "the evaluation's options")
    model.to(device, memory_format=memory_format(device.type == "cuda" and config["train"]["channels_last"]))
    if max_images is None:
        max_images = config["data"]["train_eval_images"] if split == "training" else 0
    rank, world = (dist.get_rank(), dist.get_world_size()) if is_initialized() else (0, 1)
    loader = build_val_loader(config, split, rank, world, max_images=max_images, perturb=warp)
    num_classes, rows = config["model"]["num_classes"], []

    def keep(name: str, pred: torch.Tensor, label: torch.Tensor) -> None:
        if per_image is not None:
            rows.append((name, *count_image(pred, label, num_classes)))
        if save_dir is not None:
            write_image(save_dir / f"{name}.png", Image.fromarray((pred + 1).to(torch.uint8).cpu().numpy()))

    matrix, seconds = score(model, loader, device, config, amp, "evaluation", f"of {path}", on_image=keep)
    if per_image is not None:
        _save_per_image(PerImageCounts.from_rows(rows, num_classes, digest), per_image)
    m, names = matrix.metrics(), list(load_class_info()[0])
    names = names if len(names) == len(m["iou"]) else [f"class {i}" for i in range(len(m["iou"]))]
    return {
        "mIoU": json_value(m["mIoU"]), "aAcc": json_value(m["aAcc"]), "mAcc": json_value(m["mAcc"]),
        "score": json_value(m["score"]),
        "per_class": [{"name": n, "iou": v, "acc": a} for n, v, a in zip(names, m["iou"], m["acc"])],
        "num_images": matrix.num_images, "max_images": max_images, "checkpoint": str(path),
        "checkpoint_sha256": digest, "config": config, "split": split, "mode": config["eval"]["mode"],
        "scales": config["eval"]["scales"], "flip": config["eval"]["flip"], "amp": amp,
        "images_per_s": matrix.num_images / seconds if seconds > 0 else 0.0,
        "per_image": str(per_image) if per_image is not None else None, "perturb": str(warp) if warp else None,
    }

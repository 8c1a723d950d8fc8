"""Evaluate segmentation checkpoints: mIoU, aAcc, mAcc and the ADE20K challenge score.

The metric follows torchvision's segmentation reference: one int64 confusion matrix, counted with
``bincount(n * target + pred)`` over labelled pixels on the device and summed across processes before
any ratio is taken. Classes absent from both ground truth and prediction are left out of the mean
IoU (mmsegmentation's rule), and predictions are scored at the original image size.

Inference follows mmsegmentation: ``whole`` runs the resized image at once, ``slide`` averages
overlapping crops (``slide_inference``), and test-time augmentation (scales, horizontal flip) sums
the softmax probabilities of every augmented view. ``evaluate_loader`` is also used by train.py for
validation during training.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm import tqdm

from configs import UserError, check_same_model, error_message, load_config
from data import IGNORE_INDEX
from data.dataset import build_val_loader, load_class_info
from models.segmentor import build_model

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}
REQUIRED_KEYS = ("model", "config")


class ConfusionMatrix:
    """Counts of (ground truth, prediction) pixel pairs; ``mat[t, p]``, int64, kept on ``device``.

    ``num_images`` is a plain counter that callers may increase; ``all_reduce`` sums it too.
    """

    def __init__(self, num_classes: int, device: torch.device | str = "cpu") -> None:
        self.num_classes = num_classes
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
        self.num_images = 0

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add the pixels of ``pred`` and ``target`` (same shape, class indices; target may hold 255)."""
        n = self.num_classes
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}")
        pred = pred.to(self.mat.device).flatten().long()
        target = target.to(self.mat.device).flatten().long()
        valid = target != IGNORE_INDEX
        counts = torch.bincount(n * target[valid] + pred[valid], minlength=n * n)
        if counts.numel() != n * n:  # bincount grows the output for indices >= n*n
            raise ValueError(f"labels outside 0..{n - 1} (other than the ignore index {IGNORE_INDEX})")
        self.mat += counts.view(n, n)

    def all_reduce(self) -> None:
        """Sum the raw counts over all processes (no-op unless torch.distributed is initialised)."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        dist.all_reduce(self.mat)
        images = torch.tensor([self.num_images], dtype=torch.int64, device=self.mat.device)
        dist.all_reduce(images)
        self.num_images = int(images.item())

    def metrics(self) -> dict[str, Any]:
        """All metrics in percent: ``mIoU``, ``aAcc``, ``mAcc``, ``score`` and per-class ``iou``, ``acc``.

        A class's IoU is None where its union (ground truth + prediction - intersection) is empty;
        such classes are left out of ``mIoU``. Its accuracy is None where it has no ground-truth
        pixels; ``mAcc`` averages the other classes. ``score`` = (aAcc + mIoU) / 2, the ADE20K
        challenge score. Means over no classes are NaN.
        """
        h = self.mat.detach().double().cpu()
        correct = h.diag()
        gt = h.sum(1)
        union = gt + h.sum(0) - correct
        iou = [100.0 * float(c / u) if u > 0 else None for c, u in zip(correct, union)]
        acc = [100.0 * float(c / g) if g > 0 else None for c, g in zip(correct, gt)]
        total = float(h.sum())
        a_acc = 100.0 * float(correct.sum()) / total if total > 0 else math.nan
        m_iou = _mean(iou)
        return {
            "mIoU": m_iou,
            "aAcc": a_acc,
            "mAcc": _mean(acc),
            "score": (a_acc + m_iou) / 2,
            "iou": iou,
            "acc": acc,
        }


def _mean(values: list[float | None]) -> float:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else math.nan


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by train.py (tensors only, onto the CPU); UserError if it is unusable."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"checkpoint {path} does not exist or is not a file. Give the path of a checkpoint written by "
            f"train.py, for example runs/def-conv-v2/best.pt."
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zips, pickles, non-checkpoint files: many exception types
        unsafe = re.search(r"WeightsUnpickler error: ([^\n]*?)(?: was not an allowed global|\n|$)", str(err))
        if unsafe:
            raise UserError(
                f"checkpoint {path} holds objects other than tensors and plain Python values ({unsafe.group(1)}), "
                f"so it cannot be read safely with torch.load(weights_only=True). It was not written by this "
                f"repository's train.py; save only tensors, numbers, strings, lists and dicts in it."
            ) from None
        reason = (str(err).strip().splitlines() or [""])[0].split(". ")[0][:200]
        raise UserError(
            f"could not read checkpoint {path} ({type(err).__name__}: {reason}). The file is probably "
            f"truncated or corrupt (a copy or a run that stopped while writing it); copy it again or use "
            f"another checkpoint of the run (last.pt or best.pt)."
        ) from None
    missing = [k for k in REQUIRED_KEYS if not isinstance(checkpoint, dict) or k not in checkpoint]
    if missing:
        raise UserError(
            f"checkpoint {path} has no {' or '.join(repr(k) for k in missing)} entry, so it was not written "
            f"by train.py (which saves the model weights and the config). Give a last.pt or best.pt from a run folder."
        )
    if not isinstance(checkpoint["config"], dict) or not isinstance(checkpoint["config"].get("model"), dict):
        raise UserError(f"checkpoint {path} holds no usable config (no 'model' section); it was not written by train.py.")
    return checkpoint


def build_model_from_checkpoint(
    checkpoint: dict[str, Any], path: str | Path, config_override: dict[str, Any] | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Build the checkpoint's model and load its weights strictly; return ``(model, config)``.

    The model section always comes from the checkpoint. With ``config_override`` (the user's
    ``--config``) the two must describe the same model, and its other sections (data, eval) are used.
    """
    saved = checkpoint["config"]
    if config_override is None:
        config = copy.deepcopy(saved)
    else:
        wanted_name = f"config '{config_override.get('config_name', '--config')}'"
        check_same_model(saved, config_override, f"checkpoint {path}", wanted_name)
        config = copy.deepcopy(config_override)
        config["model"] = copy.deepcopy(saved["model"])
    model, _ = build_model(config, load_pretrained=False)
    state = checkpoint["model"]
    if not isinstance(state, dict):
        raise UserError(f"checkpoint {path}: 'model' is a {type(state).__name__}, not a state dict.")
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise UserError(
            f"checkpoint {path} does not fit the model its config describes: {len(missing)} missing keys "
            f"{missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}. The file was written by "
            f"different code or edited; nothing was loaded."
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:  # shape mismatches
        detail = " ".join(str(err).split())[:400]
        raise UserError(f"checkpoint {path} does not fit the model its config describes: {detail}") from None
    return model, config


def _logits(model: nn.Module, image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The model's 1/8 logits, in float32, upsampled to ``size``."""
    out = model(image)["out"].float()
    if tuple(out.shape[-2:]) != tuple(size):
        out = F.interpolate(out, size=size, mode="bilinear", align_corners=False)
    return out


def _slide_logits(model: nn.Module, image: torch.Tensor, crop: int, stride: int, num_classes: int) -> torch.Tensor:
    """mmsegmentation's slide_inference: average the logits of overlapping ``crop`` windows.

    Windows are clipped to the image, so an image smaller than the crop is run whole.
    """
    n, _, h, w = image.shape
    rows = max(h - crop + stride - 1, 0) // stride + 1
    cols = max(w - crop + stride - 1, 0) // stride + 1
    logits = torch.zeros(n, num_classes, h, w, device=image.device)
    count = torch.zeros(1, 1, h, w, device=image.device)
    for i in range(rows):
        for j in range(cols):
            y2, x2 = min(i * stride + crop, h), min(j * stride + crop, w)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            logits[:, :, y1:y2, x1:x2] += _logits(model, image[:, :, y1:y2, x1:x2], (y2 - y1, x2 - x1))
            count[:, :, y1:y2, x1:x2] += 1
    return logits / count


def predict_logits(
    model: nn.Module,
    image: torch.Tensor,
    out_size: tuple[int, int],
    mode: str = "whole",
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    crop: int = 512,
    stride: int = 341,
    num_classes: int = 150,
) -> torch.Tensor:
    """Class scores ``[N, C, *out_size]`` for a normalised image ``[N, 3, h, w]``, in float32.

    Without augmentation these are logits; with several views (scales, flip) the sum of their softmax
    probabilities, as mmsegmentation. Every view is resized bilinearly to ``out_size`` (the original
    image size) before views are combined, so the argmax is taken at full resolution.

    Args:
        mode: ``whole`` (the image at once) or ``slide`` (``crop`` windows every ``stride`` pixels).
        scales: factors the input image is rescaled by (bilinear) for multi-scale testing.
        flip: also run the horizontally flipped image (flipped back before combining).
    """
    if mode not in ("whole", "slide"):
        raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")
    out_size = (int(out_size[0]), int(out_size[1]))
    h, w = image.shape[-2:]
    views = len(scales) * (2 if flip else 1)
    total = None
    for scale in scales:
        size = (max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5)))
        scaled = image if size == (h, w) else F.interpolate(image, size=size, mode="bilinear", align_corners=False)
        for flipped in (False, True) if flip else (False,):
            x = scaled.flip(-1) if flipped else scaled
            if mode == "whole":
                logits = _logits(model, x, size)
            else:
                logits = _slide_logits(model, x, crop, stride, num_classes)
            if flipped:
                logits = logits.flip(-1)
            if tuple(logits.shape[-2:]) != out_size:
                logits = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)
            if views > 1:
                logits = logits.softmax(1)
            total = logits if total is None else total + logits
    return total


def _is_rank0() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def evaluate_loader(
    model: nn.Module,
    loader: Any,
    device: torch.device | str,
    num_classes: int,
    mode: str = "whole",
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    crop: int = 512,
    stride: int = 341,
    amp_dtype: torch.dtype | None = None,
    save_dir: Path | None = None,
    progress: bool = True,
) -> ConfusionMatrix:
    """Predict every ``(image, label, names)`` batch of ``loader`` (batch size 1) and count the pixels.

    The matrix is summed over processes before it is returned. With ``save_dir`` each prediction is
    written as ``NAME.png`` at the original size in the ADE20K submission format (uint8, class + 1).
    The model's train/eval mode is restored afterwards.
    """
    device = torch.device(device)
    # Run the plain module: a DDP wrapper could sync buffers on forward (ranks may hold different
    # numbers of images), and a compiled one would recompile for every image size.
    net = getattr(model, "module", model)
    net = getattr(net, "_orig_mod", net)
    was_training = net.training
    net.eval()
    matrix = ConfusionMatrix(num_classes, device)
    if save_dir is not None:
        save_dir = Path(save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
    try:
        with torch.inference_mode():
            for image, label, names in tqdm(loader, desc="eval", disable=not (progress and _is_rank0())):
                image = image.to(device, non_blocking=True)
                label = label.to(device, non_blocking=True)
                autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
                with autocast:
                    scores = predict_logits(
                        net, image, tuple(label.shape[-2:]), mode, scales, flip, crop, stride, num_classes
                    )
                pred = scores.argmax(1)
                matrix.update(pred, label)
                matrix.num_images += image.shape[0]
                if save_dir is not None:
                    for name, p in zip(names, (pred + 1).to(torch.uint8).cpu().numpy()):
                        Image.fromarray(p).save(save_dir / f"{name}.png")
    finally:
        net.train(was_training)
    matrix.all_reduce()
    return matrix


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Evaluate one or more checkpoints on ADE20K (or the demo set): mIoU, aAcc, mAcc and the "
            "challenge score (aAcc + mIoU) / 2, with a per-class IoU table. The model and data settings "
            "come from the config stored in each checkpoint. Runs under torchrun for several GPUs."
        ),
        epilog=(
            "example: python evaluate.py --checkpoint runs/norm-conv/best.pt runs/def-conv-v2/best.pt "
            "--json results.json\n"
            "         torchrun --nproc_per_node 4 evaluate.py --checkpoint runs/def-conv-v2/best.pt "
            "--tta flip --scales 0.5,0.75,1.0,1.25,1.5,1.75"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", nargs="+", required=True, help="checkpoint file(s) written by train.py")
    parser.add_argument("--config", help="check the checkpoint against this config and use its data/eval settings")
    parser.add_argument("--data-root", help="dataset folder, instead of data.root of the checkpoint's config")
    parser.add_argument("--split", choices=["validation", "training"], default="validation")
    parser.add_argument(
        "--max-images", type=int, default=None,
        help="evaluate only the first N images (sorted by name); default: all of validation, "
        "data.train_eval_images of training",
    )
    parser.add_argument("--tta", choices=["none", "flip"], default="none", help="flip: also the mirrored image")
    parser.add_argument("--scales", default="1.0", help="comma-separated test scales, e.g. 0.5,0.75,1.0,1.25,1.5,1.75")
    parser.add_argument("--mode", choices=["whole", "slide"], help="inference mode (default: eval.mode of the config)")
    parser.add_argument("--save-predictions", metavar="DIR", help="write ADE20K submission PNGs (class + 1) here")
    parser.add_argument("--json", metavar="PATH", help="write the metrics as JSON here")
    parser.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda if available")
    parser.add_argument("--amp", choices=list(AMP_DTYPES), help="autocast dtype (default: bf16 on CUDA, none on CPU)")
    return parser.parse_args(argv)


def _parse_scales(text: str) -> list[float]:
    try:
        scales = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        scales = []
    if not scales or any(not math.isfinite(s) or s <= 0 for s in scales):
        raise UserError(f"--scales must be positive numbers separated by commas, like 0.5,1.0,1.5; got '{text}'.")
    return scales


def _checkpoint_names(paths: list[Path]) -> list[str]:
    """Short unique names: the file stem, or parent_stem where stems repeat (runs/a/best.pt -> a_best)."""
    stems = [p.stem for p in paths]
    names = [f"{p.parent.name}_{p.stem}" if stems.count(p.stem) > 1 else p.stem for p in paths]
    return [f"{n}_{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def init_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """Join the process group that torchrun describes in the environment; (rank, world size, device)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, torch.device(device_name)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device_name == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, device


def _fmt(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.2f}"


def _class_table(title: str, class_names: list[str], iou: list, acc: list) -> str:
    """Per-class rows for the classes present in ground truth or prediction (the others are counted)."""
    width = max(len(n) for n in class_names)
    lines = [title, f"{'id':>4}  {'class':<{width}}  {'IoU':>6}  {'Acc':>6}"]
    for i, (name, v, a) in enumerate(zip(class_names, iou, acc)):
        if v is not None:
            lines.append(f"{i:>4}  {name:<{width}}  {_fmt(v):>6}  {_fmt(a):>6}")
    absent = sum(v is None for v in iou)
    if absent:
        lines.append(f"({absent} classes appear in neither ground truth nor prediction: not shown, not in mIoU)")
    return "\n".join(lines)


def _summary_table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    width = max([len("checkpoint")] + [len(name) for name, _ in rows])
    lines = [f"{'checkpoint':<{width}}  {'mIoU':>6}  {'aAcc':>6}  {'mAcc':>6}  {'score':>6}  {'images':>6}  {'img/s':>6}"]
    for name, r in rows:
        lines.append(
            f"{name:<{width}}  {_fmt(r['mIoU']):>6}  {_fmt(r['aAcc']):>6}  {_fmt(r['mAcc']):>6}  "
            f"{_fmt(r['score']):>6}  {r['num_images']:>6}  {r['images_per_s']:>6.2f}"
        )
    return "\n".join(lines)


def _json_number(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else value


def evaluate_checkpoint(
    path: Path, name: str, args: argparse.Namespace, config_override: dict[str, Any] | None,
    rank: int, world_size: int, device: torch.device, save_dir: Path | None,
) -> dict[str, Any]:
    """Evaluate one checkpoint as the command line asks; return its result record (for JSON)."""
    checkpoint = load_checkpoint(path)
    model, config = build_model_from_checkpoint(checkpoint, path, config_override)
    del checkpoint
    if args.data_root:
        config["data"]["root"] = args.data_root
    model.to(device)
    eval_cfg = config.get("eval", {})
    mode = args.mode or eval_cfg.get("mode", "whole")
    if mode not in ("whole", "slide"):
        raise UserError(f"config key 'eval.mode' must be 'whole' or 'slide', got {mode!r}.")
    max_images = args.max_images
    if max_images is None:
        max_images = config["data"]["train_eval_images"] if args.split == "training" else 0
    loader = build_val_loader(config, args.split, rank, world_size, max_images=max_images)
    scales = _parse_scales(args.scales)
    amp = args.amp or ("bf16" if device.type == "cuda" else "none")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    matrix = evaluate_loader(
        model, loader, device, config["model"]["num_classes"], mode=mode, scales=scales,
        flip=args.tta == "flip", crop=eval_cfg.get("slide_crop", 512), stride=eval_cfg.get("slide_stride", 341),
        amp_dtype=AMP_DTYPES[amp], save_dir=save_dir,
    )
    seconds = time.perf_counter() - start  # all_reduce at the end waits for the slowest rank
    m = matrix.metrics()
    class_names = list(load_class_info()[0])
    if len(class_names) != len(m["iou"]):
        class_names = [f"class {i}" for i in range(len(m["iou"]))]
    if rank == 0:
        print(_class_table(f"\n{name} ({path}): per-class IoU and accuracy (%)", class_names, m["iou"], m["acc"]))
    return {
        "name": name,
        "mIoU": _json_number(m["mIoU"]),
        "aAcc": _json_number(m["aAcc"]),
        "mAcc": _json_number(m["mAcc"]),
        "score": _json_number(m["score"]),
        "per_class": [{"name": n, "iou": v, "acc": a} for n, v, a in zip(class_names, m["iou"], m["acc"])],
        "num_images": matrix.num_images,
        "checkpoint": str(path),
        "config": config,
        "split": args.split,
        "mode": mode,
        "scales": scales,
        "flip": args.tta == "flip",
        "amp": amp,
        "images_per_s": matrix.num_images / seconds if seconds > 0 else 0.0,
    }


def run(args: argparse.Namespace) -> int:
    device_name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but PyTorch sees no CUDA device here. Use --device cpu.")
    if args.max_images is not None and args.max_images < 0:
        raise UserError(f"--max-images must be 0 (all) or a positive number, got {args.max_images}.")
    if device_name == "cpu" and args.amp not in (None, "none"):
        raise UserError(
            f"--amp {args.amp} is for CUDA: on the CPU torchvision's deformable convolution has no bf16/fp16 "
            f"kernel. Leave --amp out (or use --amp none) with --device cpu."
        )
    _parse_scales(args.scales)  # fail before any checkpoint is read
    config_override = load_config(args.config) if args.config else None
    paths = [Path(p) for p in args.checkpoint]
    for path in paths:  # a typo in the last of several checkpoints should not wait for the others
        if not path.is_file():
            load_checkpoint(path)
    names = _checkpoint_names(paths)
    rank, world_size, device = init_distributed(device_name)
    try:
        results = []
        for path, name in zip(paths, names):
            save_dir = None
            if args.save_predictions:
                save_dir = Path(args.save_predictions) / (name if len(paths) > 1 else "")
            results.append(evaluate_checkpoint(path, name, args, config_override, rank, world_size, device, save_dir))
        if rank == 0:
            print(f"\nsplit {args.split}, mode {results[0]['mode']}, scales {results[0]['scales']}, "
                  f"flip {results[0]['flip']}, amp {results[0]['amp']}, {world_size} process(es)")
            print(_summary_table([(r["name"], r) for r in results]))
            if args.json:
                json_path = Path(args.json)
                json_path.parent.mkdir(parents=True, exist_ok=True)
                records = [{k: v for k, v in r.items() if k != "name"} for r in results]
                json_path.write_text(json.dumps(records[0] if len(records) == 1 else records, indent=2) + "\n")
                print(f"wrote {json_path}")
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2 with a one-paragraph message for user errors)."""
    args = parse_args(argv)
    try:
        return run(args)
    except UserError as err:
        print(f"error: {error_message(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

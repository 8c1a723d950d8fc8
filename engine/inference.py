"""Inference: whole-image and sliding-window prediction, test-time augmentation, and the evaluation loop.

As mmsegmentation: ``whole`` runs the resized image at once, ``slide`` averages overlapping crops
(its ``slide_inference``), and test-time augmentation (scales, horizontal flip) sums the softmax
probabilities of every augmented view. Predictions are scored at the original image size.
``predictions`` serves evaluate.py and validation during training alike.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.device import AUTOCAST, memory_format


def upsample_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Logits in float32, resized bilinearly (align_corners=False) to ``size`` where they differ."""
    logits = logits.float()
    if tuple(logits.shape[-2:]) != tuple(size):
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    return logits


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
            logits[:, :, y1:y2, x1:x2] += upsample_logits(model(image[:, :, y1:y2, x1:x2])["out"], (y2 - y1, x2 - x1))
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

    ``mode`` ``whole`` runs the image at once, ``slide`` ``crop`` windows every ``stride`` pixels; each of ``scales``
    rescales the input (bilinear), and ``flip`` adds the horizontally flipped image (flipped back). Without
    augmentation the scores are logits; with several views the sum of their softmax probabilities, as mmsegmentation.
    Every view is resized bilinearly to ``out_size`` (the original image size) before views are combined, so the
    argmax is taken at full resolution.
    """
    h, w = image.shape[-2:]
    views = len(scales) * (2 if flip else 1)
    total = None
    for scale in scales:
        size = (max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5)))
        scaled = image if size == (h, w) else F.interpolate(image, size=size, mode="bilinear", align_corners=False)
        for flipped in (False, True) if flip else (False,):
            x = scaled.flip(-1) if flipped else scaled
            if mode == "whole":
                logits = upsample_logits(model(x)["out"], size)
            else:
                logits = _slide_logits(model, x, crop, stride, num_classes)
            if flipped:
                logits = logits.flip(-1)
            logits = upsample_logits(logits, out_size)
            if views > 1:
                logits = logits.softmax(1)
            total = logits if total is None else total + logits
    return total


def predictions(
    model: nn.Module, loader: Any, device: torch.device, config: dict[str, Any], amp: str = "none"
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(name, prediction, label)`` for every image of a validation loader, both at the original image size.

    The settings come from ``config``: ``eval`` (mode, scales, flip, slide window), ``model.num_classes`` and the
    training's layout (``train.channels_last``, on CUDA). The model runs in eval mode and without cuDNN's benchmark
    mode (whole images change size almost every time, so it would autotune every convolution per image); both are
    restored when the generator is exhausted or closed (``contextlib.closing``).
    """
    net = plain_module(model)  # a DDP wrapper could sync buffers; a compiled one would recompile per image size
    ecfg, num_classes = config["eval"], config["model"]["num_classes"]
    layout = memory_format(device.type == "cuda" and config["train"]["channels_last"])
    was_training, benchmark = net.training, torch.backends.cudnn.benchmark
    net.eval()
    torch.backends.cudnn.benchmark = False
    try:
        for image, label, names in loader:
            image = image.to(device, non_blocking=True).contiguous(memory_format=layout)
            label = label.to(device, non_blocking=True)
            with torch.inference_mode(), torch.autocast(device.type, **AUTOCAST[amp]):
                scores = predict_logits(net, image, tuple(label.shape[-2:]), ecfg["mode"], ecfg["scales"], ecfg["flip"],
                                        ecfg["slide_crop"], ecfg["slide_stride"], num_classes)
            yield from zip(names, scores.argmax(1), label)
    finally:
        net.train(was_training)
        torch.backends.cudnn.benchmark = benchmark


def plain_module(model: nn.Module) -> nn.Module:
    """The model inside DDP and torch.compile wrappers."""
    net = getattr(model, "module", model)
    return getattr(net, "_orig_mod", net)

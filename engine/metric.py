"""The segmentation metric: one int64 confusion matrix, IoU per class, mIoU, aAcc, mAcc.

As torchvision's segmentation reference: pixels are counted with ``bincount(n * target + pred)`` over
labelled pixels on the device, and the raw counts are summed across processes before any ratio is
taken. Classes absent from both ground truth and prediction are left out of the mean IoU
(mmsegmentation's rule); ``class_iou`` and ``mean_iou`` are that rule, shared with engine/statistics.py.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from data import IGNORE_INDEX


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
        """All metrics in percent (:func:`metrics_from_counts` of the matrix's per-class counts)."""
        h = self.mat.detach().cpu().numpy()
        correct = np.diag(h)
        gt = h.sum(1)
        return metrics_from_counts(correct, gt + h.sum(0) - correct, gt)


def json_value(x: float | None) -> float | None:
    """A metric as JSON holds it: None where it is undefined (NaN, e.g. a class absent from labels and predictions)."""
    return None if x is None or math.isnan(x) else float(x)


def class_iou(intersection: np.ndarray, union: np.ndarray) -> np.ndarray:
    """IoU per class in percent (elementwise, any shape), NaN where the union is empty: such a class is absent."""
    intersection, union = np.asarray(intersection, dtype=np.float64), np.asarray(union, dtype=np.float64)
    return np.divide(100.0 * intersection, union, out=np.full(union.shape, np.nan), where=union > 0)


def mean_iou(iou: np.ndarray) -> np.ndarray:
    """The mean over the last axis of the classes present (not NaN); NaN where none is. The one mIoU rule."""
    present = ~np.isnan(iou)
    count = present.sum(-1)
    total = np.where(present, iou, 0.0).sum(-1)
    return np.divide(total, count, out=np.full(count.shape, np.nan), where=count > 0)


def metrics_from_counts(intersection: np.ndarray, union: np.ndarray, gt: np.ndarray) -> dict[str, Any]:
    """``mIoU``, ``aAcc``, ``mAcc``, ``score`` and per-class ``iou``, ``acc`` in percent from per-class pixel counts.

    A class's IoU is None where its union (ground truth + prediction - intersection) is empty;
    such classes are left out of ``mIoU``. Its accuracy is None where it has no ground-truth
    pixels; ``mAcc`` averages the other classes. ``score`` = (aAcc + mIoU) / 2, the ADE20K
    challenge score. Means over no classes are NaN.
    """
    iou, acc = class_iou(intersection, union), class_iou(intersection, gt)
    total = float(np.sum(gt))
    a_acc = 100.0 * float(np.sum(intersection)) / total if total > 0 else math.nan
    m_iou = float(mean_iou(iou))
    return {
        "mIoU": m_iou,
        "aAcc": a_acc,
        "mAcc": float(mean_iou(acc)),
        "score": (a_acc + m_iou) / 2,
        "iou": [json_value(v) for v in iou],
        "acc": [json_value(v) for v in acc],
    }

"""The training loss: bilinear upsampling of the logits to the label size, then cross-entropy.

Two implementations with the same value and gradient, chosen by ``train.loss_op``: ``reference``
(``F.interpolate`` + ``F.cross_entropy``) and ``triton`` (models/triton_loss.py, fused, never makes the
full-size logits; it runs the reference where Triton cannot run). Two normalisations, chosen by
``train.loss_norm``: ``labelled`` divides the summed cross-entropy by the labelled pixels (as
torchvision's reference), ``all`` by all N*H*W pixels (mmsegmentation's ``avg_non_ignore=False``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from data import IGNORE_INDEX
from models.triton_loss import reference_upsample_cross_entropy, upsample_cross_entropy

LOSS_OPS: dict[str, Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]] = {
    "reference": reference_upsample_cross_entropy,
    "triton": upsample_cross_entropy,
}


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor, op: str = "reference", norm: str = "labelled") -> torch.Tensor:
    """Cross-entropy of ``logits`` (N, C, h, w) upsampled to ``labels`` (N, H, W), normalised as ``norm`` says."""
    loss = LOSS_OPS[op](logits, labels, IGNORE_INDEX)  # mean over labelled pixels (0 if none)
    if norm == "all":
        loss = loss * ((labels != IGNORE_INDEX).sum() / labels.numel())
    return loss


def counted_pixels(labels: torch.Tensor, norm: str) -> torch.Tensor:
    """The pixels a loss normalised by ``norm`` divides by: the labelled ones, or all of them."""
    return (labels != IGNORE_INDEX).sum() if norm == "labelled" else torch.tensor(labels.numel(), device=labels.device)


def compute_loss(
    outputs: dict[str, torch.Tensor], labels: torch.Tensor, aux_weight: float, op: str = "reference",
    norm: str = "labelled",
) -> dict[str, torch.Tensor]:
    """``main``, ``aux`` (when the model returned it) and ``total`` = main + ``aux_weight`` * aux."""
    losses = {"main": segmentation_loss(outputs["out"], labels, op, norm)}
    losses["total"] = losses["main"]
    if "aux" in outputs:
        losses["aux"] = segmentation_loss(outputs["aux"], labels, op, norm)
        losses["total"] = losses["main"] + aux_weight * losses["aux"]
    return losses

"""The training loss: bilinear upsampling of the logits to the label size, then cross-entropy.

Two implementations with the same value and gradient, chosen by ``train.loss_op``: ``reference``
(``reference_upsample_cross_entropy`` below: ``F.interpolate`` + ``F.cross_entropy``) and ``triton``
(engine/triton_loss.py, fused, never makes the full-size logits), imported at its first call, so that a run with
the reference never imports the Triton modules (``engine.device.resolve_config`` keeps triton only where Triton
runs). Two normalisations, chosen by ``train.loss_norm``: ``labelled`` divides the summed cross-entropy by the
labelled pixels (as torchvision's reference), ``all`` by all N*H*W pixels (mmsegmentation's ``avg_non_ignore=False``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from data import IGNORE_INDEX


def reference_upsample_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Upsample ``logits`` (N, C, h, w) to ``labels`` (N, H, W), take the cross-entropy, average over labelled pixels
    (0 if there are none).

    bfloat16/float16 logits (autocast's) are cast to float32 before the upsampling, so that the upsampling, its
    backward and the cross-entropy run in float32 and the gradient is rounded to the logits' dtype once; float64
    stays float64. The fused kernels compute the same way. Upsampling in bf16 instead would make CUDA's backward
    accumulate the gradient in bf16 atomics (docs/gpu-and-clusters.md, "The bf16 loss":
    scripts/loss_precision.py measures it).
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    up = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    total = F.cross_entropy(up, labels, ignore_index=ignore_index, reduction="sum")
    return total / (labels != ignore_index).sum().clamp(min=1)


def upsample_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, op: str = "reference",
                           ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The loss by ``op``: ``reference`` (above), or ``triton``: engine/triton_loss.py's fused kernels, imported
    here at the first call (a ValueError where they cannot run)."""
    if op == "reference":
        return reference_upsample_cross_entropy(logits, labels, ignore_index)
    from engine import triton_loss

    return triton_loss.upsample_cross_entropy(logits, labels, ignore_index)


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor, op: str = "reference", norm: str = "labelled") -> torch.Tensor:
    """Cross-entropy of ``logits`` (N, C, h, w) upsampled to ``labels`` (N, H, W), normalised as ``norm`` says."""
    loss = upsample_cross_entropy(logits, labels, op)  # mean over labelled pixels (0 if none)
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
    losses = {name: segmentation_loss(outputs[key], labels, op, norm)
              for name, key in (("main", "out"), ("aux", "aux")) if key in outputs}
    losses["total"] = losses["main"] + aux_weight * losses["aux"] if "aux" in losses else losses["main"]
    return losses

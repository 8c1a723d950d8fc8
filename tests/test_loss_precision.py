"""The bf16 loss: the reference loss upsamples bf16 logits in fp32 (the fused loss computes the same way), and
scripts/loss_precision.py's emulation of CUDA's bf16 upsample backward."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.loss import reference_upsample_cross_entropy
from engine.triton_loss import upsample_cross_entropy
from scripts import loss_precision


def loss_and_grad(fn, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = logits.detach().clone().requires_grad_()
    loss = fn(leaf, labels)
    loss.backward()
    return loss.detach(), leaf.grad


def fp32_upsampling(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The chosen semantics written out: the logits cast to fp32, then upsampled, then the cross-entropy."""
    up = F.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(up, labels, ignore_index=255, reduction="sum") / (labels != 255).sum()


def test_bf16_logits_are_upsampled_in_fp32_and_the_gradient_rounded_once() -> None:
    logits, labels = loss_precision.make_inputs("random", 2, 12, 6, 8)
    loss, grad = loss_and_grad(reference_upsample_cross_entropy, logits, labels)
    want_loss, want_grad = loss_and_grad(fp32_upsampling, logits, labels)
    assert grad.dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert torch.equal(loss, want_loss) and torch.equal(grad, want_grad)
    exact_loss, exact_grad = loss_and_grad(reference_upsample_cross_entropy, logits.double(), labels)
    assert abs(loss.item() / exact_loss.item() - 1) < 1e-6
    assert loss_precision.relative_l2(grad, exact_grad) < 4e-3  # one bf16 rounding: at most 2^-9 per value


def test_the_fused_loss_has_the_same_semantics() -> None:
    """Triton's kernels (its CPU interpreter here) compute from the bf16 values in fp32, as the reference now does."""
    logits, labels = loss_precision.make_inputs("random", 2, 12, 6, 8)
    loss, grad = loss_and_grad(upsample_cross_entropy, logits, labels)
    want_loss, want_grad = loss_and_grad(reference_upsample_cross_entropy, logits, labels)
    assert abs(loss.item() / want_loss.item() - 1) < 1e-6
    # Equal up to the final rounding to bf16 of values that differ in the last fp32 bits: at most one bf16 step.
    assert ((grad.float() - want_grad.float()).abs() <= want_grad.float().abs() * 2**-7 + 1e-12).all()


def test_the_emulated_backward_with_fp32_sums_is_interpolates_backward() -> None:
    grad_up = torch.randn(2, 3, 40, 48, generator=torch.Generator().manual_seed(0))
    emulated = loss_precision.emulated_upsample_backward(grad_up, (5, 6), torch.float32)
    leaf = torch.zeros(2, 3, 5, 6, requires_grad=True)
    F.interpolate(leaf, size=(40, 48), mode="bilinear", align_corners=False).backward(grad_up)
    assert loss_precision.relative_l2(emulated, leaf.grad.double()) < 1e-6


def test_bf16_sums_lose_far_more_than_one_rounding() -> None:
    """At 8x upsampling each low-res gradient is a sum of ~256 terms: in bf16 the error is many roundings'."""
    errors = loss_precision.errors("random", 1, 16, 16, 8)
    assert errors["bf16_upsampling_grad_rel_l2"] > 5 * errors["fp32_upsampling_grad_rel_l2"]
    assert errors["fp32_upsampling_grad_rel_l2"] < 4e-3 and errors["fp32_upsampling_loss_rel_err"] < 1e-6

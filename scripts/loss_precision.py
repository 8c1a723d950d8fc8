"""The bf16 loss: how far the logit gradient is from exact when bf16 logits are upsampled in bf16 or in fp32.

The reference loss upsamples the heads' 1/8 logits to the label size, then takes the cross-entropy in fp32. Under
bf16 autocast the logits are bf16. Upsampled in bf16, CUDA's backward of ``F.interpolate`` adds every output
pixel's contribution into the low-res gradient with a bf16 atomic add, so each low-res value is a sum of about
(2 x 8)^2 = 256 terms rounded to bf16 after every term. Upsampled in fp32 (the logits cast first, what
``reference_upsample_cross_entropy`` does), the sums are fp32 and the gradient is rounded to bf16 once.

A CPU has no such kernel (its bf16 backward accumulates in fp32), so ``emulated_upsample_backward`` replays
CUDA's: each contribution ``lambda_y * lambda_x * grad`` computed in fp32 and rounded to bf16 (as the kernel's
cast before ``fastAtomicAdd``), then added to the running bf16 sum one at a time in the order of the output
pixels (row-major: the order the kernel's threads are numbered; the GPU's atomics serialise in an unspecified
order, which moves single roundings, not the size of the error). Both variants are compared with the float64
gradient of the same bf16 logits. The peak memory of each variant's loss forward and backward is the CPU
process peak of a fresh process running only that (``engine.benchmark.process_peak``).

    python scripts/loss_precision.py                      # 150 classes, 64x64 -> 512x512, batch 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from configs import UserError
from data import IGNORE_INDEX
from engine.benchmark import GIB, process_peak
from engine.console import command_line
from engine.loss import reference_upsample_cross_entropy
from engine.workdir import write_json

LOGITS = ("random", "trained")


def interpolation_taps(in_size: int, out_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each input position along one axis, the output positions whose bilinear sample uses it (ascending,
    padded with position 0 and weight 0) and their weights: (in_size, K) indices and weights.

    The weights are F.interpolate's own (align_corners=False), read off by interpolating the identity.
    """
    matrix = F.interpolate(torch.eye(in_size)[:, None, None, :], size=(1, out_size), mode="bilinear",
                           align_corners=False)[:, 0, 0, :]
    taps = int((matrix != 0).sum(1).max())
    weights, index = torch.zeros(in_size, taps), torch.zeros(in_size, taps, dtype=torch.long)
    for i, row in enumerate(matrix):
        (found,) = row.nonzero(as_tuple=True)
        index[i, : len(found)], weights[i, : len(found)] = found, row[found]
    return index, weights


def emulated_upsample_backward(grad_up: torch.Tensor, size: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """The gradient of bilinear upsampling from ``size`` to ``grad_up``'s (N, C, H, W), summed as CUDA's kernel
    sums it: every term rounded to ``dtype`` and added to a ``dtype`` running sum in row-major output order.

    With dtype=float32 this is F.interpolate's backward (up to fp32 rounding).
    """
    rows, row_w = interpolation_taps(size[0], grad_up.shape[-2])
    cols, col_w = interpolation_taps(size[1], grad_up.shape[-1])
    total = torch.zeros(*grad_up.shape[:2], *size, dtype=dtype)
    for a in range(rows.shape[1]):
        picked_rows = grad_up[:, :, rows[:, a], :].float()  # (N, C, h, W)
        for b in range(cols.shape[1]):
            weight = row_w[:, a, None] * col_w[None, :, b]  # lambda_y * lambda_x, (h, w)
            term = (picked_rows[:, :, :, cols[:, b]] * weight).to(dtype)
            total = (total.float() + term.float()).to(dtype)  # one atomic add: the sum rounded to dtype
    return total


def make_inputs(kind: str, batch: int, classes: int, side: int, scale: int,
                seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 logits (batch, classes, side, side) and labels (batch, side * scale, side * scale), 10% ignored.

    ``random``: i.i.d. N(0, 2^2) logits and labels (every pixel far from its target). ``trained``: labels in
    regions of 32x32 pixels, logits 5 at each low-res pixel's own label plus N(0, 1) (a confident model, wrong
    mostly at region borders).
    """
    gen = torch.Generator().manual_seed(seed)
    full = side * scale
    if kind == "random":
        logits = 2 * torch.randn(batch, classes, side, side, generator=gen)
        labels = torch.randint(0, classes, (batch, full, full), generator=gen)
    else:
        regions = torch.randint(0, classes, (batch, full // 32, full // 32), generator=gen)
        labels = regions.repeat_interleave(32, 1).repeat_interleave(32, 2)
        own = F.one_hot(labels[:, scale // 2 :: scale, scale // 2 :: scale], classes).permute(0, 3, 1, 2)
        logits = 5 * own + torch.randn(batch, classes, side, side, generator=gen)
    labels[torch.rand(batch, full, full, generator=gen) < 0.1] = IGNORE_INDEX
    return logits.to(torch.bfloat16), labels


def bf16_upsampling_gradient(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and logit gradient with the upsampling in bf16 (the former reference), CUDA's backward emulated."""
    up = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False).requires_grad_()
    total = F.cross_entropy(up.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    loss = total / (labels != IGNORE_INDEX).sum()
    (grad_up,) = torch.autograd.grad(loss, up)  # bf16: the cast's backward rounds the fp32 gradient once
    return loss.detach(), emulated_upsample_backward(grad_up, tuple(logits.shape[-2:]), torch.bfloat16)


def loss_and_gradient(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and logit gradient of ``reference_upsample_cross_entropy`` (fp32 upsampling for bf16 logits)."""
    leaf = logits.detach().clone().requires_grad_()
    loss = reference_upsample_cross_entropy(leaf, labels, IGNORE_INDEX)
    loss.backward()
    return loss.detach(), leaf.grad


def relative_l2(value: torch.Tensor, exact: torch.Tensor) -> float:
    """||value - exact|| / ||exact|| in float64."""
    return float(torch.linalg.vector_norm(value.double() - exact) / torch.linalg.vector_norm(exact))


def errors(kind: str, batch: int, classes: int, side: int, scale: int) -> dict[str, float]:
    """Relative errors of both variants' loss and logit gradient against float64 on the same bf16 logits."""
    logits, labels = make_inputs(kind, batch, classes, side, scale)
    exact_loss, exact_grad = loss_and_gradient(logits.double(), labels)
    bf16_loss, bf16_grad = bf16_upsampling_gradient(logits, labels)
    fp32_loss, fp32_grad = loss_and_gradient(logits, labels)
    return {
        "bf16_upsampling_grad_rel_l2": relative_l2(bf16_grad, exact_grad),
        "fp32_upsampling_grad_rel_l2": relative_l2(fp32_grad, exact_grad),
        "bf16_upsampling_loss_rel_err": abs(float(bf16_loss) / float(exact_loss) - 1),
        "fp32_upsampling_loss_rel_err": abs(float(fp32_loss) / float(exact_loss) - 1),
    }


def loss_step(variant: str, batch: int, classes: int, side: int, scale: int) -> None:
    """One loss forward and backward of ``variant`` (bf16 or fp32 upsampling) on bf16 logits, CPU kernels."""
    logits, labels = make_inputs("random", batch, classes, side, scale)
    leaf = logits.requires_grad_()
    if variant == "fp32":
        reference_upsample_cross_entropy(leaf, labels, IGNORE_INDEX).backward()
    else:
        up = F.interpolate(leaf, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        F.cross_entropy(up.float(), labels, ignore_index=IGNORE_INDEX).backward()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="example: python "
                                     "scripts/loss_precision.py --batch-size 2 --json runs/loss_precision.json")
    parser.add_argument("--batch-size", type=int, default=2, help="images (default 2; the errors do not depend on it)")
    parser.add_argument("--classes", type=int, default=150, help="classes (default 150, ADE20K's)")
    parser.add_argument("--side", type=int, default=64, help="logit height and width (default 64: a 512 crop / 8)")
    parser.add_argument("--scale", type=int, default=8, help="upsampling factor (default 8, the output stride)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON here")
    return parser.parse_args(argv)


@command_line
def main(argv: list[str] | None = None) -> int:
    """Print both variants' gradient errors and loss peak memory; returns the exit status."""
    args = parse_args(argv)
    if min(args.batch_size, args.classes, args.side, args.scale) < 1:
        raise UserError("--batch-size, --classes, --side and --scale must be at least 1.")
    shape = (args.batch_size, args.classes, args.side, args.scale)
    result = {"shape": dict(zip(("batch", "classes", "side", "scale"), shape))}
    result["errors"] = {kind: errors(kind, *shape) for kind in LOGITS}
    inputs_peak = process_peak(make_inputs, "random", *shape)
    result["peak_gib"] = {v: (process_peak(loss_step, v, *shape) - inputs_peak) / GIB for v in ("bf16", "fp32")}
    n, c, side, scale = shape
    print(f"bf16 logits {n} x {c} x {side} x {side} -> {side * scale} x {side * scale}; relative L2 error of the "
          f"logit gradient (loss value) against float64:")
    for kind, e in result["errors"].items():
        print(f"  {kind} logits: bf16 upsampling, CUDA's bf16 accumulation emulated "
              f"{e['bf16_upsampling_grad_rel_l2']:.2e} ({e['bf16_upsampling_loss_rel_err']:.1e}); fp32 upsampling "
              f"{e['fp32_upsampling_grad_rel_l2']:.2e} ({e['fp32_upsampling_loss_rel_err']:.1e})")
    print(f"loss forward + backward, CPU process peak above the inputs: bf16 upsampling "
          f"{result['peak_gib']['bf16']:.2f} GiB, fp32 upsampling {result['peak_gib']['fp32']:.2f} GiB "
          f"({n} images)")
    if args.json is not None:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Bilinear upsampling fused with cross-entropy, in Triton: the training loss without the full-size logits.

The segmentation loss upsamples (N, C, h, w) logits to the label size (N, H, W) and takes the cross-entropy. Done
in PyTorch it materialises an (N, C, H, W) tensor (16 x 150 x 512 x 512 in training) and its gradient, and the
upsample backward alone is a third of the GPU time. Here no (N, C, H, W) tensor is ever made:

- Forward: one program per (image n, output row y, block of output columns). It computes each upsampled logit
  on the fly from the 4 low-res corners (PyTorch's ``align_corners=False`` rule, see ``_axis``), runs the online
  log-sum-exp over class chunks (Milakov & Gimelshein 2018, "Online normalizer calculation for softmax"; the
  streaming softmax of FlashAttention and of Liger-Kernel's fused cross-entropy), picks the target logit, and
  writes the per-pixel loss and log-sum-exp (N * H * W values, the lse kept for backward).
- Backward: the same tile recomputes the upsampled logits, forms d loss / d logit = (softmax - onehot) * grad /
  count, and reduces it along x into low-res columns with a small matmul against an on-the-fly interpolation
  matrix. That gives an (H, N, C, w) buffer (W / w = 8 times smaller than (N, C, H, W) in training); the
  reduction along y is one dense torch matmul with the (H, h) row-interpolation matrix (it follows torch's fp32
  matmul precision setting: exact fp32 unless TF32 matmuls are allowed).

``upsample_cross_entropy`` refuses (ValueError) what the kernels cannot do: Triton unusable on the tensors' device
(no triton; CPU tensors without ``TRITON_INTERPRET=1``, Triton's CPU interpreter, which the tests use when there is no
GPU; it must be set before this module is imported), no labels, or a width downsampled by more than about 2x, which
the backward's tiles are not sized for. Training never meets these: ``engine.device.resolve_config`` keeps
``train.loss_op=triton`` only where Triton runs, and the logits are upsampled 8x.

The kernels are launched from ``torch.library`` custom ops (``seg_triton::upsample_cross_entropy_sum`` and its
backward; models/triton_support.py), so under ``torch.compile`` each launch is one opaque node and the loss compiles
without graph breaks. The ops compute the sum of the pixel losses; the division by the labelled pixels is plain torch.

Unlike the reference on CPU, the kernels do not check labels: a label outside [0, C) that is not ``ignore_index``
gives a wrong loss instead of an error. Gradients are accumulated with atomic adds; when a low-res column is
shared by at most two column blocks (upsampling by less than about 32x) the result is still bitwise
reproducible, beyond that the order of additions, and so the last bits, may vary between runs.
"""

# No "from __future__ import annotations": older Tritons then miss the kernels' tl.constexpr annotations.

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F

from data import IGNORE_INDEX
from models.triton_support import HAVE_TRITON, define_op_with_backward, triton_available

if HAVE_TRITON:
    import triton
    import triton.language as tl

# Tile sizes: BLOCK_C classes x BLOCK_X output columns per step. With 8x upsampling a block of 64 columns touches
# 10 low-res columns, which fit the smallest matmul tile (16). Chosen by reasoning, not tuned on a GPU.
BLOCK_C = 32
BLOCK_X = 64
NUM_WARPS = 4
# The backward's [BLOCK_X, BLOCK_J] interpolation matrix must stay small: a block of output columns may touch at
# most this many low-res columns, i.e. the width may be downsampled by up to about 2x.
MAX_SPAN = 128


def upsample_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Cross-entropy of the bilinearly upsampled logits, averaged over labelled pixels (0 if there are none).

    Equal in value and gradient to engine/loss.py's ``reference_upsample_cross_entropy`` but without the
    (N, C, H, W) tensor; ValueError where the kernels cannot run (module docstring).
    ``logits`` (N, C, h, w) are float32, bfloat16, float16 or float64 with any strides (e.g. channels_last);
    ``labels`` (N, H, W) int64 in [0, C) or ``ignore_index``, of any size. Returns a 0-dim float32 tensor (float64
    for float64 logits).
    """
    if logits.dim() != 4 or labels.dim() != 3 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"expected logits (N, C, h, w) and labels (N, H, W), got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    if not triton_available(logits.device):
        raise ValueError(f"the fused loss cannot run on {logits.device}: Triton is not usable there (a CUDA GPU, or "
                         f"TRITON_INTERPRET=1 on the CPU). Use train.loss_op=reference.")
    if labels.numel() == 0 or _block_span(logits.shape[-1], labels.shape[-1]) > MAX_SPAN:
        raise ValueError(f"the fused loss is not sized for logits {tuple(logits.shape)} and labels "
                         f"{tuple(labels.shape)} (no labels, or a width downsampled by more than about 2x). Use the "
                         f"reference loss (train.loss_op=reference).")
    total, _ = _loss_sum(logits, labels, ignore_index)
    return total / (labels != ignore_index).sum().clamp(min=1)


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    """The kernels' accumulation dtype: float64 for float64 logits, float32 otherwise."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _block_span(in_size: int, out_size: int) -> int:
    """Most input positions touched by one block of BLOCK_X output positions along an axis.

    ``_axis``'s rule in Python floats, with no tensors, so that torch.compile evaluates it while tracing. It decides
    only whether the kernels run (the kernels size their tiles from ``_axis`` itself); in fp32 the span can differ
    by one at rare boundaries.
    """
    scale = in_size / out_size

    def first(x: int) -> int:
        return int(max((x + 0.5) * scale - 0.5, 0.0))

    def second(x: int) -> int:
        return min(first(x) + 1, in_size - 1)

    return max(second(min(start + BLOCK_X, out_size) - 1) - first(start) + 1 for start in range(0, out_size, BLOCK_X))


class _Axis(NamedTuple):
    """Where the output positions of one axis sample the input: out = (1 - lam) * in[i0] + lam * in[i1]."""

    i0: torch.Tensor  # (out,) int64
    i1: torch.Tensor  # (out,) int64
    lam: torch.Tensor  # (out,) float
    matrix: torch.Tensor  # (out, in): the same interpolation as a matrix
    span: int  # most input positions touched by one block of BLOCK_X output positions


@functools.lru_cache(maxsize=32)
def _axis(in_size: int, out_size: int, dtype: torch.dtype, device: torch.device) -> _Axis:
    """PyTorch's bilinear rule for ``align_corners=False`` along one axis (as in aten's upsample_bilinear2d).

    src = (dst + 0.5) * scale - 0.5, clamped below at 0, with scale = in / out in the compute dtype (fp32, or fp64
    for float64 logits); i0 = floor(src), i1 = min(i0 + 1, in - 1), lam = src - i0.
    """
    scale = torch.tensor(float(in_size), dtype=dtype) / out_size
    src = ((torch.arange(out_size, dtype=dtype) + 0.5) * scale - 0.5).clamp(min=0)
    i0 = src.floor().long()
    i1 = (i0 + 1).clamp(max=in_size - 1)
    lam = src - i0
    matrix = F.one_hot(i0, in_size) * (1 - lam)[:, None] + F.one_hot(i1, in_size) * lam[:, None]
    starts = torch.arange(0, out_size, BLOCK_X)
    ends = (starts + BLOCK_X).clamp(max=out_size) - 1
    span = int((i1[ends] - i0[starts]).max()) + 1
    return _Axis(i0.to(device), i1.to(device), lam.to(device), matrix.to(device), span)


def _loss_sum_impl(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of the pixels' cross-entropies (0-dim) and each pixel's log-sum-exp (N, H, W), kept for the backward;
    in fp32 (fp64 for fp64 logits), with autocast off."""
    with torch.autocast(logits.device.type, enabled=False):
        n, c, h, w = logits.shape
        height, width = labels.shape[-2:]
        acc = _compute_dtype(logits)
        ys, xs = _axis(h, height, acc, logits.device), _axis(w, width, acc, logits.device)
        pixel_loss = torch.empty(n, height, width, dtype=acc, device=logits.device)
        lse = torch.empty_like(pixel_loss)
        _forward_kernel[(triton.cdiv(width, BLOCK_X), height, n)](
            logits, labels, pixel_loss, lse,
            ys.i0, ys.i1, ys.lam, xs.i0, xs.i1, xs.lam,
            c, height, width, ignore_index,
            *logits.stride(), *labels.stride(),
            BLOCK_C=BLOCK_C, BLOCK_X=BLOCK_X, ACC=_TL_DTYPE[acc], num_warps=NUM_WARPS,
        )
        return pixel_loss.sum(), lse


def _loss_sum_fake(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward's outputs as tracing needs them: shapes and dtypes, no values."""
    acc = _compute_dtype(logits)
    return logits.new_empty((), dtype=acc), logits.new_empty(labels.shape, dtype=acc)


def _loss_backward_impl(
    grad_total: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, ignore_index: int
) -> torch.Tensor:
    """Gradient of the summed loss w.r.t. the logits, for the gradient ``grad_total`` of the sum; in the logits'
    dtype and memory format."""
    with torch.autocast(logits.device.type, enabled=False):
        n, c, h, w = logits.shape
        height, width = labels.shape[-2:]
        acc = lse.dtype
        ys, xs = _axis(h, height, acc, logits.device), _axis(w, width, acc, logits.device)
        scale = grad_total.to(acc).reshape(1)  # read by the kernel, so no sync with the GPU
        # Gradient w.r.t. the logits upsampled along y only: (H, N, C, w), rows first so that the y-reduction
        # below is a single matmul.
        rows = torch.zeros(height, n, c, w, dtype=acc, device=logits.device)
        block_j = max(16, triton.next_power_of_2(xs.span))
        _backward_kernel[(triton.cdiv(width, BLOCK_X), height, n)](
            logits, labels, lse, scale, rows,
            ys.i0, ys.i1, ys.lam, xs.i0, xs.i1, xs.lam,
            c, height, width, ignore_index,
            *logits.stride(), *labels.stride(), *rows.stride()[:3],
            BLOCK_C=BLOCK_C, BLOCK_X=BLOCK_X, BLOCK_J=block_j, ACC=_TL_DTYPE[acc], FP64=acc == torch.float64,
            num_warps=NUM_WARPS,
        )
        grad = (ys.matrix.t() @ rows.view(height, -1)).view(h, n, c, w).permute(1, 2, 0, 3)
        grad_logits = torch.empty_like(logits)  # logits' dtype and memory format
        grad_logits.copy_(grad)
    return grad_logits


def _loss_backward_fake(
    grad_total: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, ignore_index: int
) -> torch.Tensor:
    """The backward's output as tracing needs it."""
    return torch.empty_like(logits)


def _loss_setup_context(ctx, inputs: tuple, output: tuple) -> None:
    """Save the logits, labels and log-sum-exps for the backward; the ignore index is a plain int."""
    logits, labels, ignore_index = inputs
    ctx.save_for_backward(logits, labels, output[1])
    ctx.ignore_index = ignore_index


def _loss_backward_rule(ctx, grad_total: torch.Tensor, grad_lse: torch.Tensor | None) -> tuple:
    """Gradients of (logits, labels, ignore_index); the log-sum-exp output is internal, its gradient ignored."""
    logits, labels, lse = ctx.saved_tensors
    return _loss_backward(grad_total, logits, labels, lse, ctx.ignore_index), None, None


if HAVE_TRITON:
    _TL_DTYPE = {torch.float32: tl.float32, torch.float64: tl.float64}

    @triton.jit
    def _upsampled_tile(base_ptr, mask, row0, row1, col0, col1, ly, lx, ACC: tl.constexpr):
        """Bilinear upsampled logits of a [BLOCK_C, BLOCK_X] tile, in ACC.

        base_ptr: [BLOCK_C, 1] pointers to each class's plane; row0/row1: offsets of the two low-res rows (scalars);
        col0/col1: offsets of the two low-res columns of each output column ([BLOCK_X]); ly, lx: weights of the
        second row / column. The order of operations is aten's: (1-ly) * ((1-lx) a + lx b) + ly * ((1-lx) c + lx d).
        """
        top_left = tl.load(base_ptr + (row0 + col0)[None, :], mask=mask, other=0.0).to(ACC)
        top_right = tl.load(base_ptr + (row0 + col1)[None, :], mask=mask, other=0.0).to(ACC)
        bottom_left = tl.load(base_ptr + (row1 + col0)[None, :], mask=mask, other=0.0).to(ACC)
        bottom_right = tl.load(base_ptr + (row1 + col1)[None, :], mask=mask, other=0.0).to(ACC)
        lx = lx[None, :]
        top = (1 - lx) * top_left + lx * top_right
        bottom = (1 - lx) * bottom_left + lx * bottom_right
        return (1 - ly) * top + ly * bottom

    @triton.jit
    def _tile_setup(
        labels_ptr, y0_ptr, y1_ptr, ly_ptr, x0_ptr, x1_ptr, lx_ptr, x_block, y, n, W, ignore_index,
        stride_lh, stride_lw, stride_tn, stride_th, stride_tw, BLOCK_X: tl.constexpr,
    ):
        """A program's output columns and where they sample: output row y interpolates low-res rows (offsets
        row0, row1, weight ly of row1); output column x low-res columns x0[x], x1[x] (offsets col0, col1, weight lx
        of x1); labels."""
        xs = x_block * BLOCK_X + tl.arange(0, BLOCK_X)
        x_mask = xs < W
        ly = tl.load(ly_ptr + y)
        row0 = tl.load(y0_ptr + y) * stride_lh
        row1 = tl.load(y1_ptr + y) * stride_lh
        lx = tl.load(lx_ptr + xs, mask=x_mask, other=0.0)
        x0 = tl.load(x0_ptr + xs, mask=x_mask, other=0)
        x1 = tl.load(x1_ptr + xs, mask=x_mask, other=0)
        label = tl.load(labels_ptr + n * stride_tn + y * stride_th + xs * stride_tw, mask=x_mask, other=ignore_index)
        return xs, x_mask, ly, row0, row1, lx, x0, x1, x0 * stride_lw, x1 * stride_lw, label

    @triton.jit
    def _forward_kernel(
        logits_ptr, labels_ptr, loss_ptr, lse_ptr,
        y0_ptr, y1_ptr, ly_ptr, x0_ptr, x1_ptr, lx_ptr,
        C, H, W, ignore_index,
        stride_ln, stride_lc, stride_lh, stride_lw,
        stride_tn, stride_th, stride_tw,
        BLOCK_C: tl.constexpr, BLOCK_X: tl.constexpr, ACC: tl.constexpr,
    ):
        """One program: image n, output row y, output columns [x_block * BLOCK_X, + BLOCK_X), all classes.

        Writes, per output pixel, the log-sum-exp over classes of the upsampled logits and the loss lse - target
        (0 on ignored pixels).
        """
        x_block, y, n = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        xs, x_mask, ly, row0, row1, lx, _, _, col0, col1, label = _tile_setup(
            labels_ptr, y0_ptr, y1_ptr, ly_ptr, x0_ptr, x1_ptr, lx_ptr, x_block, y, n, W, ignore_index,
            stride_lh, stride_lw, stride_tn, stride_th, stride_tw, BLOCK_X,
        )

        # Online log-sum-exp over chunks of classes: m is the running max, s the running sum of exp(logit - m).
        m = tl.full([BLOCK_X], float("-inf"), ACC)
        s = tl.zeros([BLOCK_X], ACC)
        target = tl.zeros([BLOCK_X], ACC)  # the logit of the labelled class
        for c_start in range(0, C, BLOCK_C):
            cs = c_start + tl.arange(0, BLOCK_C)
            c_mask = cs < C
            base = logits_ptr + n * stride_ln + cs[:, None] * stride_lc
            up = _upsampled_tile(base, c_mask[:, None] & x_mask[None, :], row0, row1, col0, col1, ly, lx, ACC)
            up = tl.where(c_mask[:, None], up, float("-inf"))  # classes past C add exp(-inf) = 0
            m_new = tl.maximum(m, tl.max(up, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(up - m_new[None, :]), axis=0)
            m = m_new
            target += tl.sum(tl.where(cs[:, None] == label[None, :], up, 0.0), axis=0)
        lse = m + tl.log(s)

        pixel = (n * H + y) * W + xs  # index into the (N, H, W) outputs
        tl.store(lse_ptr + pixel, lse, mask=x_mask)
        tl.store(loss_ptr + pixel, tl.where(label != ignore_index, lse - target, 0.0), mask=x_mask)

    @triton.jit
    def _backward_kernel(
        logits_ptr, labels_ptr, lse_ptr, scale_ptr, rows_ptr,
        y0_ptr, y1_ptr, ly_ptr, x0_ptr, x1_ptr, lx_ptr,
        C, H, W, ignore_index,
        stride_ln, stride_lc, stride_lh, stride_lw,
        stride_tn, stride_th, stride_tw,
        stride_ry, stride_rn, stride_rc,
        BLOCK_C: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_J: tl.constexpr, ACC: tl.constexpr, FP64: tl.constexpr,
    ):
        """One program: the forward's tile. Adds its gradient, reduced along x, into row y of ``rows`` (H, N, C, w).

        d loss / d upsampled logit (c, y, x) = (softmax_c - [c == label]) * grad_output / count on labelled
        pixels, 0 elsewhere. Output column x took (1 - lx) of low-res column x0 and lx of x1, so its gradient goes
        back with the same weights: rows[y, n, c, j] += sum_x grad[c, x] * Wx[x, j], a [BLOCK_C, BLOCK_X] x
        [BLOCK_X, BLOCK_J] matmul. The block's columns touch low-res columns j_start .. j_last (at most BLOCK_J);
        neighbouring blocks can share their edge columns, hence the atomic add.
        """
        x_block, y, n = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        xs, x_mask, ly, row0, row1, lx, x0, x1, col0, col1, label = _tile_setup(
            labels_ptr, y0_ptr, y1_ptr, ly_ptr, x0_ptr, x1_ptr, lx_ptr, x_block, y, n, W, ignore_index,
            stride_lh, stride_lw, stride_tn, stride_th, stride_tw, BLOCK_X,
        )
        pixel = (n * H + y) * W + xs
        lse = tl.load(lse_ptr + pixel, mask=x_mask, other=0.0)
        # Per-column factor grad_output / count, 0 on ignored and out-of-range columns (so their gradient is 0).
        weight = tl.where(label != ignore_index, tl.load(scale_ptr), 0.0)

        # Interpolation weights along x as a [BLOCK_X, BLOCK_J] matrix over the low-res columns j_start + j.
        # x0 is nondecreasing in x, so the block's first column has the smallest x0, its last the largest x1.
        j_start = tl.load(x0_ptr + x_block * BLOCK_X)
        j_last = tl.load(x1_ptr + tl.minimum(x_block * BLOCK_X + BLOCK_X, W) - 1)
        js = tl.arange(0, BLOCK_J)
        wx = (tl.where((x0 - j_start)[:, None] == js[None, :], 1 - lx[:, None], 0.0)
              + tl.where((x1 - j_start)[:, None] == js[None, :], lx[:, None], 0.0))
        j_mask = j_start + js <= j_last

        for c_start in range(0, C, BLOCK_C):
            cs = c_start + tl.arange(0, BLOCK_C)
            c_mask = cs < C
            base = logits_ptr + n * stride_ln + cs[:, None] * stride_lc
            up = _upsampled_tile(base, c_mask[:, None] & x_mask[None, :], row0, row1, col0, col1, ly, lx, ACC)
            up = tl.where(c_mask[:, None], up, float("-inf"))  # so classes past C get softmax 0 and gradient 0
            softmax = tl.exp(up - lse[None, :])
            grad = (softmax - tl.where(cs[:, None] == label[None, :], 1.0, 0.0)) * weight[None, :]
            # fp32 (or fp64) operands with "ieee": an exact fp32 matmul, no TF32 rounding.
            if FP64:  # tl.dot takes no float64 before Triton 3.4 or so: multiply and sum instead
                reduced = tl.sum(grad[:, :, None] * wx[None, :, :], axis=1)
            else:
                reduced = tl.dot(grad, wx, input_precision="ieee")  # [BLOCK_C, BLOCK_J]
            ptrs = rows_ptr + y * stride_ry + n * stride_rn + cs[:, None] * stride_rc + (j_start + js)[None, :]
            tl.atomic_add(ptrs, reduced, mask=c_mask[:, None] & j_mask[None, :], sem="relaxed")

    # Registered here, after the kernels they launch.
    _loss_sum, _loss_backward = define_op_with_backward(
        "upsample_cross_entropy_sum", _loss_sum_impl, _loss_sum_fake, _loss_backward_impl, _loss_backward_fake,
        _loss_backward_rule, _loss_setup_context,
    )

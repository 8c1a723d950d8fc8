"""Deformable convolution in Triton: torchvision's ``deform_conv2d``, computed as an implicit GEMM.

``deform_conv2d`` here has torchvision's signature and semantics (bilinear sampling, zero outside the
image, offset layout ``2*(g*K + k)`` = y and ``+1`` = x for offset group g and kernel tap k, optional
mask, conv groups, offset groups, stride, padding, dilation). It exists for speed on the GPU:

* torchvision's op runs in fp32 even under autocast and writes its sampled columns to memory (im2col)
  before a GEMM. Here the bilinear gather is fused into the matrix product: each program samples a
  (rows x channels) tile of the columns straight into registers and feeds it to ``tl.dot`` in the
  input dtype (bf16/fp16 under autocast) with fp32 accumulation, as DCNv4 does for its forward.
* The backward is two kernels. ``_deform_grad_data`` forms a tile of column gradients
  (``grad_out @ weight`` for one tap) and from it adds the input gradient to the four sampled corners
  (atomics), and reduces over channels the offset gradient (derivative of the bilinear sample) and the
  mask gradient. ``_deform_grad_weight`` re-samples the columns and accumulates ``grad_out^T @ columns``.
  Nothing of size (N*H'*W') x (C*K) is ever written to memory.

The Triton path runs where ``models.triton_support.triton_available`` says (CUDA tensors, or CPU tensors
in Triton's interpreter, which the tests use to check the numerics with no GPU). Otherwise, and for
float64 on the GPU or tensors of 2**31 elements or more, ``deform_conv2d`` calls torchvision's op. Gradients use
atomics, so like torchvision's CUDA op they are not bitwise deterministic.

The kernels are launched from two ``torch.library`` custom ops (models/triton_support.py):
``seg_triton::deform_conv2d``, with its autograd formula, and ``seg_triton::deform_conv2d_backward``, so that a
compiled backward graph holds the gradients too. Under ``torch.compile`` each launch is one opaque node of the
graph, so a model using this op compiles whole, without graph breaks.
"""

# No "from __future__ import annotations": older Tritons then miss the kernels' tl.constexpr annotations.

# typing's Sequence, not collections.abc's: torch 2.4's custom-op schema inference knows only typing's.
from typing import Sequence  # noqa: UP035

import torch
from torch.nn.modules.utils import _pair
from torchvision.ops import deform_conv2d as torchvision_deform_conv2d

from models.triton_support import (
    HAVE_TRITON,
    INTERPRET,
    define_op_with_backward,
    triton_available,
)

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _tap_sampling(
        off_ptr, mask_ptr, n, ho, wo, row_ok, tap, og,
        so_n, so_c, so_h, so_w, sm_n, sm_c, sm_h, sm_w,
        H, W, KW, SH, SW, PH, PW, DH, DW,
        K: tl.constexpr, HAS_MASK: tl.constexpr, CDT: tl.constexpr,
    ):
        """Where one kernel tap samples, for a block of output positions: corner, fractions, mask.

        ``inside``: the sample is strictly inside (-1, H) x (-1, W), torchvision's rule for the sampled value
        (its ``bilinear_interpolate``), and so for the output, the input and weight gradients and the mask
        gradient. ``touches``: some corner is on the image, i.e. the sample is in [-1, H) x [-1, W), the rule of
        torchvision's offset gradient (``get_coordinate_weight`` only checks the corners). They differ on
        row / column -1 exactly, where the value is 0 but the one-sided slope towards row / column 0 is not.
        """
        ky = tap // KW
        kx = tap % KW
        ch = 2 * (og * K + tap)
        base = off_ptr + n * so_n + ho * so_h + wo * so_w
        dy = tl.load(base + ch * so_c, mask=row_ok, other=0.0).to(CDT)
        dx = tl.load(base + (ch + 1) * so_c, mask=row_ok, other=0.0).to(CDT)
        py = (ho * SH - PH + ky * DH).to(CDT) + dy
        px = (wo * SW - PW + kx * DW).to(CDT) + dx
        inside = row_ok & (py > -1) & (py < H) & (px > -1) & (px < W)
        touches = row_ok & (py >= -1) & (py < H) & (px >= -1) & (px < W)
        py = tl.minimum(tl.maximum(py, -2.0), H + 1.0)  # keep the int conversion in range when outside
        px = tl.minimum(tl.maximum(px, -2.0), W + 1.0)
        y0f = tl.floor(py)
        x0f = tl.floor(px)
        if HAS_MASK:
            mod = tl.load(
                mask_ptr + n * sm_n + (og * K + tap) * sm_c + ho * sm_h + wo * sm_w, mask=row_ok, other=0.0
            ).to(CDT)
        else:
            mod = tl.full(py.shape, 1.0, CDT)
        return y0f.to(tl.int32), x0f.to(tl.int32), py - y0f, px - x0f, inside, touches, mod

    @triton.jit
    def _corner_masks(y0, x0, valid, c_ok, H, W):
        """(rows, channels) masks of the four corners (top-left, top-right, bottom-left, bottom-right) on the image,
        for the rows where ``valid``."""
        ok = valid[:, None] & c_ok[None, :]
        top = ok & (y0 >= 0)[:, None]
        bottom = ok & (y0 + 1 <= H - 1)[:, None]
        left = (x0 >= 0)[:, None]
        right = (x0 + 1 <= W - 1)[:, None]
        return top & left, top & right, bottom & left, bottom & right

    @triton.jit
    def _load_corners(x_ptr, n, cs, c_ok, y0, x0, valid, sx_n, sx_c, sx_h, sx_w, H, W, CDT: tl.constexpr):
        """The four input values around each sample, (rows, channels) each; 0 for corners off the image and for
        rows that are not ``valid``."""
        m00, m01, m10, m11 = _corner_masks(y0, x0, valid, c_ok, H, W)
        base = x_ptr + n[:, None] * sx_n + cs[None, :] * sx_c
        v00 = tl.load(base + (y0 * sx_h + x0 * sx_w)[:, None], mask=m00, other=0.0).to(CDT)
        v01 = tl.load(base + (y0 * sx_h + (x0 + 1) * sx_w)[:, None], mask=m01, other=0.0).to(CDT)
        v10 = tl.load(base + ((y0 + 1) * sx_h + x0 * sx_w)[:, None], mask=m10, other=0.0).to(CDT)
        v11 = tl.load(base + ((y0 + 1) * sx_h + (x0 + 1) * sx_w)[:, None], mask=m11, other=0.0).to(CDT)
        return v00, v01, v10, v11

    @triton.jit
    def _sample_columns(
        x_ptr, off_ptr, mask_ptr, n, ho, wo, row_ok, tap, og, cs, c_ok,
        sx_n, sx_c, sx_h, sx_w, so_n, so_c, so_h, so_w, sm_n, sm_c, sm_h, sm_w,
        H, W, KW, SH, SW, PH, PW, DH, DW, K: tl.constexpr, HAS_MASK: tl.constexpr, CDT: tl.constexpr,
    ):
        """One tap's (rows, channels) tile of the columns: mask * bilinear sample of the input."""
        y0, x0, ly, lx, inside, touches, mod = _tap_sampling(
            off_ptr, mask_ptr, n, ho, wo, row_ok, tap, og, so_n, so_c, so_h, so_w,
            sm_n, sm_c, sm_h, sm_w, H, W, KW, SH, SW, PH, PW, DH, DW, K, HAS_MASK, CDT,
        )
        v00, v01, v10, v11 = _load_corners(x_ptr, n, cs, c_ok, y0, x0, inside, sx_n, sx_c, sx_h, sx_w, H, W, CDT)
        ly2 = ly[:, None]
        lx2 = lx[:, None]
        val = (1 - ly2) * ((1 - lx2) * v00 + lx2 * v01) + ly2 * ((1 - lx2) * v10 + lx2 * v11)
        return val * mod[:, None]

    @triton.jit
    def _segment(pid_c, gi, CG, CPOG, NBLK, BK: tl.constexpr):
        """Channel block number ``pid_c`` of conv group ``gi``: (offset group, first channel, channel end).

        A block never straddles two offset groups, so its samples share one offset per row. The block is
        empty (first >= end) when the group has fewer segments or channels than the grid assumes.
        """
        c_lo = gi * CG
        og = c_lo // CPOG + pid_c // NBLK
        seg_lo = tl.maximum(c_lo, og * CPOG)
        seg_hi = tl.minimum(c_lo + CG, (og + 1) * CPOG)
        return og, seg_lo + (pid_c % NBLK) * BK, seg_hi

    @triton.jit
    def _mma(acc, a, b, DOT_DT: tl.constexpr, MODE: tl.constexpr):
        """acc += a @ b with operands in DOT_DT. MODE 0: tensor-core dot; 1: exact fp32 dot (no TF32);
        2: broadcast multiply and sum, for float64, which ``tl.dot`` does not take before Triton 3.4 or so."""
        if MODE == 2:
            return acc + tl.sum(a[:, :, None] * b[None, :, :], axis=1)
        if MODE == 1:
            return acc + tl.dot(a.to(DOT_DT), b.to(DOT_DT), input_precision="ieee")
        return acc + tl.dot(a.to(DOT_DT), b.to(DOT_DT))

    @triton.jit
    def _deform_forward(
        x_ptr, off_ptr, mask_ptr, w_ptr, b_ptr, out_ptr,
        M, HO, WO, H, W, CG, OG, CPOG, NSEG, NBLK, KW, SH, SW, PH, PW, DH, DW,
        sx_n, sx_c, sx_h, sx_w, so_n, so_c, so_h, so_w, sm_n, sm_c, sm_h, sm_w,
        sw_o, sw_c, sw_h, sw_w, sy_n, sy_c, sy_h, sy_w,
        K: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
        CDT: tl.constexpr, DOT_DT: tl.constexpr, MODE: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    ):
        """out[rows, out-channel block] of conv group program_id(2), rows = flattened (n, h', w')."""
        gi = tl.program_id(2)
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        row_ok = rows < M
        n = rows // (HO * WO)
        ho = (rows // WO) % HO
        wo = rows % WO
        ocs = tl.program_id(1) * BN + tl.arange(0, BN)
        oc_ok = ocs < OG
        w_rows = w_ptr + (gi * OG + ocs)[None, :] * sw_o
        acc = tl.zeros([BM, BN], dtype=CDT)
        for tap in range(K):
            w_tap = w_rows + (tap // KW) * sw_h + (tap % KW) * sw_w
            for pid_c in range(NSEG * NBLK):
                og, c0, seg_hi = _segment(pid_c, gi, CG, CPOG, NBLK, BK)
                if c0 < seg_hi:
                    cs = c0 + tl.arange(0, BK)
                    c_ok = cs < seg_hi
                    cols = _sample_columns(
                        x_ptr, off_ptr, mask_ptr, n, ho, wo, row_ok, tap, og, cs, c_ok,
                        sx_n, sx_c, sx_h, sx_w, so_n, so_c, so_h, so_w, sm_n, sm_c, sm_h, sm_w,
                        H, W, KW, SH, SW, PH, PW, DH, DW, K, HAS_MASK, CDT,
                    )
                    wt = tl.load(w_tap + (cs - gi * CG)[:, None] * sw_c, mask=c_ok[:, None] & oc_ok[None, :], other=0.0)
                    acc = _mma(acc, cols, wt, DOT_DT, MODE)
        if HAS_BIAS:
            acc += tl.load(b_ptr + gi * OG + ocs, mask=oc_ok, other=0.0).to(CDT)[None, :]
        out = out_ptr + (n * sy_n + ho * sy_h + wo * sy_w)[:, None] + ((gi * OG + ocs) * sy_c)[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & oc_ok[None, :])

    @triton.jit
    def _deform_grad_data(
        x_ptr, off_ptr, mask_ptr, w_ptr, gy_ptr, gx_ptr, goff_ptr, gmask_ptr,
        M, HO, WO, H, W, CG, OG, CPOG, NBLK, KW, SH, SW, PH, PW, DH, DW,
        sx_n, sx_c, sx_h, sx_w, so_n, so_c, so_h, so_w, sm_n, sm_c, sm_h, sm_w,
        sw_o, sw_c, sw_h, sw_w, sy_n, sy_c, sy_h, sy_w,
        sgx_n, sgx_c, sgx_h, sgx_w, sgo_n, sgo_c, sgo_h, sgo_w, sgm_n, sgm_c, sgm_h, sgm_w,
        K: tl.constexpr, HAS_MASK: tl.constexpr,
        CDT: tl.constexpr, DOT_DT: tl.constexpr, MODE: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    ):
        """Input, offset and mask gradients from one (rows x channels) tile of one tap's columns."""
        tap = tl.program_id(2) % K
        gi = tl.program_id(2) // K
        og, c0, seg_hi = _segment(tl.program_id(1), gi, CG, CPOG, NBLK, BK)
        if c0 < seg_hi:
            rows = tl.program_id(0) * BM + tl.arange(0, BM)
            row_ok = rows < M
            n = rows // (HO * WO)
            ho = (rows // WO) % HO
            wo = rows % WO
            cs = c0 + tl.arange(0, BK)
            c_ok = cs < seg_hi
            # Column gradient for this tap: grad_cols[rows, cs] = sum_o grad_out[rows, o] * weight[o, cs, tap].
            gcol = tl.zeros([BM, BK], dtype=CDT)
            gy_rows = gy_ptr + (n * sy_n + ho * sy_h + wo * sy_w)[:, None]
            w_cols = w_ptr + ((cs - gi * CG) * sw_c + (tap // KW) * sw_h + (tap % KW) * sw_w)[None, :]
            for o0 in range(0, OG, BN):
                ocs = o0 + tl.arange(0, BN)
                oc_ok = ocs < OG
                g = tl.load(gy_rows + ((gi * OG + ocs) * sy_c)[None, :], mask=row_ok[:, None] & oc_ok[None, :], other=0.0)
                wt = tl.load(w_cols + ((gi * OG + ocs) * sw_o)[:, None], mask=oc_ok[:, None] & c_ok[None, :], other=0.0)
                gcol = _mma(gcol, g, wt, DOT_DT, MODE)
            y0, x0, ly, lx, inside, touches, mod = _tap_sampling(
                off_ptr, mask_ptr, n, ho, wo, row_ok, tap, og, so_n, so_c, so_h, so_w,
                sm_n, sm_c, sm_h, sm_w, H, W, KW, SH, SW, PH, PW, DH, DW, K, HAS_MASK, CDT,
            )
            # Corners loaded under the offset gradient's rule (``touches``): on row / column -1 exactly the slope
            # towards row / column 0 counts, as in torchvision, though the sample itself is 0 there.
            v00, v01, v10, v11 = _load_corners(x_ptr, n, cs, c_ok, y0, x0, touches, sx_n, sx_c, sx_h, sx_w, H, W, CDT)
            ly2 = ly[:, None]
            lx2 = lx[:, None]
            top = (1 - lx2) * v00 + lx2 * v01
            bottom = (1 - lx2) * v10 + lx2 * v11
            # Every atomic below is a plain sum into a buffer that nothing reads before the kernel ends, so it
            # needs no ordering with other memory accesses: "relaxed" (the default, acq_rel, adds fences).
            if HAS_MASK:
                # d out / d mask = the unmodulated sample (0 unless ``inside``); summed over this block's channels.
                sample = tl.where(inside[:, None], (1 - ly2) * top + ly2 * bottom, 0.0)
                gmask = tl.sum(gcol * sample, axis=1)
                tl.atomic_add(
                    gmask_ptr + n * sgm_n + (og * K + tap) * sgm_c + ho * sgm_h + wo * sgm_w, gmask, mask=row_ok,
                    sem="relaxed",
                )
            gsample = gcol * mod[:, None]
            # d sample / d y and d x: the bilinear interpolant's slopes between the corner rows / columns.
            gdy = tl.sum(gsample * (bottom - top), axis=1)
            gdx = tl.sum(gsample * ((1 - ly2) * (v01 - v00) + ly2 * (v11 - v10)), axis=1)
            gpos = n * sgo_n + ho * sgo_h + wo * sgo_w
            ch = 2 * (og * K + tap)
            tl.atomic_add(goff_ptr + gpos + ch * sgo_c, gdy, mask=row_ok, sem="relaxed")
            tl.atomic_add(goff_ptr + gpos + (ch + 1) * sgo_c, gdx, mask=row_ok, sem="relaxed")
            # Input gradient: each sample's gradient goes to its four corners with the bilinear weights, only for
            # samples ``inside`` (on row / column -1 the weight of row / column 0 is 0 anyway).
            m00, m01, m10, m11 = _corner_masks(y0, x0, inside, c_ok, H, W)
            y1 = y0 + 1
            x1 = x0 + 1
            base = gx_ptr + n[:, None] * sgx_n + cs[None, :] * sgx_c
            w00 = gsample * (1 - ly2) * (1 - lx2)
            w01 = gsample * (1 - ly2) * lx2
            w10 = gsample * ly2 * (1 - lx2)
            w11 = gsample * ly2 * lx2
            tl.atomic_add(base + (y0 * sgx_h + x0 * sgx_w)[:, None], w00, mask=m00, sem="relaxed")
            tl.atomic_add(base + (y0 * sgx_h + x1 * sgx_w)[:, None], w01, mask=m01, sem="relaxed")
            tl.atomic_add(base + (y1 * sgx_h + x0 * sgx_w)[:, None], w10, mask=m10, sem="relaxed")
            tl.atomic_add(base + (y1 * sgx_h + x1 * sgx_w)[:, None], w11, mask=m11, sem="relaxed")

    @triton.jit
    def _deform_grad_weight(
        x_ptr, off_ptr, mask_ptr, gy_ptr, gw_ptr,
        M, ROWS_PER_SPLIT, HO, WO, H, W, CG, OG, CPOG, NBLK, NOB, KW, SH, SW, PH, PW, DH, DW,
        sx_n, sx_c, sx_h, sx_w, so_n, so_c, so_h, so_w, sm_n, sm_c, sm_h, sm_w,
        sy_n, sy_c, sy_h, sy_w, sgw_o, sgw_c, sgw_h, sgw_w,
        K: tl.constexpr, HAS_MASK: tl.constexpr,
        CDT: tl.constexpr, DOT_DT: tl.constexpr, MODE: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    ):
        """grad_weight[out-channel block, channel block, tap] += grad_out^T @ columns over one split of rows."""
        pid2 = tl.program_id(2)
        ob = pid2 % NOB
        tap = (pid2 // NOB) % K
        gi = pid2 // (NOB * K)
        og, c0, seg_hi = _segment(tl.program_id(1), gi, CG, CPOG, NBLK, BK)
        if c0 < seg_hi:
            cs = c0 + tl.arange(0, BK)
            c_ok = cs < seg_hi
            ocs = ob * BN + tl.arange(0, BN)
            oc_ok = ocs < OG
            acc = tl.zeros([BN, BK], dtype=CDT)
            row_lo = tl.program_id(0) * ROWS_PER_SPLIT
            for r0 in range(row_lo, tl.minimum(row_lo + ROWS_PER_SPLIT, M), BM):
                rows = r0 + tl.arange(0, BM)
                row_ok = rows < M
                n = rows // (HO * WO)
                ho = (rows // WO) % HO
                wo = rows % WO
                cols = _sample_columns(
                    x_ptr, off_ptr, mask_ptr, n, ho, wo, row_ok, tap, og, cs, c_ok,
                    sx_n, sx_c, sx_h, sx_w, so_n, so_c, so_h, so_w, sm_n, sm_c, sm_h, sm_w,
                    H, W, KW, SH, SW, PH, PW, DH, DW, K, HAS_MASK, CDT,
                )
                g_t = tl.load(
                    gy_ptr + ((gi * OG + ocs) * sy_c)[:, None] + (n * sy_n + ho * sy_h + wo * sy_w)[None, :],
                    mask=oc_ok[:, None] & row_ok[None, :], other=0.0,
                )
                acc = _mma(acc, g_t, cols, DOT_DT, MODE)
            gw = gw_ptr + ((gi * OG + ocs) * sgw_o)[:, None] + ((cs - gi * CG) * sgw_c)[None, :]
            gw += (tap // KW) * sgw_h + (tap % KW) * sgw_w
            tl.atomic_add(gw, acc, mask=oc_ok[:, None] & c_ok[None, :], sem="relaxed")


# Tile sizes: rows (output positions), output channels, input channels. Chosen for an H100-class GPU by
# reasoning, not tuned on one; every size stays correct.
BLOCK_ROWS, BLOCK_OUT, BLOCK_IN = 64, 64, 32


def _pow2_block(size: int, cap: int) -> int:
    """The smallest power of two >= size, between 16 (``tl.dot``'s minimum) and ``cap``."""
    return max(16, min(cap, triton.next_power_of_2(size)))


class _Geometry:
    """Sizes shared by the three kernels of one call."""

    def __init__(self, x: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor, stride, padding, dilation):
        self.n, self.c, self.h, self.w = x.shape
        self.o, self.cg, self.kh, self.kw = weight.shape
        self.k = self.kh * self.kw
        self.groups = self.c // self.cg
        self.og = self.o // self.groups
        self.offset_groups = offset.shape[1] // (2 * self.k)
        self.cpog = self.c // self.offset_groups
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.ho, self.wo = offset.shape[2], offset.shape[3]
        self.rows = self.n * self.ho * self.wo
        # Segments: a conv group's channels cut at offset-group boundaries; blocks of BK never straddle one.
        self.block_in = _pow2_block(min(self.cg, self.cpog), BLOCK_IN)
        self.block_out = _pow2_block(self.og, BLOCK_OUT)
        self.segments = max(
            (min((gi + 1) * self.cg, self.c) - 1) // self.cpog - gi * self.cg // self.cpog + 1 for gi in range(self.groups)
        )
        self.blocks_per_segment = triton.cdiv(min(self.cg, self.cpog), self.block_in)

    def conv_args(self) -> list[int]:
        return [self.kw, *self.stride, *self.padding, *self.dilation]


def _dtypes(dtype: torch.dtype) -> tuple:
    """(accumulation dtype, matmul operand dtype, ``_mma`` mode) for tensors of ``dtype``."""
    if dtype == torch.float64:
        return tl.float64, tl.float64, 2
    if dtype == torch.float32:
        return tl.float32, tl.float32, 1
    # bf16/fp16 products are exact in fp32; the interpreter's tl.dot mishandles bf16 operands.
    low = tl.bfloat16 if dtype == torch.bfloat16 else tl.float16
    return (tl.float32, tl.float32, 1) if INTERPRET else (tl.float32, low, 0)


def _out_channels_last(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (O, C, kh, kw) stored with O fastest, so the kernels' (channels x out-channels) tiles are contiguous."""
    return weight.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)


def _output_format(x: torch.Tensor) -> torch.memory_format:
    """The output's memory format: channels_last for a channels_last input (not also contiguous), else contiguous."""
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def _forward(x, offset, mask, weight, bias, geo: _Geometry) -> torch.Tensor:
    out = torch.empty((geo.n, geo.o, geo.ho, geo.wo), device=x.device, dtype=x.dtype, memory_format=_output_format(x))
    cdt, dot_dt, mode = _dtypes(x.dtype)
    m = mask if mask is not None else offset  # any tensor: never read when HAS_MASK is False
    grid = (triton.cdiv(geo.rows, BLOCK_ROWS), triton.cdiv(geo.og, geo.block_out), geo.groups)
    weight = _out_channels_last(weight)
    _deform_forward[grid](
        x, offset, m, weight, bias if bias is not None else weight, out,
        geo.rows, geo.ho, geo.wo, geo.h, geo.w, geo.cg, geo.og, geo.cpog, geo.segments, geo.blocks_per_segment,
        *geo.conv_args(), *x.stride(), *offset.stride(), *m.stride(), *weight.stride(), *out.stride(),
        K=geo.k, HAS_MASK=mask is not None, HAS_BIAS=bias is not None, CDT=cdt, DOT_DT=dot_dt, MODE=mode,
        BM=BLOCK_ROWS, BN=geo.block_out, BK=geo.block_in,
    )
    return out


def _backward(x, offset, mask, weight, grad_out, geo: _Geometry, need: tuple[bool, ...]):
    cdt, dot_dt, mode = _dtypes(x.dtype)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    m = mask if mask is not None else offset
    # fp32 (fp64) accumulators in the inputs' memory formats: channels_last keeps the atomic adds coalesced.
    grad_x = torch.zeros_like(x, dtype=acc)
    grad_offset = torch.zeros_like(offset, dtype=acc)
    grad_mask = torch.zeros_like(mask, dtype=acc) if mask is not None else grad_offset
    channel_blocks = geo.segments * geo.blocks_per_segment
    if need[0] or need[1] or need[2]:
        grid = (triton.cdiv(geo.rows, BLOCK_ROWS), channel_blocks, geo.k * geo.groups)
        weight_t = _out_channels_last(weight)
        _deform_grad_data[grid](
            x, offset, m, weight_t, grad_out, grad_x, grad_offset, grad_mask,
            geo.rows, geo.ho, geo.wo, geo.h, geo.w, geo.cg, geo.og, geo.cpog, geo.blocks_per_segment,
            *geo.conv_args(), *x.stride(), *offset.stride(), *m.stride(), *weight_t.stride(), *grad_out.stride(),
            *grad_x.stride(), *grad_offset.stride(), *grad_mask.stride(),
            K=geo.k, HAS_MASK=mask is not None, CDT=cdt, DOT_DT=dot_dt, MODE=mode,
            BM=BLOCK_ROWS, BN=geo.block_out, BK=geo.block_in,
        )
    grad_weight = None
    if need[3]:
        grad_weight = torch.zeros(weight.shape, device=x.device, dtype=acc)
        out_blocks = triton.cdiv(geo.og, geo.block_out)
        tiles = channel_blocks * geo.k * geo.groups * out_blocks
        # Split the rows so that there are enough programs to fill the GPU (their partial sums add atomically).
        row_blocks = triton.cdiv(geo.rows, BLOCK_ROWS)
        splits = max(1, min(row_blocks, 1024 // max(tiles, 1))) if x.is_cuda else 1
        rows_per_split = triton.cdiv(row_blocks, splits) * BLOCK_ROWS
        grid = (triton.cdiv(geo.rows, rows_per_split), channel_blocks, geo.k * geo.groups * out_blocks)
        _deform_grad_weight[grid](
            x, offset, m, grad_out, grad_weight,
            geo.rows, rows_per_split, geo.ho, geo.wo, geo.h, geo.w, geo.cg, geo.og, geo.cpog,
            geo.blocks_per_segment, out_blocks, *geo.conv_args(),
            *x.stride(), *offset.stride(), *m.stride(), *grad_out.stride(), *grad_weight.stride(),
            K=geo.k, HAS_MASK=mask is not None, CDT=cdt, DOT_DT=dot_dt, MODE=mode,
            BM=BLOCK_ROWS, BN=geo.block_out, BK=geo.block_in,
        )
        grad_weight = grad_weight.to(weight.dtype)
    return (
        grad_x.to(x.dtype) if need[0] else None,
        grad_offset.to(offset.dtype) if need[1] else None,
        grad_mask.to(mask.dtype) if mask is not None and need[2] else None,
        grad_weight,
    )


def _deform_forward_impl(
    x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
) -> torch.Tensor:
    """torchvision's ``deform_conv2d`` output by the forward kernel (inputs already in one dtype)."""
    return _forward(x, offset, mask, weight, bias, _Geometry(x, offset, weight, stride, padding, dilation))


def _deform_forward_fake(
    x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
) -> torch.Tensor:
    """The forward's output as tracing needs it: shape, dtype, device and memory format, no values."""
    shape = (x.shape[0], weight.shape[0], offset.shape[2], offset.shape[3])
    return torch.empty(shape, device=x.device, dtype=x.dtype, memory_format=_output_format(x))


def _deform_backward_impl(
    grad_out: torch.Tensor, x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor | None, weight: torch.Tensor,
    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], need: Sequence[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of (x, offset, mask, weight) by the backward kernels; an empty tensor for each one that is not
    in ``need`` or has no input (no mask): a custom op cannot return None."""
    geo = _Geometry(x, offset, weight, stride, padding, dilation)
    grads = _backward(x, offset, mask, weight, grad_out, geo, tuple(need))
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


def _deform_backward_fake(
    grad_out: torch.Tensor, x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor | None, weight: torch.Tensor,
    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], need: Sequence[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward's outputs as tracing needs them (``_backward``'s dtypes and memory formats)."""
    return (
        torch.empty_like(x) if need[0] else x.new_empty(0),
        torch.empty_like(offset) if need[1] else x.new_empty(0),
        torch.empty_like(mask) if mask is not None and need[2] else x.new_empty(0),
        weight.new_empty(weight.shape) if need[3] else x.new_empty(0),
    )


def _setup_context(ctx, inputs: tuple, output: torch.Tensor) -> None:
    """Save what the backward needs: tensors through save_for_backward, and only plain values (ints, a dtype)
    besides, which tracing can carry."""
    x, offset, mask, weight, bias, stride, padding, dilation = inputs
    ctx.save_for_backward(x, offset, mask, weight)
    ctx.conv = (list(stride), list(padding), list(dilation))
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward_rule(ctx, grad_out: torch.Tensor) -> tuple:
    """Gradients of the forward op's eight inputs."""
    x, offset, mask, weight = ctx.saved_tensors
    need = [bool(flag) for flag in ctx.needs_input_grad[:4]]
    need[2] = need[2] and mask is not None
    grads = _deform_backward(grad_out, x, offset, mask, weight, *ctx.conv, need)
    grad_x, grad_offset, grad_mask, grad_weight = (g if wanted else None for g, wanted in zip(grads, need))
    wants_bias = ctx.bias_dtype is not None and ctx.needs_input_grad[4]
    grad_bias = grad_out.sum((0, 2, 3)).to(ctx.bias_dtype) if wants_bias else None
    return grad_x, grad_offset, grad_mask, grad_weight, grad_bias, None, None, None


if HAVE_TRITON:
    _deform_conv2d, _deform_backward = define_op_with_backward(
        "deform_conv2d", _deform_forward_impl, _deform_forward_fake, _deform_backward_impl, _deform_backward_fake,
        _backward_rule, _setup_context,
    )


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast would give a conv on ``device_type`` now, or None when autocast is off (torch >= 2.4)."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def _check_shapes(x: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor | None,
                  stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int]) -> None:
    """Raise ValueError, as torchvision would refuse them, for inconsistent shapes."""
    n, c, h, w = x.shape
    o, cg, kh, kw = weight.shape
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    problems = []
    if c % cg or o % (c // cg):
        problems.append(f"weight {tuple(weight.shape)} does not fit {c} input channels in groups")
    if offset.shape[1] % (2 * kh * kw) or c % max(offset.shape[1] // (2 * kh * kw), 1) or offset.shape[1] == 0:
        problems.append(f"offset has {offset.shape[1]} channels, not 2 * offset_groups * {kh * kw} with offset_groups dividing {c}")
    if tuple(offset.shape[::2]) != (n, ho) or offset.shape[3] != wo:
        problems.append(f"offset {tuple(offset.shape)} does not match the output size ({n}, _, {ho}, {wo})")
    if mask is not None and (tuple(mask.shape) != (n, offset.shape[1] // 2, ho, wo)):
        problems.append(f"mask {tuple(mask.shape)} is not ({n}, {offset.shape[1] // 2}, {ho}, {wo})")
    if problems:
        raise ValueError("deform_conv2d: " + "; ".join(problems))


def deform_conv2d(
    input: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, int] = (1, 1),
    padding: int | tuple[int, int] = (0, 0),
    dilation: int | tuple[int, int] = (1, 1),
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``torchvision.ops.deform_conv2d`` with Triton kernels where they can run (see the module docstring).

    Under autocast the op computes in the autocast dtype (bf16/fp16 operands, fp32 accumulation), where
    torchvision's op computes in fp32.
    """
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    sizes = [t.numel() for t in (input, offset, weight, mask) if t is not None]
    too_big = max(*sizes, input.shape[0] * weight.shape[0] * offset.shape[2] * offset.shape[3]) >= 2**31  # int32 indexing
    if (
        not triton_available(input.device)
        or too_big
        or (input.is_cuda and input.dtype == torch.float64)
    ):
        return torchvision_deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask)
    _check_shapes(input, offset, weight, mask, stride, padding, dilation)
    dtype = _autocast_dtype(input.device.type) or input.dtype
    input, offset, weight = input.to(dtype), offset.to(dtype), weight.to(dtype)
    mask = mask.to(dtype) if mask is not None else None
    with torch.autocast(device_type=input.device.type, enabled=False):
        return _deform_conv2d(input, offset, mask, weight, bias, list(stride), list(padding), list(dilation))

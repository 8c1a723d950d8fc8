"""Deformable convolution v1 (Dai et al. 2017) and v2 (Zhu et al. 2019) on torchvision's op.

The layer keeps the ``weight`` (and ``bias``) of the 3x3 conv it replaces, so state-dict keys and
pretrained weights carry over unchanged. A separate conv, ``offset_conv``, with the same kernel,
stride, padding and dilation predicts per-position offsets (and for v2 a modulation mask through a
sigmoid). It starts at zero, as in the papers and detectron2: a fresh v1 layer computes exactly the
original convolution and a fresh v2 layer exactly half of it (sigmoid(0) = 0.5).

Offsets use torchvision's layout: for deformable group g and kernel tap k (row-major over the
kernel), channel 2*(g*K + k) is the y offset and 2*(g*K + k) + 1 the x offset; mask channel g*K + k.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import deform_conv2d


def triton_deform_conv2d(
    input: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """torchvision's op by models/triton_deform.py's Triton kernels, imported here, at the first call: a run with
    the reference op never imports the Triton modules."""
    from models import triton_deform

    return triton_deform.deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask)


# Implementations of the op, by the name config key ``model.deform_op`` uses; same signature and results.
DEFORM_OPS = {"reference": deform_conv2d, "triton": triton_deform_conv2d}


class DeformConv2d(nn.Module):
    """A conv layer whose sampling grid is shifted by learned offsets (v1) and weighted by a mask (v2).

    Args (the others as ``nn.Conv2d``'s):
        version: 1 for offsets only, 2 for offsets and a modulation mask in [0, 1].
        deform_groups: number of offset sets; input channels are split into this many groups.
        op: "reference" (``torchvision.ops.deform_conv2d``) or "triton" (``models.triton_deform``, the
            fused GPU kernels; torchvision's op where Triton cannot run).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int],
        stride: tuple[int, int] = (1, 1),
        padding: tuple[int, int] = (1, 1),
        dilation: tuple[int, int] = (1, 1),
        groups: int = 1,
        bias: bool = False,
        version: int = 1,
        deform_groups: int = 1,
        op: str = "reference",
    ) -> None:
        super().__init__()
        self.op = op
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.version = version
        self.deform_groups = deform_groups
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        taps = deform_groups * kernel_size[0] * kernel_size[1]
        self.offset_conv = nn.Conv2d(
            in_channels, taps * (3 if version == 2 else 2), kernel_size, stride, padding, dilation, bias=True
        )
        nn.init.zeros_(self.offset_conv.weight)
        nn.init.zeros_(self.offset_conv.bias)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, version: int, deform_groups: int = 1, op: str = "reference") -> "DeformConv2d":
        """Build a deformable layer that starts from ``conv``'s weights and geometry."""
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            bias=conv.bias is not None,
            version=version,
            deform_groups=deform_groups,
            op=op,
        )
        with torch.no_grad():
            layer.weight.copy_(conv.weight)
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        return layer.to(conv.weight.device)

    def offsets_and_mask(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return the offsets (N, 2*G*K, H', W') and, for v2, the mask (N, G*K, H', W') in [0, 1]."""
        return self.split(self.offset_conv(x))

    def split(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``offset_conv``'s output as (offsets, mask in [0, 1] or None for v1)."""
        if self.version == 1:
            return raw, None
        split = raw.shape[1] * 2 // 3
        return raw[:, :split], torch.sigmoid(raw[:, split:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        offset, mask = self.offsets_and_mask(x)
        # A diverged model predicts NaN offsets, which the ops turn into out-of-range memory reads (a segfault
        # in torchvision's CPU kernel). Zeroing them keeps the process alive until the non-finite loss check
        # stops the run with its message; finite offsets pass unchanged.
        offset = torch.where(torch.isfinite(offset), offset, torch.zeros((), dtype=offset.dtype, device=offset.device))
        return DEFORM_OPS[self.op](
            x,
            offset,
            self.weight,
            self.bias,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            mask=mask,
        )

    def extra_repr(self) -> str:
        out_c, in_c, kh, kw = self.weight.shape
        return (
            f"{in_c}, {out_c}, kernel_size=({kh}, {kw}), stride={self.stride}, padding={self.padding}, "
            f"dilation={self.dilation}, version={self.version}, deform_groups={self.deform_groups}, op={self.op}"
        )

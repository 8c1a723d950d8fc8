"""Decode heads: torchvision's FCNHead (the default, the reference study's model) or mmsegmentation's.

- ``torchvision``: ``torchvision.models.segmentation.fcn.FCNHead``: 3x3 conv 2048->512, BN, ReLU,
  dropout 0.1, 1x1 conv to the classes (9,515,158 parameters for 150 classes), PyTorch's default
  initialisation. This is what ``fcn_resnet50`` uses and what gives the study's 33M-parameter model.
- ``mmseg``: mmsegmentation's ``FCNHead`` as its FCN-R50-D8 config builds it (num_convs=2,
  concat_input=True, kernel 3, Dropout2d 0.1): two 3x3 conv-BN-ReLU 2048->512->512, the input
  concatenated with their output and fused by a third 3x3 conv-BN-ReLU 2560->512, then a 1x1 conv to
  the classes (23,672,982 parameters). Initialisation as mmseg: convs Kaiming normal (fan_out, ReLU),
  BN weight 1 and bias 0, the classifier N(0, 0.01) with bias 0.

The auxiliary head (on layer3, training only) has the same structure in both: 3x3 conv 1024->256,
BN, ReLU, dropout 0.1, 1x1 conv; with ``mmseg`` it gets mmseg's Dropout2d and initialisation.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.segmentation.fcn import FCNHead


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """mmseg's ConvModule: 3x3 conv without bias, BN, ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)
    )


class MMSegFCNHead(nn.Module):
    """mmsegmentation's FCNHead: ``num_convs`` conv-BN-ReLU, optional concat of the input and a fuse conv."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, num_convs: int, concat_input: bool) -> None:
        super().__init__()
        self.convs = nn.Sequential(*[_conv_bn_relu(in_channels if i == 0 else channels, channels) for i in range(num_convs)])
        self.conv_cat = _conv_bn_relu(in_channels + channels, channels) if concat_input else None
        self.dropout = nn.Dropout2d(0.1)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d) and module is not self.conv_seg:
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.conv_seg.weight, 0.0, 0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.convs(x)
        if self.conv_cat is not None:
            out = self.conv_cat(torch.cat([x, out], dim=1))
        return self.conv_seg(self.dropout(out))


def build_heads(kind: str, num_classes: int, aux_head: bool) -> tuple[nn.Module, nn.Module | None]:
    """The decode head on layer4 (2048 channels) and, if ``aux_head``, the auxiliary head on layer3 (1024)."""
    if kind == "mmseg":
        head = MMSegFCNHead(2048, 512, num_classes, num_convs=2, concat_input=True)
        aux = MMSegFCNHead(1024, 256, num_classes, num_convs=1, concat_input=False) if aux_head else None
        return head, aux
    return FCNHead(2048, num_classes), FCNHead(1024, num_classes) if aux_head else None

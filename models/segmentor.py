"""ResNet-50 FCN (output stride 8) with config-selected deformable 3x3 convolutions.

The backbone is torchvision's ResNet-50 with the strides of layer3 and layer4 replaced by dilation
(as FCN-R50-D8 in mmsegmentation and DeepLab); the head is torchvision's ``FCNHead`` (as in
``fcn_resnet50``), and an optional auxiliary ``FCNHead`` on layer3 is used in training only. The
deformable swap follows detectron2's DeformBottleneckBlock: only ``conv2`` of a bottleneck changes,
under its own name, so torchvision's ImageNet weights load unchanged.

Logits are returned at 1/8 of the input resolution; the training loss and the evaluator upsample.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from torchvision.models import ResNet50_Weights, resnet50

from configs import UserError
from models.deform_conv import DeformConv2d
from models.heads import build_heads


class SegmentationModel(nn.Module):
    """Dilated ResNet-50 backbone, FCN head and optional auxiliary head.

    ``forward`` returns ``{"out": logits}`` and, in training mode with the aux head on, also
    ``"aux"``; both at output stride 8.
    """

    def __init__(self, num_classes: int, aux_head: bool, head: str = "torchvision") -> None:
        super().__init__()
        backbone = resnet50(weights=None, replace_stride_with_dilation=[False, True, True])
        del backbone.fc, backbone.avgpool
        self.backbone = backbone
        self.head, self.aux_head = build_heads(head, num_classes, aux_head)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        b = self.backbone
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        c3 = b.layer3(b.layer2(b.layer1(x)))
        c4 = b.layer4(c3)
        result = {"out": self.head(c4)}
        if self.aux_head is not None and self.training:
            result["aux"] = self.aux_head(c3)
        return result


def swap_deformable(model: SegmentationModel, deform_cfg: dict[str, Any], op: str = "reference") -> list[str]:
    """Replace the chosen bottlenecks' ``conv2`` by ``DeformConv2d`` running ``op``; return their module names.

    With ``dilation`` > 0 the chosen convs first get that dilation (and the same padding, so sizes stay): the
    receptive-field control of DCNv1's Table 3, for plain convs (version 0) as for deformable ones.
    ``deform_cfg`` is a validated ``model.deform`` section (configs.validate_config checks stages, blocks, groups).
    """
    version, dilation = deform_cfg["version"], deform_cfg["dilation"]
    if version == 0 and dilation == 0:
        return []
    swapped = []
    for stage in deform_cfg["stages"]:
        blocks = getattr(model.backbone, stage)
        for i in deform_cfg["blocks"] or range(len(blocks)):
            if dilation:
                blocks[i].conv2.dilation = blocks[i].conv2.padding = (dilation, dilation)
            if version:
                blocks[i].conv2 = DeformConv2d.from_conv(blocks[i].conv2, version, deform_cfg["groups"], op)
                swapped.append(f"backbone.{stage}.{i}.conv2")
    return swapped


def load_imagenet_backbone(model: SegmentationModel) -> None:
    """Load torchvision's ImageNet ResNet-50 weights (IMAGENET1K_V1) into the backbone.

    Raises UserError with the file name and folder when the weights cannot be downloaded.
    """
    weights = ResNet50_Weights.IMAGENET1K_V1
    try:
        state = weights.get_state_dict(progress=True)
    except Exception as err:  # network errors come in many types (URLError, socket errors, ...)
        hub_dir = os.path.join(torch.hub.get_dir(), "checkpoints")
        filename = os.path.basename(weights.url)
        raise UserError(
            f"could not get the ImageNet ResNet-50 weights ({type(err).__name__}: {err}). "
            f"Download {weights.url} on a machine with network access and put the file {filename} in "
            f"{hub_dir} (the folder follows $TORCH_HOME), or train from scratch with "
            f"model.pretrained_backbone=false."
        ) from None
    load_backbone_state_dict(model, state)


def load_backbone_state_dict(model: SegmentationModel, state: dict[str, torch.Tensor]) -> None:
    """Load a torchvision ResNet-50 state dict into the backbone; only offset predictors may stay unset."""
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = model.backbone.load_state_dict(state, strict=False)
    missing = [k for k in missing if ".offset_conv." not in k]
    if missing or unexpected:
        raise RuntimeError(f"backbone weights do not match: missing {missing[:5]}, unexpected {unexpected[:5]}")


def build_model(config: dict[str, Any], load_pretrained: bool = True) -> tuple[SegmentationModel, list[str]]:
    """Build the model described by ``config['model']``; return it and its deformable layer names.

    ``load_pretrained=False`` skips the ImageNet download (used when a checkpoint will be loaded).
    """
    mcfg = config["model"]
    model = SegmentationModel(mcfg["num_classes"], mcfg["aux_head"], mcfg["head"])
    if mcfg["pretrained_backbone"] and load_pretrained:
        load_imagenet_backbone(model)
    deform_layers = swap_deformable(model, mcfg["deform"], mcfg["deform_op"])
    return model, deform_layers


def deformable_layers(model: nn.Module) -> dict[str, DeformConv2d]:
    """All deformable layers of a model, by module name (works through DDP and torch.compile wrappers)."""
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, DeformConv2d):
            for wrapper in ("_orig_mod.", "module."):
                name = name.removeprefix(wrapper)
            layers[name] = module
    return layers


def offset_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of the offset/mask predictors of every deformable layer."""
    return [p for m in model.modules() if isinstance(m, DeformConv2d) for p in m.offset_conv.parameters()]


def count_parameters(model: SegmentationModel) -> dict[str, int]:
    """Parameters of the inference model (aux head excluded) and of the offset/mask predictors."""
    aux = {id(p) for p in model.aux_head.parameters()} if model.aux_head is not None else set()
    total = sum(p.numel() for p in model.parameters() if id(p) not in aux)
    deform = sum(p.numel() for p in offset_parameters(model))
    return {"params": total, "deform_params": deform}

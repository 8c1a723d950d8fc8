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
from torchvision.models.segmentation.fcn import FCNHead

from configs import UserError
from models.deform_conv import DEFORM_OPS, DeformConv2d

STAGES = ("layer1", "layer2", "layer3", "layer4")


class SegmentationModel(nn.Module):
    """Dilated ResNet-50 backbone, FCN head and optional auxiliary head.

    ``forward`` returns ``{"out": logits}`` and, in training mode with the aux head on, also
    ``"aux"``; both at output stride 8.
    """

    def __init__(self, num_classes: int, aux_head: bool) -> None:
        super().__init__()
        backbone = resnet50(weights=None, replace_stride_with_dilation=[False, True, True])
        del backbone.fc, backbone.avgpool
        self.backbone = backbone
        self.head = FCNHead(2048, num_classes)
        self.aux_head = FCNHead(1024, num_classes) if aux_head else None

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        b = self.backbone
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        c3 = b.layer3(b.layer2(b.layer1(x)))
        c4 = b.layer4(c3)
        result = {"out": self.head(c4)}
        if self.aux_head is not None and self.training:
            result["aux"] = self.aux_head(c3)
        return result


def swap_deformable(model: SegmentationModel, deform_cfg: dict[str, Any], op: str = "torchvision") -> list[str]:
    """Replace the chosen bottlenecks' ``conv2`` by ``DeformConv2d`` running ``op``; return their module names."""
    version = deform_cfg["version"]
    if version not in (0, 1, 2):
        raise UserError(f"config key 'model.deform.version' must be 0, 1 or 2, got {version}.")
    if version == 0:
        return []
    unknown = [s for s in deform_cfg["stages"] if s not in STAGES]
    if unknown:
        raise UserError(f"config key 'model.deform.stages' names unknown stages {unknown}; use some of {list(STAGES)}.")
    for key in ("stages", "blocks"):
        if len(set(deform_cfg[key])) != len(deform_cfg[key]):
            raise UserError(f"config key 'model.deform.{key}' lists an entry twice: {deform_cfg[key]}.")
    if op not in DEFORM_OPS:
        raise UserError(f"config key 'model.deform_op' must be one of {list(DEFORM_OPS)}, got {op!r}.")
    groups = deform_cfg["groups"]
    if groups < 1:
        raise UserError(f"config key 'model.deform.groups' must be at least 1, got {groups}.")
    swapped = []
    for stage in deform_cfg["stages"]:
        blocks = getattr(model.backbone, stage)
        indices = deform_cfg["blocks"] or list(range(len(blocks)))
        for i in indices:
            if not 0 <= i < len(blocks):
                raise UserError(
                    f"config key 'model.deform.blocks' holds block {i}, but {stage} has blocks 0..{len(blocks) - 1}."
                )
            block = blocks[i]
            if block.conv2.in_channels % groups:
                raise UserError(
                    f"config key 'model.deform.groups' is {groups}, which does not divide the "
                    f"{block.conv2.in_channels} input channels of {stage}.{i}.conv2; use a power of 2."
                )
            block.conv2 = DeformConv2d.from_conv(block.conv2, version, groups, op)
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
    cfg = config["model"]
    model = SegmentationModel(cfg["num_classes"], cfg["aux_head"])
    if cfg["pretrained_backbone"] and load_pretrained:
        load_imagenet_backbone(model)
    # Checkpoints written before model.deform_op existed hold no such key: they ran torchvision's op.
    deform_layers = swap_deformable(model, cfg["deform"], cfg.get("deform_op", "torchvision"))
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


def count_parameters(model: SegmentationModel) -> dict[str, int]:
    """Parameters of the inference model (aux head excluded) and of the offset/mask predictors."""
    total = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("aux_head."))
    deform = sum(p.numel() for name, p in model.named_parameters() if ".offset_conv." in name)
    return {"params": total, "deform_params": deform}


def parameter_groups(model: nn.Module, train_cfg: dict[str, Any], offset_lr_mult: float) -> list[dict[str, Any]]:
    """SGD parameter groups: offset/mask predictors get ``offset_lr_mult``; optionally no decay on norms and biases.

    Each group carries ``lr_mult``, which the poly schedule multiplies into its learning rate.
    """
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lr_mult = offset_lr_mult if ".offset_conv." in name else 1.0
        no_decay = train_cfg["no_decay_norm_bias"] and (param.ndim <= 1)
        groups.setdefault((lr_mult, no_decay), []).append(param)
    return [
        {
            "params": params,
            "lr": train_cfg["lr"] * lr_mult,
            "lr_mult": lr_mult,
            "weight_decay": 0.0 if no_decay else train_cfg["weight_decay"],
        }
        for (lr_mult, no_decay), params in groups.items()
    ]

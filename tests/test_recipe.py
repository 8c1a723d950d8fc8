"""Recipe fidelity with mmsegmentation's FCN-R50-D8: its decode head, loss normalisation and config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import write_ade_tree

import train
from configs import UserError, check_same_model, load_config
from engine.checkpoint import load_checkpoint
from engine.loss import compute_loss, segmentation_loss
from models.heads import MMSegFCNHead
from models.segmentor import build_model, count_parameters

NO_DOWNLOAD = ["model.pretrained_backbone=false"]


def test_mmseg_head_has_mmsegs_parameter_counts() -> None:
    """mmseg's resolved config builds a 23,672,982-parameter decode head and a 2,398,358-parameter aux head;
    with torchvision's 7x7 stem the inference model has 47,181,014 (measured with mmseg 1.2.2 itself)."""
    model, _ = build_model(load_config("mmseg-fcn-r50-d8", NO_DOWNLOAD), load_pretrained=False)
    assert isinstance(model.head, MMSegFCNHead) and isinstance(model.aux_head, MMSegFCNHead)
    assert sum(p.numel() for p in model.head.parameters()) == 23_672_982
    assert sum(p.numel() for p in model.aux_head.parameters()) == 2_398_358
    assert count_parameters(model)["params"] == 47_181_014
    assert isinstance(model.head.dropout, torch.nn.Dropout2d)


def test_mmseg_head_initialisation() -> None:
    head = MMSegFCNHead(2048, 512, 150, num_convs=2, concat_input=True)
    assert head.conv_seg.weight.std().item() == pytest.approx(0.01, rel=0.05) and head.conv_seg.bias.abs().max() == 0
    conv = head.convs[0][0]  # Kaiming normal, fan_out: std = sqrt(2 / (out_channels * 9))
    assert conv.weight.std().item() == pytest.approx((2 / (512 * 9)) ** 0.5, rel=0.05)
    assert all(m.weight.eq(1).all() and m.bias.eq(0).all() for m in head.modules() if isinstance(m, torch.nn.BatchNorm2d))


@pytest.mark.parametrize("name,params", [("norm-conv", 33_023_190), ("def-conv-v1", 33_272_076), ("def-conv-v2", 33_396_519)])
def test_default_configs_keep_the_studys_parameter_counts(name: str, params: int) -> None:
    model, _ = build_model(load_config(name, NO_DOWNLOAD), load_pretrained=False)
    assert count_parameters(model)["params"] == params


@pytest.mark.parametrize("op", ["reference", "triton"])
def test_loss_over_all_pixels_is_mmsegs_normalisation(op: str) -> None:
    """norm=all: summed cross-entropy / (N*H*W); the same value and gradient from both implementations."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 150, (2, 32, 32), generator=gen)
    labels[:, :12] = 255
    logits = torch.randn(2, 150, 4, 4, generator=gen, requires_grad=True)
    loss = segmentation_loss(logits, labels, op, "all")
    loss.backward()
    up = torch.nn.functional.interpolate(logits.detach(), size=(32, 32), mode="bilinear", align_corners=False)
    expected = torch.nn.functional.cross_entropy(up, labels, ignore_index=255, reduction="sum") / labels.numel()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    labelled = segmentation_loss(logits, labels, op, "labelled")
    assert labelled.item() == pytest.approx(loss.item() * labels.numel() / (labels != 255).sum().item(), rel=1e-6)
    reference = logits.detach().clone().requires_grad_()
    segmentation_loss(reference, labels, "reference", "all").backward()
    torch.testing.assert_close(logits.grad, reference.grad, rtol=1e-5, atol=1e-8)


def test_compute_loss_passes_the_normalisation_to_both_heads() -> None:
    gen = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 150, (1, 16, 16), generator=gen)
    labels[:, :8] = 255
    outputs = {k: torch.randn(1, 150, 2, 2, generator=gen) for k in ("out", "aux")}
    a = compute_loss(outputs, labels, 0.4, norm="labelled")
    b = compute_loss(outputs, labels, 0.4, norm="all")
    for key in ("main", "aux", "total"):
        assert b[key].item() == pytest.approx(a[key].item() * 0.5, rel=1e-6)


def test_mmseg_config_trains_on_the_demo_data(tmp_path: Path) -> None:
    tree = write_ade_tree(tmp_path / "ADEChallengeData2016", num_train=4, num_val=1, size=(48, 40))
    overrides = [
        *NO_DOWNLOAD, f"data.root={tree}", "data.num_workers=0", "data.scale=[48,48]", "data.crop_size=32",
        "train.batch_size=2", "train.iters=2", "train.log_interval=1", "train.val_interval=2", "train.ckpt_interval=2",
        "train.tb_images=1",
    ]
    assert train.main(["--config", "mmseg-fcn-r50-d8", "--work-dir", str(tmp_path / "run"), "--device", "cpu", *overrides]) == 0
    checkpoint = load_checkpoint(tmp_path / "run" / "last.pt")
    assert checkpoint["iteration"] == 2 and checkpoint["config"]["model"]["head"] == "mmseg"
    assert any(k.startswith("head.conv_cat.") for k in checkpoint["model"])


def test_receptive_field_control_dilates_the_selected_convs() -> None:
    """norm-conv-dilated: layer4's conv2 with dilation (and padding) 12, nothing else changed; with a deformable
    version the dilation carries into the deformable layers; the dilation is part of the architecture."""
    plain, _ = build_model(load_config("norm-conv", NO_DOWNLOAD), load_pretrained=False)
    dilated, names = build_model(load_config("norm-conv-dilated", NO_DOWNLOAD), load_pretrained=False)
    assert names == [] and count_parameters(dilated) == count_parameters(plain)
    assert [b.conv2.dilation for b in plain.backbone.layer4] == [(2, 2), (4, 4), (4, 4)]
    assert all(b.conv2.dilation == (12, 12) and b.conv2.padding == (12, 12) for b in dilated.backbone.layer4)
    assert all(b.conv2.dilation != (12, 12) for b in dilated.backbone.layer3)
    dilated.eval()
    with torch.no_grad():
        assert dilated(torch.zeros(1, 3, 64, 64))["out"].shape == (1, 150, 8, 8)
    deform, names = build_model(load_config("def-conv-v2", [*NO_DOWNLOAD, "model.deform.dilation=12"]), load_pretrained=False)
    assert len(names) == 3 and all(b.conv2.dilation == (12, 12) for b in deform.backbone.layer4)
    with pytest.raises(UserError, match="model.deform.dilation"):
        check_same_model(load_config("norm-conv"), load_config("norm-conv-dilated"), "a", "b")

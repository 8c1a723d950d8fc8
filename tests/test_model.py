"""Tests of the deformable layer and the ResNet-50 FCN: sizes, offset/mask semantics, weights, contract."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import urllib.error
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from configs import UserError, load_config
from engine.optim import parameter_groups
from models.deform_conv import DeformConv2d
from models.segmentor import (
    SegmentationModel,
    build_model,
    count_parameters,
    deformable_layers,
    load_backbone_state_dict,
)

REPO = Path(__file__).resolve().parents[1]

NO_DOWNLOAD = ["model.pretrained_backbone=false"]
NORM_CONV_PARAMS = 33_023_190
LAYER4_CONV2 = [f"backbone.layer4.{i}.conv2" for i in range(3)]


def build(name: str, overrides: list[str] | None = None) -> tuple[SegmentationModel, list[str]]:
    """Build a config's model with random weights (no download)."""
    torch.manual_seed(0)
    return build_model(load_config(name, NO_DOWNLOAD + (overrides or [])), load_pretrained=False)


@pytest.fixture(scope="module")
def models() -> dict[str, SegmentationModel]:
    """norm-conv, def-conv-v1 and def-conv-v2 models, built once for the read-only tests."""
    return {name: build(name)[0] for name in ("norm-conv", "def-conv-v1", "def-conv-v2")}


def load_script(name: str) -> Any:
    """Import scripts/<name>.py as a module."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def offset_params(in_channels: int, version: int) -> int:
    """Parameters of one 3x3 offset(/mask) predictor: 2 (or 3) x 9 output channels, with bias."""
    out = (3 if version == 2 else 2) * 9
    return in_channels * out * 9 + out


# ---------------------------------------------------------------------------------------------
# Parameter counts and which layers are deformable


@pytest.mark.parametrize(
    "name, added, layers",
    [
        ("norm-conv", 0, []),
        ("def-conv-v1", 248_886, LAYER4_CONV2),
        ("def-conv-v2", 373_329, LAYER4_CONV2),
    ],
)
def test_parameter_counts_of_the_compared_configs(
    models: dict[str, SegmentationModel], name: str, added: int, layers: list[str]
) -> None:
    model = models[name]
    counts = count_parameters(model)
    assert counts == {"params": NORM_CONV_PARAMS + added, "deform_params": added}
    assert sorted(deformable_layers(model)) == layers


@pytest.mark.parametrize(
    "name, params, deform_params, layers",
    [
        ("def-conv-v1", NORM_CONV_PARAMS + 248_886, 248_886, LAYER4_CONV2),
        (
            "def-conv-v2-dcnv2-placement",
            NORM_CONV_PARAMS + 4 * offset_params(128, 2) + 6 * offset_params(256, 2) + 3 * offset_params(512, 2),
            4 * offset_params(128, 2) + 6 * offset_params(256, 2) + 3 * offset_params(512, 2),
            [f"backbone.layer2.{i}.conv2" for i in range(4)]
            + [f"backbone.layer3.{i}.conv2" for i in range(6)]
            + LAYER4_CONV2,
        ),
    ],
)
def test_model_info_script_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, params: int, deform_params: int, layers: list[str]
) -> None:
    out = tmp_path / "info" / "model.json"
    rc = load_script("model_info").main(["--config", name, "--json", str(out), *NO_DOWNLOAD])
    assert rc == 0
    info = json.loads(out.read_text())
    assert info == {"config": name, "params": params, "deform_params": deform_params, "deform_layers": layers}
    assert len(info["deform_layers"]) == (13 if "placement" in name else 3)
    printed = capsys.readouterr().out
    assert f"{params:,}" in printed and f"{deform_params:,}" in printed
    assert "backbone.layer4.2.conv2: v" in printed and "dilation (4, 4)" in printed


def test_model_info_script_reports_user_errors(capsys: pytest.CaptureFixture[str]) -> None:
    rc = load_script("model_info").main(["--config", "def-conv-v2", "model.deform.stages=[layer5]"])
    assert rc == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_one_by_one_convs_are_never_swapped() -> None:
    model, names = build("def-conv-v2", ["model.deform.stages=[layer1,layer2,layer3,layer4]"])
    assert len(names) == 3 + 4 + 6 + 3
    deform = deformable_layers(model)
    assert sorted(deform) == sorted(names)
    for layer in deform.values():
        assert layer.weight.shape[-2:] == (3, 3)
        assert layer.offset_conv.kernel_size == (3, 3)
    backbone = model.backbone
    assert type(backbone.conv1) is nn.Conv2d
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        for block in getattr(backbone, stage):
            assert isinstance(block.conv2, DeformConv2d)
            for conv in (block.conv1, block.conv3):
                assert type(conv) is nn.Conv2d and conv.kernel_size == (1, 1)
            if block.downsample is not None:
                assert type(block.downsample[0]) is nn.Conv2d


def test_blocks_option_swaps_only_the_chosen_block() -> None:
    model, names = build("def-conv-v2", ["model.deform.blocks=[1]"])
    assert names == ["backbone.layer4.1.conv2"]
    assert list(deformable_layers(model)) == names
    layer4 = model.backbone.layer4
    assert type(layer4[0].conv2) is nn.Conv2d and type(layer4[2].conv2) is nn.Conv2d
    assert layer4[1].conv2.dilation == (4, 4) and layer4[1].conv2.padding == (4, 4)


@pytest.mark.parametrize(
    "override",
    [
        "model.deform.stages=[layer5]",
        "model.deform.stages=[layer4,layer4]",
        "model.deform.blocks=[3]",
        "model.deform.blocks=[1,1]",
        "model.deform.version=3",
        "model.deform.groups=3",
        "model.deform.groups=0",
    ],
)
def test_bad_deform_settings_raise_user_error(override: str) -> None:
    with pytest.raises(UserError, match=r"model\.deform\."):
        build("def-conv-v2", [override])


def test_deform_op_is_chosen_by_config() -> None:
    model, _ = build("def-conv-v2", ["model.deform_op=triton"])
    assert {layer.op for layer in deformable_layers(model).values()} == {"triton"}
    assert {layer.op for layer in deformable_layers(build("def-conv-v2")[0]).values()} == {"reference"}
    with pytest.raises(UserError, match=r"model\.deform_op.*'cuda'"):
        build("def-conv-v2", ["model.deform_op=cuda"])
    with pytest.raises(UserError, match=r"model\.deform_op.*'torchvision'"):  # the op's name before 0.2: refused
        build("def-conv-v2", ["model.deform_op=torchvision"])


# ---------------------------------------------------------------------------------------------
# The deformable layer


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("dilation", [1, 2])
@pytest.mark.parametrize("bias", [False, True])
def test_fresh_layer_equals_the_conv_it_replaces(stride: int, dilation: int, bias: bool) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=stride, padding=dilation, dilation=dilation, bias=bias)
    x = torch.randn(2, 4, 11, 9)
    expected = conv(x)
    with torch.no_grad():
        v1 = DeformConv2d.from_conv(conv, 1)(x)
        v2 = DeformConv2d.from_conv(conv, 2)(x)
    assert v1.shape == expected.shape
    torch.testing.assert_close(v1, expected, rtol=0, atol=1e-6)
    if bias:  # the mask scales the sampled input, not the bias
        expected = 0.5 * (expected - conv.bias[:, None, None]) + conv.bias[:, None, None]
    else:
        expected = 0.5 * expected
    torch.testing.assert_close(v2, expected, rtol=0, atol=1e-6)


def layer_with_constant_offset(dy: float, dx: float, version: int = 1) -> tuple[DeformConv2d, nn.Conv2d]:
    """A 3x3 deformable layer (3 -> 5 channels) whose offsets are (dy, dx) at every tap and position."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=1, bias=False)
    layer = DeformConv2d.from_conv(conv, version)
    with torch.no_grad():
        layer.offset_conv.bias[0:18:2] = dy  # channel 2k: y offset of tap k
        layer.offset_conv.bias[1:18:2] = dx  # channel 2k + 1: x offset of tap k
    return layer, conv


def test_offset_channel_layout_x() -> None:
    layer, conv = layer_with_constant_offset(0.0, 1.0)
    x = torch.randn(1, 3, 10, 12)
    with torch.no_grad():
        out = layer(x)
        shifted = conv(x[..., 1:])  # the input moved left by one pixel
    # Column 0 differs only where the plain conv pads x[-1] and the deformable one samples x[0].
    torch.testing.assert_close(out[..., 1:-1], shifted[..., 1:], rtol=0, atol=1e-5)
    assert not torch.allclose(out[..., 1:-1], conv(x)[..., 1:-1], atol=1e-2)


def test_offset_channel_layout_y() -> None:
    layer, conv = layer_with_constant_offset(1.0, 0.0)
    x = torch.randn(1, 3, 10, 12)
    with torch.no_grad():
        out = layer(x)
        shifted = conv(x[..., 1:, :])  # the input moved up by one pixel
    torch.testing.assert_close(out[..., 1:-1, :], shifted[..., 1:, :], rtol=0, atol=1e-5)


def test_offset_channel_order_matters() -> None:
    x = torch.randn(1, 3, 10, 12)
    with torch.no_grad():
        out_x = layer_with_constant_offset(0.0, 1.0)[0](x)
        out_y = layer_with_constant_offset(1.0, 0.0)[0](x)
    assert (out_x - out_y)[..., 1:-1, 1:-1].abs().max() > 0.1


def test_offsets_and_mask_shapes_and_range() -> None:
    layer = DeformConv2d.from_conv(nn.Conv2d(8, 8, 3, padding=1), 2, deform_groups=2)
    offset, mask = layer.offsets_and_mask(torch.randn(1, 8, 6, 7))
    assert offset.shape == (1, 2 * 2 * 9, 6, 7) and mask.shape == (1, 2 * 9, 6, 7)
    assert torch.all(mask == 0.5)
    v1 = DeformConv2d.from_conv(nn.Conv2d(8, 8, 3, padding=1), 1)
    v1_offset, v1_mask = v1.offsets_and_mask(torch.randn(1, 8, 6, 7))
    assert v1_offset.shape == (1, 18, 6, 7) and v1_mask is None


def test_deformable_groups_take_their_own_offsets() -> None:
    """Group g's offsets (channels 2*(g*9 + k) and 2*(g*9 + k) + 1) move only group g's input channels."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 5, 3, padding=1, bias=False)
    layer = DeformConv2d.from_conv(conv, 1, deform_groups=2)
    assert layer.offset_conv.out_channels == 2 * 2 * 9
    with torch.no_grad():
        layer.offset_conv.bias[1:18:2] = 1.0  # group 0 (input channels 0, 1): x offset +1
        x = torch.randn(1, 4, 7, 10)
        out = layer(x)
        moved = F.conv2d(x[:, :2, :, 1:], conv.weight[:, :2], padding=1)
        still = F.conv2d(x[:, 2:], conv.weight[:, 2:], padding=1)
    torch.testing.assert_close(out[..., 1:-1], moved[..., 1:] + still[..., 1:-1], rtol=0, atol=1e-5)


def test_model_with_deformable_groups_runs() -> None:
    model, names = build("def-conv-v2", ["model.deform.groups=4", "model.aux_head=false"])
    layer = deformable_layers(model)[names[0]]
    assert layer.deform_groups == 4 and layer.offset_conv.out_channels == 4 * 27
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32))["out"].shape == (1, 150, 4, 4)


@pytest.mark.parametrize("tap", [0, 4, 5])
def test_mask_scales_each_tap(tap: int) -> None:
    m = 0.3
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=1, bias=False)
    layer = DeformConv2d.from_conv(conv, 2)
    with torch.no_grad():
        mask_bias = torch.full((9,), -100.0)  # sigmoid(-100) ~ 4e-44
        mask_bias[tap] = math.log(m / (1 - m))  # sigmoid = m
        layer.offset_conv.bias[18:] = mask_bias
        only_tap = torch.zeros_like(conv.weight)
        ky, kx = divmod(tap, 3)
        only_tap[..., ky, kx] = conv.weight[..., ky, kx]
        x = torch.randn(2, 3, 8, 9)
        out = layer(x)
        expected = m * F.conv2d(x, only_tap, padding=1)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The full model


def test_gradients_reach_offset_and_mask_predictors(models: dict[str, SegmentationModel]) -> None:
    model = models["def-conv-v2"]
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    try:
        x = torch.randn(2, 3, 64, 64)
        result = model(x)
        target = torch.randint(0, 150, result["out"].shape[:1] + result["out"].shape[2:])
        loss = F.cross_entropy(result["out"], target) + 0.4 * F.cross_entropy(result["aux"], target)
        loss.backward()
        layers = deformable_layers(model)
        assert len(layers) == 3
        for name, layer in layers.items():
            grad = layer.offset_conv.weight.grad
            assert grad is not None, name
            assert grad[:18].norm() > 0, f"{name}: no gradient to the offset predictor"
            assert grad[18:].norm() > 0, f"{name}: no gradient to the mask predictor"
            assert layer.offset_conv.bias.grad[:18].norm() > 0
            assert layer.weight.grad.norm() > 0
    finally:
        model.zero_grad(set_to_none=True)


def test_forward_contract(models: dict[str, SegmentationModel]) -> None:
    model = models["def-conv-v2"]
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        model.train()
        train_out = model(x)
        model.eval()
        eval_out = model(x)
    assert set(train_out) == {"out", "aux"}
    assert train_out["out"].shape == (2, 150, 8, 6)
    assert train_out["aux"].shape == (2, 150, 8, 6)
    assert set(eval_out) == {"out"}
    assert eval_out["out"].shape == (2, 150, 8, 6)


def test_forward_without_aux_head() -> None:
    model, _ = build("def-conv-v1", ["model.aux_head=false"])
    assert model.aux_head is None
    model.train()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert set(out) == {"out"} and out["out"].shape == (2, 150, 4, 4)
    assert count_parameters(model)["params"] == NORM_CONV_PARAMS + 248_886


def test_state_dict_round_trip() -> None:
    source, _ = build("def-conv-v2")
    torch.manual_seed(2)
    with torch.no_grad():
        for layer in deformable_layers(source).values():  # make offsets and mask non-trivial
            layer.offset_conv.weight.normal_(0, 0.01)
            layer.offset_conv.bias.normal_(0, 0.5)
        source.train()
        source(torch.randn(2, 3, 32, 32))  # move the BatchNorm running statistics
    torch.manual_seed(3)
    target, _ = build_model(load_config("def-conv-v2", NO_DOWNLOAD), load_pretrained=False)
    x = torch.randn(1, 3, 32, 32)
    source.eval()
    target.eval()
    with torch.no_grad():
        before = target(x)["out"]
        target.load_state_dict(source.state_dict())
        expected, got = source(x)["out"], target(x)["out"]
    assert not torch.allclose(before, expected)
    assert torch.equal(got, expected)


def random_torchvision_state() -> dict[str, torch.Tensor]:
    """A randomly initialised torchvision ResNet-50 state dict, with non-trivial BN statistics."""
    torch.manual_seed(4)
    state = torchvision.models.resnet50().state_dict()
    for key, value in state.items():
        if key.endswith(("running_mean", "running_var", "bn1.weight", "bn2.bias")):
            state[key] = torch.rand_like(value) + 0.5
    return state


@pytest.mark.parametrize("name", ["norm-conv", "def-conv-v2"])
def test_torchvision_resnet50_weights_load_into_the_backbone(name: str) -> None:
    state = random_torchvision_state()
    model, names = build(name)
    load_backbone_state_dict(model, state)
    backbone = model.backbone.state_dict()
    for key, value in state.items():
        if not key.startswith("fc.") and "num_batches_tracked" not in key:
            assert torch.equal(backbone[key], value), key
    for layer_name in names:
        tv_key = layer_name.removeprefix("backbone.") + ".weight"
        assert torch.equal(deformable_layers(model)[layer_name].weight, state[tv_key])
    # Offset predictors are not in torchvision's state dict and stay at zero.
    for layer in deformable_layers(model).values():
        assert layer.offset_conv.weight.abs().sum() == 0


def test_backbone_state_dict_with_wrong_or_missing_key_raises() -> None:
    model, _ = build("def-conv-v2")
    state = random_torchvision_state()
    renamed = dict(state)
    renamed["layer1.0.conv_1.weight"] = renamed.pop("layer1.0.conv1.weight")
    with pytest.raises(RuntimeError, match=r"layer1\.0\.conv_?1\.weight"):
        load_backbone_state_dict(model, renamed)
    missing = dict(state)
    del missing["layer4.1.conv2.weight"]
    with pytest.raises(RuntimeError, match=r"layer4\.1\.conv2\.weight"):
        load_backbone_state_dict(model, missing)


def test_imagenet_weights_reach_the_deformable_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    """build_model loads the (here: fake) ImageNet weights; the swapped layers keep their conv2 weights."""
    state = random_torchvision_state()
    weights = torchvision.models.ResNet50_Weights.IMAGENET1K_V1
    monkeypatch.setattr(weights, "get_state_dict", lambda *args, **kwargs: state)
    model, names = build_model(load_config("def-conv-v1"))
    assert names == LAYER4_CONV2
    for layer_name, layer in deformable_layers(model).items():
        assert torch.equal(layer.weight, state[layer_name.removeprefix("backbone.") + ".weight"])
    assert torch.equal(model.backbone.conv1.weight, state["conv1.weight"])


def raise_url_error(*args: Any, **kwargs: Any) -> None:
    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")


@pytest.mark.parametrize("where", ["hub_download", "get_state_dict"])
def test_offline_pretrained_weights_raise_user_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    if where == "hub_download":
        monkeypatch.setattr(torch.hub, "download_url_to_file", raise_url_error)
    else:
        monkeypatch.setattr(torchvision.models.ResNet50_Weights.IMAGENET1K_V1, "get_state_dict", raise_url_error)
    with pytest.raises(UserError) as info:
        build_model(load_config("def-conv-v2"))
    message = str(info.value)
    assert "resnet50-0676ba61.pth" in message
    assert str(tmp_path / "hub" / "checkpoints") in message
    assert "model.pretrained_backbone=false" in message


@pytest.mark.parametrize("no_decay", [True, False])
def test_parameter_groups(models: dict[str, SegmentationModel], no_decay: bool) -> None:
    model = models["def-conv-v2"]
    config = load_config("def-conv-v2", [f"train.no_decay_norm_bias={str(no_decay).lower()}"])
    train_cfg, mult = config["train"], config["model"]["deform"]["offset_lr_mult"]
    assert mult == 0.1
    groups = parameter_groups(model, train_cfg, mult)
    group_of = {}
    for index, group in enumerate(groups):
        assert group["lr"] == pytest.approx(train_cfg["lr"] * group["lr_mult"])
        for param in group["params"]:
            assert id(param) not in group_of, "a parameter is in two groups"
            group_of[id(param)] = group
    trainable = dict(model.named_parameters())
    assert set(group_of) == {id(p) for p in trainable.values()}
    bn_params = {id(p) for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
    assert bn_params
    for name, param in trainable.items():
        group = group_of[id(param)]
        if ".offset_conv." in name:
            assert group["lr"] == pytest.approx(train_cfg["lr"] * 0.1), name
        else:
            assert group["lr"] == pytest.approx(train_cfg["lr"]), name
        if no_decay and id(param) in bn_params:
            assert group["weight_decay"] == 0.0, name
        if param.ndim == 4 or not no_decay:
            assert group["weight_decay"] == train_cfg["weight_decay"], name


def test_nan_offsets_do_not_crash_the_deformable_op() -> None:
    """A diverged model predicts NaN offsets; torchvision's CPU kernel segfaults on them (exit 139), so the layer
    zeroes non-finite offsets and the non-finite-loss check can stop the run with its message. In a subprocess:
    without the guard the crash would take the test runner with it."""
    code = (
        "import torch\n"
        "from models.deform_conv import DeformConv2d\n"
        "layer = DeformConv2d(8, 8, (3, 3), padding=(4, 4), dilation=(4, 4), version=2)\n"
        "torch.nn.init.constant_(layer.offset_conv.weight, float('nan'))\n"
        "out = layer(torch.randn(2, 8, 16, 16))\n"
        "assert out.shape == (2, 8, 16, 16)\n"
        "print('alive')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "alive" in result.stdout, (result.returncode, result.stderr[-500:])

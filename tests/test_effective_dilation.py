"""DCNv1's effective dilation: exact for zero offsets and for offsets that scale the sampling grid, its buckets by
object size, and scripts/effective_dilation.py end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from configs import load_config
from data import IGNORE_INDEX
from engine.offsets import capture_offsets, effective_dilation
from engine.statistics import dilation_table, region_sums
from models.segmentor import build_model, deformable_layers
from scripts import effective_dilation as cli

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model() -> nn.Module:
    """A fresh demo def-conv-v2 model: its offset predictors start at zero (layer4's conv2, dilations 2, 4, 4)."""
    torch.manual_seed(0)
    return build_model(load_config("demo.yaml"))[0].eval()


def dilations(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each deformable layer's effective dilation map on one random image."""
    with torch.no_grad(), capture_offsets(model) as captured:
        model(torch.randn(1, 3, 48, 64))
    layers = deformable_layers(model)
    return {name: effective_dilation(captured[name][0].offsets, tuple(layer.weight.shape[-2:]), layer.dilation)
            for name, layer in layers.items()}


def test_zero_offsets_give_exactly_the_layer_dilation(model: nn.Module) -> None:
    layers = deformable_layers(model)
    assert [layer.dilation for layer in layers.values()] == [(2, 2), (4, 4), (4, 4)]
    for name, value in dilations(model).items():
        assert value.shape == (1, 6, 8) and torch.equal(value, torch.full_like(value, layers[name].dilation[0]))


@pytest.mark.parametrize("scale", [0.5, 1.75])
def test_offsets_scaling_the_grid_give_that_factor_times_the_dilation(model: nn.Module, scale: float) -> None:
    layers = deformable_layers(model)
    saved = {name: layer.offset_conv.bias.detach().clone() for name, layer in layers.items()}
    try:
        with torch.no_grad():
            for layer in layers.values():  # tap k at (dy, dx) * dilation moves to scale times that: a constant offset
                taps = torch.stack(torch.meshgrid(torch.arange(3.0) - 1, torch.arange(3.0) - 1, indexing="ij"), -1)
                layer.offset_conv.bias[:18] = ((scale - 1) * layer.dilation[0] * taps).reshape(18)
        for name, value in dilations(model).items():
            assert torch.allclose(value, torch.full_like(value, scale * layers[name].dilation[0]), rtol=1e-6)
    finally:
        with torch.no_grad():
            for name, layer in layers.items():
                layer.offset_conv.bias.copy_(saved[name])


def test_buckets_by_object_area_and_stuff() -> None:
    label = np.full((10, 10), 0)  # class 0 (wall, stuff) everywhere ...
    label[0, 0] = 12  # ... a 1-pixel person
    label[2:4, 2:6] = 20  # an 8-pixel car
    label[5:10, 5:10] = 12  # a 25-pixel person
    label[9, 0] = IGNORE_INDEX
    values = np.stack([np.where(label == 0, 2.0, 3.0), np.where(label == 12, 5.0, 4.0)])
    values[1, 5:10, 5:10] = np.arange(25).reshape(5, 5) % 2 * 2 + 4.0  # the big person: 4 and 6 alternating
    classes, pixels, share, sums, squares = region_sums(values, label)
    assert sorted(zip(classes.tolist(), pixels.tolist())) == [(0, 65), (12, 1), (12, 25), (20, 8)]
    table = dilation_table(classes, pixels, share, sums, squares, stuff=[0])
    buckets = table["buckets"]
    # thing regions of 1, 8 and 25 % of the image: one a third; the cuts are the terciles of those shares
    assert table["thirds"] == pytest.approx([0.01 + 0.07 * 2 / 3, 0.08 + 0.17 / 3])
    assert buckets["small"] == {"pixels": 1, "regions": 1, "mean": [3.0, 5.0], "std": [0.0, 0.0]}
    assert buckets["medium"] == {"pixels": 8, "regions": 1, "mean": [3.0, 4.0], "std": [0.0, 0.0]}
    assert buckets["large"]["mean"] == pytest.approx([3.0, 4.96])
    assert buckets["large"]["std"] == pytest.approx([0, 0.9992], abs=1e-4)
    assert buckets["stuff"] == {"pixels": 65, "regions": 1, "mean": [2.0, 4.0], "std": [0.0, 0.0]}
    assert table["classes"][12]["pixels"] == 26 and table["all"]["pixels"] == 99


def test_fragments_are_in_no_bucket() -> None:
    """A region under 0.1% of the image (a stray pixel of a class) is a fragment: it is counted in all and in its
    class, not in the small third, which the other thing regions then make up."""
    label = np.zeros((40, 40), np.int64)  # 1,600 pixels of wall (stuff)
    label[0, 0] = 12  # a 1-pixel person: 0.06% of the image
    label[10:12, 10:12] = 20  # a 4-pixel car
    label[20:25, 20:25] = 12  # a 25-pixel person
    label[30:40, 30:40] = 20  # a 100-pixel car
    values = np.stack([np.where(label == 0, 2.0, 3.0)])
    values[0, 0, 0] = 9.0  # the fragment's own value
    table = dilation_table(*region_sums(values, label), stuff=[0])
    assert table["fragments"] == {"pixels": 1, "regions": 1, "mean": [9.0], "std": [0.0]}
    assert [table["buckets"][b]["pixels"] for b in ("small", "medium", "large")] == [4, 25, 100]
    assert table["buckets"]["stuff"]["pixels"] == 1600 - 130 and table["all"]["pixels"] == 1600
    assert table["classes"][12]["pixels"] == 26


def test_the_script_on_a_zero_offset_checkpoint_reports_the_plain_dilations(model: nn.Module, tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture) -> None:
    config = load_config("demo.yaml")
    torch.save({"model": model.state_dict(), "config": config, "iteration": 0}, tmp_path / "last.pt")
    args = ["--checkpoint", str(tmp_path / "last.pt"), "--data-root", str(REPO / "data" / "demo"), "--max-images", "3",
            "--device", "cpu"]
    assert cli.main(args + ["--json", str(tmp_path / "d.json"), "--out", str(tmp_path / "d.png"), "--classes"]) == 0
    result = json.loads((tmp_path / "d.json").read_text())
    assert result["images"] == 3 and result["plain"] == [[2, 2], [4, 4], [4, 4]]
    for cell in [*result["buckets"].values(), result["all"], *result["classes"].values()]:
        if cell["pixels"]:
            assert cell["mean"] == [2.0, 4.0, 4.0] and cell["std"] == [0.0, 0.0, 0.0]
    out = capsys.readouterr().out
    assert "| backbone.layer4.0.conv2 | 2 | 2.00 ± 0.00 |" in out and "| class | kind | pixels |" in out
    assert (tmp_path / "d.png").read_bytes()[:4] == b"\x89PNG"
    plain = load_config("demo.yaml", ["model.deform.version=0"])
    torch.save({"model": build_model(plain)[0].state_dict(), "config": plain, "iteration": 0}, tmp_path / "plain.pt")
    assert cli.main(["--checkpoint", str(tmp_path / "plain.pt")]) == 2
    assert "holds a plain model" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--out", "--json"])
def test_an_unwritable_output_is_refused_before_the_measurement(flag: str, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    """Checked first: the checkpoint (missing here) is never read."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert cli.main(["--checkpoint", str(tmp_path / "missing.pt"), flag, str(blocker / "d.x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot write to {blocker}: it is a file") and f"Give {flag} a path" in err
    assert "nothing was measured" in err and err.count("\n") == 1

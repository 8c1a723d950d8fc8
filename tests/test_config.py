"""Tests of the config loader: name resolution, one-level inheritance, typed overrides, errors."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from configs import (
    CONFIG_DIR,
    UserError,
    check_same_model,
    flatten,
    load_config,
    resolve_config_path,
)
from data.dataset import sample_seed

REPO = Path(__file__).resolve().parents[1]

BASE_YAML = CONFIG_DIR / "ade20k-base.yaml"


@pytest.mark.parametrize(
    "name", ["def-conv-v2.yaml", "def-conv-v2", "configs/def-conv-v2.yaml", str(CONFIG_DIR / "def-conv-v2.yaml")]
)
def test_bare_name_and_path_resolve_to_the_config(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    assert resolve_config_path(name) == (CONFIG_DIR / "def-conv-v2.yaml").resolve()
    assert load_config(name)["config_name"] == "def-conv-v2"


@pytest.mark.parametrize(
    "names",
    [("norm-conv", "def-conv-v1", "def-conv-v2"), ("norm-conv-160k", "def-conv-v1-160k", "def-conv-v2-160k")],
)
def test_compared_configs_differ_only_in_model_deform(names: tuple[str, str, str]) -> None:
    flats = [flatten(load_config(n)) for n in names]
    for flat in flats:
        flat.pop("config_name")
    assert all(flat.keys() == flats[0].keys() for flat in flats)
    for i in range(3):
        for j in range(i + 1, 3):
            diff = {k for k in flats[i] if flats[i][k] != flats[j][k]}
            assert diff, f"{names[i]} and {names[j]} are identical"
            assert all(k.startswith("model.deform.") for k in diff), f"{names[i]} vs {names[j]} differ in {diff}"
    assert [flat["model.deform.version"] for flat in flats] == [0, 1, 2]


@pytest.mark.parametrize(
    "override, key, expected, expected_type",
    [
        ("train.iters=100", "train.iters", 100, int),
        ("train.lr=1", "train.lr", 1.0, float),
        ("train.lr=0.5", "train.lr", 0.5, float),
        ("model.deform.stages=[layer3,layer4]", "model.deform.stages", ["layer3", "layer4"], list),
        ("model.aux_head=false", "model.aux_head", False, bool),
        ("train.amp=none", "train.amp", "none", str),
        ("train.accum_steps=4", "train.accum_steps", 4, int),  # a key of two types: auto, or N
        ("train.accum_steps=auto", "train.accum_steps", "auto", str),
    ],
)
def test_override_keeps_the_type_of_the_value_it_replaces(
    override: str, key: str, expected: Any, expected_type: type
) -> None:
    value = flatten(load_config("def-conv-v2", [override]))[key]
    assert value == expected
    assert type(value) is expected_type


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.iters=abc", "train.iters"),
        ("train.iterz=5", "train.iterz"),
        ("model.aux_head=0", "model.aux_head"),
        ("model.deform=1", "model.deform"),
        ("train.iters", "train.iters"),
        ("=5", "=5"),
        # values that would only fail after training started: checked when the config is loaded
        ("eval.mode=sliding", "eval.mode"),
        ("train.log_interval=0", "train.log_interval"),
        ("train.val_interval=0", "train.val_interval"),
        ("train.iters=0", "train.iters"),
        ("train.amp=fp8", "train.amp"),
        ("data.cat_max_ratio=1.5", "data.cat_max_ratio"),
        ("data.ratio_range=[2.0,0.5]", "data.ratio_range"),
        ("train.min_lr=0.5", "train.min_lr"),
        ("model.deform.blocks=[5]", "model.deform.blocks"),
        ("data.resize_filter=lanczos", "data.resize_filter"),
        ("data.scale=[512]", "data.scale"),  # the transforms trust these: checked here, once
        ("data.crop_size=0", "data.crop_size"),
        ("train.accum_steps=0", "train.accum_steps"),
        ("train.accum_steps=many", "train.accum_steps"),
        ("train.accum_steps=3", "train.accum_steps"),  # does not divide the batch of 16
        ("train.accum_steps=16", "train.accum_steps"),  # 1 image per forward: BatchNorm needs 2
        ("train.batch_size=1", "train.batch_size"),
    ],
)
def test_bad_override_raises_user_error_naming_the_key(override: str, key: str) -> None:
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        load_config("def-conv-v2", [override])


@pytest.mark.parametrize(("override", "allowed"), [
    ("seed=18446744073709551616", "an integer in 0..2**64 - 1"),  # torch.manual_seed: "Overflow when unpacking long"
    ("model.num_classes=256", "an integer in 1..255"),  # class 255 would be the ignore index
    ("model.num_classes=1000000000", "an integer in 1..255"),  # a head of 512 x 10^9 weights
])
def test_edges_that_crashed_after_the_start_are_refused_at_load_with_the_range(override: str, allowed: str) -> None:
    """Issue 29, item 6: every key's edges were tried (smallest, largest, zero, huge, wrong types inside lists); these
    passed the check and then crashed with a traceback naming no key. Those that now train instead (a data.scale or
    data.ratio_range below one pixel, a num_classes below the labels' values) are in test_data.py."""
    key = override.split("=")[0]
    with pytest.raises(UserError, match=rf"config key '{key}' in .* must be {re.escape(allowed)}"):
        load_config("demo", [override])


def test_the_largest_seed_seeds_torch_and_the_data() -> None:
    seed = load_config("demo", [f"seed={2**64 - 1}"])["seed"]
    torch.manual_seed(seed)
    assert 0 <= sample_seed(seed, 3) < 2**63


def test_unknown_key_in_a_yaml_file_names_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text(f"base: {BASE_YAML}\ntrain:\n  iterz: 5\n")
    with pytest.raises(UserError, match=r"train\.iterz") as info:
        load_config(str(path))
    assert "typo.yaml" in str(info.value)


def test_child_yaml_value_of_wrong_type_raises(tmp_path: Path) -> None:
    path = tmp_path / "wrong-type.yaml"
    path.write_text(f"base: {BASE_YAML}\nmodel:\n  deform:\n    version: two\n")
    with pytest.raises(UserError, match=r"model\.deform\.version"):
        load_config(str(path))


def test_a_valid_child_yaml_in_another_folder_loads(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text(f"base: {BASE_YAML}\ntrain:\n  iters: 7\n")
    config = load_config(str(path))
    assert config["train"]["iters"] == 7
    assert config["config_name"] == "mine"
    assert "base" not in config


def test_second_level_of_inheritance_raises(tmp_path: Path) -> None:
    middle = tmp_path / "middle.yaml"
    middle.write_text(f"base: {BASE_YAML}\ntrain:\n  iters: 7\n")
    child = tmp_path / "child.yaml"
    child.write_text("base: middle.yaml\ntrain:\n  iters: 8\n")
    with pytest.raises(UserError, match="one level") as info:
        load_config(str(child))
    assert "middle.yaml" in str(info.value)


def test_missing_config_file_raises_naming_it(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="missing-config.yaml"):
        load_config(str(tmp_path / "missing-config.yaml"))
    with pytest.raises(UserError, match="nope"):
        load_config("nope")


def test_missing_base_file_raises_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "orphan.yaml"
    path.write_text("base: no-such-base.yaml\n")
    with pytest.raises(UserError, match="no-such-base.yaml"):
        load_config(str(path))


@pytest.mark.parametrize("text, message", [("model: [unclosed\n", "not valid YAML"), ("- a\n- b\n", "mapping")])
def test_invalid_yaml_raises_naming_the_file(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=message) as info:
        load_config(str(path))
    assert "broken.yaml" in str(info.value)


@pytest.mark.parametrize(
    "args, needle",
    [(["--config", "nope.yaml"], "nope.yaml"), (["--config", "def-conv-v2", "train.iters=abc"], "train.iters")],
)
def test_script_prints_a_one_paragraph_error_without_traceback(args: list[str], needle: str) -> None:
    proc = subprocess.run(
        [sys.executable, "scripts/model_info.py", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert "Traceback" not in proc.stderr
    assert err.startswith("error: ")
    assert "\n\n" not in err
    assert needle in err


def test_check_same_model() -> None:
    v2, norm = load_config("def-conv-v2"), load_config("norm-conv")
    with pytest.raises(UserError, match=r"model\.deform"):
        check_same_model(v2, norm, "last.pt", "norm-conv.yaml")
    check_same_model(v2, load_config("def-conv-v2"), "last.pt", "def-conv-v2.yaml")
    # Training settings are not part of the model.
    check_same_model(v2, load_config("def-conv-v2-160k", ["train.lr=0.1"]), "last.pt", "def-conv-v2-160k.yaml")
    with pytest.raises(UserError, match=r"model\.num_classes"):
        check_same_model(v2, load_config("def-conv-v2", ["model.num_classes=19"]), "last.pt", "x.yaml")


def test_scientific_notation_is_a_float() -> None:
    config = load_config("demo", ["train.lr=1e-3", "train.min_lr=1e-5"])
    assert config["train"]["lr"] == 0.001 and isinstance(config["train"]["lr"], float)
    assert config["train"]["min_lr"] == 1e-5

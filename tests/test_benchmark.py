"""Tests of scripts/benchmark.py: one tiny CPU run of every part, and its command-line errors."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import engine.benchmark as benchmark_lib
from scripts import benchmark

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    """JSON and stdout of a tiny CPU benchmark with --ops and --data (batch 1, crop 64).

    Without TRITON_INTERPRET, as a user's CPU run: the Triton kernels cannot run, so only the reference path is timed
    (the interpreter would take minutes at the model's 512 channels; test_loss_rows_with_triton covers those rows).
    """
    path = tmp_path_factory.mktemp("bench") / "x.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "scripts/benchmark.py", "--config", "demo.yaml", "--device", "cpu", "--batch-size", "1",
         "--crop", "64", "--iters", "2", "--warmup", "1", "--ops", "--data", "--data-samples", "2",
         "--data-images", "2", "--json", str(path)],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(path.read_text()), proc.stdout


def test_models_and_ratios(result: tuple[dict, str]) -> None:
    data, stdout = result
    assert data["device"] == "cpu" and data["gpu"] is None and data["torch"] == str(torch.__version__)
    assert data["settings"]["batch_size"] == 1 and data["settings"]["crop"] == 64 and data["settings"]["amp"] == "none"
    models = {m["name"]: m for m in data["models"]}
    assert list(models) == ["norm-conv", "def-conv-v1", "def-conv-v2"]
    assert data["settings"]["paths"] == ["reference"] and {m["path"] for m in models.values()} == {"reference"}
    assert models["norm-conv"]["train_ratio"] == 1.0 and models["norm-conv"]["infer_ratio"] == 1.0
    assert all(m["train_path_speedup"] == 1.0 for m in models.values())
    for m in models.values():
        assert m["train_images_per_s"] > 0 and m["infer_images_per_s"] > 0
        assert m["peak_mem_gib"] is None  # CPU: not measured
        assert m["train_ratio"] == pytest.approx(m["train_images_per_s"] / models["norm-conv"]["train_images_per_s"])
    assert "| def-conv-v2 |" in stdout


def test_ops_rows_agree_with_the_float64_reference(result: tuple[dict, str]) -> None:
    ops = [r for r in result[0]["ops"] if r["op"] != "upsample_cross_entropy"]
    # demo.yaml: layer4.0.conv2 (dilation 2) and layer4.1/.2.conv2 (dilation 4) at 1/8 of the 64 crop.
    shapes = sorted({r["shape"] for r in ops})
    assert shapes == ["1 x 512 x 8 x 8, k3 d2", "1 x 512 x 8 x 8, k3 d4"]
    for shape in shapes:
        rows = [r for r in ops if r["shape"] == shape]
        kinds = sorted((r["op"], r["impl"], r["offsets"] or "") for r in rows)
        assert kinds == [
            ("conv2d", "conv2d", ""),
            ("deform_conv2d", "torchvision", "random"), ("deform_conv2d", "torchvision", "zero"),
            ("deform_conv2d", "torchvision+mask", "random"), ("deform_conv2d", "torchvision+mask", "zero"),
        ]
    for r in ops:
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0
        assert 0 <= r["max_rel_err"] < 1e-4, r
    assert [r["layers"] for r in ops if r["op"] == "conv2d"][1] == ["backbone.layer4.1.conv2", "backbone.layer4.2.conv2"]
    loss_rows = [r for r in result[0]["ops"] if r["op"] == "upsample_cross_entropy"]
    assert [(r["impl"], r["shape"]) for r in loss_rows] == [("reference", "1 x 150 x 8 x 8 -> 64 x 64")]
    assert loss_rows[0]["max_rel_err"] < 1e-5 and loss_rows[0]["fwd_bwd_ms"] > 0
    assert "| upsample_cross_entropy | reference |" in result[1]


@pytest.mark.skipif(not benchmark_lib.triton_available("cpu"), reason="needs Triton >= 3.2 and its CPU interpreter")
def test_loss_rows_with_triton() -> None:
    """Where Triton runs (here its interpreter), --ops adds a triton row that agrees with the float64 reference."""
    config = benchmark_lib.load_config("demo.yaml")
    args = benchmark_lib.BenchOptions(config="demo.yaml", batch_size=2, crop=32, iters=1, warmup=0)
    rows = benchmark_lib.bench_loss_ops(config, args, torch.device("cpu"), None, torch.channels_last)
    assert [r["impl"] for r in rows] == ["reference", "triton"]
    for r in rows:
        assert r["shape"] == "2 x 150 x 4 x 4 -> 32 x 32" and r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0
        assert r["max_rel_err"] < 1e-5, r


def test_ratios_are_per_path() -> None:
    """× norm-conv compares within a path; the path speedup compares a variant's fast path to its reference."""
    rows = [
        {"deform_version": v, "path": p, "train_images_per_s": t, "infer_images_per_s": 1.0, "peak_mem_gib": None}
        for v, p, t in ((0, "reference", 100.0), (2, "reference", 60.0), (0, "triton", 200.0), (2, "triton", 190.0))
    ]
    benchmark_lib.add_ratios(rows)
    assert [r["train_ratio"] for r in rows] == [1.0, 0.6, 1.0, 0.95]
    assert [r["train_path_speedup"] for r in rows] == [1.0, 1.0, 2.0, 190.0 / 60.0]
    assert all(r["mem_ratio"] is None for r in rows)


def test_triton_path_without_triton_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(benchmark_lib, "triton_available", lambda device: False)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = benchmark.main(["--config", "demo.yaml", "--device", "cpu", "--paths", "reference,triton"])
    assert code == 2 and "--paths triton needs the Triton kernels" in err.getvalue()


def test_data_section(result: tuple[dict, str]) -> None:
    data = result[0]["data"]
    assert data["samples"] == 2 and data["samples_per_s_per_worker"] > 0
    assert data["recipe"]["crop_size"] == 512 and data["sample_shape"] == [[3, 512, 512], [512, 512]]
    need = data["workers_needed"][0]
    assert need["images_per_s"] == 150 and need["workers"] >= 1
    assert need["workers"] == -(-150 // data["samples_per_s_per_worker"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--variants", "norm,v3"], "--variants"),
        (["--paths", "quick"], "--paths"),
        (["--crop", "60"], "multiple of 8"),
        (["--iters", "0"], "--iters"),
        (["--config", "no-such-config"], "no-such-config"),
    ],
)
def test_bad_arguments_are_user_errors(argv: list[str], message: str) -> None:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = benchmark.main(["--config", "demo.yaml", "--device", "cpu", *argv])
    assert code == 2 and err.getvalue().startswith("error: ") and message in err.getvalue()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_a_user_error() -> None:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = benchmark.main(["--config", "demo.yaml", "--device", "cuda"])
    assert code == 2 and "--device cpu" in err.getvalue()

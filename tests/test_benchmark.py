"""scripts/benchmark.py: a tiny CPU run of the speed and --ops tables, the memory table's fit and CPU measurement,
and the command line's errors."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

from configs import load_config
from engine import benchmark as benchmark_lib
from engine.diagnosis import DeviceInfo, read_device_info
from engine.memory import CARDS_GIB, STEP_GIB, fewest_that_fit, step_gib
from scripts import benchmark

GIB = 2**30
NO_GPU = DeviceInfo("2.14.1", "13.0", ("sm_75",), False, None, None, None)


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    """JSON and stdout of a tiny CPU benchmark of the reference path with --ops (batch 1, crop 64, one round).

    Only the reference path: in Triton's CPU interpreter the kernels would take minutes at the model's 512 channels
    (their errors at small shapes: tests/test_gpu_check.py).
    """
    path = tmp_path_factory.mktemp("bench") / "x.json"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = benchmark.main(["--config", "demo.yaml", "--device", "cpu", "--batch-size", "1", "--crop", "64",
                               "--variants", "norm,v2", "--paths", "reference", "--rounds", "1", "--min-time", "0",
                               "--ops", "--json", str(path)])
    assert code == 0
    return json.loads(path.read_text()), out.getvalue()


def test_models_and_ratios(result: tuple[dict, str]) -> None:
    data, stdout = result
    assert data["device"].startswith("CPU, torch") and "batch 1" in data["settings"]
    models = {m["name"]: m for m in data["models"]}
    assert list(models) == ["norm-conv", "def-conv-v2"]
    assert {(m["path"], m["amp"]) for m in models.values()} == {("reference", "none")}  # demo.yaml: auto -> none
    for m in models.values():
        assert m["train_images_per_s"] > 0 and m["infer_images_per_s"] > 0 and m["peak_gib"] is None
        assert m["train_x_norm"] == pytest.approx(m["train_images_per_s"] / models["norm-conv"]["train_images_per_s"])
        assert m["train_x_reference"] == 1.0 and m["infer_x_reference"] == 1.0
    assert models["norm-conv"]["train_x_norm"] == 1.0 and "| def-conv-v2 | reference | none |" in stdout


def test_ops_rows_agree_with_float64(result: tuple[dict, str]) -> None:
    data, stdout = result
    # demo.yaml: layer4.0.conv2 (dilation 2) and layer4.1/.2.conv2 (dilation 4) at 1/8 of the 64 crop.
    assert [(r["op"], r["impl"], r["shape"]) for r in data["ops"]] == [
        ("conv2d", "F.conv2d", "1 x 512 x 8 x 8, dilation 2"),
        ("deform_conv2d v1", "reference", "1 x 512 x 8 x 8, dilation 2"),
        ("deform_conv2d v2", "reference", "1 x 512 x 8 x 8, dilation 2"),
        ("conv2d", "F.conv2d", "1 x 512 x 8 x 8, dilation 4"),
        ("deform_conv2d v1", "reference", "1 x 512 x 8 x 8, dilation 4"),
        ("deform_conv2d v2", "reference", "1 x 512 x 8 x 8, dilation 4"),
        ("upsample_cross_entropy", "reference", "1 x 150 x 8 x 8 -> 64 x 64"),
    ]
    for r in data["ops"]:
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and 0 < r["max_rel_err"] < 1e-5, r
        assert r["max_rel_err"] == max(r["errors"].values())
    assert set(data["ops"][2]["errors"]) == {"output", "grad input", "grad offset", "grad weight", "grad mask"}
    assert "| upsample_cross_entropy | reference | 1 x 150 x 8 x 8 -> 64 x 64 |" in stdout


def test_memory_fit_and_the_cards() -> None:
    fit = benchmark_lib.memory_fit({2: int(4.5 * GIB), 1: 3 * GIB})
    assert fit["per_image_gib"] == 1.5 and fit["fixed_gib"] == 1.5
    # batch 16 at accum n: 1.5 + 1.5 * 16 / n GiB against 90% of the card.
    assert fit["accum_steps"] == {16: 2, 24: 2, 40: 1, 80: 1}
    heavy = benchmark_lib.memory_fit({1: 21 * GIB, 2: 41 * GIB})  # 20 GiB per image
    assert heavy["accum_steps"] == {16: None, 24: None, 40: None, 80: 8}  # at least 2 images per forward


def test_cpu_memory_rows_measure_a_process_peak_that_grows_with_the_batch() -> None:
    """Each case in its own process: a larger batch has a larger peak, and the per-image figure is the memory table's
    (engine/memory.py, at 512x512) scaled to the crop's area, within a factor of 2. At 128x128 the 3 images between
    the batches add ~0.3 GiB, several times a process peak's run-to-run noise (~0.07 GiB; at 64x64 it drowned the
    slope). v2 in bf16 runs too: CPU autocast with the deformable op in fp32 (torchvision's CUDA rule)."""
    config, cpu, device_info = load_config("demo.yaml"), torch.device("cpu"), read_device_info()
    (norm,) = benchmark_lib.memory_rows(config, ["norm"], ["none"], (1, 4), cpu, device_info, 128)
    assert norm["peak_gib"][4] > norm["peak_gib"][1] > 0.2  # the interpreter and torch alone are more than that
    table = STEP_GIB[(0, "none")][0] * (128 / 512) ** 2
    assert table / 2 < norm["per_image_gib"] < table * 2 and norm["fixed_gib"] > 0.2, (norm, table)
    v2 = benchmark_lib.case_config(config, 2, "reference", "bf16", cpu, device_info)
    assert benchmark_lib.training_peak(v2, cpu, 2, 32) > 0.2 * 2**30  # torchvision itself has no bf16 CPU kernel
    table = benchmark.report({"device": "CPU, torch x", "settings": "s", "memory": [norm]})
    assert "| norm-conv | none | " in table and "CPU process peak of one training step at 128x128" in table


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--variants", "norm,v3"], "--variants"),
        (["--paths", "quick"], "--paths"),
        (["--amp", "bf32"], "--amp"),
        (["--crop", "60"], "multiple of 8"),
        (["--rounds", "0"], "--rounds"),
        (["--memory", "--memory-batches", "2"], "--memory-batches"),
        (["--config", "no-such-config"], "no-such-config"),
        (["--amp", "bf16"], "--amp bf16 on the CPU is for --memory only"),  # before: a traceback from torchvision
        (["--amp", "none,fp16", "--ops"], "--amp fp16 on the CPU is for --memory only"),
    ],
)
def test_bad_arguments_are_user_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    assert benchmark.main(["--config", "demo.yaml", "--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_cpu_bf16_still_runs_the_memory_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """--memory is where CPU bf16 runs (the deformable op in fp32 in each case's process): not refused."""
    asked = []
    monkeypatch.setattr(benchmark, "memory_rows", lambda config, variants, amps, *rest: asked.append(amps) or [])
    assert benchmark.main(["--config", "demo.yaml", "--device", "cpu", "--amp", "bf16", "--memory"]) == 0
    assert asked == [["bf16"]]


def test_out_of_memory_on_either_device_is_one_paragraph(monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture) -> None:
    """The CPU allocator's refusal is treated as CUDA's (engine.memory.is_out_of_memory); other errors pass."""
    error = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")

    def run(args: object) -> dict:
        raise error

    monkeypatch.setattr(benchmark, "run", run)
    assert benchmark.main(["--config", "demo.yaml", "--device", "cpu", "--batch-size", "64"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: out of memory at --batch-size 64") and err.count("\n") == 1
    error = RuntimeError("a bug")
    with pytest.raises(RuntimeError, match="a bug"):
        benchmark.main(["--config", "demo.yaml", "--device", "cpu"])


def test_triton_path_without_triton_is_a_user_error(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(benchmark, "triton_available", lambda device: False)
    assert benchmark.main(["--config", "demo.yaml", "--device", "cpu", "--paths", "reference,triton"]) == 2
    assert "--paths triton needs the Triton kernels" in capsys.readouterr().err


def test_cuda_without_a_usable_gpu_is_a_user_error(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(benchmark, "read_device_info", lambda: NO_GPU)
    assert benchmark.main(["--config", "demo.yaml", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "CUDA is not usable here" in err and "--device cpu" in err


def test_the_documented_memory_table_is_engine_memorys() -> None:
    """The table of docs/gpu-and-clusters.md and the figures the advice and gpu_check.py's plan use cannot drift
    apart."""
    page = (Path(__file__).resolve().parents[1] / "docs" / "gpu-and-clusters.md").read_text(encoding="utf-8")
    rows = [line.split(" | ") for line in page.splitlines()
            if line.startswith("| ") and line.endswith("| not measured yet |")]
    versions, found = {"norm-conv": 0, "def-conv-v1": 1, "def-conv-v2": 2}, {}
    for row in rows:
        key = (versions[row[0].strip("| ")], "none" if row[1] == "fp32" else row[1].split()[0])
        per_image, fixed = (float(cell.split()[0]) for cell in row[2:4])
        found[key] = (per_image, fixed)
        fits = [fewest_that_fit(lambda b: step_gib(*key, 512, b), 16, 1, card) for card in CARDS_GIB]
        assert row[4:8] == [f"accum {n}" for n in fits], row
    assert found == STEP_GIB

"""scripts/gpu_check.py's CPU-testable parts: the cases a GPU gets, the real case runner at tiny shapes, the
tolerances, the table and its JSON, the exit codes. Triton's ops run in its CPU interpreter (tests/conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.device import DeviceFacts, device_facts
from scripts import gpu_check

TINY = {"batch": 2, "crop": 32, "eval_size": (32, 48), "width": 8, "min_run_time": 0.0}


def gpu(name: str, capability: tuple[int, int]) -> DeviceFacts:
    return DeviceFacts("2.14.1", "13.0", ("sm_75", "sm_80", "sm_90"), True, name, capability, "580.65.06")


A100, T4, H100 = gpu("NVIDIA A100-SXM4-40GB", (8, 0)), gpu("Tesla T4", (7, 5)), gpu("NVIDIA H100 80GB HBM3", (9, 0))


@pytest.mark.parametrize(("facts", "amps"), [(A100, ["bf16", "fp16", "none"]), (H100, ["bf16", "fp16", "none"]),
                                             (T4, ["fp16", "none"])])
def test_cases_follow_the_gpus_precisions(facts: DeviceFacts, amps: list[str]) -> None:
    cases = gpu_check.check_cases(facts)
    names = [case["name"] for case in cases]
    assert len(names) == len(set(names))
    eager = [c for c in cases if c["kind"] == "train" and c["path"] == "reference" and not c["compile"]]
    assert {(c["variant"], c["amp"], c["channels_last"]) for c in eager} == {
        (v, amp, cl) for v in ("norm", "v1", "v2") for amp in amps for cl in (True, False)}
    ops = [c for c in cases if c["kind"] == "op"]
    assert {(c["op"], c["impl"], c["amp"]) for c in ops} == {
        (op, impl, amp) for op in ("deform v1", "deform v2", "loss") for impl in ("reference", "triton")
        for amp in amps}
    rest = [c for c in cases if c not in eager and c not in ops]  # eval, Triton paths, compile: train.amp=auto's pick
    assert {c["amp"] for c in rest} == {amps[0]} and len(rest) == 6 + 3 + 4
    assert {(c["variant"], c["path"]) for c in rest if c.get("compile")} == {
        ("norm", "reference"), ("v1", "reference"), ("v2", "reference"), ("v2", "triton")}
    assert all(c.get("compile") for c in cases[-4:])  # the slow ones last


def test_the_case_runner_on_the_cpu(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The real runner at tiny shapes: passing cases, a failing one reported in its row, the table and the JSON."""
    by_name = {case["name"]: case for case in gpu_check.check_cases(A100)}
    cases = [by_name["train norm-conv none contiguous"], by_name["train def-conv-v2 bf16 contiguous"],
             by_name["deform v2 triton none"], by_name["deform v1 triton fp16"], by_name["loss triton bf16"],
             by_name["loss reference none"], dict(by_name["eval norm-conv slide bf16"], amp="none", name="eval slide")]
    rows = gpu_check.run_checks(cases, torch.device("cpu"), device_facts(), TINY, tmp_path)
    status = {row["case"]: row["status"] for row in rows}
    assert status.pop("train def-conv-v2 bf16 contiguous") == "FAIL"  # torchvision has no bf16 CPU kernel
    assert set(status.values()) == {"ok"}, rows
    train, failed = rows[0], rows[1]
    assert train["images_per_s"] > 0 and train["peak_gib"] is None and train["detail"].startswith("loss ")
    assert "not implemented for 'BFloat16'" in failed["detail"] and failed["images_per_s"] is None
    for row in rows[2:6]:
        assert "max rel err" in row["detail"] and "grad " in row["detail"]
    assert rows[-1]["images_per_s"] > 0
    record = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [r["case"] for r in record["rows"]] == [c["name"] for c in cases] and record["cases_left"] == 0
    assert record["tolerances"] == gpu_check.TOLERANCES
    out = capsys.readouterr().out
    assert "img/s" in out and "6 of 7 cases passed; not passed: train def-conv-v2 bf16 contiguous" in out
    assert gpu_check.exit_code(rows) == 1 and gpu_check.exit_code([r for r in rows if r["status"] == "ok"]) == 0


def test_an_error_above_the_tolerance_is_a_mismatch(monkeypatch: pytest.MonkeyPatch) -> None:
    case = next(c for c in gpu_check.check_cases(T4) if c["name"] == "deform v2 reference none")
    row = gpu_check.run_case(case, torch.device("cpu"), device_facts(), TINY)
    assert row["status"] == "ok" and "(tolerance 1e-04)" in row["detail"]
    monkeypatch.setitem(gpu_check.TOLERANCES, "deform", {"none": 1e-9})  # below fp32's rounding
    row = gpu_check.run_case(case, torch.device("cpu"), device_facts(), TINY)
    assert row["status"] == "mismatch" and "(tolerance 1e-09)" in row["detail"]
    assert gpu_check.exit_code([row]) == 1


def test_without_cuda_one_line_and_exit_2(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    no_gpu = DeviceFacts("2.14.1", "13.0", ("sm_75",), False, None, None, None)
    monkeypatch.setattr(gpu_check, "device_facts", lambda: no_gpu)
    assert gpu_check.main(["--out", "unused"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "CUDA is not usable here" in err and "no NVIDIA GPU or driver was found" in err
    assert "--device cpu" not in err and "no CPU mode" in err

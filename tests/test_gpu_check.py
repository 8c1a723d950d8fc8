"""scripts/gpu_check.py's CPU-testable parts: the cases a GPU gets, the plan (memory table, estimated time), the real
case runner at tiny shapes (an injected out-of-memory too), the tolerances, the table and its JSON, the exit codes.
Triton's ops run in its CPU interpreter (tests/conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine import benchmark as benchmark_lib
from engine.diagnosis import DeviceInfo, read_device_info
from scripts import gpu_check

TINY = {"batch": 2, "crop": 32, "eval_size": (32, 48), "op_batch": 2, "width": 8, "min_run_time": 0.0}


def gpu(name: str, capability: tuple[int, int]) -> DeviceInfo:
    return DeviceInfo("2.14.1", "13.0", ("sm_75", "sm_80", "sm_90"), True, name, capability, "580.65.06")


A100, T4, H100 = gpu("NVIDIA A100-SXM4-40GB", (8, 0)), gpu("Tesla T4", (7, 5)), gpu("NVIDIA H100 80GB HBM3", (9, 0))
NO_GPU = DeviceInfo("2.14.1", "13.0", ("sm_75",), False, None, None, None)


@pytest.mark.parametrize(("device_info", "amps"), [(A100, ["bf16", "fp16", "none"]), (H100, ["bf16", "fp16", "none"]),
                                             (T4, ["fp16", "none"])])
def test_full_cases_follow_the_gpus_precisions(device_info: DeviceInfo, amps: list[str]) -> None:
    cases = gpu_check.check_cases(device_info.capability, full=True)
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


@pytest.mark.parametrize("device_info", [A100, H100, T4])
def test_the_default_set_is_every_path_once_and_one_compiled_model(device_info: DeviceInfo) -> None:
    """Every model in train.amp=auto's precision and def-conv-v2 in fp32, the Triton ops and path, both evaluation
    modes, one torch.compile (the last case); on an H100 its estimate is under 3 minutes, and every case fits."""
    cases, auto = gpu_check.check_cases(device_info.capability), gpu_check.precisions(device_info.capability)[0]
    train = [(c["variant"], c["amp"], c["path"], c["compile"]) for c in cases if c["kind"] == "train"]
    assert train == [("norm", auto, "reference", False), ("v1", auto, "reference", False),
                     ("v2", auto, "reference", False), ("v2", "none", "reference", False),
                     ("v2", auto, "triton", False), ("v2", auto, "reference", True)]
    assert [(c["op"], c["impl"], c["amp"]) for c in cases if c["kind"] == "op"] == [
        ("deform v1", "triton", auto), ("deform v2", "triton", auto), ("loss", "triton", auto)]
    assert [c["mode"] for c in cases if c["kind"] == "eval"] == ["whole", "slide"]
    total = sum(gpu_check.estimate_s(c) for c in cases)
    assert total < gpu_check.BUDGET_S == 180
    assert all(gpu_check.plan_case(c, 80, gpu_check.RECIPE)["accum"] in (None, 1) for c in cases)


def test_the_plan_splits_the_batch_as_the_memory_table_says(monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture) -> None:
    """No GPU needed: fp32 def-conv-v2 takes 2 micro-batches on 24 GiB, 4 on 16 (not a failure); on 3 GiB nothing
    fits and says how much it needs; the estimated time counts the cases that fit."""
    monkeypatch.setattr(gpu_check, "read_device_info", lambda: NO_GPU)
    assert gpu_check.main(["--plan", "--memory-gib", "16,24,40,80"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("train def-conv-v2 none channels_last"))
    assert row.split()[4:] == ["4x4", "(7.8)", "8x2", "(14.5)", "16x1", "(27.9)", "16x1", "(27.9)", "12"]
    assert "11 cases, for compute capability 8.0 (precisions bf16, fp16, none)" in out
    assert "estimated time" in out and "2 min 44 s" in out and "not measured" in out
    assert gpu_check.main(["--plan", "--memory-gib", "3", "--capability", "7.5"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("train def-conv-v2 none channels_last"))
    assert row.split()[4:] == ["no", "fit", "(needs", "4.5)", "12"] and " bf16" not in out
    assert "0 min 28 s" in out  # the 5 cases that are not training: 6 + 6 + 6 + 5 + 5 s
    assert gpu_check.main(["--plan"]) == 2
    assert "--plan without a usable GPU needs --memory-gib" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message"), [(["--plan", "--memory-gib", "0"], "--memory-gib must be positive"),
                                               (["--plan", "--memory-gib", "nan"], "--memory-gib must be positive"),
                                               (["--plan", "--memory-gib", "24,inf"], "like 24 or 16,24,40,80"),
                                               (["--plan", "--memory-gib", "24", "--capability", "8"], "--capability"),
                                               (["--capability", "8.0"], "give it with --plan"),
                                               (["--memory-gib", "16,24"], "a check runs on one card")])
def test_bad_arguments_are_one_line(argv: list[str], message: str, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(gpu_check, "read_device_info", lambda: NO_GPU)
    assert gpu_check.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_an_unwritable_out_is_refused_before_any_case(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture) -> None:
    """--out under a file: one paragraph before any case runs (before: a traceback from mkdir)."""
    monkeypatch.setattr(gpu_check, "read_device_info", lambda: A100)
    monkeypatch.setattr(gpu_check, "with_nvidia_smi", lambda info: info)
    monkeypatch.setattr(gpu_check, "run_checks", lambda *args: pytest.fail("a case ran"))
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert gpu_check.main(["--out", str(blocker / "check")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write to ") and "nothing was checked" in err and err.count("\n") == 1


def test_help_is_plain_text(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        gpu_check.main(["--help"])
    out = capsys.readouterr().out
    assert "--plan" in out and "``" not in out and "python scripts/gpu_check.py --plan --memory-gib 16,24,40,80" in out


def test_the_case_runner_on_the_cpu(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The real runner at tiny shapes: passing cases, a failing one reported in its row, the table and the JSON; then
    a card too small for the step: the case is reported as not fitting (not run, not a failure)."""
    by_name = {case["name"]: case for case in gpu_check.check_cases(A100.capability, full=True)}
    cases = [by_name["train norm-conv none contiguous"], by_name["train def-conv-v2 bf16 contiguous"],
             by_name["deform v2 triton none"], by_name["deform v1 triton fp16"], by_name["loss triton bf16"],
             by_name["loss reference none"], dict(by_name["eval norm-conv slide bf16"], amp="none", name="eval slide")]
    rows = gpu_check.run_checks(cases, torch.device("cpu"), read_device_info(), TINY, 24, tmp_path)
    status = {row["case"]: row["status"] for row in rows}
    assert status.pop("train def-conv-v2 bf16 contiguous") == "FAIL"  # torchvision has no bf16 CPU kernel
    assert set(status.values()) == {"ok"}, rows
    train, failed = rows[0], rows[1]
    assert train["images_per_s"] > 0 and train["peak_gib"] is None and train["detail"].startswith("2x1: loss ")
    assert "not implemented for 'BFloat16'" in failed["detail"] and failed["images_per_s"] is None
    for row in rows[2:6]:
        assert "max rel err" in row["detail"] and "grad " in row["detail"]
    assert rows[-1]["images_per_s"] > 0
    record = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [r["case"] for r in record["rows"]] == [c["name"] for c in cases] and record["cases_left"] == 0
    assert record["tolerances"] == gpu_check.TOLERANCES and record["memory_gib"] == 24
    out = capsys.readouterr().out
    assert "img/s" in out and "6 of 7 cases passed; not passed: train def-conv-v2 bf16 contiguous;" in out
    assert gpu_check.exit_code(rows) == 1 and gpu_check.exit_code([r for r in rows if r["status"] == "ok"]) == 0

    (unfit,) = gpu_check.run_checks(cases[:1], torch.device("cpu"), read_device_info(), TINY, 1.0, tmp_path)
    assert unfit["status"] == "no fit" and unfit["seconds"] < 1  # nothing was built
    assert unfit["detail"] == "needs 1.1 GiB at 2 images per forward (the memory table in docs/gpu-and-clusters.md)"
    assert "0 of 1 cases passed; do not fit this card: train norm-conv none contiguous;" in capsys.readouterr().out
    assert gpu_check.exit_code([unfit]) == 0


def test_a_training_case_that_runs_out_of_memory_takes_more_micro_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """The plan's split runs out of memory (an injected fault): the case runs with the next accepted split, as
    train.accum_steps=auto would; where every split runs out of memory, the row says so ("no fit", not FAIL)."""
    real, seen = benchmark_lib.train_step, []

    def oom_above(limit: int):  # type: ignore[no-untyped-def]
        def step(model, optimizer, scaler, images, labels, config):  # type: ignore[no-untyped-def]
            seen.append(images.shape[0] // config["train"]["accum_steps"])
            if seen[-1] > limit:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
            return real(model, optimizer, scaler, images, labels, config)
        return step

    shapes = dict(TINY, batch=4)
    case = next(c for c in gpu_check.check_cases(A100.capability) if c["name"] == "train norm-conv bf16 channels_last")
    case = dict(case, amp="none") | gpu_check.plan_case(dict(case, amp="none"), 24, shapes)
    monkeypatch.setattr(benchmark_lib, "train_step", oom_above(2))
    row = gpu_check.run_case(case, torch.device("cpu"), read_device_info(), shapes)
    assert row["status"] == "ok" and row["detail"].startswith("2x2 (planned 4x1): loss ") and seen[0] == 4
    monkeypatch.setattr(benchmark_lib, "train_step", oom_above(1))
    row = gpu_check.run_case(case, torch.device("cpu"), read_device_info(), shapes)
    assert row["status"] == "no fit" and row["detail"] == "out of memory even at 2 images per forward"


def test_an_error_above_the_tolerance_is_a_mismatch(monkeypatch: pytest.MonkeyPatch) -> None:
    case = next(c for c in gpu_check.check_cases(T4.capability, full=True) if c["name"] == "deform v2 reference none")
    row = gpu_check.run_case(case, torch.device("cpu"), read_device_info(), TINY)
    assert row["status"] == "ok" and "(tolerance 1e-04)" in row["detail"]
    monkeypatch.setitem(gpu_check.TOLERANCES, "deform", {"none": 1e-9})  # below fp32's rounding
    row = gpu_check.run_case(case, torch.device("cpu"), read_device_info(), TINY)
    assert row["status"] == "mismatch" and "(tolerance 1e-09)" in row["detail"]
    assert gpu_check.exit_code([row]) == 1


def test_without_cuda_one_line_and_exit_2(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(gpu_check, "read_device_info", lambda: NO_GPU)
    assert gpu_check.main(["--out", "unused"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "CUDA is not usable here" in err and "no NVIDIA GPU or driver was found" in err
    assert "--device cpu" not in err and "no CPU mode" in err


def test_the_docs_show_the_plan_as_printed(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(gpu_check, "read_device_info", lambda: NO_GPU)
    assert gpu_check.main(["--plan", "--memory-gib", "16,24,40,80"]) == 0
    page = (Path(__file__).resolve().parents[1] / "docs" / "gpu-and-clusters.md").read_text(encoding="utf-8")
    assert f"$ python scripts/gpu_check.py --plan --memory-gib 16,24,40,80\n{capsys.readouterr().out}```" in page

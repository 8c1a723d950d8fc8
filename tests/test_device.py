"""The device and precision decisions, with other machines' DeviceInfo passed in (no GPU needed)."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import torch

from configs import UserError, batch_split_error, flatten, load_config, set_values, validate_config
from engine import device, diagnosis
from engine.device import choose_device, nonfinite_advice, resolve_amp, resolve_config
from engine.diagnosis import DeviceInfo, arch_supported, cuda_usable
from engine.memory import WHERE, memory_advice, out_of_memory_message

CU13_ARCHS = ("sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120")


def device_info(**changes: object) -> DeviceInfo:
    """An H100 with a CUDA 13 build of torch and a recent driver, changed where a test says."""
    base = dict(torch="2.14.1", cuda="13.0", arch_list=CU13_ARCHS, available=True, gpu="NVIDIA H100 80GB HBM3",
                capability=(9, 0), driver="580.65.06")
    return DeviceInfo(**{**base, **changes})  # type: ignore[arg-type]


NO_GPU = device_info(available=False, arch_list=(), gpu=None, capability=None, driver=None)
OLD_DRIVER = device_info(available=False, arch_list=(), gpu="NVIDIA GeForce RTX 3090", capability=(8, 6), driver="535.129.03",
                   init_warning="The NVIDIA driver on your system is too old (found version 12020).")
V100 = device_info(gpu="Tesla V100-SXM2-32GB", capability=(7, 0))


@pytest.mark.parametrize(("capability", "archs", "expected"), [
    ((9, 0), CU13_ARCHS, True),
    ((8, 9), CU13_ARCHS, True),  # sm_86 kernels run on 8.9 (same major, newer minor)
    ((7, 0), CU13_ARCHS, False),  # a V100 with a build that starts at sm_75
    ((7, 0), ("sm_50", "sm_70", "sm_80"), True),
    ((12, 1), ("sm_90", "compute_90"), True),  # PTX is compiled for newer GPUs at run time
    ((12, 1), ("sm_90", "sm_100"), False),
    ((9, 0), ("sm_90a",), True),
])
def test_a_build_runs_on_the_architectures_cuda_says_it_does(capability, archs, expected) -> None:
    assert arch_supported(capability, archs) is expected


def test_auto_takes_a_usable_gpu_and_the_cpu_only_for_a_config_meant_for_it() -> None:
    ade, demo = load_config("def-conv-v2.yaml"), load_config("demo.yaml")
    assert choose_device("auto", ade, device_info()) == "cuda"
    assert choose_device("auto", demo, NO_GPU) == "cpu"  # the demo runs on a CPU without flags
    assert choose_device("cpu", ade, device_info()) == "cpu"  # deliberately
    assert not cuda_usable(V100)


@pytest.mark.parametrize(("machine", "cause"), [
    (NO_GPU, "no NVIDIA GPU or driver was found"),
    (OLD_DRIVER, "the driver 535.129.03 is older than CUDA 13.0 needs (the R580 series or newer)"),
    (V100, "no kernels for the GPU's architecture sm_70"),
    (device_info(cuda=None, available=False, arch_list=(), gpu=None, capability=None, driver=None), "a CPU-only build"),
])
def test_an_ade20k_config_without_a_usable_gpu_stops_with_the_cause_and_the_fix(machine: DeviceInfo, cause: str) -> None:
    with pytest.raises(UserError) as err:
        choose_device("auto", load_config("def-conv-v2.yaml"), machine)
    text = str(err.value)
    assert "data.dataset=ade20k" in text and cause in text
    assert "requirements-gpu.txt" in text and "--device cpu" in text and "\n" not in text
    if machine.gpu:
        assert machine.gpu in text


@pytest.mark.parametrize("override", ["train.amp=bf16", "train.compile=true", "model.deform_op=triton"])
def test_any_gpu_setting_on_the_demo_asks_for_a_gpu(override: str) -> None:
    with pytest.raises(UserError, match=override.replace("true", "true").split("=")[0]):
        choose_device("auto", load_config("demo.yaml", [override]), NO_GPU)


def test_device_cuda_without_cuda_is_refused_even_for_the_demo() -> None:
    with pytest.raises(UserError, match="--device cuda was asked for"):
        choose_device("cuda", load_config("demo.yaml"), NO_GPU)


@pytest.mark.parametrize(("name", "device", "capability", "expected"), [
    ("auto", "cuda", (9, 0), "bf16"),
    ("auto", "cuda", (8, 0), "bf16"),
    ("auto", "cuda", (7, 5), "fp16"),  # a T4
    ("auto", "cpu", None, "none"),
    ("fp16", "cuda", (7, 0), "fp16"),
    ("none", "cuda", (9, 0), "none"),
])
def test_amp_resolves_to_what_the_gpu_runs_natively(name, device, capability, expected) -> None:
    assert resolve_amp(name, device, capability) == expected


def test_bf16_on_a_gpu_without_native_bf16_proposes_fp16() -> None:
    with pytest.raises(UserError, match="train.amp=fp16"):
        resolve_amp("bf16", "cuda", (7, 5))
    with pytest.raises(UserError, match="GPU setting"):
        resolve_amp("bf16", "cpu", None)


def test_the_resolved_config_says_what_runs() -> None:
    config = load_config("def-conv-v2.yaml", ["model.deform_op=triton"])
    on_cpu = resolve_config(config, torch.device("cpu"), NO_GPU)
    assert on_cpu["train"]["amp"] == "none" and on_cpu["train"]["channels_last"] is False
    assert config["train"]["amp"] == "auto"  # the config asked for is left alone
    t4 = resolve_config(config, torch.device("cuda"), device_info(gpu="Tesla T4", capability=(7, 5)))
    assert t4["train"]["amp"] == "fp16" and t4["train"]["channels_last"] is True and t4["model"]["deform_op"] == "triton"


def test_train_py_on_a_machine_without_a_usable_gpu(make_ade_tree, tmp_path, monkeypatch, capsys) -> None:
    """An ADE20K config stops before any work with the paragraph (nothing written); --device cpu trains it."""
    import train
    from engine.checkpoint import load_checkpoint

    monkeypatch.setattr(train, "read_device_info", lambda: OLD_DRIVER)
    tree, work_dir = make_ade_tree(), tmp_path / "run"
    small = [f"data.root={tree}", "model.pretrained_backbone=false", "data.num_workers=0", "data.scale=[48,48]",
             "data.crop_size=32", "train.batch_size=2", "train.iters=1", "train.tb_images=0"]
    assert train.main(["--config", "def-conv-v2.yaml", "--work-dir", str(work_dir), *small]) == 2
    err = capsys.readouterr().err
    assert "CUDA is not usable here" in err and "NVIDIA GeForce RTX 3090" in err and "--device cpu" in err
    assert not work_dir.exists()
    assert train.main(["--config", "def-conv-v2.yaml", "--work-dir", str(work_dir), "--device", "cpu", *small]) == 0
    out = capsys.readouterr().out
    assert "1 process(es) on CPU" in out and "2 per forward x 1 micro-batch(es) per step in each; train.accum_steps=" \
                                              "auto is 1 on the CPU)" in out  # no trial steps: the CPU swaps
    train_config = load_checkpoint(work_dir / "last.pt")["config"]["train"]
    assert train_config["amp"] == "none" and train_config["accum_steps"] == 1  # auto, resolved for the CPU


# ------------------------------------------------------------------------------------------ the advice table
CAPABILITIES = {"CPU": None, "T4": (7, 5), "A100": (8, 0), "H100": (9, 0)}
IN_FORCE = [(amp, name) for name, capability in CAPABILITIES.items() for amp in ("bf16", "fp16", "none")
            if amp == "none" or (capability is not None and (amp == "fp16" or capability >= (8, 0)))]


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("accum", [1, 2, 8])
@pytest.mark.parametrize(("amp", "card"), IN_FORCE)
def test_advice_proposes_only_settings_this_device_accepts_and_not_in_force(amp: str, card: str, accum: int,
                                                                            where: str) -> None:
    """Every out-of-memory and non-finite-loss proposal, for every precision a device runs, is accepted there (the
    config check, resolve_amp, the batch split) and differs from what is in force."""
    capability, device = CAPABILITIES[card], "cpu" if card == "CPU" else "cuda"
    config = load_config("def-conv-v2.yaml", [f"train.accum_steps={accum}", "eval.scales=[1.0,1.5]"])
    config["train"]["amp"] = amp  # resolved: what runs
    proposals = memory_advice(where, config, amp, 1, device, 15.0 if device == "cuda" else 23.0)
    proposals += nonfinite_advice(config, device, capability) if where == "training" else []
    for p in proposals:
        if p.key == "train.amp":
            assert resolve_amp(p.value, device, capability) != amp  # raises UserError where the device refuses it
            continue
        changed = set_values(config, {p.key: p.value}, "a proposal")
        validate_config(changed, "a proposal")
        assert flatten(changed)[p.key] != flatten(config)[p.key]
        if p.key == "train.accum_steps":
            assert batch_split_error(16, p.value, 1) is None and p.value > accum
    keys = [p.key for p in proposals]
    assert ("train.accum_steps" in keys) is (where == "training" and accum < 8)  # 8: 2 images per forward, the least
    assert ("eval.mode" in keys) is ("eval.scales" in keys) is (where != "training")
    assert keys.count("train.amp") == (device == "cuda" and amp == "none") + (where == "training" and amp != "none")


def test_the_paragraph_spells_settings_as_the_command_that_takes_them() -> None:
    config = load_config("def-conv-v2.yaml", ["train.accum_steps=1", "eval.scales=[0.5,1.0,1.75]"])
    config["train"]["amp"] = "none"
    training = out_of_memory_message("training", config, "none", 1, "cuda", 23.6, "at iteration 3")
    assert training.startswith("out of memory in training at iteration 3 on a GPU with 23.6 GiB: 16 images per forward")
    assert "train.accum_steps=2 (8 images per forward, about 14.5 GiB by the memory table" in training  # 27.9 did not
    assert "train.amp=auto" in training and training.endswith("or more GPUs under torchrun.")
    evaluation = out_of_memory_message("evaluation", config, "none", 1, "cuda", 15.0, "of runs/x/last.pt")
    assert "Run it again with --amp auto" in evaluation and "--mode slide" in evaluation
    assert "--scales 0.5,1.0 (no view larger than the image)" in evaluation and "train." not in evaluation
    on_cpu = out_of_memory_message("validation", config, "none", 1, "cpu", 23.0, "at iteration 8000")
    assert "eval.mode=slide" in on_cpu and "eval.scales=[0.5, 1.0]" in on_cpu and "amp" not in on_cpu.split(". ")[1]


def test_evaluate_amp_follows_the_training_rule() -> None:
    with pytest.raises(UserError, match="--amp bf16 needs a GPU with native bfloat16.*Use --amp fp16 or --amp auto"):
        resolve_amp("bf16", "cuda", (7, 5), "--amp")
    assert resolve_amp("auto", "cuda", (7, 5), "--amp") == "fp16" and resolve_amp("auto", "cpu", None, "--amp") == "none"


# ---------------------------------------------------------------- nvidia-smi, read only when needed and never trusted
SMI_ROW = "NVIDIA GeForce RTX 3090, 535.129.03, 8.6"


def fake_nvidia_smi(folder: Path, monkeypatch: pytest.MonkeyPatch, script: str) -> Path:
    """Put an ``nvidia-smi`` running the shell ``script`` first on PATH; return the file it touches when it runs."""
    # nvidia-smi is asked once per process: this test gets its own answer, and later tests do not see it
    monkeypatch.setattr(diagnosis, "_nvidia_smi", functools.cache(diagnosis._nvidia_smi.__wrapped__))
    ran = folder / "nvidia-smi-ran"
    (folder / "nvidia-smi").write_text(f"#!/bin/sh\ntouch {ran}\n{script}\n", encoding="utf-8")
    (folder / "nvidia-smi").chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    return ran


@pytest.mark.parametrize(("script", "expected"), [
    (f"echo '{SMI_ROW}'", ("NVIDIA GeForce RTX 3090", (8, 6), "535.129.03")),
    ("echo 'NVIDIA GeForce RTX 3090, 535.129.03, [N/A]'", ("NVIDIA GeForce RTX 3090", None, "535.129.03")),
    ("echo '[N/A], 535.129.03, [N/A]'", (None, None, "535.129.03")),
    (f"echo 'WARNING: infoROM is corrupted at gpu 0000:01:00.0'; echo '{SMI_ROW}'",
     ("NVIDIA GeForce RTX 3090", (8, 6), "535.129.03")),
    (f"echo '{SMI_ROW}'; echo 'Tesla V100-SXM2-32GB, 535.129.03, 7.0'", ("NVIDIA GeForce RTX 3090", (8, 6), "535.129.03")),
    ("echo 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver.'; exit 9", (None, None, None)),
    (f"echo '{SMI_ROW}'; exit 3", (None, None, None)),  # a non-zero exit is no answer, whatever it printed
    ("case \"$1\" in *compute_cap*) echo 'Field \"compute_cap\" is not a valid field to query.'; exit 2;; esac; "
     "echo 'Tesla T4, 470.82.01'", ("Tesla T4", None, "470.82.01")),  # an old nvidia-smi: asked again without it
    ("printf 'GPU \\377\\376, 550.54.15, 9.0\\n'", ("GPU \ufffd\ufffd", (9, 0), "550.54.15")),  # not UTF-8
    ("exec sleep 30", (None, None, None)),  # a hang: given up after the timeout
    ("echo ''", (None, None, None)),
])
def test_nvidia_smi_output_degrades_to_unknown(script: str, expected: tuple, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 29, item 7: whatever nvidia-smi prints or does, each fact is read or unknown (before: a traceback)."""
    fake_nvidia_smi(tmp_path, monkeypatch, script)
    monkeypatch.setattr(diagnosis, "NVIDIA_SMI_TIMEOUT_S", 1)
    assert diagnosis._nvidia_smi() == expected
    message = diagnosis.cuda_unusable_message(diagnosis.read_device_info(), "--device cuda was asked for")
    assert "CUDA is not usable here" in message and "\n" not in message


def test_cpu_runs_never_start_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """Issue 29, item 7: --device cpu and the demo on a machine without a usable GPU go on without asking nvidia-smi
    (before: train.py --config demo.yaml --device cpu ended in a traceback with a fake one printing [N/A]); the note
    of an evaluation on the CPU asks it and goes on with what it says."""
    import train

    ran = fake_nvidia_smi(tmp_path, monkeypatch, "echo 'NVIDIA H100 80GB HBM3, 580.65.06, [N/A]'")
    monkeypatch.setattr(diagnosis.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(diagnosis.torch.version, "cuda", "13.0")  # a CUDA build of torch, whatever is installed here
    blocker = tmp_path / "file"
    blocker.write_text("", encoding="utf-8")
    for requested in ("cpu", "auto"):  # stops at the work dir (under a file), after the device was chosen
        assert train.main(["--config", "demo.yaml", "--device", requested, "--work-dir", str(blocker / "run")]) == 2
        assert f"cannot write to {blocker / 'run'}" in capsys.readouterr().err and not ran.exists()
    device._note.cache_clear()
    assert device.inference_device("auto", diagnosis.read_device_info()) == "cpu" and ran.exists()
    assert "note: running on the CPU, CUDA is not usable here (torch could not initialise CUDA)" in capsys.readouterr().err


def test_an_old_driver_without_an_nvidia_smi_answer_is_not_called_no_gpu() -> None:
    """Issue 29, item 7: torch's "driver too old" warning says a GPU and a driver exist even when nvidia-smi gives no
    answer: the paragraph says what is unknown instead of claiming there is no GPU."""
    silent = device_info(available=False, gpu=None, capability=None, driver=None,
                   init_warning="The NVIDIA driver on your system is too old (found version 12020).")
    text = diagnosis.cuda_unusable_message(silent, "--device cuda was asked for")
    assert "no NVIDIA GPU" not in text and "shows no" not in text
    assert "nvidia-smi gave no answer, so the GPU and the driver are unknown" in text and "too old" in text


def test_a_cpu_only_torch_on_a_machine_with_a_gpu_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys) -> None:
    """Issue 29, item 7: a CPU-only build of torch where nvidia-smi shows a GPU: the paragraph and the evaluation
    note name the GPU and the build (before: "shows no NVIDIA GPU", and no note at all)."""
    fake_nvidia_smi(tmp_path, monkeypatch, f"echo '{SMI_ROW}'")
    cpu_build = device_info(cuda=None, available=False, arch_list=(), gpu=None, capability=None, driver=None, unread=True)
    text = diagnosis.cuda_unusable_message(cpu_build, "--device cuda was asked for")
    assert "is a CPU-only build" in text and "this machine has NVIDIA GeForce RTX 3090, capability 8.6" in text
    assert "Likely cause: this torch is a CPU-only build, on a machine with NVIDIA GeForce RTX 3090" in text
    device._note.cache_clear()
    assert device.inference_device("auto", cpu_build) == "cpu"
    assert "CPU-only build, on a machine with NVIDIA GeForce RTX 3090" in capsys.readouterr().err


def test_the_cpu_note_is_printed_once_per_process(capsys) -> None:
    """Issue 29, item 13: compare.py evaluates a dozen checkpoints in one process; the note came once per evaluation."""
    device._note.cache_clear()
    for _ in range(3):
        assert device.inference_device("auto", NO_GPU) == "cpu"
    assert capsys.readouterr().err.count("note: running on the CPU") == 1


def test_what_torch_warns_while_looking_for_a_gpu_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch warns (an old driver) instead of raising: the warning's text is kept in the DeviceInfo (before: a NameError)."""
    import warnings

    def warns() -> bool:
        warnings.warn("The NVIDIA driver on your system is too old (found version 12020).\nPlease update it.")
        return False

    monkeypatch.setattr(diagnosis.torch.cuda, "is_available", warns)
    found = diagnosis.read_device_info()
    assert not found.available and found.init_warning == ("The NVIDIA driver on your system is too old (found "
                                                          "version 12020). Please update it.")

"""The device and the numeric precision of a run: decided once, from what torch and the machine say, said out loud.

``device_facts()`` reads what torch was built for and what the machine has (nvidia-smi only when a message or a
CUDA run needs the GPU's name or the driver). Every decision below takes those facts as an argument, so the rules
are tested on any machine with another machine's facts (a V100, an old driver, an nvidia-smi that fails).
A config meant for a GPU never falls back to the CPU without a word: ``choose_device`` stops with the reason.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import os
import re
import subprocess
import sys
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from configs import UserError
from engine.memory import CARD_SHARE, accum_choices, config_step_gib

AMP_DTYPES: dict[str, torch.dtype | None] = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}
# The oldest NVIDIA driver branch that runs each CUDA major version (CUDA's minor-version compatibility).
MIN_DRIVER = {11: 450, 12: 525, 13: 580}
NVIDIA_SMI_TIMEOUT_S = 10  # a driver in a bad state can make nvidia-smi hang


@dataclass(frozen=True)
class DeviceFacts:
    """What torch was built for and what the machine has: the inputs of every device decision.

    ``device_facts()`` leaves the GPU name and the driver, which only nvidia-smi knows when torch cannot use the GPU,
    to be read when a message needs them (``unread=True``; ``with_nvidia_smi``): a run on the CPU never starts it.
    """

    torch: str  # torch.__version__
    cuda: str | None  # the CUDA torch was built against (torch.version.cuda); None for a CPU-only build
    arch_list: tuple[str, ...]  # GPU architectures torch has kernels for (torch.cuda.get_arch_list())
    available: bool  # torch.cuda.is_available()
    gpu: str | None  # name of GPU 0, from torch or nvidia-smi (None: unknown)
    capability: tuple[int, int] | None  # its compute capability (None: unknown)
    driver: str | None  # the NVIDIA driver version, from nvidia-smi (None: unknown)
    init_warning: str | None = None  # what torch warned while looking for a GPU (an old driver, say)
    unread: bool = False  # nvidia-smi not asked yet: gpu, capability and driver hold only what torch said


@functools.cache
def _nvidia_smi() -> tuple[str | None, tuple[int, int] | None, str | None]:
    """GPU 0's name, compute capability and driver version as nvidia-smi reports them, asked once per process; None
    for each one it does not give. Whatever it prints (an error, a warning line, ``[N/A]``, several GPUs) or does
    (hang, fail), a row counts only with the fields asked for and a driver version of digits and dots; the first
    such row is GPU 0."""
    for fields in ("name,driver_version,compute_cap", "name,driver_version"):  # compute_cap: drivers from R510 on
        try:
            out = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"], capture_output=True,
                                 encoding="utf-8", errors="replace", timeout=NVIDIA_SMI_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired):
            return None, None, None
        rows = [[part.strip() for part in line.split(",")] for line in out.stdout.splitlines()]
        rows = [row for row in rows if len(row) == fields.count(",") + 1 and re.fullmatch(r"\d+(\.\d+)*", row[1])]
        if out.returncode == 0 and rows:
            name, driver, *cap = rows[0]
            found = re.fullmatch(r"(\d+)\.(\d+)", cap[0]) if cap else None
            gpu = name if name and not name.startswith("[") else None  # [N/A], [Unknown Error]
            return gpu, (int(found.group(1)), int(found.group(2))) if found else None, driver
    return None, None, None


def device_facts() -> DeviceFacts:
    """The facts of this machine and this torch build, as torch gives them (nvidia-smi's: ``with_nvidia_smi``)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    gpu, capability = (torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0)) if available else (None, None)
    init_warning = " ".join(" ".join(str(w.message).split()) for w in caught) or None
    return DeviceFacts(torch.__version__, torch.version.cuda, tuple(torch.cuda.get_arch_list()), available, gpu,
                       capability, None, init_warning, unread=True)


def with_nvidia_smi(facts: DeviceFacts) -> DeviceFacts:
    """``facts`` completed by nvidia-smi where it was not asked yet (torch's GPU name and capability kept)."""
    if not facts.unread:
        return facts
    gpu, capability, driver = _nvidia_smi()
    return dataclasses.replace(facts, gpu=facts.gpu or gpu, capability=facts.capability or capability, driver=driver,
                               unread=False)


def arch_supported(capability: tuple[int, int], arch_list: tuple[str, ...]) -> bool:
    """Whether a build with kernels for ``arch_list`` runs on a GPU of ``capability``.

    A kernel for sm_XY runs on capability X.Z for Z >= Y; PTX (compute_XY) is compiled at run time for any newer GPU.
    """
    for arch in arch_list:
        found = re.fullmatch(r"(sm|compute)_(\d+)(\d)[a-z]?", arch)
        if found:
            major, minor = int(found.group(2)), int(found.group(3))
            if (found.group(1) == "sm" and major == capability[0] and minor <= capability[1]) or (
                found.group(1) == "compute" and (major, minor) <= capability
            ):
                return True
    return False


def cuda_usable(facts: DeviceFacts) -> bool:
    """Whether CUDA can run this build's kernels here."""
    return facts.available and (facts.capability is None or arch_supported(facts.capability, facts.arch_list))


def _likely_cause(facts: DeviceFacts) -> str:
    """Why CUDA cannot run here, in a few words, from ``facts`` completed by nvidia-smi."""
    if facts.cuda is None:
        return "this torch is a CPU-only build" + (f", on a machine with {facts.gpu}" if facts.gpu else "")
    if facts.gpu is None and facts.driver is None:
        if facts.init_warning:  # torch found a driver: nvidia-smi failed, not the machine
            return f"torch could not initialise CUDA ({facts.init_warning}), and nvidia-smi gave no answer"
        return "no NVIDIA GPU or driver was found (torch saw none, nvidia-smi gave no answer)"
    need = MIN_DRIVER.get(int(facts.cuda.split(".")[0]))
    driver_major = int(facts.driver.split(".")[0]) if facts.driver else None
    if need and driver_major is not None and driver_major < need:
        return f"the driver {facts.driver} is older than CUDA {facts.cuda} needs (the R{need} series or newer)"
    if facts.capability and facts.arch_list and not arch_supported(facts.capability, facts.arch_list):
        return (f"this build has no kernels for the GPU's architecture sm_{facts.capability[0]}{facts.capability[1]} "
                f"(it has {', '.join(facts.arch_list)})")
    return "torch could not initialise CUDA" + (f": {facts.init_warning}" if facts.init_warning else "")


def cuda_unusable_message(facts: DeviceFacts, why: str,
                          instead: str = "To run on the CPU deliberately (slow), add --device cpu.") -> str:
    """One paragraph: why CUDA cannot run here, what torch was built for, what the machine has, and what to do
    (``instead``: the way around it, where there is one)."""
    facts = with_nvidia_smi(facts)
    build = f"torch {facts.torch} was built for CUDA {facts.cuda}" if facts.cuda else f"torch {facts.torch} is a CPU-only build"
    if facts.arch_list:
        build += f" (kernels for {', '.join(facts.arch_list)})"
    machine = "this machine shows no NVIDIA GPU"
    if facts.gpu or facts.driver:
        capability = f", capability {facts.capability[0]}.{facts.capability[1]}" if facts.capability else ""
        machine = f"this machine has {facts.gpu or 'an NVIDIA GPU'}{capability}, driver {facts.driver or 'unknown'}"
    elif facts.init_warning:
        machine = "nvidia-smi gave no answer, so the GPU and the driver are unknown"
    return (
        f"{why}, but CUDA is not usable here: {build}; {machine}. Likely cause: {_likely_cause(facts)}. To use the "
        f"GPU, install a torch/torchvision pair built for a CUDA version the driver supports (the selector on "
        f"pytorch.org lists the builds; CUDA 12 builds run on drivers of the R525 series and newer), then `pip install "
        f"-r requirements-gpu.txt`. {instead}"
    )


def gpu_reasons(config: dict[str, Any]) -> list[str]:
    """The settings that say a config is meant for a GPU (none for the demo, which runs on the CPU as it is).

    channels_last is not one: it is a layout preference that the CPU resolves to the plain layout.
    """
    train, model = config["train"], config["model"]
    reasons = [f"data.dataset={config['data']['dataset']}"] if config["data"]["dataset"] == "ade20k" else []
    reasons += [f"train.amp={train['amp']}"] if train["amp"] in ("bf16", "fp16") else []
    reasons += ["train.compile=true"] if train["compile"] else []
    reasons += [f"{key}=triton" for key, value in (("model.deform_op", model["deform_op"]),
                                                   ("train.loss_op", train["loss_op"])) if value == "triton"]
    return reasons


def choose_device(requested: str, config: dict[str, Any] | None, facts: DeviceFacts) -> str:
    """``cuda`` or ``cpu`` for ``--device requested`` (auto, cuda or cpu); UserError rather than a silent CPU run.

    ``auto`` takes CUDA when it is usable; otherwise the CPU, unless ``config`` is meant for a GPU (``gpu_reasons``).
    """
    if requested == "cpu":
        return "cpu"
    if cuda_usable(facts):
        return "cuda"
    if requested == "cuda":
        raise UserError(cuda_unusable_message(facts, "--device cuda was asked for"))
    reasons = gpu_reasons(config) if config is not None else []
    if reasons:
        raise UserError(cuda_unusable_message(facts, f"this config is meant for a GPU ({', '.join(reasons)})"))
    return "cpu"


def inference_device(requested: str, facts: DeviceFacts) -> str:
    """``cuda`` or ``cpu`` for evaluation and prediction (``--device auto|cuda|cpu``).

    As ``choose_device``, except that ``auto`` without a usable GPU runs on the CPU (an evaluation is slow there,
    not hopeless) and says why on stderr, once per process, when torch is a CUDA build or the machine has a GPU.
    """
    device = choose_device(requested, None, facts)
    if requested == "auto" and device == "cpu":
        facts = with_nvidia_smi(facts)
        if facts.cuda is not None or facts.gpu is not None:
            _note(f"note: running on the CPU, CUDA is not usable here ({_likely_cause(facts)}); --device cpu makes "
                  f"this choice explicit, and `python scripts/gpu_check.py` tells more.")
    return device


@functools.cache
def _note(text: str) -> None:
    """Print ``text`` on stderr the first time it comes (compare.py evaluates a dozen checkpoints in one process)."""
    print(text, file=sys.stderr)


def spell(setting: str, value: Any) -> str:
    """A setting as the user writes it: ``key=value`` for a config key, ``--flag value`` for a command-line flag."""
    if isinstance(value, list):
        value = ",".join(map(str, value)) if setting.startswith("--") else f"[{', '.join(map(str, value))}]"
    return f"{setting} {value}" if setting.startswith("--") else f"{setting}={value}"


def resolve_amp(name: str, device_type: str, capability: tuple[int, int] | None, setting: str = "train.amp") -> str:
    """``train.amp`` (or evaluate.py's ``--amp``: ``setting``) as it will run: auto is bf16 on GPUs of capability 8.0
    or newer, fp16 below, none on the CPU."""
    if device_type != "cuda":
        if name in ("bf16", "fp16"):
            raise UserError(
                f"{spell(setting, name)} is a GPU setting: on the CPU autocast stays off (torchvision's deformable "
                f"convolution has no {name} CPU kernel). Use {spell(setting, 'auto')} (or none) with --device cpu."
            )
        return "none"
    native_bf16 = capability is not None and capability >= (8, 0)
    if name == "auto":
        return "bf16" if native_bf16 else "fp16"
    if name == "bf16" and not native_bf16:
        raise UserError(
            f"{spell(setting, 'bf16')} needs a GPU with native bfloat16 (compute capability 8.0 or newer: A100, RTX "
            f"30xx, H100...); this one has {capability}. Use {spell(setting, 'fp16')} or "
            f"{spell(setting, 'auto')}."
        )
    return name


def resolve_config(config: dict[str, Any], device: torch.device, facts: DeviceFacts) -> dict[str, Any]:
    """``config`` with the settings that depend on the device replaced by what will run on ``device``.

    train.amp (auto resolved), train.channels_last (CUDA only) and the op keys (triton only where Triton runs):
    these are what config.yaml, the checkpoint and compare.py show.
    """
    resolved = copy.deepcopy(config)
    train, model = resolved["train"], resolved["model"]
    train["amp"] = resolve_amp(train["amp"], device.type, facts.capability)
    train["channels_last"] = train["channels_last"] and device.type == "cuda"
    if "triton" in (model["deform_op"], train["loss_op"]):
        from models.triton_support import triton_available  # imported only for a config that asks for Triton

        if not triton_available(device):
            model["deform_op"] = train["loss_op"] = "reference"
    return resolved


def describe_device(device: torch.device, facts: DeviceFacts) -> str:
    """The device in words for the start banner: GPU, capability, torch, CUDA and driver versions."""
    if device.type != "cuda":
        return f"CPU, torch {facts.torch}"
    facts = with_nvidia_smi(facts)
    capability = f"capability {facts.capability[0]}.{facts.capability[1]}" if facts.capability else "capability unknown"
    return f"{facts.gpu} ({capability}), torch {facts.torch}, CUDA {facts.cuda}, driver {facts.driver or 'unknown'}"


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for a resolved ``amp`` name (bf16, fp16) on ``device``, or a no-op for none."""
    dtype = AMP_DTYPES[amp]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def memory_format(channels_last: bool) -> torch.memory_format:
    """The layout of a resolved ``train.channels_last``: channels_last (cuDNN's and the Triton kernels' fast one)."""
    return torch.channels_last if channels_last else torch.contiguous_format


# ------------------------------------------------------------------------------------------ the advice table
# What an out-of-memory or a non-finite loss message proposes: only settings this device accepts that are not
# already in force, spelled as config keys in training and validation and as evaluate.py's flags in evaluation.
WHERE = ("training", "validation", "evaluation")
EVALUATE_FLAGS = {"train.amp": "--amp", "eval.mode": "--mode", "eval.scales": "--scales"}


@dataclass(frozen=True)
class Proposal:
    """One setting to change: the config key, its value, and what it does."""

    key: str
    value: Any
    why: str


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocation that failed: CUDA's OutOfMemoryError, or the CPU allocator's refusal."""
    return isinstance(err, torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and "can't allocate memory" in str(err))


def memory_gib(device: torch.device) -> float:
    """The memory of ``device`` in GiB: the GPU's, or the machine's RAM for the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / 2**30
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def memory_advice(where: str, config: dict[str, Any], amp: str, processes: int, device_type: str,
                  available_gib: float) -> list[Proposal]:
    """What makes ``where`` (training, validation or evaluation) of a resolved ``config`` in precision ``amp`` fit.

    Training: more micro-batches (the fewest the memory table says fit ``available_gib``, or the next accepted
    value where it says the present one should), then autocast. Validation and evaluation: autocast, sliding
    windows, no test scale above 1.
    """
    tcfg, ecfg, proposals = config["train"], config["eval"], []
    if where == "training":
        batch, accum = tcfg["batch_size"], tcfg["accum_steps"]
        more = [n for n in accum_choices(batch, processes) if n > accum]
        if more:
            need = {n: config_step_gib(config, batch // (processes * n)) for n in more}
            n = next((n for n in more if need[n] <= CARD_SHARE * available_gib), more[-1])
            proposals.append(Proposal("train.accum_steps", n, f"{batch // (processes * n)} images per forward, about "
                                      f"{need[n]:.1f} GiB by the memory table; the same global batch and recipe"))
    if device_type == "cuda" and amp == "none":
        proposals.append(Proposal("train.amp", "auto", "bf16 or fp16 autocast, about half the activation memory"))
    if where != "training" and ecfg["mode"] == "whole":
        proposals.append(Proposal("eval.mode", "slide", f"windows of {ecfg['slide_crop']} pixels instead of the "
                                  "whole image"))
    if where != "training" and max(ecfg["scales"]) > 1:
        scales = [s for s in ecfg["scales"] if s <= 1] or [1.0]
        proposals.append(Proposal("eval.scales", scales, "no view larger than the image"))
    return proposals


def nonfinite_advice(config: dict[str, Any], device_type: str, capability: tuple[int, int] | None) -> list[Proposal]:
    """What may keep the loss of a resolved ``config`` finite: a lower learning rate (above train.min_lr), then a
    wider precision than the one in force (bf16 where the GPU has it, else fp32)."""
    tcfg, proposals = config["train"], []
    if tcfg["lr"] / 2 >= tcfg["min_lr"]:
        proposals.append(Proposal("train.lr", tcfg["lr"] / 2, "half the learning rate"))
    if tcfg["amp"] == "fp16" and device_type == "cuda" and capability is not None and capability >= (8, 0):
        proposals.append(Proposal("train.amp", "bf16", "fp32's range, where fp16 overflows"))
    elif tcfg["amp"] != "none":
        proposals.append(Proposal("train.amp", "none", "fp32, no rounding or overflow of autocast"))
    return proposals


def advice_text(proposals: list[Proposal], where: str) -> str:
    """``key=value (why); or ...`` (evaluate.py's flags in evaluation)."""
    return "; or ".join(f"{spell(EVALUATE_FLAGS[p.key] if where == 'evaluation' else p.key, p.value)} ({p.why})"
                        for p in proposals)


def out_of_memory_message(where: str, config: dict[str, Any], amp: str, processes: int, device_type: str,
                          available_gib: float, what: str) -> str:
    """One paragraph for an out-of-memory ``where`` (``what``: at iteration N, evaluating X): what ran, on what
    memory, and ``memory_advice``'s settings (then more GPUs, or more memory)."""
    tcfg, ecfg = config["train"], config["eval"]
    place = f"{'a GPU' if device_type == 'cuda' else 'the CPU'} with {available_gib:.1f} GiB"
    if where == "training":
        per_forward = tcfg["batch_size"] // (processes * tcfg["accum_steps"])
        ran = (f"{per_forward} images per forward (train.batch_size={tcfg['batch_size']} over {processes} process(es) "
               f"x train.accum_steps={tcfg['accum_steps']}), about {config_step_gib(config, per_forward):.1f} GiB by "
               f"the README's memory table")
    else:
        ran = f"mode {ecfg['mode']}, scales {ecfg['scales']}"
    advice = advice_text(memory_advice(where, config, amp, processes, device_type, available_gib), where)
    last = ("a GPU, or a machine with more memory" if device_type != "cuda" else
            "more GPUs under torchrun" if where == "training" else "a GPU with more memory")
    again = "Run it again with" if where == "evaluation" else "Continue with --resume auto and"
    return (f"out of memory in {where} {what} on {place}: {ran}, precision {amp}. {again} "
            f"{advice + '; or ' if advice else ''}{last}.")

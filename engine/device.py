"""The device and the numeric precision of a run: decided once, from what torch and the machine say, said out loud.

Every decision takes what ``engine.diagnosis`` read (a ``DeviceInfo``) as an argument. A config meant for a GPU never
falls back to the CPU without a word: ``choose_device`` stops with the reason. The messages that propose settings
(``Proposal``) propose only what this device accepts and what is not already in force.
"""

from __future__ import annotations

import copy
import functools
import sys
from dataclasses import dataclass
from typing import Any

import torch

from configs import UserError
from engine.diagnosis import DeviceInfo, cuda_unusable_message, cuda_usable, likely_cause, with_nvidia_smi

AMP_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": torch.float32}
# ``torch.autocast(device_type, **AUTOCAST[amp])`` for a resolved train.amp (or evaluate.py's --amp): off for none
AUTOCAST: dict[str, dict[str, Any]] = {amp: {"dtype": dtype, "enabled": amp != "none"} for amp, dtype in AMP_DTYPES.items()}
# evaluate.py's flags for the config keys a proposal may name (the messages of evaluate.py spell them so)
EVALUATE_FLAGS = {"train.amp": "--amp", "eval.mode": "--mode", "eval.scales": "--scales"}


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


def choose_device(requested: str, config: dict[str, Any] | None, device_info: DeviceInfo) -> str:
    """``cuda`` or ``cpu`` for ``--device requested`` (auto, cuda or cpu); UserError rather than a silent CPU run.

    ``auto`` takes CUDA when it is usable; otherwise the CPU, unless ``config`` is meant for a GPU (``gpu_reasons``).
    """
    if requested == "cpu":
        return "cpu"
    if cuda_usable(device_info):
        return "cuda"
    if requested == "cuda":
        raise UserError(cuda_unusable_message(device_info, "--device cuda was asked for"))
    reasons = gpu_reasons(config) if config is not None else []
    if reasons:
        raise UserError(cuda_unusable_message(device_info, f"this config is meant for a GPU ({', '.join(reasons)})"))
    return "cpu"


def inference_device(requested: str, device_info: DeviceInfo) -> str:
    """``cuda`` or ``cpu`` for evaluation and prediction (``--device auto|cuda|cpu``).

    As ``choose_device``, except that ``auto`` without a usable GPU runs on the CPU (an evaluation is slow there,
    not hopeless) and says why on stderr, once per process, when torch is a CUDA build or the machine has a GPU.
    """
    device = choose_device(requested, None, device_info)
    if requested == "auto" and device == "cpu":
        device_info = with_nvidia_smi(device_info)
        if device_info.cuda is not None or device_info.gpu is not None:
            _note(f"note: running on the CPU, CUDA is not usable here ({likely_cause(device_info)}); --device cpu makes "
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


def resolve_config(config: dict[str, Any], device: torch.device, device_info: DeviceInfo) -> dict[str, Any]:
    """``config`` with the settings that depend on the device replaced by what will run on ``device``.

    train.amp (auto resolved), train.channels_last (CUDA only) and the op keys (triton only where Triton runs):
    these are what config.yaml, the checkpoint and compare.py show.
    """
    resolved = copy.deepcopy(config)
    train, model = resolved["train"], resolved["model"]
    train["amp"] = resolve_amp(train["amp"], device.type, device_info.capability)
    train["channels_last"] = train["channels_last"] and device.type == "cuda"
    if "triton" in (model["deform_op"], train["loss_op"]):
        from models.triton_support import triton_available  # imported only for a config that asks for Triton

        if not triton_available(device):
            model["deform_op"] = train["loss_op"] = "reference"
    return resolved


def describe_device(device: torch.device, device_info: DeviceInfo) -> str:
    """The device in words for the start banner: GPU, capability, torch, CUDA and driver versions."""
    if device.type != "cuda":
        return f"CPU, torch {device_info.torch}"
    device_info = with_nvidia_smi(device_info)
    capability = f"capability {device_info.capability[0]}.{device_info.capability[1]}" if device_info.capability else "capability unknown"
    return f"{device_info.gpu} ({capability}), torch {device_info.torch}, CUDA {device_info.cuda}, driver {device_info.driver or 'unknown'}"


def memory_format(channels_last: bool) -> torch.memory_format:
    """The layout of a resolved ``train.channels_last``: channels_last (cuDNN's and the Triton kernels' fast one)."""
    return torch.channels_last if channels_last else torch.contiguous_format


@dataclass(frozen=True)
class Proposal:
    """One setting to change: the config key, its value, and what it does."""

    key: str
    value: Any
    why: str


def advice_text(proposals: list[Proposal], where: str) -> str:
    """``key=value (why); or ...`` (evaluate.py's flags in evaluation)."""
    return "; or ".join(f"{spell(EVALUATE_FLAGS[p.key] if where == 'evaluation' else p.key, p.value)} ({p.why})"
                        for p in proposals)


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

"""Memory: what one training step needs, how many micro-batches make the recipe's batch fit a card, and what an
out-of-memory error proposes.

``STEP_GIB`` is the memory table of docs/gpu-and-clusters.md, the one place its figures live (a test checks that
page against it): per image and fixed GiB of one training step at 512x512 with the aux head (reference ops),
measured by ``scripts/benchmark.py --memory`` on the CPU, a stand-in until a GPU measures them. Everything that plans
or advises memory (``train.accum_steps`` in an out-of-memory message, gpu_check.py's plan) estimates from it.
``train.accum_steps: auto`` is measured instead: trial steps on this GPU (``choose_accum_steps``).
"""

from __future__ import annotations

import copy
import gc
import os
from collections.abc import Callable
from typing import Any

import torch

from configs import UserError, batch_split_error
from engine.device import Proposal, advice_text, memory_format
from engine.distributed import any_rank, largest
from engine.optim import train_step

CARDS_GIB = (16, 24, 40, 80)  # the memory table's cards
# Where auto runs trial steps: where running out of memory is an error to catch. On the CPU an allocation past the
# RAM is not refused but swapped or killed, so there auto is 1.
TRIAL_DEVICES = ("cuda",)
WHERE = ("training", "validation", "evaluation")  # where an out-of-memory message can come from
CARD_SHARE = 0.9  # a step fits a card when its peak is at most this share of it (CUDA context, allocator slack)
TABLE_CROP = 512  # the crop the table was measured at
# (model.deform.version, precision) -> (GiB per image, fixed GiB). fp16 keeps values in as many bytes as bf16.
STEP_GIB: dict[tuple[int, str], tuple[float, float]] = {
    (0, "none"): (1.69, 1.08),
    (1, "none"): (1.72, 1.13),
    (2, "none"): (1.67, 1.14),
    (0, "bf16"): (1.21, 1.04),
    (1, "bf16"): (1.17, 1.16),
    (2, "bf16"): (1.21, 1.09),
}


def step_gib(version: int, amp: str, crop: int, per_forward: int) -> float:
    """The table's estimate of a training step's peak at ``per_forward`` images of ``crop`` x ``crop`` in ``amp``
    (a resolved train.amp): the per-image part scales with the crop's area."""
    per_image, fixed = STEP_GIB[(version, "bf16" if amp == "fp16" else amp)]
    return fixed + per_image * per_forward * (crop / TABLE_CROP) ** 2


def config_step_gib(config: dict[str, Any], per_forward: int) -> float:
    """``step_gib`` for a resolved config."""
    return step_gib(config["model"]["deform"]["version"], config["train"]["amp"], config["data"]["crop_size"],
                    per_forward)


def accum_choices(batch_size: int, processes: int, synced: bool = False) -> list[int]:
    """The ``train.accum_steps`` values that split ``batch_size`` over ``processes`` (``batch_split_error``), fewest
    micro-batches first."""
    return [n for n in range(1, batch_size + 1) if batch_split_error(batch_size, n, processes, synced) is None]


def fewest_that_fit(need_gib: Callable[[int], float], batch_size: int, processes: int, memory_gib: float) -> int | None:
    """The fewest accepted ``train.accum_steps`` whose step (``need_gib(per_forward)``) fits ``CARD_SHARE`` of
    ``memory_gib``; None when not even the smallest per-forward batch fits."""
    usable = CARD_SHARE * memory_gib
    return next((n for n in accum_choices(batch_size, processes)
                 if need_gib(batch_size // (processes * n)) <= usable), None)


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

    Training: more micro-batches (the fewest the memory table says fit ``available_gib``; the most accepted where
    it says none does), then autocast. Validation and evaluation: autocast, sliding
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
               f"the memory table in docs/gpu-and-clusters.md")
    else:
        ran = f"mode {ecfg['mode']}, scales {ecfg['scales']}"
    proposals = memory_advice(where, config, amp, processes, device_type, available_gib)
    advice = advice_text(proposals, where)
    last = ("a GPU, or a machine with more memory" if device_type != "cuda" else
            "more GPUs under torchrun" if where == "training" else "a GPU with more memory")
    again = "Run it again with" if where == "evaluation" else "Continue with --resume auto and"
    return (f"out of memory in {where} {what} on {place}: {ran}, precision {amp}. {again} "
            f"{advice + '; or ' if advice else ''}{last}.")


def choose_accum_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                       config: dict[str, Any], world_size: int, synced: bool) -> tuple[int, str]:
    """train.accum_steps=auto: the fewest micro-batches whose training step fits this GPU, and why (1 on the CPU).

    Two trial steps (``train_step``, so the momentum buffers are resident) of the plain model (neither compiled nor
    wrapped: no collective that a rank out of memory would miss) at the recipe's shapes on a synthetic batch, for
    each accepted value (``accum_choices``) from 1 up until one does not run out of memory; the weights, optimizer,
    scaler and RNG are restored after. Under torchrun every rank takes the largest value any rank needed.
    """
    device, tcfg = next(model.parameters()).device, config["train"]
    if device.type not in TRIAL_DEVICES:
        return 1, f"auto is 1 on the {device.type.upper()}"
    per_process, crop = tcfg["batch_size"] // world_size, config["data"]["crop_size"]
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(per_process, 3, crop, crop, generator=gen).to(device)
    images = images.contiguous(memory_format=memory_format(tcfg["channels_last"]))
    labels = torch.randint(0, config["model"]["num_classes"], (per_process, crop, crop), generator=gen).to(device)
    saved = ({k: v.to("cpu", copy=True) for k, v in model.state_dict().items()},
             copy.deepcopy(optimizer.state_dict()), scaler.state_dict())
    found, tried, choices = None, [], accum_choices(tcfg["batch_size"], world_size, synced)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for n in choices:
            fits = _trial_fits(model, optimizer, scaler, images, labels, dict(config, train=dict(tcfg, accum_steps=n)))
            optimizer.zero_grad(set_to_none=True)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if fits:
                found = n
                break
            tried.append(n)
    model.load_state_dict(saved[0])
    optimizer.load_state_dict(saved[1])
    scaler.load_state_dict(saved[2])
    available = memory_gib(device)
    if any_rank(found is None):
        trial = dict(config, train=dict(tcfg, accum_steps=choices[-1]))
        raise UserError(out_of_memory_message("training", trial, tcfg["amp"], world_size, device.type, available,
                                              "(the trial steps of train.accum_steps=auto)"))
    chosen = largest(found)
    why = (f"the whole {per_process} fit in {available:.1f} GiB" if not tried else
           f"{per_process // tried[-1]} did not fit in {available:.1f} GiB")
    if chosen != found:
        why = f"the most any of the {world_size} processes needed ({why} here)"
    return chosen, f"auto: {per_process // chosen} images per forward x {chosen} micro-batch(es), {why}"


def _trial_fits(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                images: torch.Tensor, labels: torch.Tensor, config: dict[str, Any]) -> bool:
    """Whether two training steps of ``config`` run without running out of memory."""
    try:
        for _ in range(2):
            train_step(model, optimizer, scaler, images, labels, config)
    except RuntimeError as err:
        if not is_out_of_memory(err):
            raise
        return False
    return True

"""The training run: set-up, then one loop counted in iterations (nanoGPT's shape), with one exit for every stop.

The recipe is mmsegmentation's FCN-R50-D8 for ADE20K (SGD, poly schedule, aux loss 0.4). Everything random
derives from the config seed and the iteration number, so a run stopped at any point and resumed ends where
the uninterrupted run ends (bitwise on the CPU; on CUDA, cuDNN's benchmark mode and the deformable backward's atomic
adds are not bitwise reproducible). Rank 0 alone logs and writes files. Every way out of the loop (the end, a stop
signal, a file that cannot be read, a non-finite loss, any error) passes one ``finally``, which saves last.pt
when the work since the last save is sound; under torchrun the ranks agree on stopping every iteration.
"""

from __future__ import annotations

import copy
import gc
import sys
import time
from collections.abc import Callable
from contextlib import closing, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from configs import UserError, batch_split_error, error_message, flatten, resume_changes
from data.dataset import build_train_loader, build_val_loader, load_class_info, prepare_dataset_root
from data.transforms import normalize_batch
from engine import loss as loss_module
from engine import tensorboard as tb
from engine.checkpoint import link_checkpoint, load_checkpoint, save_checkpoint
from engine.device import (DeviceFacts, advice_text, autocast, describe_device, is_out_of_memory, memory_format,
                           memory_gib, nonfinite_advice, out_of_memory_message, resolve_config)
from engine.distributed import any_rank, first_message, init_distributed, largest
from engine.memory import accum_choices
from engine.environment import describe
from engine.inference import predictions
from engine.metric import ConfusionMatrix
from engine.optim import build_optimizer, set_learning_rate
from engine.workdir import check_work_dir, resume_point, write_record
from models.segmentor import build_model, count_parameters


class NonFiniteLoss(Exception):
    """The loss (or the weights) became NaN or infinite; nothing after the last good checkpoint is saved."""

    def __init__(self, iteration: int, last_good: int, advice: str, what: str = "the loss") -> None:
        kept = (f"The weights after it are not saved: the run's newest checkpoint holds iteration {last_good}, where "
                f"--resume auto continues." if last_good else
                "Nothing was saved yet (no checkpoint): --resume auto starts the run over.")
        super().__init__(
            f"training stopped: {what} became non-finite (NaN or inf) at iteration {iteration}. {kept} Check the data, "
            f"then run the same command line with --resume auto and {advice} (a changed setting applies from the "
            f"resume iteration on)."
        )


@dataclass
class Stop:
    """Set by the signal handlers train.py installs: the name of the signal that asked the run to stop."""

    reason: str | None = None


def iteration_seed(seed: int, iteration: int, rank: int) -> int:
    """The torch RNG seed of one iteration on one rank (dropout): a function of the run's seed and position."""
    return int(np.random.SeedSequence([seed, iteration, rank]).generate_state(1)[0])


def train_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, images: torch.Tensor,
    labels: torch.Tensor, config: dict[str, Any],
) -> dict[str, torch.Tensor]:
    """One optimizer step on a batch, run as ``train.accum_steps`` micro-batches; the batch's detached losses.

    Each micro-batch's loss is weighted by its share of the pixels the loss normalises by (``counted_pixels``),
    so the summed gradients are the whole batch's. Under DDP the gradients are averaged over the processes on
    the last micro-batch only (``no_sync`` before it). ``train.amp`` must be resolved (``engine.device``).
    """
    tcfg, accum = config["train"], config["train"]["accum_steps"]
    total_pixels = loss_module.counted_pixels(labels, tcfg["loss_norm"]).clamp(min=1)
    losses: dict[str, torch.Tensor] = {}
    optimizer.zero_grad(set_to_none=True)
    for i, (x, y) in enumerate(zip(images.chunk(accum), labels.chunk(accum))):
        ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
        with model.no_sync() if ddp and i < accum - 1 else nullcontext():
            with autocast(x.device, tcfg["amp"]):
                outputs = model(x)
            micro = loss_module.compute_loss(
                outputs, y, config["model"]["aux_loss_weight"], tcfg["loss_op"], tcfg["loss_norm"]
            )
            share = loss_module.counted_pixels(y, tcfg["loss_norm"]) / total_pixels
            scaler.scale(micro["total"] * share).backward()
        for key, value in micro.items():
            losses[key] = losses.get(key, 0) + value.detach() * share
    scaler.step(optimizer)
    scaler.update()
    return losses


# Where auto runs trial steps: where running out of memory is an error to catch. On the CPU an allocation past the
# RAM is not refused but swapped or killed, so there auto is 1.
TRIAL_DEVICES = ("cuda",)
BATCHNORM_MOMENTUM = 0.1  # the recipe's (torch's and mmsegmentation's default), per optimizer step


def scale_batchnorm_momentum(model: torch.nn.Module, accum_steps: int) -> None:
    """Set every BatchNorm's momentum so that ``accum_steps`` micro-batches move the running statistics as one batch
    would: (1 - m) ** accum_steps = 1 - BATCHNORM_MOMENTUM, the same time constant in steps on every card."""
    momentum = 1 - (1 - BATCHNORM_MOMENTUM) ** (1 / accum_steps) if accum_steps > 1 else BATCHNORM_MOMENTUM
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = momentum


def auto_accum_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                     config: dict[str, Any], world_size: int, synced: bool) -> tuple[int, str]:
    """train.accum_steps=auto: the fewest micro-batches whose training step fits this GPU, and why.

    Two trial steps (``train_step``, so the momentum buffers are resident) of the plain model (neither compiled nor
    wrapped: no collective that a rank out of memory would miss) at the recipe's shapes on a synthetic batch, for
    each accepted value (``accum_choices``) from 1 up until one does not run out of memory; the weights, optimizer,
    scaler and RNG are restored after. Under torchrun every rank takes the largest value any rank needed.
    """
    device, tcfg = next(model.parameters()).device, config["train"]
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
            trial = dict(config, train=dict(tcfg, accum_steps=n))
            fits = _trial_fits(model, optimizer, scaler, images, labels, trial)
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


@dataclass
class Run:
    """What a training run holds: the config as it runs, the model (plain, and as trained), optimizer and place."""

    config: dict[str, Any]
    work_dir: Path
    rank: int
    world_size: int
    device: torch.device
    facts: DeviceFacts
    model: torch.nn.Module  # the plain model: what checkpoints hold
    train_model: torch.nn.Module  # the model as trained (compiled, DDP)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    banner: str
    iteration: int = 0
    validated: int = 0  # the iteration of the last completed validation
    best_miou: float = -1.0
    best_at: int = -1  # the iteration of the best validation in this process's lifetime
    checkpointed: int = 0  # the iteration of the work dir's newest checkpoint, where --resume auto continues (0: none)
    config_changes: list[dict[str, Any]] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)
    writer: SummaryWriter | None = None
    samples: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # validation images shown in TensorBoard

    @property
    def master(self) -> bool:
        return self.rank == 0


def start(config: dict[str, Any], work_dir: Path, resume_mode: str | None, device_name: str, facts: DeviceFacts) -> Run:
    """Join the process group, resolve the config for the device, check the work dir and the data, build the
    model and optimizer, and restore them from last.pt when the run resumes."""
    rank, world_size, device = init_distributed(device_name)
    asked, config = config, resolve_config(config, device, facts)
    tcfg, cuda = config["train"], device.type == "cuda"
    synced = world_size > 1 and tcfg["sync_bn"] and cuda  # SyncBatchNorm: statistics over every process's images
    accum_note = ""
    if tcfg["accum_steps"] == "auto" and device.type not in TRIAL_DEVICES:
        tcfg["accum_steps"], accum_note = 1, f"auto is 1 on the {device.type.upper()}"
    torch.backends.cudnn.benchmark = cuda
    point = resume_point(work_dir, resume_mode)
    note = check_work_dir(work_dir, config) if rank == 0 and point is None else None
    if rank == 0:  # the dataset is checked (and the demo data made) before anything slow happens
        prepare_dataset_root(config)
    checkpoint = load_checkpoint(point) if point else None
    if checkpoint and tcfg["accum_steps"] == "auto":  # a resume keeps the value the start chose
        tcfg["accum_steps"], accum_note = checkpoint["config"]["train"]["accum_steps"], "auto, kept from the checkpoint"
    split = 1 if tcfg["accum_steps"] == "auto" else tcfg["accum_steps"]
    if (why := batch_split_error(tcfg["batch_size"], split, world_size, synced)) is not None:
        raise UserError(why)
    changes = list(checkpoint["config_changes"]) if checkpoint else []
    if checkpoint and (diff := resume_changes(checkpoint["config"], config, str(point))):
        changes.append({"iteration": checkpoint["iteration"], "changes": diff})
    if rank != 0 and world_size > 1:
        dist.barrier()  # rank 0 fetches the ImageNet weights first; the others then read them from the cache
    torch.manual_seed(config["seed"])  # the initial weights (the same on every rank)
    model, deform_names = build_model(config, load_pretrained=checkpoint is None)
    if rank == 0 and world_size > 1:
        dist.barrier()
    model = model.to(device, memory_format=memory_format(tcfg["channels_last"]))
    optimizer = build_optimizer(model, config)
    scaler = torch.amp.GradScaler("cuda", enabled=tcfg["amp"] == "fp16")
    if tcfg["accum_steps"] == "auto":  # trial steps on the plain model, before SyncBatchNorm, compile and DDP
        tcfg["accum_steps"], accum_note = auto_accum_steps(model, optimizer, scaler, config, world_size, synced)
    scale_batchnorm_momentum(model, tcfg["accum_steps"])
    if synced:  # SyncBatchNorm is CUDA-only; it keeps the parameters the optimizer holds
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    train_model = torch.compile(model) if tcfg["compile"] else model  # compiled inside DDP, as nanoGPT
    if world_size > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(train_model, device_ids=[device.index] if cuda else None)
    how = note or (f"resuming {point} at iteration {checkpoint['iteration']}" if checkpoint
                   else f"starting a new run in {work_dir}")
    run = Run(config, work_dir, rank, world_size, device, facts, model, train_model, optimizer, scaler,
              banner(config, asked, model, deform_names, world_size, device, facts, how, accum_note),
              config_changes=changes,
              environment={**describe(device), "device": describe_device(device, facts)})
    if checkpoint is not None:
        restore(run, checkpoint)
    set_learning_rate(optimizer, run.iteration, tcfg)  # from the config, also after a resume
    return run


def banner(config: dict[str, Any], asked: dict[str, Any], model: torch.nn.Module, deform_names: list[str],
           world_size: int, device: torch.device, facts: DeviceFacts, how: str, accum_note: str) -> str:
    """The start lines: start or resume, model size, deformable layers, device, batch (and how train.accum_steps=auto
    chose), and what runs where the config said otherwise."""
    info, tcfg = count_parameters(model), config["train"]
    per_forward = tcfg["batch_size"] // (world_size * tcfg["accum_steps"])
    resolved = [f"{k}={v} runs as {flatten(config)[k]}" for k, v in flatten(asked).items() if flatten(config).get(k, v) != v]
    return (
        f"{how}\n{config['config_name']}: {info['params']:,} parameters (inference), {info['deform_params']:,} in offset/mask "
        f"predictors; deformable layers: {', '.join(deform_names) or 'none'}\n"
        f"  {world_size} process(es) on {describe_device(device, facts)}; global batch {tcfg['batch_size']} "
        f"({per_forward} per forward x {tcfg['accum_steps']} micro-batch(es) per step in each"
        f"{'; train.accum_steps=' + accum_note if accum_note else ''})\n"
        f"  precision {tcfg['amp']}, layout {'channels_last' if tcfg['channels_last'] else 'contiguous'}, deform op "
        f"{config['model']['deform_op']}, loss op {tcfg['loss_op']}{', compiled' if tcfg['compile'] else ''}"
        + (f" ({'; '.join(resolved)} on this device)" if resolved else "")
    )


def restore(run: Run, checkpoint: dict[str, Any]) -> None:
    """Weights, optimizer, scaler, position, best mIoU and RNG from ``checkpoint``; the config's settings win."""
    run.model.load_state_dict(checkpoint["model"])
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in run.optimizer.param_groups]
    try:
        run.optimizer.load_state_dict(checkpoint["optimizer"])
    except ValueError:  # another offset_lr_mult merged or split the parameter groups
        raise UserError(
            f"--resume: model.deform.offset_lr_mult={run.config['model']['deform']['offset_lr_mult']} groups the "
            f"parameters differently from the checkpoint's value, so its optimizer state does not fit. Resume with the "
            f"checkpoint's offset_lr_mult, or start a new run."
        ) from None
    for group, settings in zip(run.optimizer.param_groups, fresh):
        group.update(settings)  # momentum, weight decay, lr_mult: the resumed config's
    if checkpoint["scaler"] and run.scaler.is_enabled():
        run.scaler.load_state_dict(checkpoint["scaler"])
    run.iteration, run.validated, run.best_miou = checkpoint["iteration"], checkpoint["validated"], checkpoint["best_miou"]
    run.checkpointed = run.iteration


def loop(run: Run, stop: Stop) -> int:
    """Train to ``train.iters``: a step per iteration; losses, validation and last.pt at their intervals."""
    cfg, tcfg = run.config, run.config["train"]
    batches = iter(build_train_loader(cfg, run.rank, run.world_size, start_iter=run.iteration))
    val_loader = build_val_loader(cfg, "validation", run.rank, run.world_size, max_images=tcfg["val_max_images"])
    announce(run)

    def due(interval: int) -> bool:
        return run.iteration % interval == 0 or run.iteration == tcfg["iters"]

    bar = tqdm(total=tcfg["iters"], initial=run.iteration, disable=not run.master, dynamic_ncols=True)
    window, saved, error, stopped, agreed, metrics = Window(), run.iteration, None, False, False, None
    try:
        if run.validated < run.iteration and due(tcfg["val_interval"]):  # a validation a stop cut short
            stopped = (metrics := validate(run, val_loader, stop, then_saved=True)) is None
            if not stopped:
                save_last(run)  # with the validation's record (validated, best mIoU)
        while not stopped and run.iteration < tcfg["iters"]:
            try:
                images, labels, valid = next(batches)
            except UserError as err:  # a file that cannot be read: saved below, then named
                error = error_message(err)
            except RuntimeError:  # loader workers ended by the stop signal too (a signal to the process group)
                if stop.reason is None:
                    raise
            if stopped := any_rank(stop.reason is not None or error is not None):
                break
            window.data_time += time.perf_counter() - window.mark
            images, labels = on_device(run, images, labels, valid)
            torch.manual_seed(iteration_seed(cfg["seed"], run.iteration, run.rank))  # dropout
            try:
                window.losses.append(train_step(run.train_model, run.optimizer, run.scaler, images, labels, cfg))
            except RuntimeError as err:  # out of memory (CUDA's, or the CPU allocator's): the paragraph
                if not is_out_of_memory(err):
                    raise
                raise out_of_memory(run, "training") from None
            run.iteration += 1
            set_learning_rate(run.optimizer, run.iteration, tcfg)  # the next step's (a per-step scheduler)
            bar.update(1)
            if due(tcfg["log_interval"]) or due(tcfg["val_interval"]) or due(tcfg["ckpt_interval"]):
                log_window(run, window, bar)  # checks the losses: NonFiniteLoss names the iteration
                window = Window()
            if due(tcfg["val_interval"]):
                check_weights(run)  # a bad last update must reach neither best.pt nor last.pt
                if stopped := (metrics := validate(run, val_loader, stop, due(tcfg["ckpt_interval"]))) is None:
                    break
            if due(tcfg["ckpt_interval"]):
                saved = save_last(run)
            window.mark = time.perf_counter()
        agreed = True  # every rank leaves here together: the end, or a stop they agreed on
    finally:
        bar.close()
        if run.iteration > saved and (agreed or run.world_size == 1):  # one process may always save its own work
            log_window(run, window, bar)
            saved = save_last(run)
    return finish(run, (stop.reason or "a stop signal on another rank") if stopped else None,
                  first_message(error) if stopped else None, metrics)


def log(run: Run, write: Callable[[SummaryWriter], None]) -> None:
    """``write(run.writer)`` on rank 0: a log write that fails (tb/ deleted, a read-only or full disk) is reported in
    one line and ends the logging, never the training (checkpoints are saved as usual; a restart logs again)."""
    if run.writer is None:
        return
    try:
        write(run.writer)
    except OSError as err:
        run.writer = None
        tqdm.write(f"warning: TensorBoard logging stopped: cannot write {run.work_dir / 'tb'} ({err.strerror or err}). "
                   f"The training goes on without it and saves its checkpoints as usual; a restart (--resume auto) "
                   f"logs there again.", file=sys.stderr)


def announce(run: Run) -> None:
    """Rank 0, once the start succeeded (the work dir now belongs to this run): the record, TensorBoard, the banner."""
    if not run.master:
        return
    write_record(run.work_dir, run.config)
    run.writer = tb.open_writer(run.work_dir, run.iteration)
    print(run.banner)
    for change in run.config_changes[-1:]:
        if change["iteration"] == run.iteration:
            print(f"resumed at iteration {run.iteration} with changed settings: "
                  + ", ".join(f"{k} {old} -> {new}" for k, (old, new) in change["changes"].items()))


def on_device(run: Run, images: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A batch on the training device: uint8 images (a quarter of float32's bytes) normalised there, int64 labels."""
    layout = memory_format(run.config["train"]["channels_last"])
    images = images.to(run.device, non_blocking=True).contiguous(memory_format=layout)
    return normalize_batch(images, valid), labels.to(run.device, non_blocking=True).long()


def finish(run: Run, stopped_by: str | None, error: str | None, metrics: dict[str, Any] | None) -> int:
    """Say how the run ended; raise the error of a file that could not be read, after last.pt was saved."""
    saved = "saved" if run.iteration else "nothing trained yet"  # the loop's end saved the work since the last save
    if error is not None:
        raise UserError(f"{error} Training stopped at iteration {run.iteration} ({saved}); after fixing the file, run "
                        f"the same command line with --resume auto to continue.")
    if not run.master:
        return 0
    if stopped_by:
        print(f"stopped by {stopped_by} at iteration {run.iteration} ({saved}). To continue, run the same command line "
              f"with --resume auto.")
    elif metrics is None:
        print(f"nothing to do: the run in {run.work_dir} is already at iteration {run.config['train']['iters']}.")
    else:
        print(
            f"done: {run.iteration} iterations, final val mIoU {metrics['mIoU']:.2f} (best {run.best_miou:.2f}).\n"
            f"  curves:    tensorboard --logdir {run.work_dir.parent}\n"
            f"  evaluate:  python evaluate.py --checkpoint {run.work_dir / 'last.pt'}"
        )
    return 0


@dataclass
class Window:
    """The iterations since the last logging boundary: their losses, data-wait time and wall time."""

    losses: list[dict[str, torch.Tensor]] = field(default_factory=list)
    data_time: float = 0.0
    start: float = field(default_factory=time.perf_counter)
    mark: float = field(default_factory=time.perf_counter)  # when the next batch was asked for


def log_window(run: Run, window: Window, bar: tqdm) -> None:
    """Check the window's losses (averaged over ranks: one sync) and log them with the speed on rank 0.

    Raises NonFiniteLoss naming the first bad iteration, so nothing after it is saved.
    """
    if not window.losses:
        return
    stacked = torch.stack([torch.stack([w["total"], w["main"], w.get("aux", w["main"])]) for w in window.losses])
    if run.world_size > 1:
        dist.all_reduce(stacked)
        stacked /= run.world_size
    stacked = stacked.float().cpu()
    bad = (~torch.isfinite(stacked)).any(dim=1).nonzero()
    if len(bad):
        raise NonFiniteLoss(run.iteration - len(window.losses) + int(bad[0]) + 1, run.checkpointed, nonfinite(run))
    if not run.master:
        return
    elapsed, mean, group = time.perf_counter() - window.start, stacked.mean(0), run.optimizer.param_groups[0]
    values = {"loss": mean[0].item(), "loss_main": mean[1].item(), "lr": group["lr"] / group["lr_mult"],
              "images_per_s": len(window.losses) * run.config["train"]["batch_size"] / elapsed,
              "data_wait_share": window.data_time / elapsed}
    if "aux" in window.losses[0]:
        values["loss_aux"] = mean[2].item()
    if run.device.type == "cuda":
        values["gpu_mem_gib"] = torch.cuda.max_memory_allocated(run.device) / 2**30
    log(run, lambda writer: tb.log_train(writer, run.iteration, values))
    bar.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{values['lr']:.2e}")


def check_weights(run: Run) -> None:
    """NonFiniteLoss if an update made a weight NaN or infinite (the losses before it were still finite)."""
    finite = torch.stack([torch.isfinite(p).all() for p in run.model.parameters()]).all().to(torch.int32)
    if run.world_size > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if not finite.item():
        raise NonFiniteLoss(run.iteration, run.checkpointed, nonfinite(run), "the weights")


def validate(run: Run, loader: Any, stop: Stop, then_saved: bool) -> dict[str, Any] | None:
    """Validation metrics (logged on rank 0, best.pt kept), or None when a stop signal cut validation short.

    A new best is written to best.pt now, or, when last.pt is saved at this iteration (``then_saved``), becomes
    best.pt as a second name of that file (``save_last``): a run whose best is its end holds one file, not two.

    The ranks agree on stopping after each image, as many times as the longest shard has images (a rank whose
    shard is shorter, or whose loader workers the signal ended, still takes part).
    """
    start, matrix = time.perf_counter(), ConfusionMatrix(run.config["model"]["num_classes"], run.device)
    longest = -(-len(loader.dataset.dataset) // run.world_size)
    with closing(predictions(run.model, loader, run.device, run.config, run.config["train"]["amp"])) as images:
        for _ in range(longest):
            try:
                _, pred, label = next(images, (None, None, None))
            except RuntimeError as err:  # loader workers ended by the stop signal too (a signal to the process group)
                if is_out_of_memory(err):
                    raise out_of_memory(run, "validation") from None
                if stop.reason is None:
                    raise
            else:
                if pred is not None:
                    matrix.update(pred, label)
            if any_rank(stop.reason is not None):
                return None
    matrix.all_reduce()
    metrics, run.validated = matrix.metrics(), run.iteration
    is_best, run.best_miou = metrics["mIoU"] > run.best_miou, max(run.best_miou, metrics["mIoU"])  # alike on every rank
    if is_best:
        run.best_at = run.iteration
    if run.master:
        names, palette = load_class_info()
        if run.samples is None:  # the fixed panel images, read once per run
            run.samples = [loader.dataset[i][:2] for i in range(min(run.config["train"]["tb_images"], len(loader.dataset)))]
        log(run, lambda writer: tb.log_validation(writer, run.iteration, metrics, names))
        log(run, lambda writer: tb.log_samples(writer, run.iteration, run.model, run.samples, palette, run.device))
        tqdm.write(f"iter {run.iteration}: val mIoU {metrics['mIoU']:.2f}  aAcc {metrics['aAcc']:.2f}  mAcc "
                   f"{metrics['mAcc']:.2f}  ({time.perf_counter() - start:.0f}s){'  new best' if is_best else ''}")
        if is_best and not then_saved:
            save_checkpoint(checkpoint_state(run), run.work_dir / "best.pt")
    if is_best and not then_saved:
        run.checkpointed = run.iteration
    return metrics


def save_last(run: Run) -> int:
    """last.pt at the current iteration, once the weights are checked finite; returns the iteration saved."""
    check_weights(run)
    if run.master:
        save_checkpoint(checkpoint_state(run), run.work_dir / "last.pt")
        if run.best_at == run.iteration:  # the best weights are these: best.pt names the same file
            link_checkpoint(run.work_dir / "last.pt", run.work_dir / "best.pt")
    run.checkpointed = run.iteration
    return run.iteration


def checkpoint_state(run: Run) -> dict[str, Any]:
    """The checkpoint: one plain dict (nanoGPT) of tensors and plain values. No RNG state: every iteration seeds
    torch from the config seed and its number (``iteration_seed``), the data from the sample's position."""
    return {
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else None,
        "iteration": run.iteration,
        "validated": run.validated,
        "best_miou": run.best_miou,
        "config": run.config,
        "config_changes": run.config_changes,
        "environment": run.environment,
    }


def out_of_memory(run: Run, where: str) -> UserError:
    """The out-of-memory paragraph of a training step or a validation (``engine.device``'s decision table)."""
    return UserError(out_of_memory_message(where, run.config, run.config["train"]["amp"], run.world_size,
                                           run.device.type, memory_gib(run.device), f"at iteration {run.iteration}"))


def nonfinite(run: Run) -> str:
    """What a non-finite loss message proposes for ``run`` (``engine.device``'s decision table)."""
    return advice_text(nonfinite_advice(run.config, run.device.type, run.facts.capability), "training")

"""The training run: set-up, then one loop counted in iterations (nanoGPT's shape), with one exit for every stop.

The recipe is mmsegmentation's FCN-R50-D8 for ADE20K (SGD, poly schedule, aux loss 0.4). Everything random
derives from the config seed and the iteration number, so a run stopped at any point and resumed ends where
the uninterrupted run ends. Rank 0 alone logs and writes files. Every way out of the loop (the end, a stop
signal, a file that cannot be read, a non-finite loss, any error) passes one ``finally``, which saves last.pt
when the work since the last save is sound; under torchrun the ranks agree on stopping every iteration.
"""

from __future__ import annotations

import time
from contextlib import closing, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from configs import UserError, error_message, flatten, resume_changes
from data.dataset import build_train_loader, build_val_loader, load_class_info, prepare_dataset_root
from data.transforms import normalize_batch
from engine import loss as loss_module
from engine import tensorboard as tb
from engine.checkpoint import link_checkpoint, load_checkpoint, save_checkpoint
from engine.device import DeviceFacts, autocast, describe_device, memory_format, resolve_config
from engine.distributed import any_rank, first_message, init_distributed
from engine.environment import describe, training_data
from engine.inference import predictions
from engine.metric import ConfusionMatrix
from engine.optim import build_optimizer, set_learning_rate
from engine.workdir import check_work_dir, wants_resume, write_record
from models.segmentor import build_model, count_parameters


class NonFiniteLoss(Exception):
    """The loss (or the weights) became NaN or infinite; nothing after the last good checkpoint is saved."""

    def __init__(self, iteration: int, last_good: int, what: str = "the loss") -> None:
        super().__init__(
            f"training stopped: {what} became non-finite (NaN or inf) at iteration {iteration}. The weights after it "
            f"are not saved; last.pt holds iteration {last_good}. Lower train.lr, check the data, or use train.amp=bf16, "
            f"then continue with --resume auto (a changed train.lr applies from the resume iteration on)."
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


@dataclass
class Run:
    """What a training run holds: the config as it runs, the model (plain, and as trained), optimizer and place."""

    config: dict[str, Any]
    work_dir: Path
    rank: int
    world_size: int
    device: torch.device
    model: torch.nn.Module  # the plain model: what checkpoints hold
    train_model: torch.nn.Module  # the model as trained (compiled, DDP)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    banner: str
    iteration: int = 0
    validated: int = 0  # the iteration of the last completed validation
    best_miou: float = -1.0
    best_at: int = -1  # the iteration of the best validation in this process's lifetime
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
    if tcfg["batch_size"] % (world_size * tcfg["accum_steps"]):
        raise UserError(
            f"train.batch_size={tcfg['batch_size']} (the global batch) must be divisible by the {world_size} "
            f"process(es) of this launch times train.accum_steps={tcfg['accum_steps']}."
        )
    torch.backends.cudnn.benchmark = cuda
    resume = wants_resume(work_dir, resume_mode)
    note = check_work_dir(work_dir, config, resume) if rank == 0 else None
    if rank == 0:  # the dataset is checked (and the demo data made) before anything slow happens
        prepare_dataset_root(config)
    checkpoint = load_checkpoint(work_dir / "last.pt") if resume else None
    changes = list(checkpoint["config_changes"]) if checkpoint else []
    if checkpoint and (diff := resume_changes(checkpoint["config"], config, str(work_dir / "last.pt"))):
        changes.append({"iteration": checkpoint["iteration"], "changes": diff})
    if rank != 0 and world_size > 1:
        dist.barrier()  # rank 0 fetches the ImageNet weights first; the others then read them from the cache
    torch.manual_seed(config["seed"])  # the initial weights (the same on every rank)
    model, deform_names = build_model(config, load_pretrained=checkpoint is None)
    if rank == 0 and world_size > 1:
        dist.barrier()
    if world_size > 1 and tcfg["sync_bn"] and cuda:  # SyncBatchNorm is CUDA-only
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device, memory_format=memory_format(tcfg["channels_last"]))
    optimizer = build_optimizer(model, config)
    scaler = torch.amp.GradScaler("cuda", enabled=tcfg["amp"] == "fp16")
    train_model = torch.compile(model) if tcfg["compile"] else model  # compiled inside DDP, as nanoGPT
    if world_size > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(train_model, device_ids=[device.index] if cuda else None)
    how = note or (f"resuming {work_dir / 'last.pt'} at iteration {checkpoint['iteration']}" if checkpoint
                   else f"starting a new run in {work_dir}")
    run = Run(config, work_dir, rank, world_size, device, model, train_model, optimizer, scaler,
              banner(config, asked, model, deform_names, world_size, device, facts, how), config_changes=changes,
              environment={**describe(device), "device": describe_device(device, facts),
                           "training_data": training_data(config)})
    if checkpoint is not None:
        restore(run, checkpoint)
    set_learning_rate(optimizer, run.iteration, tcfg)  # from the config, also after a resume
    return run


def banner(config: dict[str, Any], asked: dict[str, Any], model: torch.nn.Module, deform_names: list[str],
           world_size: int, device: torch.device, facts: DeviceFacts, how: str) -> str:
    """The start lines: start or resume, model size, deformable layers, device, batch, and what runs where the
    config said otherwise."""
    info, tcfg = count_parameters(model), config["train"]
    per_forward = tcfg["batch_size"] // (world_size * tcfg["accum_steps"])
    resolved = [f"{k}={v} runs as {flatten(config)[k]}" for k, v in flatten(asked).items() if flatten(config).get(k, v) != v]
    return (
        f"{how}\n{config['config_name']}: {info['params']:,} parameters (inference), {info['deform_params']:,} in offset/mask "
        f"predictors; deformable layers: {', '.join(deform_names) or 'none'}\n"
        f"  {world_size} process(es) on {describe_device(device, facts)}; global batch {tcfg['batch_size']} "
        f"({per_forward} per forward x {tcfg['accum_steps']} micro-batch(es) per step in each)\n"
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
                save_last(run, saved)  # with the validation's record (validated, best mIoU)
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
            except torch.cuda.OutOfMemoryError:
                raise UserError(out_of_memory_message(run)) from None
            run.iteration += 1
            set_learning_rate(run.optimizer, run.iteration, tcfg)  # the next step's (a per-step scheduler)
            bar.update(1)
            if due(tcfg["log_interval"]) or due(tcfg["val_interval"]) or due(tcfg["ckpt_interval"]):
                log_window(run, window, saved, bar)  # checks the losses: NonFiniteLoss names the iteration
                window = Window()
            if due(tcfg["val_interval"]):
                check_weights(run, saved)  # a bad last update must reach neither best.pt nor last.pt
                if stopped := (metrics := validate(run, val_loader, stop, due(tcfg["ckpt_interval"]))) is None:
                    break
            if due(tcfg["ckpt_interval"]):
                saved = save_last(run, saved)
            window.mark = time.perf_counter()
        agreed = True  # every rank leaves here together: the end, or a stop they agreed on
    finally:
        bar.close()
        if run.iteration > saved and (agreed or run.world_size == 1):  # one process may always save its own work
            log_window(run, window, saved, bar)
            saved = save_last(run, saved)
    return finish(run, (stop.reason or "a stop signal on another rank") if stopped else None,
                  first_message(error) if stopped else None, metrics)


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
    if error is not None:
        saved = " (last.pt holds it)" if run.iteration > 0 else ""
        raise UserError(f"{error} Training stopped at iteration {run.iteration}{saved}; after fixing the file, run the "
                        f"same command with --resume auto to continue.")
    if not run.master:
        return 0
    if stopped_by:
        saved = "last.pt holds it" if run.iteration > 0 else "nothing trained yet"
        print(f"stopped by {stopped_by} at iteration {run.iteration}; {saved}. Continue with the same command and "
              f"--resume auto.")
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


def log_window(run: Run, window: Window, last_good: int, bar: tqdm) -> None:
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
        raise NonFiniteLoss(run.iteration - len(window.losses) + int(bad[0]) + 1, last_good)
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
    tb.log_train(run.writer, run.iteration, values)
    bar.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{values['lr']:.2e}")


def check_weights(run: Run, last_good: int) -> None:
    """NonFiniteLoss if an update made a weight NaN or infinite (the losses before it were still finite)."""
    finite = torch.stack([torch.isfinite(p).all() for p in run.model.parameters()]).all().to(torch.int32)
    if run.world_size > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if not finite.item():
        raise NonFiniteLoss(run.iteration, last_good, "the weights")


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
            except RuntimeError:  # loader workers ended by the stop signal too (a signal to the process group)
                if stop.reason is None:
                    raise
            else:
                if pred is not None:
                    matrix.update(pred, label)
            if any_rank(stop.reason is not None):
                return None
    matrix.all_reduce()
    metrics, run.validated = matrix.metrics(), run.iteration
    if run.master:
        names, palette = load_class_info()
        if run.samples is None:  # the fixed panel images, read once per run
            run.samples = [loader.dataset[i][:2] for i in range(min(run.config["train"]["tb_images"], len(loader.dataset)))]
        tb.log_validation(run.writer, run.iteration, metrics, names)
        tb.log_samples(run.writer, run.iteration, run.model, run.samples, palette, run.device)
        is_best, run.best_miou = metrics["mIoU"] > run.best_miou, max(run.best_miou, metrics["mIoU"])
        tqdm.write(f"iter {run.iteration}: val mIoU {metrics['mIoU']:.2f}  aAcc {metrics['aAcc']:.2f}  mAcc "
                   f"{metrics['mAcc']:.2f}  ({time.perf_counter() - start:.0f}s){'  new best' if is_best else ''}")
        if is_best:
            run.best_at = run.iteration
            if not then_saved:
                save_checkpoint(checkpoint_state(run), run.work_dir / "best.pt")
    return metrics


def save_last(run: Run, last_good: int) -> int:
    """last.pt at the current iteration, once the weights are checked finite; returns the iteration saved."""
    check_weights(run, last_good)
    if run.master:
        save_checkpoint(checkpoint_state(run), run.work_dir / "last.pt")
        if run.best_at == run.iteration:  # the best weights are these: best.pt names the same file
            link_checkpoint(run.work_dir / "last.pt", run.work_dir / "best.pt")
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


def out_of_memory_message(run: Run) -> str:
    """What to do when a step does not fit: first split it (the recipe stays), then a cheaper precision."""
    tcfg = run.config["train"]
    per_forward = tcfg["batch_size"] // (run.world_size * tcfg["accum_steps"])
    advice = [f"train.accum_steps={tcfg['accum_steps'] * 2} ({per_forward // 2} images per forward, the same global "
              f"batch and recipe)"] if per_forward > 1 else []
    if tcfg["amp"] == "none":
        advice.append("train.amp=auto (bf16 or fp16 autocast, about half the activation memory)")
    advice.append("more GPUs under torchrun")
    return (
        f"CUDA out of memory at iteration {run.iteration} with {per_forward} images per forward (train.batch_size="
        f"{tcfg['batch_size']} over {run.world_size} process(es) x train.accum_steps={tcfg['accum_steps']}, precision "
        f"{tcfg['amp']}). Continue with --resume auto and {'; or '.join(advice)}. The README's memory table gives "
        f"the memory per image."
    )

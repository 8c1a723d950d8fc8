"""Train a (deformable) ResNet-50 FCN for semantic segmentation: the recipe, in nanoGPT's shape.

    python train.py --config def-conv-v2.yaml                          # one GPU (or the demo on the CPU)
    torchrun --nproc_per_node=8 train.py --config def-conv-v2.yaml     # DDP, the global batch split over GPUs
    python train.py --config def-conv-v2.yaml --resume auto            # start, or continue from the newest checkpoint

Read it top to bottom: ``set_up`` (config, device, model, optimizer, data, a resumed state), then ``train``, one loop
counted in iterations (at the top, the point where the losses are checked and logged, the model validated and the
checkpoints written at their intervals; then a batch, its learning rate, a step). One iteration runs the recipe's
code in six files: data/dataset.py and data/transforms.py (the data), models/segmentor.py and models/deform_conv.py
(the model), engine/loss.py (the loss) and engine/optim.py (the step with gradient accumulation, and the schedule).
The operations around it run at the start, at that point and at the stop: engine/signals.py (stop signals),
engine/workdir.py (the work dir, its lock, start or resume), engine/checkpoint.py (writing and reading checkpoints),
engine/device.py and engine/diagnosis.py (the device), engine/memory.py (what fits the card). Everything random
derives from the config's seed and the iteration, so a run stopped anywhere and resumed ends where the
uninterrupted run ends (bitwise on the CPU; on CUDA, cuDNN's benchmark mode and the atomic adds of the deformable
op's and the upsampling's backward are not bitwise reproducible). Under torchrun rank 0 alone logs and writes
files, and the ranks agree once per iteration whether to stop.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from configs import UserError, batch_split_error, error_message, flatten, load_config
from data.dataset import build_train_loader, build_val_loader, load_class_info, prepare_dataset_root
from data.transforms import normalize_batch
from engine.checkpoint import checkpoint_state, link_checkpoint, restore, save_checkpoint
from engine.console import command_line
from engine.device import advice_text, choose_device, describe_device, memory_format, nonfinite_advice, resolve_config
from engine.diagnosis import DeviceInfo, read_device_info
from engine.distributed import any_rank, env_rank, first_message, init_distributed, shutdown
from engine.environment import describe, training_data
from engine.evaluation import score
from engine.memory import choose_accum_steps, is_out_of_memory, memory_gib, out_of_memory_message
from engine.optim import build_optimizer, scale_batchnorm_momentum, set_learning_rate, train_step
from engine.signals import Stop, catch_stop_signals
from engine.tensorboard import TensorBoard, log_samples, log_train, log_validation
from engine.workdir import hold_work_dir, start_or_resume, write_record
from models.segmentor import build_model, count_parameters


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        description="Train a ResNet-50 FCN (optionally with deformable convolutions) on ADE20K or the demo data.",
        epilog="example: python train.py --config demo.yaml train.iters=40   (overrides are key.sub=value)",
    )
    parser.add_argument("--config", required=True, help="config name in configs/ (e.g. def-conv-v2.yaml) or a path")
    parser.add_argument("--work-dir", help="where checkpoints, logs and the resolved config go (default runs/<config name>)")
    parser.add_argument(
        "--resume", nargs="?", const="last", choices=["last", "auto"],
        help="--resume: continue the run in the work dir from its newest checkpoint (last.pt, or best.pt when a "
        "validation wrote it later); --resume auto: continue when there is a checkpoint, start otherwise (one command "
        "line for starts and restarts: torchrun --max-restarts, SLURM requeue)",
    )
    parser.add_argument(
        "--device", choices=["auto", "cuda", "cpu"], default="auto",
        help="auto (default): CUDA when usable; a config meant for a GPU (ADE20K data, amp, compile, Triton) stops "
        "with the reason instead of training on the CPU. cpu: on the CPU deliberately",
    )
    parser.add_argument("overrides", nargs="*", help="config overrides key.sub=value, typed like the value they replace")
    argv = sys.argv[1:] if argv is None else argv
    # a bare --resume takes no value from the next word unless it is one of its values: an override after it stays one
    argv = ["--resume=last" if word == "--resume" and argv[i + 1:i + 2] not in (["last"], ["auto"]) else word
            for i, word in enumerate(argv)]
    return parser.parse_intermixed_args(argv)


@command_line
def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: 0 when the run ends, or stops and saves; 2 for a user error; 1 for a non-finite loss."""
    args = parse_args(argv)
    stop = catch_stop_signals()
    try:
        config = load_config(args.config, args.overrides)
        device_info = read_device_info()
        device = choose_device(args.device, config, device_info)
        work_dir = Path(args.work_dir or Path("runs") / config["config_name"])
        with hold_work_dir(work_dir, env_rank()):
            training = set_up(config, work_dir, args.resume, device, device_info)
            try:
                return finish(training, *train(training, stop))
            except RuntimeError as err:  # out of memory in a step: the paragraph, after last.pt was saved (``train``)
                if not is_out_of_memory(err):
                    raise
                raise UserError(out_of_memory_message(
                    "training", training.config, training.config["train"]["amp"], training.world_size,
                    training.device.type, memory_gib(training.device), f"at iteration {training.iteration}")) from None
            finally:
                if training.log is not None:
                    training.log.close()
    finally:
        shutdown()


class NonFiniteLoss(UserError):
    """The loss (or the weights) became NaN or infinite; nothing after the last good checkpoint is saved. Exit code 1."""

    exit_code = 1

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
class Training:
    """A training run as it goes: the resolved config, the model (plain, as checkpoints hold it, and as trained:
    compiled, DDP), optimizer, data, and where it stands (what a checkpoint records)."""

    config: dict[str, Any]
    work_dir: Path
    rank: int
    world_size: int
    device: torch.device
    model: torch.nn.Module
    train_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    batches: Any  # the training batches, from the iteration the run starts at on
    val_loader: DataLoader
    iteration: int = 0
    validated: int = 0  # the iteration of the last complete validation
    best_miou: float = -1.0
    best_at: int = -1  # the iteration of the best validation in this process's lifetime
    saved: int = 0  # the iteration last.pt holds (where this process started, until it saves)
    checkpointed: int = 0  # the iteration of the work dir's newest checkpoint, where --resume auto continues (0: none)
    config_changes: list[dict[str, Any]] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)  # rank 0's, which writes the checkpoints
    nonfinite_advice: str = ""  # what a non-finite loss message proposes (``NonFiniteLoss``)
    metrics: dict[str, Any] | None = None  # the last complete validation's
    log: TensorBoard | None = None  # rank 0's
    samples: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # the validation images shown in TensorBoard


def set_up(config: dict[str, Any], work_dir: Path, resume: str | None, device_name: str,
           device_info: DeviceInfo) -> Training:
    """Join the process group; resolve the config for the device; start or resume (``engine.workdir``'s rules);
    build the model, optimizer and data; restore a checkpoint's state; then (rank 0) record the run and say what runs."""
    rank, world_size, device = init_distributed(device_name)
    asked, config = config, resolve_config(config, device, device_info)
    tcfg, cuda = config["train"], device.type == "cuda"
    checkpoint, changes, how = start_or_resume(work_dir, resume, config, rank)
    synced = world_size > 1 and tcfg["sync_bn"] and cuda  # SyncBatchNorm: statistics over every process's images
    if why := batch_split_error(tcfg["batch_size"], 1 if tcfg["accum_steps"] == "auto" else tcfg["accum_steps"],
                                world_size, synced):
        raise UserError(why)
    torch.backends.cudnn.benchmark = cuda
    if rank == 0:
        prepare_dataset_root(config)  # the data checked (the demo data made) before anything slow
    if rank != 0 and world_size > 1:
        dist.barrier()  # rank 0 fetches the ImageNet weights first; the others then read them from the cache
    torch.manual_seed(config["seed"])  # the initial weights, the same on every rank
    model, deform_names = build_model(config, load_pretrained=checkpoint is None)
    if rank == 0 and world_size > 1:
        dist.barrier()
    model = model.to(device, memory_format=memory_format(tcfg["channels_last"]))
    optimizer = build_optimizer(model, config)
    scaler = torch.amp.GradScaler("cuda", enabled=tcfg["amp"] == "fp16")
    accum_note = "auto, kept from the checkpoint" if asked["train"]["accum_steps"] == "auto" else ""
    if tcfg["accum_steps"] == "auto":  # trial steps on the plain model, before SyncBatchNorm, compile and DDP
        tcfg["accum_steps"], accum_note = choose_accum_steps(model, optimizer, scaler, config, world_size, synced)
    scale_batchnorm_momentum(model, tcfg["accum_steps"])
    if synced:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    train_model = torch.compile(model) if tcfg["compile"] else model  # compiled inside DDP, as nanoGPT
    if world_size > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(train_model, device_ids=[device.index] if cuda else None)
    start = checkpoint["iteration"] if checkpoint else 0
    train_loader = build_train_loader(config, rank, world_size, start_iter=start)
    training = Training(
        config, work_dir, rank, world_size, device, model, train_model, optimizer, scaler, iter(train_loader),
        build_val_loader(config, "validation", rank, world_size, max_images=tcfg["val_max_images"]),
        config_changes=changes,
        nonfinite_advice=advice_text(nonfinite_advice(config, device.type, device_info.capability), "training"),
    )
    if checkpoint is not None:
        restore(checkpoint, model, optimizer, scaler, config)
        training.iteration = training.saved = training.checkpointed = start
        training.validated, training.best_miou = checkpoint["validated"], checkpoint["best_miou"]
    if rank == 0:  # the start succeeded: the work dir is this run's now; what its checkpoints record
        training.environment = {**describe(device), "device": describe_device(device, device_info),
                                "training_data": training_data(train_loader.dataset)}
        write_record(work_dir, config)
        training.log = TensorBoard(work_dir, training.iteration)
        print(banner(training, asked, deform_names, how, accum_note))
    return training


def train(t: Training, stop: Stop) -> tuple[str | None, str | None]:
    """Train to ``train.iters`` in nanoGPT's loop: each pass first reaches the point where, at their intervals, the
    losses and weights are checked and logged, the model validated and the checkpoints written; then it trains one
    iteration (a batch, its learning rate, a step with gradient accumulation).

    Every way out passes that point. The end and a stop (a signal, a file that cannot be read) leave the loop there,
    after last.pt. Any other error is kept, the work since the last save checked and saved at the point, and the
    error raised after it (under torchrun at once: the other ranks cannot take part). A non-finite loss or weight
    saves nothing. Returns what stopped the run (None: it ended) and the message of a file that could not be read.
    """
    tcfg = t.config["train"]
    layout = memory_format(tcfg["channels_last"])

    def every(interval: int) -> bool:
        return t.iteration % interval == 0 or t.iteration == tcfg["iters"]

    losses, waited, window_start = [], 0.0, time.perf_counter()  # since the last point
    stopping, unreadable, failure = False, None, None
    with tqdm(total=tcfg["iters"], initial=t.iteration, disable=t.rank != 0, dynamic_ncols=True) as bar:
        while True:
            try:
                # The point: checks first (a bad update reaches no checkpoint), then validation, logs, checkpoints.
                ending = stopping or failure is not None or t.iteration == tcfg["iters"]
                values = None
                if ending or any(every(tcfg[k]) for k in ("log_interval", "val_interval", "ckpt_interval")):
                    values = checked_losses(t, losses, waited, time.perf_counter() - window_start)
                    check_weights(t)
                    losses, waited, window_start = [], 0.0, time.perf_counter()
                validating = not stopping and failure is None and t.validated < t.iteration and every(
                    tcfg["val_interval"])
                validated = validating and validate(t, stop)
                if validating and not validated:  # a stop signal cut the validation short
                    stopping = ending = True
                # last.pt at the checkpoint interval, at the end and at a stop; and after a validation made again at
                # the iteration last.pt holds (one a stop had cut short), so that it is not made a third time
                last = (t.iteration > t.saved and (ending or every(tcfg["ckpt_interval"]))
                        or validated and t.iteration == t.saved)
                best = validated and t.best_at == t.iteration and not last  # else best.pt is last.pt's second name
                if t.rank == 0:
                    if values is not None:
                        t.log.write(log_train, t.iteration, values)
                        bar.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{values['lr']:.2e}")
                    if validated:
                        names, palette = load_class_info()
                        t.log.write(log_validation, t.iteration, t.metrics, names)
                        t.log.write(log_samples, t.iteration, t.model, t.samples, palette, t.device)
                    if last or best:
                        state = checkpoint_state(t.model, t.optimizer, t.scaler, iteration=t.iteration,
                                                 validated=t.validated, best_miou=t.best_miou, config=t.config,
                                                 config_changes=t.config_changes, environment=t.environment)
                        save_checkpoint(state, t.work_dir / ("last.pt" if last else "best.pt"))
                    if last and t.best_at == t.iteration:  # the best weights are these: best.pt names the same file
                        link_checkpoint(t.work_dir / "last.pt", t.work_dir / "best.pt")
                t.saved = t.iteration if last else t.saved
                t.checkpointed = t.iteration if last or best else t.checkpointed
                if ending:
                    break

                # One iteration.
                asked = time.perf_counter()
                try:
                    images, labels, valid = next(t.batches)
                except UserError as err:  # a file that cannot be read: the run saves, then names it
                    unreadable = error_message(err)
                except (RuntimeError, OSError):  # loader workers the stop signal ended too (a signal to the process
                    if stop.reason is None:  # group): a worker error, or a connection reset while a batch was passed
                        raise
                here = stop.reason is not None or unreadable is not None  # under torchrun: on any rank
                if stopping := any_rank(here) if t.world_size > 1 else here:
                    continue
                waited += time.perf_counter() - asked
                images = normalize_batch(images.to(t.device, non_blocking=True).contiguous(memory_format=layout), valid)
                labels = labels.to(t.device, non_blocking=True).long()
                torch.manual_seed(iteration_seed(t.config["seed"], t.iteration, t.rank))  # dropout
                set_learning_rate(t.optimizer, t.iteration, tcfg)  # the schedule is per iteration
                losses.append(train_step(t.train_model, t.optimizer, t.scaler, images, labels, t.config))
                t.iteration += 1
                bar.update(1)
            except NonFiniteLoss:
                raise  # nothing after the last good checkpoint is saved
            except BaseException as err:  # any other error: saved at the point, then raised
                if failure is not None or t.world_size > 1:
                    raise
                failure = err
    if failure is not None:
        raise failure
    return ((stop.reason or "a stop signal on another rank") if stopping else None,
            first_message(unreadable) if stopping else None)


def iteration_seed(seed: int, iteration: int, rank: int) -> int:
    """The torch RNG seed of one iteration on one rank (dropout): a function of the run's seed and position."""
    return int(np.random.SeedSequence([seed, iteration, rank]).generate_state(1)[0])


def checked_losses(t: Training, losses: list[dict[str, torch.Tensor]], waited: float,
                   elapsed: float) -> dict[str, float] | None:
    """The losses since the last point, averaged over ranks (one sync) and checked finite; the values to log on
    rank 0 (None without losses, and on the other ranks).

    Raises NonFiniteLoss naming the first bad iteration, so that nothing after it is saved.
    """
    if not losses:
        return None
    stacked = torch.stack([torch.stack([w["total"], w["main"], w.get("aux", w["main"])]) for w in losses])
    if t.world_size > 1:
        dist.all_reduce(stacked)
        stacked /= t.world_size
    stacked = stacked.float().cpu()
    bad = (~torch.isfinite(stacked)).any(dim=1).nonzero()
    if len(bad):
        raise NonFiniteLoss(t.iteration - len(losses) + int(bad[0]) + 1, t.checkpointed, t.nonfinite_advice)
    if t.rank != 0:
        return None
    mean, group = stacked.mean(0), t.optimizer.param_groups[0]
    values = {"loss": mean[0].item(), "loss_main": mean[1].item(), "lr": group["lr"] / group["lr_mult"],
              "images_per_s": len(losses) * t.config["train"]["batch_size"] / elapsed, "data_wait_share": waited / elapsed}
    if "aux" in losses[0]:
        values["loss_aux"] = mean[2].item()
    if t.device.type == "cuda":
        values["gpu_mem_gib"] = torch.cuda.max_memory_allocated(t.device) / 2**30
    return values


def check_weights(t: Training) -> None:
    """NonFiniteLoss if an update made a weight NaN or infinite (the losses before it were still finite)."""
    finite = torch.stack([torch.isfinite(p).all() for p in t.model.parameters()]).all().to(torch.int32)
    if t.world_size > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if not finite.item():
        raise NonFiniteLoss(t.iteration, t.checkpointed, t.nonfinite_advice, "the weights")


def validate(t: Training, stop: Stop) -> bool:
    """Validate (``engine.evaluation.score``): the metrics and the best so far recorded in ``t``, the line printed on
    rank 0. False when a stop signal cut the validation short."""
    scored = score(t.model, t.val_loader, t.device, t.config, t.config["train"]["amp"], "validation",
                   f"at iteration {t.iteration}", stop)
    if scored is None:
        return False
    (matrix, seconds), t.validated = scored, t.iteration
    t.metrics = matrix.metrics()
    if t.metrics["mIoU"] > t.best_miou:
        t.best_miou, t.best_at = t.metrics["mIoU"], t.iteration
    if t.rank == 0:
        if t.samples is None:  # the fixed images of the TensorBoard panels, read once per run
            t.samples = [t.val_loader.dataset[i][:2]
                         for i in range(min(t.config["train"]["tb_images"], len(t.val_loader.dataset)))]
        tqdm.write(f"iter {t.iteration}: val mIoU {t.metrics['mIoU']:.2f}  aAcc {t.metrics['aAcc']:.2f}  mAcc "
                   f"{t.metrics['mAcc']:.2f}  ({seconds:.0f}s){'  new best' if t.best_at == t.iteration else ''}")
    return True


def banner(t: Training, asked: dict[str, Any], deform_names: list[str], how: str, accum_note: str) -> str:
    """The start lines: start or resume, model size, deformable layers, device, batch (and how train.accum_steps=auto
    chose), what runs where the config said otherwise, and the settings a resume changed."""
    info, tcfg, flat = count_parameters(t.model), t.config["train"], flatten(t.config)
    per_forward = tcfg["batch_size"] // (t.world_size * tcfg["accum_steps"])
    resolved = [f"{k}={v} runs as {flat[k]}" for k, v in flatten(asked).items() if flat.get(k, v) != v]
    lines = [
        how,
        f"{t.config['config_name']}: {info['params']:,} parameters (inference), {info['deform_params']:,} in "
        f"offset/mask predictors; deformable layers: {', '.join(deform_names) or 'none'}",
        f"  {t.world_size} process(es) on {t.environment['device']}; global batch {tcfg['batch_size']} "
        f"({per_forward} per forward x {tcfg['accum_steps']} micro-batch(es) per step in each"
        f"{'; train.accum_steps=' + accum_note if accum_note else ''})",
        f"  precision {tcfg['amp']}, layout {'channels_last' if tcfg['channels_last'] else 'contiguous'}, deform op "
        f"{t.config['model']['deform_op']}, loss op {tcfg['loss_op']}{', compiled' if tcfg['compile'] else ''}"
        + (f" ({'; '.join(resolved)} on this device)" if resolved else ""),
    ]
    for change in t.config_changes[-1:]:
        if change["iteration"] == t.iteration:
            lines.append(f"resumed at iteration {t.iteration} with changed settings: "
                         + ", ".join(f"{k} {old} -> {new}" for k, (old, new) in change["changes"].items()))
    return "\n".join(lines)


def finish(t: Training, stopped_by: str | None, unreadable: str | None) -> int:
    """Say how the run ended; raise the error of a file that could not be read, after last.pt was saved."""
    saved = "saved" if t.iteration else "nothing trained yet"  # the loop's end saved the work since the last save
    if unreadable is not None:
        raise UserError(f"{unreadable} Training stopped at iteration {t.iteration} ({saved}); after fixing the file, "
                        f"run the same command line with --resume auto to continue.")
    if t.rank != 0:
        return 0
    if stopped_by:
        print(f"stopped by {stopped_by} at iteration {t.iteration} ({saved}). To continue, run the same command line "
              f"with --resume auto.")
    elif t.metrics is None:
        print(f"nothing to do: the run in {t.work_dir} is already at iteration {t.config['train']['iters']}.")
    else:
        print(f"done: {t.iteration} iterations, final val mIoU {t.metrics['mIoU']:.2f} (best {t.best_miou:.2f}).\n"
              f"  curves:    tensorboard --logdir {t.work_dir.parent}\n"
              f"  evaluate:  python evaluate.py --checkpoint {t.work_dir / 'last.pt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

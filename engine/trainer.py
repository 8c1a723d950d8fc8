"""The training run: set-up, the SGD step, validation, checkpoints and the loop (train.py drives it).

One flat loop counted in iterations (after nanoGPT); the recipe is mmsegmentation's FCN-R50-D8 for
ADE20K (SGD, poly schedule, aux loss 0.4). Everything random derives from the config seed and the
iteration number, so a run stopped at any point and resumed ends where the uninterrupted run ends.
Rank 0 alone logs and writes files; under torchrun the ranks agree on stopping at logging boundaries.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torchvision
from torch.utils.data import DataLoader
from tqdm import tqdm

from configs import UserError, resume_changes
from data.dataset import build_train_loader, build_val_loader, load_class_info, prepare_dataset_root
from data.transforms import normalize_batch
from engine import loss as loss_module
from engine import tensorboard as tb
from engine.checkpoint import load_checkpoint, save_checkpoint
from engine.distributed import init_distributed
from engine.environment import describe
from engine.inference import evaluate_loader
from engine.optim import build_optimizer, set_learning_rate
from engine.precision import amp_dtype, autocast, memory_format
from engine.workdir import write_record
from models import triton_deform
from models.segmentor import build_model, count_parameters


class NonFiniteLoss(Exception):
    """The loss (or the weights) became NaN or infinite; nothing after the last good checkpoint is saved."""

    def __init__(self, iteration: int, last_good: int, what: str = "the loss") -> None:
        super().__init__(
            f"training stopped: {what} became non-finite (NaN or inf) at iteration {iteration}. The weights after it "
            f"are not saved; last.pt holds iteration {last_good}. Lower train.lr, check the data, or use train.amp=bf16, "
            f"then continue with --resume (a changed train.lr applies from the resume iteration on)."
        )


def iteration_seed(seed: int, iteration: int, rank: int) -> int:
    """The torch RNG seed of one iteration on one rank (dropout): a function of the run's seed and position."""
    return int(np.random.SeedSequence([seed, iteration, rank]).generate_state(1)[0])


def op_summary(config: dict[str, Any], device: torch.device) -> str:
    """Which implementations of the deformable op and of the loss will run on ``device``, in words."""
    parts = []
    for key, chosen, runs in (
        ("model.deform_op", config["model"]["deform_op"], "triton" if triton_deform.triton_available(device) else "reference"),
        ("train.loss_op", config["train"]["loss_op"], loss_module.effective_op(config["train"]["loss_op"], device)),
    ):
        if chosen == "triton" and runs != "triton":
            parts.append(f"{key}=triton falls back to reference (Triton runs on CUDA only)")
        else:
            parts.append(f"{key}={chosen}")
    return ", ".join(parts)


class Trainer:
    """State and steps of one training run; ``run`` drives it."""

    def __init__(self, config: dict[str, Any], work_dir: Path, resume: bool) -> None:
        self.config, self.work_dir = config, work_dir
        self.tcfg, self.mcfg = config["train"], config["model"]
        self.rank, self.world_size, self.device = init_distributed("cuda" if torch.cuda.is_available() else "cpu")
        self.master = self.rank == 0
        self.stop_signal: str | None = None
        if self.tcfg["batch_size"] % self.world_size:
            raise UserError(
                f"train.batch_size={self.tcfg['batch_size']} (the global batch) must be divisible by the "
                f"{self.world_size} processes of this launch."
            )
        cuda = self.device.type == "cuda"
        torch.backends.cudnn.benchmark = cuda
        self.amp_dtype = amp_dtype(self.tcfg["amp"], self.device)
        self.memory_format = memory_format(self.device, self.tcfg["channels_last"])

        # Rank 0 checks the dataset (and generates the demo data) before anything slow happens.
        if self.master:
            prepare_dataset_root(config)
        self._barrier()
        checkpoint = load_checkpoint(work_dir / "last.pt") if resume else None
        self.config_changes: list[dict[str, Any]] = []
        if checkpoint is not None:
            changes = resume_changes(checkpoint["config"], config, str(work_dir / "last.pt"))
            self.config_changes = list(checkpoint.get("config_changes", []))
            if changes:
                self.config_changes.append({"iteration": checkpoint["iteration"], "changes": changes})
        # Rank 0 fetches the ImageNet weights first; the others then read them from the cache.
        if self.rank != 0:
            self._barrier()
        torch.manual_seed(config["seed"])  # the initial weights (the same on every rank)
        model, self.deform_names = build_model(config, load_pretrained=checkpoint is None)
        if self.rank == 0:
            self._barrier()
        if self.world_size > 1 and self.tcfg["sync_bn"] and cuda:  # SyncBatchNorm is CUDA-only
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model.to(self.device, memory_format=self.memory_format)
        self.optimizer = build_optimizer(model, config)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.iteration, self.best_miou = 0, -1.0
        if checkpoint is not None:
            self._restore(checkpoint)
        set_learning_rate(self.optimizer, self.iteration, self.tcfg)  # from the config, also after a resume
        self.train_model: torch.nn.Module = self.model
        if self.world_size > 1:
            self.train_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if cuda else None
            )
        if self.tcfg["compile"]:
            self.train_model = torch.compile(self.train_model)
        self.writer = None  # opened by ``run`` once the start has succeeded (tb/ marks the work dir as taken)
        self.samples: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # validation images shown in TensorBoard
        self.environment = describe(self.device)

    def _barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def _restore(self, checkpoint: dict[str, Any]) -> None:
        """Weights, optimizer, scaler, iteration, best mIoU and RNG from ``checkpoint``; the config's settings win."""
        self.model.load_state_dict(checkpoint["model"])
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        try:
            self.optimizer.load_state_dict(checkpoint["optimizer"])
        except ValueError:  # another offset_lr_mult merged or split the parameter groups
            raise UserError(
                f"--resume: model.deform.offset_lr_mult={self.mcfg['deform']['offset_lr_mult']} groups the parameters "
                f"differently from the checkpoint's value, so its optimizer state does not fit. Resume with the "
                f"checkpoint's offset_lr_mult, or start a new run."
            ) from None
        for group, settings in zip(self.optimizer.param_groups, fresh):
            group.update(settings)  # momentum, weight decay, lr_mult: the resumed config's
        if checkpoint.get("scaler"):
            self.scaler.load_state_dict(checkpoint["scaler"])
        self.iteration, self.best_miou = checkpoint["iteration"], checkpoint["best_miou"]
        torch.set_rng_state(checkpoint["rng"]["torch"])

    # ----------------------------------------------------------------------------------------- steps
    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """One SGD step; returns the detached losses of this rank."""
        torch.manual_seed(iteration_seed(self.config["seed"], self.iteration, self.rank))
        with autocast(self.device, self.amp_dtype):
            outputs = self.train_model(images)
        losses = loss_module.compute_loss(
            outputs, labels, self.mcfg["aux_loss_weight"], self.tcfg["loss_op"], self.tcfg["loss_norm"]
        )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(losses["total"]).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.iteration += 1
        set_learning_rate(self.optimizer, self.iteration, self.tcfg)  # the next step's (as a per-step scheduler)
        return {k: v.detach() for k, v in losses.items()}

    def learning_rate(self) -> float:
        """The base learning rate (lr_mult 1) of the next step."""
        group = self.optimizer.param_groups[0]
        return group["lr"] / group["lr_mult"]

    def weights_finite(self) -> bool:
        """Whether every weight is finite (checked before a checkpoint is written)."""
        finite = torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all()
        if self.world_size > 1:
            flag = finite.to(torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            finite = flag.bool()
        return bool(finite)

    def checkpoint_state(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "iteration": self.iteration,
            "rng": rng,
            "best_miou": self.best_miou,
            "config": self.config,
            "config_changes": self.config_changes,
            "versions": {"torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
                         "python": sys.version.split()[0]},
            "environment": self.environment,
        }

    def save(self, name: str) -> None:
        """Rank 0 writes ``name`` in the work dir atomically (a full disk or other write error is a UserError)."""
        if self.master:
            save_checkpoint(self.checkpoint_state(), self.work_dir / name)

    def stop_requested(self) -> bool:
        """True when SIGTERM/SIGINT arrived on any rank (a collective under torchrun: all ranks agree)."""
        flag = self.stop_signal is not None
        if self.world_size > 1:
            t = torch.tensor([int(flag)], device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
        return flag

    # ------------------------------------------------------------------------------------ validation
    def evaluate(self, val_loader: DataLoader) -> dict[str, Any] | None:
        """Validation metrics with the shared evaluator, or None when a stop signal cut it short.

        In one process a stop signal ends validation after the current image (schedulers give ~30 s); under
        torchrun validation runs to its end, since the ranks hold different images.
        """
        ecfg = self.config["eval"]
        should_stop = (lambda: self.stop_signal is not None) if self.world_size == 1 else None
        try:
            matrix = evaluate_loader(
                self.model, val_loader, self.device, self.mcfg["num_classes"], mode=ecfg["mode"],
                crop=ecfg["slide_crop"], stride=ecfg["slide_stride"], amp_dtype=self.amp_dtype,
                memory_format=self.memory_format, progress=False, should_stop=should_stop,
            )
        except RuntimeError:  # loader workers gone: the stop signal reached them too (process group)
            if self.stop_signal is None:
                raise
            return None
        return None if matrix is None else matrix.metrics()

    def record_validation(self, metrics: dict[str, Any], seconds: float, samples: list) -> None:
        """Rank 0: log the metrics, panels and offsets, print a line, and save best.pt on a new best."""
        if not self.master:
            return
        names, palette = load_class_info()
        tb.log_validation(self.writer, self.iteration, metrics, names)
        tb.log_samples(self.writer, self.iteration, self.model, samples, palette, self.device)
        is_best = metrics["mIoU"] > self.best_miou
        self.best_miou = max(self.best_miou, metrics["mIoU"])
        tqdm.write(
            f"iter {self.iteration}: val mIoU {metrics['mIoU']:.2f}  aAcc {metrics['aAcc']:.2f}  "
            f"mAcc {metrics['mAcc']:.2f}  ({seconds:.0f}s){'  new best' if is_best else ''}"
        )
        if is_best:
            self.save("best.pt")

    def banner(self) -> str:
        """The first line of a run: model size, deformable layers, processes, batch, ops."""
        info = count_parameters(self.model)
        return (
            f"{self.config['config_name']}: {info['params']:,} parameters (inference), {info['deform_params']:,} in "
            f"offset/mask predictors; deformable layers: {', '.join(self.deform_names) or 'none'}; "
            f"{self.world_size} process(es) on {self.device.type}, global batch {self.tcfg['batch_size']}; "
            f"{op_summary(self.config, self.device)}"
        )


def checked_losses(window: list[dict[str, torch.Tensor]], iteration: int, world_size: int, last_good: int) -> torch.Tensor:
    """The (total, main, aux) losses of the window's iterations averaged over ranks, on the CPU.

    One sync per window; raises NonFiniteLoss naming the first bad iteration, so nothing after it is saved.
    """
    stacked = torch.stack([torch.stack([w["total"], w["main"], w.get("aux", w["main"])]) for w in window])
    if world_size > 1:
        dist.all_reduce(stacked)
        stacked /= world_size
    stacked = stacked.cpu()
    bad = (~torch.isfinite(stacked)).any(dim=1).nonzero()
    if len(bad):
        raise NonFiniteLoss(iteration - len(window) + int(bad[0]) + 1, last_good)
    return stacked


class _Window:
    """The iterations since the last logging boundary: their losses, data-wait time and wall time."""

    def __init__(self) -> None:
        self.losses: list[dict[str, torch.Tensor]] = []
        self.data_time, self.start = 0.0, time.perf_counter()


def _log_window(trainer: Trainer, window: _Window, stacked: torch.Tensor, bar: tqdm) -> None:
    """Rank 0: the window's mean losses, learning rate, speed, data-wait share and GPU memory."""
    if not trainer.master:
        return
    elapsed = time.perf_counter() - window.start
    mean = stacked.mean(0)
    values = {"loss": mean[0].item(), "loss_main": mean[1].item()}
    if "aux" in window.losses[0]:
        values["loss_aux"] = mean[2].item()
    values["lr"] = trainer.learning_rate()
    values["images_per_s"] = len(window.losses) * trainer.tcfg["batch_size"] / elapsed
    values["data_wait_share"] = window.data_time / elapsed
    if trainer.device.type == "cuda":
        values["gpu_mem_gib"] = torch.cuda.max_memory_allocated(trainer.device) / 2**30
    tb.log_train(trainer.writer, trainer.iteration, values)
    bar.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{values['lr']:.2e}")


def _validate(trainer: Trainer, val_loader: DataLoader) -> dict[str, Any] | None:
    """Validate, log and keep best.pt; None when a stop signal cut validation short."""
    start = time.perf_counter()
    metrics = trainer.evaluate(val_loader)
    if metrics is not None:
        if trainer.samples is None:  # the fixed panel images, read once per run
            n = min(trainer.tcfg["tb_images"], len(val_loader.dataset)) if trainer.master else 0
            trainer.samples = [val_loader.dataset[i][:2] for i in range(n)]
        trainer.record_validation(metrics, time.perf_counter() - start, trainer.samples)
    return metrics


def _stop(trainer: Trainer, window: _Window, last_good: int, bar: tqdm) -> int:
    """The one exit for a stop signal: check the losses since the last checkpoint, save last.pt, say so."""
    bar.close()
    if window.losses:
        checked_losses(window.losses, trainer.iteration, trainer.world_size, last_good)
    _save_last(trainer, last_good)
    if trainer.master:
        print(f"stopped by {trainer.stop_signal} at iteration {trainer.iteration}; last.pt saved. Continue with --resume.")
    return 0


def _save_before_error(trainer: Trainer, window: _Window, last_good: int, bar: tqdm) -> None:
    """Before a data error ends the run: save last.pt at the current iteration if it is newer and sound.

    One process only: under torchrun the error reaches one rank, and a save needs all of them.
    """
    if trainer.world_size == 1 and trainer.iteration > last_good:
        bar.close()
        if window.losses:
            checked_losses(window.losses, trainer.iteration, trainer.world_size, last_good)
        _save_last(trainer, last_good)
        if trainer.master:
            print(f"last.pt saved at iteration {trainer.iteration}; after fixing the file, continue with --resume.",
                  file=sys.stderr)


def _check_weights(trainer: Trainer, last_good: int) -> None:
    """NonFiniteLoss if an update made a weight NaN or infinite (the losses before it were still finite)."""
    if not trainer.weights_finite():
        raise NonFiniteLoss(trainer.iteration, last_good, "the weights")


def _save_last(trainer: Trainer, last_good: int) -> None:
    """last.pt, after checking that the weights are finite (a bad last update must not overwrite the good one)."""
    _check_weights(trainer, last_good)
    trainer.save("last.pt")


def run(trainer: Trainer) -> int:
    """The training loop; returns the process exit code."""
    cfg, tcfg = trainer.config, trainer.tcfg
    train_loader = build_train_loader(cfg, trainer.rank, trainer.world_size, start_iter=trainer.iteration)
    val_loader = build_val_loader(cfg, "validation", trainer.rank, trainer.world_size, max_images=tcfg["val_max_images"])
    if trainer.master:
        write_record(trainer.work_dir, cfg)  # the start succeeded: now the work dir belongs to this run
        trainer.writer = tb.open_writer(trainer.work_dir, trainer.iteration)
        print(trainer.banner())
        for change in trainer.config_changes[-1:]:
            if change["iteration"] == trainer.iteration:
                print(f"resumed at iteration {change['iteration']} with changed settings: "
                      + ", ".join(f"{k} {old} -> {new}" for k, (old, new) in change["changes"].items()))
    data_iter = iter(train_loader)
    trainer.model.train()
    bar = tqdm(total=tcfg["iters"], initial=trainer.iteration, disable=not trainer.master, dynamic_ncols=True)
    window, last_good, metrics = _Window(), trainer.iteration, None
    single = trainer.world_size == 1
    while trainer.iteration < tcfg["iters"]:
        t0 = time.perf_counter()
        try:
            images, labels, valid = next(data_iter)
        except RuntimeError:  # loader workers gone: the stop signal reached them too (process group)
            if trainer.stop_signal is None:
                raise
            return _stop(trainer, window, last_good, bar)
        except UserError:  # a file that cannot be read: keep the work done so far, then say which
            _save_before_error(trainer, window, last_good, bar)
            raise
        # Batches travel as uint8 (a quarter of float32's bytes; labels an eighth of int64's) and are
        # normalised on the device.
        images = images.to(trainer.device, non_blocking=True).contiguous(memory_format=trainer.memory_format)
        images = normalize_batch(images, valid)
        labels = labels.to(trainer.device, non_blocking=True).long()
        window.data_time += time.perf_counter() - t0
        window.losses.append(_step(trainer, images, labels))
        it = trainer.iteration
        bar.update(1)
        log_boundary = it % tcfg["log_interval"] == 0 or it == tcfg["iters"]
        # Under torchrun the stop flag is a collective (a host sync): asked at logging boundaries only.
        stop = trainer.stop_requested() if single or log_boundary else False
        if not (log_boundary or stop or it % tcfg["val_interval"] == 0 or it % tcfg["ckpt_interval"] == 0):
            continue
        stacked = checked_losses(window.losses, it, trainer.world_size, last_good)
        _log_window(trainer, window, stacked, bar)
        window = _Window()
        if stop:
            return _stop(trainer, window, last_good, bar)
        if it % tcfg["val_interval"] == 0 or it == tcfg["iters"]:
            _check_weights(trainer, last_good)  # a bad last update must reach neither best.pt nor last.pt
            try:
                result = _validate(trainer, val_loader)  # before saving, so last.pt holds the best mIoU so far
            except UserError:
                _save_before_error(trainer, window, last_good, bar)
                raise
            if result is None:
                return _stop(trainer, window, last_good, bar)
            metrics = result
        if it % tcfg["ckpt_interval"] == 0 or it == tcfg["iters"]:
            _save_last(trainer, last_good)
            last_good = it
    bar.close()
    if trainer.master:
        if metrics is None:
            print(f"nothing to do: the run in {trainer.work_dir} is already at iteration {tcfg['iters']}.")
            return 0
        print(
            f"done: {tcfg['iters']} iterations, final val mIoU {metrics['mIoU']:.2f} (best {trainer.best_miou:.2f}).\n"
            f"  curves:    tensorboard --logdir {trainer.work_dir.parent}\n"
            f"  evaluate:  python evaluate.py --checkpoint {trainer.work_dir / 'last.pt'}"
        )
    return 0


def _step(trainer: Trainer, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """``trainer.train_step`` with CUDA out-of-memory turned into advice."""
    try:
        return trainer.train_step(images, labels)
    except torch.cuda.OutOfMemoryError:
        tcfg, world = trainer.tcfg, trainer.world_size
        raise UserError(
            f"CUDA out of memory at iteration {trainer.iteration} with train.batch_size={tcfg['batch_size']} "
            f"({tcfg['batch_size'] // world} per GPU). Use a smaller batch (e.g. "
            f"train.batch_size={max(world, tcfg['batch_size'] // 2)}), more GPUs, or train.amp=bf16."
        ) from None

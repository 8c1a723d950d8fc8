"""Train a (deformable) ResNet-50 FCN for semantic segmentation.

    python train.py --config def-conv-v2.yaml                          # one GPU or the CPU
    torchrun --nproc_per_node=8 train.py --config def-conv-v2.yaml     # DDP, global batch split over GPUs
    python train.py --config def-conv-v2.yaml --resume                 # continue from runs/def-conv-v2/last.pt

One flat loop counted in iterations (after nanoGPT); the recipe is mmsegmentation's FCN-R50-D8 for
ADE20K (SGD, poly schedule, aux loss 0.4). Everything random derives from the config seed and the
iteration number, so a run stopped at any point and resumed ends where the uninterrupted run ends.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torchvision
import yaml
from PIL import Image
from tqdm import tqdm

from configs import UserError, check_same_model, error_message, load_config
from data import IGNORE_INDEX
from data.dataset import build_train_loader, build_val_loader, load_class_info, prepare_dataset_root
from data.transforms import denormalize
from evaluate import evaluate_loader, init_distributed, load_checkpoint, predict_logits
from models import triton_deform, triton_loss
from models.segmentor import build_model, count_parameters, deformable_layers, parameter_groups
from scripts.visualize_offsets import offset_figure


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train a ResNet-50 FCN (optionally with deformable convolutions) on ADE20K or the demo data.",
        epilog="example: python train.py --config demo.yaml train.iters=40   (overrides are key.sub=value)",
    )
    parser.add_argument("--config", required=True, help="config name in configs/ (e.g. def-conv-v2.yaml) or a path")
    parser.add_argument("--work-dir", help="where checkpoints, logs and the resolved config go (default runs/<config name>)")
    parser.add_argument("--resume", action="store_true", help="continue the run in the work dir from its last.pt")
    parser.add_argument("overrides", nargs="*", help="config overrides key.sub=value, typed like the value they replace")
    return parser.parse_args(argv)


def poly_factor(iteration: int, train_cfg: dict[str, Any]) -> float:
    """Learning-rate factor of the poly schedule: from 1 down to min_lr / lr at the last iteration."""
    floor = train_cfg["min_lr"] / train_cfg["lr"]
    progress = min(iteration / train_cfg["iters"], 1.0)
    return (1.0 - progress) ** train_cfg["poly_power"] * (1.0 - floor) + floor


# Implementations of the segmentation loss (bilinear upsample + cross-entropy averaged over labelled pixels), by
# the name config key ``train.loss_op`` uses. Same value and gradient; "triton" never makes the full-size logits.
LOSS_OPS = {"reference": triton_loss.reference_upsample_cross_entropy, "triton": triton_loss.upsample_cross_entropy}


def compute_loss(
    outputs: dict[str, torch.Tensor], labels: torch.Tensor, aux_weight: float, loss_op: str = "reference"
) -> dict[str, torch.Tensor]:
    """The training loss: main head plus ``aux_weight`` times the auxiliary head (when present)."""
    loss = LOSS_OPS[loss_op]
    losses = {"main": loss(outputs["out"], labels, IGNORE_INDEX)}
    losses["total"] = losses["main"]
    if "aux" in outputs:
        losses["aux"] = loss(outputs["aux"], labels, IGNORE_INDEX)
        losses["total"] = losses["main"] + aux_weight * losses["aux"]
    return losses


def op_summary(config: dict[str, Any], device: torch.device) -> str:
    """Which implementations of the deformable op and of the loss will run on ``device``, in words."""
    parts = []
    for key, chosen, reference, available in (
        ("model.deform_op", config["model"]["deform_op"], "torchvision", triton_deform.triton_available(device)),
        ("train.loss_op", config["train"]["loss_op"], "reference", triton_loss.triton_available(device)),
    ):
        if chosen == "triton" and not available:
            parts.append(f"{key}=triton falls back to {reference} (Triton runs on CUDA only)")
        else:
            parts.append(f"{key}={chosen}")
    return ", ".join(parts)


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write a checkpoint atomically: a temporary file in the same folder, then a rename."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def iteration_seed(seed: int, iteration: int, rank: int) -> int:
    """The torch RNG seed of one iteration on one rank (dropout): a function of the run's seed and position."""
    return int(np.random.SeedSequence([seed, iteration, rank]).generate_state(1)[0])


def check_work_dir(work_dir: Path, config: dict[str, Any], resume: bool) -> None:
    """Refuse to start a new run over a work dir that holds another run."""
    saved_path, last = work_dir / "config.yaml", work_dir / "last.pt"
    if resume:
        if not last.is_file():
            raise UserError(f"--resume was given but {last} does not exist. Start without --resume, or name the run's folder with --work-dir.")
        return
    if not last.is_file():  # nothing saved yet (say, a start that failed on a missing dataset)
        return
    saved = yaml.safe_load(saved_path.read_text()) if saved_path.is_file() else None
    what = "a run of this config" if saved == config else f"a run of a different config ({saved_path})"
    raise UserError(
        f"the work dir {work_dir} already holds {what}. To continue it, add --resume; to start another run, "
        f"give --work-dir DIR (or delete {work_dir}). Nothing was overwritten."
    )


def colorize(label: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Class-index map (255 = ignore, shown black) to an RGB image in the class palette."""
    rgb = np.zeros((*label.shape, 3), np.uint8)
    valid = label != IGNORE_INDEX
    rgb[valid] = palette[label[valid]]
    return rgb


class Trainer:
    """State and steps of one training run; ``main`` drives it."""

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
        if cuda:
            torch.backends.cudnn.benchmark = True
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}.get(self.tcfg["amp"], "bad")
        if self.amp_dtype == "bad":
            raise UserError(f"config key 'train.amp' must be bf16, fp16 or none, got {self.tcfg['amp']!r}.")
        if not cuda:
            self.amp_dtype = None  # autocast on CPU is slow and not part of the recipe
        if self.tcfg["loss_op"] not in LOSS_OPS:
            raise UserError(f"config key 'train.loss_op' must be one of {list(LOSS_OPS)}, got {self.tcfg['loss_op']!r}.")
        self.memory_format = torch.channels_last if cuda and self.tcfg["channels_last"] else torch.contiguous_format

        # Rank 0 checks the dataset (and generates the demo data) before anything slow happens.
        if self.master:
            prepare_dataset_root(config)
        if self.world_size > 1:
            dist.barrier()
        checkpoint = load_checkpoint(work_dir / "last.pt") if resume else None
        if checkpoint is not None:
            check_same_model(checkpoint["config"], config, str(work_dir / "last.pt"), f"config {config['config_name']}")
        # Rank 0 fetches the ImageNet weights first; the others then read them from the cache.
        if self.rank != 0:
            dist.barrier()
        torch.manual_seed(config["seed"])  # the initial weights (the same on every rank)
        model, self.deform_names = build_model(config, load_pretrained=checkpoint is None)
        if self.rank == 0 and self.world_size > 1:
            dist.barrier()
        if self.world_size > 1 and self.tcfg["sync_bn"] and cuda:  # SyncBatchNorm is CUDA-only
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model.to(self.device, memory_format=self.memory_format)
        self.optimizer = torch.optim.SGD(
            parameter_groups(model, self.tcfg, self.mcfg["deform"]["offset_lr_mult"]),
            lr=self.tcfg["lr"],
            momentum=self.tcfg["momentum"],
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda it: poly_factor(it, self.tcfg))
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.iteration, self.best_miou = 0, -1.0
        if checkpoint is not None:
            self.model.load_state_dict(checkpoint["model"])
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            self.scheduler.load_state_dict(checkpoint["scheduler"])
            if checkpoint.get("scaler"):
                self.scaler.load_state_dict(checkpoint["scaler"])
            self.iteration, self.best_miou = checkpoint["iteration"], checkpoint["best_miou"]
            torch.set_rng_state(checkpoint["rng"]["torch"])
        self.train_model: torch.nn.Module = self.model
        if self.world_size > 1:
            self.train_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if cuda else None
            )
        if self.tcfg["compile"]:
            self.train_model = torch.compile(self.train_model)
        self.writer = None
        if self.master:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides events past the checkpoint (or all of them for a new run) left by a run that died
            self.writer = SummaryWriter(str(work_dir / "tb"), purge_step=self.iteration)

    # ----------------------------------------------------------------------------------------- steps
    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """One SGD step; returns the detached losses of this rank."""
        torch.manual_seed(iteration_seed(self.config["seed"], self.iteration, self.rank))
        autocast = torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()
        with autocast:
            outputs = self.train_model(images)
        losses = compute_loss(outputs, labels, self.mcfg["aux_loss_weight"], self.tcfg["loss_op"])
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(losses["total"]).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.iteration += 1
        return {k: v.detach() for k, v in losses.items()}

    def checkpoint_state(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "iteration": self.iteration,
            "rng": rng,
            "best_miou": self.best_miou,
            "config": self.config,
            "versions": {"torch": str(torch.__version__), "torchvision": str(torchvision.__version__), "python": sys.version.split()[0]},
        }

    def save(self, name: str) -> None:
        if self.master:
            save_checkpoint(self.checkpoint_state(), self.work_dir / name)

    def stop_requested(self) -> bool:
        """True when SIGTERM/SIGINT arrived on any rank (all ranks agree, so they stop at the same iteration)."""
        flag = self.stop_signal is not None
        if self.world_size > 1:
            t = torch.tensor([int(flag)], device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
        return flag

    # ------------------------------------------------------------------------------------ validation
    def validate(self, val_loader: torch.utils.data.DataLoader) -> dict[str, Any]:
        """Validation mIoU with the shared evaluator; rank 0 logs it and saves best.pt."""
        ecfg = self.config["eval"]
        start = time.perf_counter()
        matrix = evaluate_loader(
            self.model, val_loader, self.device, self.mcfg["num_classes"], mode=ecfg["mode"],
            crop=ecfg["slide_crop"], stride=ecfg["slide_stride"], amp_dtype=self.amp_dtype, progress=False,
        )
        metrics = matrix.metrics()
        seconds = time.perf_counter() - start
        self.model.train()
        if self.master:
            names, palette = load_class_info()
            w = self.writer
            for key in ("mIoU", "aAcc", "mAcc"):
                w.add_scalar(f"val/{key}", metrics[key], self.iteration)
            for name, iou in zip(names, metrics["iou"]):
                if iou is not None:
                    w.add_scalar(f"val_class_iou/{name}", iou, self.iteration)
            samples = self.fixed_val_images(val_loader)
            self.log_panels(samples, palette)
            self.log_offsets(samples)
            is_best = metrics["mIoU"] > self.best_miou
            self.best_miou = max(self.best_miou, metrics["mIoU"])
            tqdm.write(
                f"iter {self.iteration}: val mIoU {metrics['mIoU']:.2f}  aAcc {metrics['aAcc']:.2f}  "
                f"mAcc {metrics['mAcc']:.2f}  ({seconds:.0f}s){'  new best' if is_best else ''}"
            )
            if is_best:
                self.save("best.pt")
        return metrics

    def fixed_val_images(self, val_loader: torch.utils.data.DataLoader) -> list[tuple[torch.Tensor, torch.Tensor]]:
        n = min(self.tcfg["tb_images"], len(val_loader.dataset))
        return [val_loader.dataset[i][:2] for i in range(n)]

    @torch.no_grad()
    def log_panels(self, samples: list[tuple[torch.Tensor, torch.Tensor]], palette: np.ndarray) -> None:
        """A few fixed validation images as input | ground truth | prediction panels."""
        self.model.eval()
        for i, (image, label) in enumerate(samples):
            logits = predict_logits(self.model, image[None].to(self.device), tuple(label.shape), num_classes=self.mcfg["num_classes"])
            pred = logits.argmax(1)[0].cpu().numpy()
            rgb = np.asarray(Image.fromarray(denormalize(image)).resize(label.shape[::-1], Image.BILINEAR))
            panel = np.concatenate([rgb, colorize(label.numpy(), palette), colorize(pred, palette)], axis=1)
            self.writer.add_image(f"val_panels/{i}", panel, self.iteration, dataformats="HWC")
        self.model.train()

    @torch.no_grad()
    def log_offsets(self, samples: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Per-layer histograms of offset magnitude (and of the v2 mask) on the fixed validation images,
        and the sampling-location figure of scripts/visualize_offsets.py for the first of them."""
        layers = deformable_layers(self.model)
        if not layers:
            return
        captured: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
        hooks = [
            layer.register_forward_hook(lambda mod, inp, out, name=name: captured[name].append(mod.offsets_and_mask(inp[0])))
            for name, layer in layers.items()
        ]
        self.model.eval()
        try:
            for image, _ in samples:
                self.model(image[None].to(self.device))
        finally:
            for hook in hooks:
                hook.remove()
            self.model.train()
        image, label = samples[0]
        rgb = np.asarray(Image.fromarray(denormalize(image)).resize(label.shape[::-1], Image.BILINEAR))
        figure = offset_figure(self.model, image, rgb, iteration=self.iteration)
        self.writer.add_image("offsets/sampling_locations", figure, self.iteration, dataformats="HWC")
        for name, outputs in captured.items():
            offsets = torch.cat([o.float().flatten(2) for o, _ in outputs], dim=2)  # N, 2GK, P
            magnitude = offsets.unflatten(1, (-1, 2)).norm(dim=2)
            self.writer.add_histogram(f"offset_magnitude/{name}", magnitude.cpu(), self.iteration)
            self.writer.add_scalar(f"offset_mean_magnitude/{name}", magnitude.mean().item(), self.iteration)
            if outputs[0][1] is not None:
                masks = torch.cat([m.float().flatten() for _, m in outputs])
                self.writer.add_histogram(f"mask/{name}", masks.cpu(), self.iteration)


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


def run(trainer: Trainer) -> int:
    """The training loop; returns the process exit code."""
    cfg, tcfg = trainer.config, trainer.tcfg
    train_loader = build_train_loader(cfg, trainer.rank, trainer.world_size, start_iter=trainer.iteration)
    val_loader = build_val_loader(cfg, "validation", trainer.rank, trainer.world_size, max_images=tcfg["val_max_images"])
    if trainer.master:
        info = count_parameters(trainer.model)
        print(
            f"{cfg['config_name']}: {info['params']:,} parameters (inference), {info['deform_params']:,} in offset/mask "
            f"predictors; deformable layers: {', '.join(trainer.deform_names) or 'none'}; "
            f"{trainer.world_size} process(es) on {trainer.device.type}, global batch {tcfg['batch_size']}; "
            f"{op_summary(cfg, trainer.device)}"
        )
    data_iter = iter(train_loader)
    trainer.model.train()
    bar = tqdm(total=tcfg["iters"], initial=trainer.iteration, disable=not trainer.master, dynamic_ncols=True)
    window: list[dict[str, torch.Tensor]] = []
    data_time, window_start, last_good = 0.0, time.perf_counter(), trainer.iteration
    metrics: dict[str, Any] | None = None
    while trainer.iteration < tcfg["iters"]:
        t0 = time.perf_counter()
        try:
            images, labels = next(data_iter)
        except RuntimeError:  # loader workers gone: the stop signal reached them too (process group)
            if trainer.stop_signal is None:
                raise
            if window:
                checked_losses(window, trainer.iteration, trainer.world_size, last_good)
            trainer.save("last.pt")
            if trainer.master:
                print(f"stopped by {trainer.stop_signal} at iteration {trainer.iteration}; last.pt saved. Continue with --resume.")
            return 0
        images = images.to(trainer.device, non_blocking=True).contiguous(memory_format=trainer.memory_format)
        labels = labels.to(trainer.device, non_blocking=True)
        data_time += time.perf_counter() - t0
        try:
            window.append(trainer.train_step(images, labels))
        except torch.cuda.OutOfMemoryError:
            raise UserError(
                f"CUDA out of memory at iteration {trainer.iteration} with train.batch_size={tcfg['batch_size']} "
                f"({tcfg['batch_size'] // trainer.world_size} per GPU). Use a smaller batch (e.g. "
                f"train.batch_size={max(trainer.world_size, tcfg['batch_size'] // 2)}), more GPUs, or train.amp=bf16."
            ) from None
        it = trainer.iteration
        bar.update(1)
        stop = trainer.stop_requested()
        boundary = it % tcfg["log_interval"] == 0 or it % tcfg["ckpt_interval"] == 0 or it % tcfg["val_interval"] == 0
        if boundary or stop or it == tcfg["iters"]:
            stacked = checked_losses(window, it, trainer.world_size, last_good)
            elapsed = time.perf_counter() - window_start
            mean = stacked.mean(0)
            lr = trainer.optimizer.param_groups[0]["lr"] / trainer.optimizer.param_groups[0]["lr_mult"]
            if trainer.master:
                w = trainer.writer
                w.add_scalar("train/loss", mean[0].item(), it)
                w.add_scalar("train/loss_main", mean[1].item(), it)
                if "aux" in window[0]:
                    w.add_scalar("train/loss_aux", mean[2].item(), it)
                w.add_scalar("train/lr", lr, it)
                w.add_scalar("train/images_per_s", len(window) * tcfg["batch_size"] / elapsed, it)
                w.add_scalar("train/data_wait_share", data_time / elapsed, it)
                if trainer.device.type == "cuda":
                    w.add_scalar("train/gpu_mem_gib", torch.cuda.max_memory_allocated(trainer.device) / 2**30, it)
                bar.set_postfix(loss=f"{mean[0].item():.3f}", lr=f"{lr:.2e}")
            window, data_time, window_start = [], 0.0, time.perf_counter()
            if it % tcfg["val_interval"] == 0 or it == tcfg["iters"]:
                metrics = trainer.validate(val_loader)  # before saving, so last.pt holds the best mIoU so far
            if it % tcfg["ckpt_interval"] == 0 or it == tcfg["iters"] or stop:
                trainer.save("last.pt")
                last_good = it
            if stop:
                bar.close()
                if trainer.master:
                    print(f"stopped by {trainer.stop_signal} at iteration {it}; last.pt saved. Continue with --resume.")
                return 0
    bar.close()
    if trainer.master:
        if metrics is None:
            print(f"nothing to do: the run in {trainer.work_dir} is already at iteration {tcfg['iters']}.")
            return 0
        print(
            f"done: {tcfg['iters']} iterations, final val mIoU {metrics['mIoU']:.2f} (best {trainer.best_miou:.2f}).\n"
            f"  curves:    tensorboard --logdir {trainer.work_dir.parent}\n"
            f"  evaluate:  python evaluate.py --checkpoint {trainer.work_dir / 'best.pt'}"
        )
    return 0


class NonFiniteLoss(Exception):
    def __init__(self, iteration: int, last_good: int) -> None:
        super().__init__(
            f"training stopped: the loss became non-finite (NaN or inf) at iteration {iteration}. The weights after it "
            f"are not saved; last.pt holds iteration {last_good}. Lower train.lr, check the data, or use train.amp=bf16, "
            f"then continue with --resume."
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    trainer = None
    try:
        config = load_config(args.config, args.overrides)
        work_dir = Path(args.work_dir or Path("runs") / config["config_name"])
        master = int(os.environ.get("RANK", 0)) == 0
        if master:
            check_work_dir(work_dir, config, args.resume)
            work_dir.mkdir(parents=True, exist_ok=True)
            (work_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        trainer = Trainer(config, work_dir, args.resume)

        def on_signal(signum: int, frame: Any) -> None:
            trainer.stop_signal = signal.Signals(signum).name
            signal.signal(signum, signal.SIG_DFL)  # a second signal stops at once

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        return run(trainer)
    except (UserError, NonFiniteLoss) as err:
        prefix = f"[rank {os.environ['RANK']}] " if "RANK" in os.environ else ""
        print(f"{prefix}error: {error_message(err)}", file=sys.stderr)
        return 2 if isinstance(err, UserError) else 1
    finally:
        if trainer is not None and trainer.writer is not None:
            trainer.writer.close()
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())

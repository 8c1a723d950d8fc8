"""What a training run writes to TensorBoard: losses and speed, validation metrics, panels and offsets.

Rank 0 alone writes, through ``TensorBoard``: a write that fails (tb/ deleted, a read-only or full disk) is reported
once and ends the logging, never the training. Validation panels (input | ground truth | prediction) and the offset statistics come
from one forward pass per fixed validation image, with ``engine.offsets.capture_offsets`` recording the
deformable layers' offsets and masks on the way.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from data import IGNORE_INDEX
from data.transforms import denormalize
from engine.inference import upsample_logits
from engine.offsets import capture_offsets, fields_from_captures


class TensorBoard:
    """The run's log in ``work_dir/tb``; when resuming at ``iteration``, events after it (left by a run that died)
    are hidden. Every write goes through ``write``: the first that fails is reported in one line and ends the
    logging (checkpoints are saved as usual; a restart logs again)."""

    def __init__(self, work_dir: Path, iteration: int) -> None:
        threading.excepthook = quiet_writer_thread  # a failed write in the writer's thread raises at the next call
        self.folder = work_dir / "tb"
        self.writer: SummaryWriter | None = SummaryWriter(str(self.folder), purge_step=iteration + 1 if iteration else None)

    def write(self, log: Callable[..., None], *args: Any) -> None:
        """``log(writer, *args)`` (``log_train``, ``log_validation``, ``log_samples``), unless logging has ended."""
        if self.writer is None:
            return
        try:
            log(self.writer, *args)
        except OSError as err:
            self.writer = None
            tqdm.write(f"warning: TensorBoard logging stopped: cannot write {self.folder} ({err.strerror or err}). The "
                       f"training goes on without it and saves its checkpoints as usual; a restart (--resume auto) "
                       f"logs there again.", file=sys.stderr)

    def close(self) -> None:
        self.write(SummaryWriter.close)


def quiet_writer_thread(args: threading.ExceptHookArgs) -> None:
    """Python's ``threading.excepthook``, without the traceback of an OSError in a TensorBoard writer thread."""
    if not (type(args.thread).__module__.startswith("tensorboard.") and issubclass(args.exc_type, OSError)):
        threading.__excepthook__(args)


def colorize(label: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Class-index map (255 = ignore, shown black) to an RGB image in the class palette."""
    rgb = np.zeros((*label.shape, 3), np.uint8)
    valid = label != IGNORE_INDEX
    rgb[valid] = palette[label[valid]]
    return rgb


def titled_panel(strips: list[np.ndarray], titles: list[str]) -> np.ndarray:
    """RGB strips of one height side by side, under a white band that names each (PIL's built-in font)."""
    width = strips[0].shape[1]
    band = Image.new("RGB", (width * len(strips), 14), "white")
    draw = ImageDraw.Draw(band)
    for i, title in enumerate(titles):
        draw.text((i * width + 3, 1), title, fill="black")
    return np.concatenate([np.asarray(band), np.concatenate(strips, axis=1)], axis=0)


def log_train(writer: SummaryWriter, iteration: int, values: dict[str, float]) -> None:
    """Scalars of one logging window under ``train/`` (loss, loss_main, loss_aux, lr, images_per_s, ...)."""
    for key, value in values.items():
        writer.add_scalar(f"train/{key}", value, iteration)


def log_validation(writer: SummaryWriter, iteration: int, metrics: dict[str, Any], class_names: list[str]) -> None:
    """val/mIoU, val/aAcc, val/mAcc and the IoU of every class present."""
    for key in ("mIoU", "aAcc", "mAcc"):
        writer.add_scalar(f"val/{key}", metrics[key], iteration)
    for name, iou in zip(class_names, metrics["iou"]):
        if iou is not None:
            writer.add_scalar(f"val_class_iou/{name}", iou, iteration)


@torch.no_grad()
def log_samples(
    writer: SummaryWriter, iteration: int, model: torch.nn.Module, samples: list[tuple[torch.Tensor, torch.Tensor]],
    palette: np.ndarray, device: torch.device,
) -> None:
    """Panels of the fixed validation images (input | truth | prediction, titled), offset/mask histograms over them
    and the sampling-location figure.

    One eval-mode forward per image; the model's train/eval mode is restored.
    """
    was_training = model.training
    model.eval()
    try:
        with capture_offsets(model) as captured:
            outputs, photos = [], []
            for i, (image, label) in enumerate(samples):
                logits = model(image[None].to(device))["out"]
                outputs.append(logits)
                pred = upsample_logits(logits, tuple(label.shape)).argmax(1)[0].cpu().numpy()
                rgb = np.asarray(Image.fromarray(denormalize(image)).resize(label.shape[::-1], Image.BILINEAR))
                photos.append(rgb)
                panel = titled_panel([rgb, colorize(label.numpy(), palette), colorize(pred, palette)],
                                     ["input", "truth", "prediction"])
                writer.add_image(f"val_panels/{i}", panel, iteration, dataformats="HWC")
    finally:
        model.train(was_training)
    if not samples or not any(captured.values()):
        return
    for name, calls in captured.items():
        offsets = torch.cat([c.offsets.float().flatten(2) for c in calls], dim=2)  # N, 2GK, P
        magnitude = offsets.unflatten(1, (-1, 2)).norm(dim=2)
        writer.add_histogram(f"offset_magnitude/{name}", magnitude.cpu(), iteration)
        writer.add_scalar(f"offset_mean_magnitude/{name}", magnitude.mean().item(), iteration)
        if calls[0].mask is not None:
            writer.add_histogram(f"mask/{name}", torch.cat([c.mask.float().flatten() for c in calls]).cpu(), iteration)
    from engine.offset_figure import offset_figure  # matplotlib, only where a figure is drawn

    image = samples[0][0]
    first = [calls[0] for calls in captured.values()]
    fields = fields_from_captures(first, tuple(image.shape[-2:]))
    figure = offset_figure(model, image, photos[0], iteration=iteration, observed=(outputs[0], fields))
    writer.add_image("offsets/sampling_locations", figure, iteration, dataformats="HWC")

"""Predict on your own photos: the class map (ADE20K submission PNG) and a picture to look at.

    python scripts/predict.py --checkpoint runs/def-conv-v2/last.pt --input photos/ --out runs/predictions/

For each image X it writes ``DIR/X.png`` (uint8, class + 1, the ADE20K submission format: 1..150) and
``DIR/X_overlay.jpg`` (the photo with the coloured prediction blended over it and a legend of the
classes present). Photos are turned upright by their EXIF orientation and 16-bit ones scaled to 8 bits
(``data.dataset.read_rgb``), resized as in evaluation (data.scale of the checkpoint's config), and the
prediction is taken at the upright original size. Nothing is overwritten: two inputs that would write the
same file (photo.jpg and photo.png), an output that would replace an input, and (without --overwrite) files
already in DIR are refused before anything is predicted. Every file of the folder that is not used, and every
image that cannot be read, is named with the reason in the summary; the rest go on.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from configs import UserError
from data.dataset import list_folder, load_class_info, read_rgb
from data.transforms import ValTransform
from engine.checkpoint import build_model_from_checkpoint, load_checkpoint
from engine.console import command_line
from engine.device import inference_device
from engine.diagnosis import read_device_info
from engine.inference import predict_logits
from engine.overlay import overlay
from engine.workdir import make_writable_folder, write_image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        description="Segment your own images with a checkpoint: a class-map PNG (ADE20K submission format, class + 1) "
        "and an overlay picture with a legend per image.",
        epilog="example: python scripts/predict.py --checkpoint runs/def-conv-v2/last.pt --input photos/ --out runs/predictions/",
    )
    parser.add_argument("--checkpoint", required=True, type=Path, help="checkpoint written by train.py (last.pt)")
    parser.add_argument("--input", required=True, type=Path, help="an image file or a folder of images")
    parser.add_argument("--out", required=True, type=Path, help="folder for the PNGs and overlays")
    parser.add_argument(
        "--overwrite", action="store_true",
        help="replace class maps and overlays already in --out (never an input image; two inputs of one name, such as "
        "photo.jpg and photo.png, are refused either way)",
    )
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                        help="auto (default): CUDA when usable, else the CPU with a note saying why")
    return parser.parse_args(argv)


def find_images(path: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The image file ``path``, or the images in the folder ``path`` sorted by name, with every other entry of the
    folder and why it is skipped; UserError if there is no image."""
    if path.is_file():
        return [path], []
    if path.is_dir():
        images, skipped = [], []
        for entry in list_folder(path):
            if not entry.exists():
                skipped.append((entry, f"a broken symbolic link (to {os.readlink(entry)}, which does not exist)"))
            elif entry.is_dir():
                skipped.append((entry, "a folder (only the images directly in --input are read)"))
            elif entry.suffix.lower() in IMAGE_SUFFIXES:
                images.append(entry)
            else:
                skipped.append((entry, f"not an image type predict.py reads ({', '.join(IMAGE_SUFFIXES)})"))
        if images:
            return images, skipped
        raise UserError(f"the folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)}). Give an image or a folder of them.")
    raise UserError(f"--input {path} does not exist. Give an image file or a folder of images.")


def output_paths(images: list[Path], out: Path, overwrite: bool) -> list[tuple[Path, Path]]:
    """The class map and overlay path of every image; UserError, before anything is predicted, where one would
    replace another image's output, an input image, or (without ``overwrite``) a file already in ``out``."""
    by_stem: dict[str, list[Path]] = {}
    for image in images:  # case-folded: Photo.png and photo.png are one file on macOS and Windows
        by_stem.setdefault(image.stem.casefold(), []).append(image)
    clashes = [" and ".join(str(p) for p in same) for same in by_stem.values() if len(same) > 1]
    if clashes:
        raise UserError(
            f"these inputs would write the same class map and overlay in {out} (the outputs are named after the file "
            f"name without its extension): {'; '.join(clashes)}. Nothing was predicted. Rename one of each, or predict "
            f"them into different --out folders."
        )
    outputs = [(out / f"{p.stem}.png", out / f"{p.stem}_overlay.jpg") for p in images]
    inputs = {(s.st_dev, s.st_ino) for s in (p.stat() for p in images)}
    existing = [f for pair in outputs for f in pair if f.exists()]
    replaced = [f for f in existing if (f.stat().st_dev, f.stat().st_ino) in inputs]
    if replaced:
        raise UserError(
            f"writing the predictions into {out} would replace the input image(s) {', '.join(map(str, replaced))}. "
            f"Nothing was predicted. Give --out a folder that holds no input images."
        )
    if existing and not overwrite:
        shown = ", ".join(map(str, existing[:4])) + (f" and {len(existing) - 4} more" if len(existing) > 4 else "")
        raise UserError(
            f"{len(existing)} output file(s) already exist: {shown}. Nothing was predicted. Give another --out, delete "
            f"them, or add --overwrite to replace them."
        )
    return outputs


@command_line
def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: 0 if every file was used, 1 if some were skipped (listed), 2 on errors."""
    args = parse_args(argv)
    images, skipped = find_images(args.input)
    outputs = output_paths(images, args.out, args.overwrite)
    make_writable_folder(args.out, "Give --out a folder you can write to; nothing was predicted.")
    device = torch.device(inference_device(args.device, read_device_info()))
    checkpoint = load_checkpoint(args.checkpoint)
    model, config = build_model_from_checkpoint(checkpoint, args.checkpoint)
    model.to(device).eval()
    transform, (names, palette) = ValTransform(config["data"]), load_class_info()
    written = 0
    for path, (class_map, overlay_path) in tqdm(list(zip(images, outputs)), desc="predict", disable=len(images) < 2):
        try:
            image = read_rgb(path, exif_orientation=True)  # upright as the photo is shown
        except (OSError, Image.DecompressionBombError) as err:
            skipped.append((path, f"cannot read it as an image ({type(err).__name__}: {err})"))
            continue
        except UserError as err:
            skipped.append((path, str(err)))
            continue
        rgb = np.asarray(image)
        with torch.inference_mode():
            x = transform(image)[None].to(device)
            scores = predict_logits(model, x, rgb.shape[:2], num_classes=config["model"]["num_classes"])
        pred = scores.argmax(1)[0].cpu().numpy().astype(np.uint8)
        write_image(class_map, Image.fromarray(pred + 1))
        write_image(overlay_path, Image.fromarray(overlay(rgb, pred, palette, names)), quality=92)
        written += 1
    if skipped:
        print(f"skipped {len(skipped)} file(s):", file=sys.stderr)
        for path, why in sorted(skipped):
            print(f"  {path}: {why}", file=sys.stderr)
    print(f"wrote {written} class maps and {written} overlays to {args.out}"
          + (f"; skipped {len(skipped)} file(s), listed above" if skipped else ""))
    return 1 if skipped else 0


if __name__ == "__main__":
    sys.exit(main())

"""Predict on your own photos: the class map (ADE20K submission PNG) and a picture to look at.

    python scripts/predict.py --checkpoint runs/def-conv-v2/last.pt --input photos/ --out predictions/

For each image X it writes ``DIR/X.png`` (uint8, class + 1, the ADE20K submission format: 1..150) and
``DIR/X_overlay.jpg`` (the photo with the coloured prediction blended over it and a legend of the
classes present). Images are resized as in evaluation (data.scale of the checkpoint's config) and the
prediction is taken at the original size. An unreadable file is named and skipped; the rest go on.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from configs import UserError
from data.dataset import load_class_info
from data.transforms import ValTransform
from engine.checkpoint import build_model_from_checkpoint, load_checkpoint
from engine.inference import predict_logits
from engine.overlay import overlay

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        description="Segment your own images with a checkpoint: a class-map PNG (ADE20K submission format, class + 1) "
        "and an overlay picture with a legend per image.",
        epilog="example: python scripts/predict.py --checkpoint runs/def-conv-v2/last.pt --input photos/ --out predictions/",
    )
    parser.add_argument("--checkpoint", required=True, type=Path, help="checkpoint written by train.py (last.pt)")
    parser.add_argument("--input", required=True, type=Path, help="an image file or a folder of images")
    parser.add_argument("--out", required=True, type=Path, help="folder for the PNGs and overlays")
    parser.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda if available")
    return parser.parse_args(argv)


def find_images(path: Path) -> list[Path]:
    """The image file ``path``, or the images in the folder ``path`` sorted by name; UserError if none."""
    if path.is_file():
        return [path]
    if path.is_dir():
        images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if images:
            return images
        raise UserError(f"the folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)}). Give an image or a folder of them.")
    raise UserError(f"--input {path} does not exist. Give an image file or a folder of images.")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: 0 if every image worked, 1 if some were unreadable, 2 on errors."""
    args = parse_args(argv)
    try:
        images = find_images(args.input)
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        checkpoint = load_checkpoint(args.checkpoint)
        model, config = build_model_from_checkpoint(checkpoint, args.checkpoint)
        model.to(device).eval()
        try:
            args.out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create {args.out} ({err.strerror or err}). Give a folder you can write to.") from None
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    transform, (names, palette) = ValTransform(config["data"]), load_class_info()
    failed = []
    for path in tqdm(images, desc="predict", disable=len(images) < 2):
        try:
            with Image.open(path) as im:
                rgb = np.asarray(im.convert("RGB"))
        except (UnidentifiedImageError, OSError) as err:
            tqdm.write(f"skipped {path}: cannot read it as an image ({type(err).__name__}: {err})", file=sys.stderr)
            failed.append(path)
            continue
        with torch.inference_mode():
            x = transform(Image.fromarray(rgb))[None].to(device)
            scores = predict_logits(model, x, rgb.shape[:2], num_classes=config["model"]["num_classes"])
        pred = scores.argmax(1)[0].cpu().numpy().astype(np.uint8)
        Image.fromarray(pred + 1).save(args.out / f"{path.stem}.png")
        Image.fromarray(overlay(rgb, pred, palette, names)).save(args.out / f"{path.stem}_overlay.jpg", quality=92)
    done = len(images) - len(failed)
    print(f"wrote {done} class maps and overlays to {args.out}" + (f"; {len(failed)} unreadable file(s) skipped" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

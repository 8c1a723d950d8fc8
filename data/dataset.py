"""The ADEChallengeData2016-layout dataset, its resumable training sampler and the data loaders.

The folder layout and label convention are those of the ADE20K scene-parsing benchmark
(``images/{split}/*.jpg``, ``annotations/{split}/*.png`` holding ids 0..150, 0 = "other"), as
read by mmsegmentation's ``ADE20KDataset`` with ``reduce_zero_label=True``. Training samples are
addressed by ``(index, sample_seed)`` keys from ``TrainSampler``, a deterministic infinite stream
(nanoGPT-style iteration counting rather than epochs), so a run resumed at iteration k sees exactly
the batches an uninterrupted run would have seen. Validation is sharded without the duplicates a
``DistributedSampler`` would add (see torchvision's segmentation reference).
"""

from __future__ import annotations

import csv
import multiprocessing
import os
import signal
import warnings
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from torchvision.io import ImageReadMode, decode_jpeg, decode_png, read_file
from tqdm import tqdm

from configs import UserError
from data.perturb import Perturbation
from data.transforms import (
    NUM_ADE_CLASSES,
    TrainTransform,
    ValTransform,
    map_ade_labels,
)

CLASSES_CSV = Path(__file__).resolve().parent / "ade20k_classes.csv"
SPLITS = ("training", "validation")
OFFICIAL_COUNTS = {"training": 20210, "validation": 2000}
POOL_MIN_FILES = 256  # check_layout reads smaller splits in-process
IMAGE_SUFFIXES = (".jpg", ".jpeg")  # compared in lower case: X.JPG and X.Jpeg are images too
LABEL_SUFFIXES = (".png",)
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")  # PIL's 16-bit greyscale
NOT_PNG = "annotations must be PNGs (a JPEG's lossy compression changes the class ids along every region edge)"
LAYOUT_HELP = (
    "ADEChallengeData2016/images/{training,validation}/*.jpg (or .jpeg, any case) and "
    "ADEChallengeData2016/annotations/{training,validation}/*.png"
)


def load_class_info() -> tuple[list[str], np.ndarray]:
    """Return the 150 ADE20K class names (training label order) and their (150, 3) uint8 RGB palette."""
    with CLASSES_CSV.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    names = [row["name"] for row in rows]
    palette = np.array([[int(row["r"]), int(row["g"]), int(row["b"])] for row in rows], dtype=np.uint8)
    return names, palette


def _decode(decoder: Any, path: Path) -> torch.Tensor | None:
    """``decoder`` (torchvision's libjpeg-turbo or libpng: PIL's pixels, faster) on the file's bytes, channels as
    stored; None where torchvision cannot read it. Silences torchvision 0.29's deprecation notice (TorchCodec)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return decoder(read_file(str(path)), mode=ImageReadMode.UNCHANGED)
    except RuntimeError:  # not something torchvision decodes: PIL reads it (or explains what is wrong)
        return None


def _read_image(path: Path) -> torch.Tensor | Image.Image:
    """The RGB pixels of ``path``: a uint8 [3, H, W] tensor when torchvision decodes it as a 3-channel JPEG
    (libjpeg-turbo, as PIL: the same pixels, but faster and without a copy into numpy), else ``read_rgb``'s image.
    Neither applies the EXIF orientation (``decode_jpeg`` leaves it off by default), as ``read_rgb`` here."""
    pixels = _decode(decode_jpeg, path)  # a dataset image is a .jpg or .jpeg (list_split)
    return pixels if pixels is not None and pixels.shape[0] == 3 else read_rgb(path)


def read_rgb(path: Path, exif_orientation: bool = False) -> Image.Image:
    """``path`` decoded by PIL as an 8-bit RGB image (no copy for RGB JPEGs): the one reader of photos.

    16-bit greyscale is scaled to 8 bits (v / 257, rounded: 65535 -> 255), where PIL's conversion would clip every
    value above 255 to white; 16-bit colour PNGs PIL itself reads as 8-bit RGB. 32-bit integer or floating-point
    pixels (TIFF modes I and F) have no standard range and are refused (UserError naming the file).
    ``exif_orientation`` turns the pixels as the EXIF Orientation tag says (a phone photo held upright), for
    photos shown to people (scripts/predict.py); the dataset reads the stored pixels, see ``SegmentationFolder._load``.
    """
    with Image.open(path) as im:
        im.load()  # decoded now: the pixels outlive the file
        if im.mode in ("I", "F"):
            raise UserError(
                f"{path} has {'32-bit integer' if im.mode == 'I' else 'floating-point'} pixels (PIL mode {im.mode}), "
                f"which have no standard range to map to 8-bit colours. Save it as an 8- or 16-bit image (JPEG or PNG)."
            )
        if exif_orientation:
            im = ImageOps.exif_transpose(im)
        if im.mode in SIXTEEN_BIT_MODES:
            im = Image.fromarray(np.rint(np.asarray(im, dtype=np.float32) / 257).astype(np.uint8))
        return im if im.mode == "RGB" else im.convert("RGB")


def _read_label(path: Path, num_classes: int = NUM_ADE_CLASSES) -> np.ndarray:
    """Read an ADE annotation PNG as uint8 ids (torchvision's decoder for single-channel 8-bit PNGs, all of ADE20K's;
    PIL for the rest), raising UserError for a file that is not a PNG, for anything outside 0..150 and for an id
    above ``num_classes`` (the model's ``model.num_classes``: ids 1..N become classes 0..N-1)."""
    decoded = _decode(decode_png, path)
    if decoded is not None and decoded.shape[0] == 1 and decoded.dtype == torch.uint8:
        raw = decoded[0].numpy()
    else:
        with Image.open(path) as im:
            if im.format != "PNG":
                raise UserError(
                    f"annotation {path} is a {im.format} file, not a PNG: {NOT_PNG}. Replace it with the PNG from "
                    f"ADEChallengeData2016.zip, and run `python scripts/download_ade20k.py --check <root>` to find "
                    f"every such file."
                )
            raw = np.array(im)
    if raw.ndim != 2:
        raise UserError(
            f"annotation {path} has shape {raw.shape}; ADE20K annotations are single-channel PNGs of class "
            f"ids 0..150. Replace the file with the one from ADEChallengeData2016.zip."
        )
    if (top := int(raw.max())) > NUM_ADE_CLASSES:  # a PNG has at least one pixel
        raise UserError(
            f"annotation {path} holds the label value {top}, but ADE20K ids are 0..{NUM_ADE_CLASSES} "
            f"(0 = other). The file is corrupt or not an ADEChallengeData2016 annotation; run "
            f"`python scripts/download_ade20k.py --check <root>` to list every such file and replace them."
        )
    if top > num_classes:
        raise UserError(
            f"annotation {path} holds the label value {top} (class {top - 1}), but model.num_classes={num_classes} "
            f"allows the values 1..{num_classes} (classes 0..{num_classes - 1}; 0 = other, ignored). Set "
            f"model.num_classes={NUM_ADE_CLASSES} for ADE20K (at least {top} for this file)."
        )
    return raw.astype(np.uint8, copy=False)


class SegmentationFolder(Dataset):
    """Images and annotations in the ADEChallengeData2016 layout.

    With a ``TrainTransform`` the dataset is indexed by ``(index, sample_seed)`` and returns ``TrainTransform``'s
    crops; with a ``ValTransform`` it is indexed by ``index`` and returns ``(resized image, label at the original
    size, file stem)``, after ``perturb`` (validation only) warped image and label together. ``max_images`` > 0
    keeps the first N files sorted by name. A label value above ``num_classes`` (``model.num_classes``) is refused
    when its file is read.
    """

    def __init__(
        self, root: str | Path, split: str, transform: TrainTransform | ValTransform, max_images: int = 0,
        perturb: Perturbation | None = None, num_classes: int = NUM_ADE_CLASSES,
    ) -> None:
        self.root = Path(root)
        self.num_classes = num_classes
        self.transform = transform
        self.train = isinstance(transform, TrainTransform)
        self.perturb = perturb
        pairs, problems = list_split(self.root, split)
        if not any(image for image, _ in pairs):
            raise UserError(
                f"no images found in {self.root / 'images' / split} (the folder is missing or holds no .jpg/.jpeg "
                f"files). The dataset must follow the layout {LAYOUT_HELP}; check data.root, or run "
                f"`python scripts/download_ade20k.py --check {self.root}` to see what is wrong."
            )
        if problems:
            shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
            raise UserError(
                f"the {split} files of {self.root} do not pair up ({len(problems)} problem(s)): {shown}. Every "
                f"images/{split}/X.jpg (or .jpeg, any case) needs annotations/{split}/X.png and the reverse, and "
                f"nothing else belongs in those folders; fix the files named, or run "
                f"`python scripts/download_ade20k.py --check {self.root}` for a full report."
            )
        if max_images > 0:
            pairs = pairs[:max_images]
        self.images, self.labels = [image for image, _ in pairs], [label for _, label in pairs]

    def __len__(self) -> int:
        return len(self.images)

    def _read(self, path: Path, reader: Any) -> Any:
        """``reader(path)``, with a file that cannot be read (deleted after the start, truncated, not an image)
        turned into one message naming it."""
        try:
            return reader(path)
        except OSError as err:
            raise UserError(
                f"cannot read {path} ({type(err).__name__}: {err}). The file is missing, truncated or not an image; "
                f"replace it from ADEChallengeData2016.zip, and run `python scripts/download_ade20k.py --check "
                f"{self.root}` to find every such file."
            ) from None

    def _load(self, index: int, pixels: bool = False) -> tuple[Image.Image | torch.Tensor, np.ndarray]:
        """The RGB image and the mapped training label (0..149, 255) of file ``index``.

        ``pixels=True`` (training) may return the image as a uint8 [3, H, W] tensor (``_read_image``), else a PIL
        image. The stored pixels, without the EXIF orientation: ADE20K's annotations are aligned with them.
        """
        image = self._read(self.images[index], _read_image if pixels else read_rgb)
        raw = self._read(self.labels[index], lambda path: _read_label(path, self.num_classes))
        height, width = image.shape[-2:] if isinstance(image, torch.Tensor) else (image.height, image.width)
        if raw.shape != (height, width):
            raise UserError(
                f"annotation {self.labels[index]} is {raw.shape[1]}x{raw.shape[0]} but its image "
                f"{self.images[index]} is {width}x{height}; they must have the same size. "
                f"Replace the pair with the originals from ADEChallengeData2016.zip."
            )
        return image, map_ade_labels(raw)

    def __getitem__(self, key: Any) -> tuple:
        if self.train:
            index, sample_seed = key
            image, label = self._load(int(index), pixels=True)
            return self.transform(image, label, np.random.default_rng(int(sample_seed)))
        image, label = self._load(int(key))
        name = self.images[int(key)].stem
        if self.perturb is not None:
            image, label = self.perturb(image, label, key=name)
        return self.transform(image), torch.from_numpy(label.astype(np.int64)), name


def list_folder(folder: Path) -> list[Path]:
    """The entries of ``folder`` sorted by name; UserError naming it when it cannot be listed (its permissions)."""
    try:
        return sorted(folder.iterdir())
    except OSError as err:
        raise UserError(f"cannot list the folder {folder} ({err.strerror or err}). Check its permissions "
                        f"(`ls -ld {folder}`): the user running this needs read and execute rights on it.") from None


def list_split(root: Path, split: str) -> tuple[list[tuple[Path | None, Path | None]], list[str]]:
    """The (image, annotation) pairs of one split, matched by file stem, and every problem with the files.

    The one listing of the dataset, for training, evaluation and ``--check`` alike: images are
    ``images/{split}/X.jpg`` or ``X.jpeg``, annotations ``annotations/{split}/X.png``, the suffixes in any case.
    Nothing is dropped without a word: an image without its annotation (or the reverse) is a pair holding None and
    a problem; two files of one stem (X.jpg and X.JPEG) and any other file or folder are problems. Pairs are sorted
    by file name (the image's, else the annotation's); a missing folder lists as empty.
    """
    image_dir, label_dir = root / "images" / split, root / "annotations" / split
    problems: list[str] = []
    by_stem: list[dict[str, Path]] = []
    for folder, suffixes, kind in ((image_dir, IMAGE_SUFFIXES, "image"), (label_dir, LABEL_SUFFIXES, "annotation")):
        files: dict[str, Path] = {}
        for path in list_folder(folder) if folder.is_dir() else []:
            if path.suffix.lower() not in suffixes or not path.is_file():
                what = f"not an {kind} file ({' or '.join(suffixes)}, any case)"
                problems.append(f"{path}: {what}; move it out of {folder}")
            elif path.stem in files:
                problems.append(f"{files[path.stem]} and {path}: two {kind}s named {path.stem}; keep one of them")
            else:
                files[path.stem] = path
        by_stem.append(files)
    images, labels = by_stem
    for stem in sorted(images.keys() - labels.keys()):
        problems.append(f"{images[stem]}: no annotation {label_dir / (stem + '.png')}")
    for stem in sorted(labels.keys() - images.keys()):
        problems.append(f"{labels[stem]}: annotation without an image {image_dir / stem}.jpg (or .jpeg)")
    pairs = [(images.get(stem), labels.get(stem)) for stem in images.keys() | labels.keys()]
    return sorted(pairs, key=lambda pair: (pair[0] or pair[1]).name), problems


def sample_seed(seed: int, position: int) -> int:
    """A 63-bit seed for global sample ``position`` of a run seeded with ``seed``."""
    state = np.random.SeedSequence([seed, position]).generate_state(1, np.uint64)[0]
    return int(state >> np.uint64(1))


class TrainSampler(Sampler):
    """Infinite, resumable stream of ``(index, sample_seed)`` keys for one rank.

    Global sample position ``p = it * global_batch + j`` belongs to epoch ``p // dataset_len`` and
    reads ``permutation(seed, epoch)[p % dataset_len]``; rank r takes the slice
    ``[r * B / W, (r + 1) * B / W)`` of every global batch. Starting at ``start_iter`` yields exactly
    the continuation of a stream started at 0. ``global_batch`` is ``train.batch_size``, ``seed`` the config's.
    """

    def __init__(
        self, dataset_len: int, global_batch: int, rank: int, world_size: int, seed: int, start_iter: int = 0
    ) -> None:
        self.dataset_len = dataset_len
        self.global_batch = global_batch
        self.local_batch = global_batch // world_size
        self.rank = rank
        self.seed = seed
        self.start_iter = start_iter

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, perm = -1, np.empty(0, dtype=np.int64)
        it = self.start_iter
        while True:
            first = it * self.global_batch + self.rank * self.local_batch
            for p in range(first, first + self.local_batch):
                if p // self.dataset_len != epoch:
                    epoch = p // self.dataset_len
                    perm = np.random.default_rng([self.seed, epoch]).permutation(self.dataset_len)
                yield int(perm[p % self.dataset_len]), sample_seed(self.seed, p)
            it += 1


def _exit_quietly(signum: int, frame: Any) -> None:
    os._exit(0)


def _worker_init(worker_id: int) -> None:
    """One intra-op thread per loader worker; Ctrl-C left to the main process, SIGTERM/SIGUSR1 a quiet exit.

    Ctrl-C in a terminal, a scheduler's SIGTERM or SIGUSR1 and torchrun's forwarding reach the whole process
    group. A worker killed by a signal makes PyTorch raise in the training process at once, before it can save
    last.pt; a worker that exits with status 0 does not, and the training process then stops on its own signal
    (its loader's RuntimeError is expected then). Ignoring the signal instead would keep workers alive that
    Python's exit terminates with SIGTERM and then waits for.
    """
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, _exit_quietly)


def build_train_loader(config: dict, rank: int, world_size: int, start_iter: int) -> DataLoader:
    """Infinite loader of ``(images [B,3,C,C] uint8, labels [B,C,C] uint8, valid [B,2] int64)``, B = batch_size //
    world_size. ``data.transforms.normalize_batch(images, valid)`` on the training device gives the float input
    (the crop padded with 0 after normalisation); ``labels.long()`` the loss target (255 = ignore)."""
    root = prepare_dataset_root(config)
    data = config["data"]
    dataset = SegmentationFolder(root, "training", TrainTransform(data), num_classes=config["model"]["num_classes"])
    batch = config["train"]["batch_size"]
    sampler = TrainSampler(len(dataset), batch, rank, world_size, config["seed"], start_iter)
    workers = data["num_workers"]
    return DataLoader(
        dataset,
        batch_size=batch // world_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
        worker_init_fn=_worker_init,
    )


def build_val_loader(
    config: dict, split: str, rank: int, world_size: int, max_images: int = 0, perturb: Perturbation | None = None
) -> DataLoader:
    """Loader of ``(image [1,3,h,w], label [1,H,W] int64, names [str])``; rank r takes files r, r+W, ...

    ``perturb`` warps every image and its label (geometric robustness, data/perturb.py).
    """
    root = prepare_dataset_root(config)
    data = config["data"]
    dataset = SegmentationFolder(root, split, ValTransform(data), max_images, perturb, config["model"]["num_classes"])
    shard = Subset(dataset, range(rank, len(dataset), world_size))
    return DataLoader(
        shard,
        batch_size=1,
        shuffle=False,
        num_workers=data["num_workers"],
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=_worker_init,
    )


def prepare_dataset_root(config: dict) -> Path:
    """Return the dataset folder of ``config``, generating the demo dataset on first use.

    For ``data.dataset: ade20k`` a missing or incomplete folder is a UserError that explains the
    expected layout and how to download it. Relative roots are relative to the current directory.
    """
    data = config["data"]
    kind, root = data["dataset"], Path(data["root"]).expanduser()
    if kind == "demo":
        from data.demo import ensure_demo_dataset

        return ensure_demo_dataset(root).resolve()
    needed = [root / top / split for top in ("images", "annotations") for split in SPLITS]
    missing = [p for p in needed if not p.is_dir()]
    if missing:
        hint = ""
        if (root / "ADEChallengeData2016" / "images").is_dir():
            hint = f" It looks like data.root should be {root / 'ADEChallengeData2016'}."
        raise UserError(
            f"the ADE20K dataset was not found: {missing[0]} does not exist (data.root={data['root']}, "
            f"resolved to {root.resolve()}). Expected the layout {LAYOUT_HELP}.{hint} Download and check it "
            f"with `python scripts/download_ade20k.py --root data` (about 923 MB), or point the config at an "
            f"existing copy with the override data.root=/path/to/ADEChallengeData2016."
        )
    return root.resolve()


def _check_pair(pair: tuple[Path | None, Path | None]) -> list[str]:
    """Problems with one (image, annotation) pair: unreadable files, different sizes, ids > 150."""
    problems, sizes = [], []
    for path, kind in zip(pair, ("image", "annotation")):
        if path is None:
            continue
        try:
            with Image.open(path) as im:
                im.load()
                sizes.append(im.size)
                if kind == "image":
                    continue
                if im.format != "PNG":
                    problems.append(f"{path}: annotation is a {im.format} file, not a PNG: {NOT_PNG}")
                elif im.mode not in ("L", "P", "I", *SIXTEEN_BIT_MODES):  # single-channel, 8 or 16 bit: as read
                    problems.append(f"{path}: annotation has mode {im.mode} ({len(im.getbands())} channels), "
                                    f"expected a single-channel PNG of class ids")
                elif (top := int(np.asarray(im).max())) > NUM_ADE_CLASSES:
                    problems.append(f"{path}: label value {top} is outside 0..{NUM_ADE_CLASSES}")
        except Exception as err:  # any decoder error means the file is unusable
            problems.append(f"{path}: cannot read the {kind} ({err})")
    if len(sizes) == 2 and sizes[0] != sizes[1]:
        problems.append(f"{pair[0]}: image is {sizes[0][0]}x{sizes[0][1]} but its annotation is "
                        f"{sizes[1][0]}x{sizes[1][1]}")
    return problems


def _map_files(pairs: list[tuple[Path | None, Path | None]], desc: str, workers: int) -> list[list[str]]:
    """``_check_pair`` over all pairs, in a process pool for big lists, with a progress bar.

    The pool's processes start from a fresh server process (``forkserver``), not as forks of this one, whose other
    threads may hold a lock at the fork; a process that dies ends the check with an error instead of a hang.
    """
    if workers <= 1 or len(pairs) < POOL_MIN_FILES:
        return [_check_pair(p) for p in tqdm(pairs, desc=desc, disable=len(pairs) < 256)]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver")) as pool:
        return list(tqdm(pool.map(_check_pair, pairs, chunksize=32), total=len(pairs), desc=desc))


def check_layout(root: Path, workers: int = min(8, os.cpu_count() or 1)) -> tuple[list[str], list[str]]:
    """Check an ADEChallengeData2016 folder completely, with ``workers`` processes (default: up to 8, one per CPU).

    Every image needs an annotation and vice versa, pairs must have the same size, labels must be in 0..150 and
    every file must decode fully. Returns (problems, report): every problem that makes the dataset unusable, and
    the counts and warnings.
    """
    if not root.is_dir():
        return [f"{root}: the dataset folder does not exist (expected {LAYOUT_HELP})"], []
    problems: list[str] = []
    report = [f"checking {root}"]
    for split in SPLITS:
        image_dir, label_dir = root / "images" / split, root / "annotations" / split
        missing = [folder for folder in (image_dir, label_dir) if not folder.is_dir()]
        problems.extend(f"{folder}: folder is missing" for folder in missing)
        if missing:
            continue
        pairs, listing_problems = list_split(root, split)
        num_images, num_labels = sum(i is not None for i, _ in pairs), sum(a is not None for _, a in pairs)
        report.append(f"{split}: {num_images} images, {num_labels} annotations")
        if num_images != OFFICIAL_COUNTS[split]:
            report.append(
                f"WARNING: {split} has {num_images} images, the official split has {OFFICIAL_COUNTS[split]:,} "
                f"(fine for a subset)"
            )
        if not num_images:
            problems.append(f"{image_dir}: no .jpg/.jpeg images")
        problems.extend(listing_problems)
        for found in _map_files(pairs, f"checking {split}", workers):
            problems.extend(found)
    return problems, report

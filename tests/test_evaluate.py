"""evaluate.py end to end on a tiny ADE-format tree: the ADE20K rule on saved PNGs, errors, inference modes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from configs import UserError, load_config
from engine.checkpoint import build_model_from_checkpoint, load_checkpoint
from engine.diagnosis import DeviceInfo
from engine.inference import predict_logits
from engine.metric import metrics_from_counts
from engine.statistics import PerImageCounts
from engine import workdir
from evaluate import main
from models.segmentor import build_model

REPO = Path(__file__).resolve().parents[1]

# (width, height) of the images of each split; the 64x64 data.scale resizes them up.
SIZES = {"validation": [(48, 40), (40, 56), (52, 44)], "training": [(48, 40), (44, 48), (40, 40)]}


def make_ade_tree(root: Path) -> None:
    """A small ADEChallengeData2016 tree: random JPEGs and blocky annotations of ADE ids 0..150."""
    rng = np.random.default_rng(0)
    for split, sizes in SIZES.items():
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            name = f"ADE_{split[:5]}_{i:08d}"
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "images" / split / f"{name}.jpg")
            blocks = rng.integers(0, 151, (h // 4 + 1, w // 4 + 1)).astype(np.uint8)
            label = np.kron(blocks, np.ones((4, 4), dtype=np.uint8))[:h, :w]
            label[:6, :6] = 0  # always some "other" pixels
            Image.fromarray(label).save(root / "annotations" / split / f"{name}.png")


@pytest.fixture(scope="module")
def tree(module_dir: Path) -> Path:
    root = module_dir / "ade" / "ADEChallengeData2016"
    make_ade_tree(root)
    return root


@pytest.fixture(scope="module")
def config(tree: Path) -> dict:
    overrides = [
        "model.pretrained_backbone=false",
        f"data.root={tree}",
        "data.dataset=ade20k",
        "data.num_workers=0",
        "data.scale=[64,64]",
    ]
    return load_config("demo.yaml", overrides)  # a def-conv-v2 model


@pytest.fixture(scope="module")
def checkpoint(config: dict, module_dir: Path) -> Path:
    torch.manual_seed(0)
    model, _ = build_model(config, load_pretrained=False)
    path = module_dir / "def-conv-v2.pt"
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": None,
            "scheduler": None,
            "scaler": None,
            "iteration": 0,
            "best_miou": 0.0,
            "config": config,
            "versions": {"torch": str(torch.__version__)},  # TorchVersion is not weights_only-safe
        },
        path,
    )
    return path


def ade_challenge_metrics(pred_dir: Path, anno_dir: Path) -> tuple[float, float]:
    """mIoU and pixel accuracy (percent) by the ADE20K challenge rule, from submission PNGs.

    As the devkit: annotation 0 is unlabelled and not scored, predictions hold 1..150, intersection
    and union of each class are summed over the whole set, and the mean runs over classes with a
    non-empty union. Unlike the devkit we count every class exactly: its np.histogram(bins=150,
    range=(1, 150)) puts classes 149 and 150 into one last bin.
    """
    inter, union = np.zeros(151), np.zeros(151)
    correct = labelled = 0
    for anno_path in sorted(anno_dir.glob("*.png")):
        anno = np.array(Image.open(anno_path)).astype(np.int64)
        with Image.open(pred_dir / anno_path.name) as im:
            assert im.mode == "L" and im.size == (anno.shape[1], anno.shape[0])
            pred = np.array(im).astype(np.int64)
        assert pred.min() >= 1 and pred.max() <= 150
        pred = pred * (anno > 0)
        correct += int(np.sum((pred == anno) & (anno > 0)))
        labelled += int(np.sum(anno > 0))
        for c in range(1, 151):
            inter[c] += np.sum((pred == c) & (anno == c))
            union[c] += np.sum((pred == c) | (anno == c))
    present = union[1:] > 0
    return 100.0 * float(np.mean(inter[1:][present] / union[1:][present])), 100.0 * correct / labelled


def test_json_and_saved_pngs_follow_the_ade20k_rule(tree: Path, checkpoint: Path, tmp_path: Path) -> None:
    second = tmp_path / "copy.pt"
    os.link(checkpoint, second)  # a second checkpoint name without copying 150 MB
    out, json_path = tmp_path / "pred", tmp_path / "res.json"
    args = ["--checkpoint", str(checkpoint), str(second), "--device", "cpu"]
    assert main(args + ["--save-predictions", str(out), "--json", str(json_path)]) == 0
    results = json.loads(json_path.read_text())
    assert isinstance(results, list) and [r["checkpoint"] for r in results] == [str(checkpoint), str(second)]
    for result, sub in zip(results, ["def-conv-v2", "copy"]):
        assert result["num_images"] == 3 and result["split"] == "validation"
        assert len(result["per_class"]) == 150 and result["per_class"][0]["name"]
        assert result["config"]["model"]["deform"]["version"] == 2
        m_iou, a_acc = ade_challenge_metrics(out / sub, tree / "annotations" / "validation")
        assert result["mIoU"] == pytest.approx(m_iou, rel=1e-9)
        assert result["aAcc"] == pytest.approx(a_acc, rel=1e-9)
        assert result["score"] == pytest.approx((m_iou + a_acc) / 2, rel=1e-9)
    assert results[0]["mIoU"] == results[1]["mIoU"]


def test_training_split_max_images(tree: Path, checkpoint: Path, tmp_path: Path, capsys) -> None:
    json_path = tmp_path / "res.json"
    args = ["--checkpoint", str(checkpoint), "--split", "training", "--max-images", "2", "--data-root", str(tree)]
    assert main(args + ["--json", str(json_path), "--device", "cpu"]) == 0
    result = json.loads(json_path.read_text())
    assert isinstance(result, dict)
    assert result["num_images"] == 2 and result["split"] == "training"
    assert result["mode"] == "whole" and result["flip"] is False and result["scales"] == [1.0]
    shown = capsys.readouterr().out
    assert "mIoU" in shown and "wall" in shown  # summary table and per-class table (class "wall")


@pytest.fixture(scope="module")
def broken_checkpoints(checkpoint: Path, config: dict, module_dir: Path) -> dict:
    """Command lines that must fail cleanly, with the file names their message must hold."""
    folder = module_dir / "broken"
    folder.mkdir()
    truncated, no_model = folder / "truncated.pt", folder / "no_model.pt"
    data = checkpoint.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    torch.save({"config": config, "iteration": 0}, no_model)
    missing = folder / "missing.pt"
    return {
        "missing": (["--checkpoint", str(missing)], [str(missing)]),
        "truncated": (["--checkpoint", str(truncated)], [str(truncated)]),
        "no_model": (["--checkpoint", str(no_model)], [str(no_model)]),
        "other_model": (["--checkpoint", str(checkpoint), "--config", "norm-conv.yaml"], [str(checkpoint), "norm-conv"]),
    }


@pytest.mark.parametrize("case", ["missing", "truncated", "no_model", "other_model"])
def test_bad_checkpoints_are_user_errors(case: str, broken_checkpoints: dict, capsys) -> None:
    args, names = broken_checkpoints[case]
    assert main(args + ["--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    for name in names:
        assert name in err


def test_bad_checkpoints_show_no_traceback_from_the_command_line(broken_checkpoints: dict) -> None:
    # One interpreter runs evaluate.py as __main__ once per case (importing torch four times would
    # take ~20 s on 2 cores); anything uncaught would print a traceback and end the process.
    script = (
        "import runpy, sys\n"
        "for argv in sys.argv[1].split('\\n'):\n"
        "    sys.argv = ['evaluate.py'] + argv.split('\\t') + ['--device', 'cpu']\n"
        "    try:\n"
        "        runpy.run_path('evaluate.py', run_name='__main__')\n"
        "    except SystemExit as e:\n"
        "        print(f'exit {e.code}', flush=True)\n"
        "        print('--- end of case', file=sys.stderr, flush=True)\n"
    )
    cases = list(broken_checkpoints.values())
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(
        [sys.executable, "-c", script, "\n".join("\t".join(args) for args, _ in cases)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    assert proc.returncode == 0 and proc.stdout.split() == ["exit", "2"] * len(cases), proc.stdout + proc.stderr
    messages = proc.stderr.split("--- end of case\n")[:-1]
    assert len(messages) == len(cases)
    for message, (_, names) in zip(messages, cases):
        assert message.startswith("error: ") and message.count("\n") == 1  # one paragraph
        for name in names:
            assert name in message


@pytest.mark.parametrize("change", ["removed", "added"])
def test_state_dict_mismatch_is_never_loaded_partially(checkpoint: Path, change: str) -> None:
    saved = load_checkpoint(checkpoint)
    state = dict(saved["model"])
    if change == "removed":
        key = "head.4.weight"
        del state[key]
    else:
        key = "head.9.weight"
        state[key] = torch.zeros(1)
    with pytest.raises(UserError) as info:
        build_model_from_checkpoint({**saved, "model": state}, checkpoint, None)
    assert str(checkpoint) in str(info.value) and key in str(info.value)


class Pointwise(nn.Module):
    """A stand-in model of 1x1 convs: full resolution, or 1/8 after 8x8 average pooling."""

    def __init__(self, num_classes: int = 5, pool: bool = True) -> None:
        super().__init__()
        self.pool = pool
        self.net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, num_classes, 1))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.net(nn.functional.avg_pool2d(x, 8) if self.pool else x)}


def test_whole_and_slide_agree_when_one_crop_covers_the_image() -> None:
    torch.manual_seed(0)
    model = Pointwise(pool=True)  # logits at 1/8, as the segmentation model
    image = torch.randn(1, 3, 40, 48)
    with torch.inference_mode():
        whole = predict_logits(model, image, (45, 51), mode="whole", num_classes=5)
        slide = predict_logits(model, image, (45, 51), mode="slide", crop=64, stride=32, num_classes=5)
        tiles = predict_logits(model, image, (45, 51), mode="slide", crop=24, stride=16, num_classes=5)
    assert whole.shape == slide.shape == tiles.shape == (1, 5, 45, 51)
    assert torch.allclose(whole, slide, atol=1e-6)
    assert not torch.allclose(whole, tiles, atol=1e-3)  # smaller crops do see less context


def test_slide_averages_overlapping_crops() -> None:
    torch.manual_seed(0)
    model = Pointwise(pool=False)  # every pixel's logits are independent of the crop it is in
    image = torch.randn(1, 3, 50, 70)
    with torch.inference_mode():
        whole = predict_logits(model, image, (50, 70), mode="whole", num_classes=5)
        slide = predict_logits(model, image, (50, 70), mode="slide", crop=32, stride=12, num_classes=5)
    assert torch.allclose(whole, slide, atol=1e-5)


def test_flip_tta_of_a_flip_equivariant_model() -> None:
    torch.manual_seed(0)
    model = Pointwise(pool=True)  # pooling over aligned 8x8 cells commutes with flipping a 64-wide image
    image = torch.randn(1, 3, 48, 64)
    with torch.inference_mode():
        plain = predict_logits(model, image, (37, 61), num_classes=5)
        flipped = predict_logits(model, image, (37, 61), flip=True, num_classes=5)
        multi = predict_logits(model, image, (37, 61), scales=(0.5, 1.0, 1.5), flip=True, num_classes=5)
    assert plain.shape == flipped.shape == multi.shape == (1, 5, 37, 61)
    assert torch.allclose(flipped, 2 * plain.softmax(1), atol=1e-5)  # sum of softmax over 2 views
    assert torch.equal(flipped.argmax(1), plain.argmax(1))
    assert torch.allclose(multi.sum(1), torch.full((1, 37, 61), 6.0), atol=1e-4)


def test_identity_perturbation_equals_plain_and_rotation_differs(tree: Path, checkpoint: Path, tmp_path: Path) -> None:
    """--perturb rotate=0 is the plain evaluation exactly; rotate=30 warps images and labels (other numbers);
    --per-image counts sum to the dataset metric of the same evaluation."""
    records = {}
    for name, extra in (("plain", ["--per-image", str(tmp_path / "counts.npz")]), ("identity", ["--perturb", "rotate=0"]),
                        ("rotated", ["--perturb", "rotate=30"])):
        json_path = tmp_path / f"{name}.json"
        args = ["--checkpoint", str(checkpoint), "--data-root", str(tree), "--device", "cpu", "--json", str(json_path)]
        assert main(args + extra) == 0
        records[name] = json.loads(json_path.read_text())
    assert records["identity"]["per_class"] == records["plain"]["per_class"]
    assert records["identity"]["perturb"] == "rotate=0" and records["plain"]["perturb"] is None
    assert records["rotated"]["per_class"] != records["plain"]["per_class"]
    counts = PerImageCounts.load(tmp_path / "counts.npz")
    assert len(counts.names) == 3 and metrics_from_counts(*counts.counts.sum(0).T)["mIoU"] == records["plain"]["mIoU"]


def test_unwritable_outputs_fail_before_evaluating(tree: Path, checkpoint: Path, tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    args = ["--checkpoint", str(checkpoint), "--data-root", str(tree), "--device", "cpu"]
    assert main(args + ["--json", str(blocker / "res.json")]) == 2
    err = capsys.readouterr()
    assert "cannot write" in err.err and "nothing was evaluated" in err.err and "per-class" not in err.out
    assert main(args + ["--perturb", "twist=3"]) == 2 and "unknown kind 'twist'" in capsys.readouterr().err


def test_predict_writes_class_maps_and_overlays_and_skips_broken_files(tree: Path, checkpoint: Path, tmp_path: Path,
                                                                        capsys) -> None:
    from scripts import predict

    photos = tmp_path / "photos"
    photos.mkdir()
    for p in sorted((tree / "images" / "validation").glob("*.jpg"))[:2]:
        (photos / p.name).write_bytes(p.read_bytes())
    (photos / "broken.jpg").write_text("not an image")
    out = tmp_path / "pred"
    assert predict.main(["--checkpoint", str(checkpoint), "--input", str(photos), "--out", str(out), "--device", "cpu"]) == 1
    captured = capsys.readouterr()
    assert "broken.jpg" in captured.err and "wrote 2 class maps" in captured.out
    for p in sorted(photos.glob("ADE_*.jpg")):
        with Image.open(p) as im:
            size = im.size
        class_map = np.asarray(Image.open(out / f"{p.stem}.png"))
        assert class_map.shape == size[::-1] and 1 <= class_map.min() and class_map.max() <= 150
        with Image.open(out / f"{p.stem}_overlay.jpg") as im:
            assert im.size[0] > size[0] and im.size[1] >= size[1]  # the legend sits to the right
    assert predict.main(["--checkpoint", str(checkpoint), "--input", str(tmp_path / "none"), "--out", str(out)]) == 2


def test_evaluation_outputs_have_one_writer_and_are_written_whole(tree: Path, checkpoint: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """Issue 23, item 6: a second evaluate.py writing the same --json/--per-image is refused at once (before: both said
    "wrote" and one result replaced the other), and a write that fails halfway leaves the previous file as it was."""
    from engine.lock import output_lock

    json_path, counts = tmp_path / "res.json", tmp_path / "counts.npz"
    args = ["--checkpoint", str(checkpoint), "--data-root", str(tree), "--device", "cpu", "--max-images", "1"]
    for output, flag in ((json_path, "--json"), (counts, "--per-image")):
        with output_lock(output):  # another live process (this one) writes it
            assert main(args + [flag, str(output)]) == 2
        err = capsys.readouterr().err
        assert f"the output {output} is in use by process {os.getpid()}" in err and "Traceback" not in err
    assert main(args + ["--json", str(json_path), "--per-image", str(counts)]) == 0
    assert json.loads(json_path.read_text())["per_image"] == str(counts)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["counts.npz", "res.json"]  # no lock or temporary file left
    before = {p: p.read_bytes() for p in (json_path, counts)}

    def half_then_full(self: Path, data: str | bytes, *rest: object, **kwargs: object) -> None:
        with open(self, "wb") as f:
            f.write(data[: len(data) // 2].encode() if isinstance(data, str) else data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", half_then_full)
    assert main(args + ["--json", str(json_path)]) == 2  # one paragraph, no traceback
    assert f"could not write {json_path} (No space left on device)" in capsys.readouterr().err
    monkeypatch.undo()
    probe_writer = Path.write_bytes  # the output folder's write probe still works: the disk fills during the write

    def half_counts(self: Path, data: bytes) -> None:
        return half_then_full(self, data) if self.name.startswith(f".{counts.name}") else probe_writer(self, data)

    monkeypatch.setattr(Path, "write_bytes", half_counts)
    assert main(args + ["--per-image", str(counts)]) == 2
    assert f"could not write {counts} (No space left on device)" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in (json_path, counts)} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["counts.npz", "res.json"]


def _predict(*args: str | Path) -> int:
    from scripts import predict

    return predict.main([str(a) for a in args])


def test_predict_never_overwrites(tree: Path, checkpoint: Path, tmp_path: Path, capsys) -> None:
    """Issue 23, item 2: photo.jpg and photo.png would both write photo.png (before: one class map lost, both counted):
    refused before predicting, as are files already in --out (unless --overwrite) and an input image as output."""
    source = sorted((tree / "images" / "validation").glob("*.jpg"))[0]
    same, out = tmp_path / "same", tmp_path / "pred"
    same.mkdir()
    (same / "photo.jpg").write_bytes(source.read_bytes())
    Image.open(source).save(same / "photo.png")
    assert _predict("--checkpoint", checkpoint, "--input", same, "--out", out, "--device", "cpu") == 2
    err = capsys.readouterr().err
    assert f"{same / 'photo.jpg'} and {same / 'photo.png'}" in err and "Nothing was predicted" in err
    assert not out.exists()
    (same / "photo.png").unlink()
    assert _predict("--checkpoint", checkpoint, "--input", same, "--out", out, "--device", "cpu") == 0
    assert "wrote 1 class maps and 1 overlays" in capsys.readouterr().out
    assert _predict("--checkpoint", checkpoint, "--input", same, "--out", out, "--device", "cpu") == 2
    existing = f"2 output file(s) already exist: {out / 'photo.png'}, {out / 'photo_overlay.jpg'}"
    assert existing in capsys.readouterr().err
    assert _predict("--checkpoint", checkpoint, "--input", same, "--out", out, "--device", "cpu", "--overwrite") == 0
    (same / "photo_overlay.jpg").write_bytes(source.read_bytes())  # an input that photo.jpg's overlay would replace
    assert _predict("--checkpoint", checkpoint, "--input", same, "--out", same, "--overwrite") == 2
    assert f"would replace the input image(s) {same / 'photo_overlay.jpg'}" in capsys.readouterr().err


def test_predict_reads_photos_as_shown_and_lists_what_it_skips(tree: Path, checkpoint: Path, tmp_path: Path,
                                                               capsys) -> None:
    """Issue 23, items 3-5: a phone photo is predicted upright (EXIF orientation), a 16-bit PNG as its 8-bit
    equivalent (before: white), and a .gif or a folder in --input is named with the reason in the summary."""
    photos, out = tmp_path / "photos", tmp_path / "pred"
    photos.mkdir()
    rgb = np.asarray(Image.open(sorted((tree / "images" / "validation").glob("*.jpg"))[0]).convert("RGB"))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 48x40 (WxH), shown rotated: 40 wide, 48 high
    Image.fromarray(rgb).save(photos / "phone.jpg", exif=exif)
    grey = rgb[..., 1]
    Image.fromarray(grey).save(photos / "grey8.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(photos / "grey16.png")
    (photos / "clip.gif").write_bytes(b"GIF89a")
    (photos / "more").mkdir()
    assert _predict("--checkpoint", checkpoint, "--input", photos, "--out", out, "--device", "cpu") == 1
    captured = capsys.readouterr()
    assert "wrote 3 class maps and 3 overlays" in captured.out and "skipped 2 file(s)" in captured.out
    assert f"{photos / 'clip.gif'}: not an image type predict.py reads" in captured.err
    assert f"{photos / 'more'}: a folder" in captured.err
    assert Image.open(out / "phone.png").size == (40, 48)
    grey16, grey8 = (np.asarray(Image.open(out / f"{name}_overlay.jpg")) for name in ("grey16", "grey8"))
    assert np.array_equal(grey16, grey8)


def test_predict_lists_a_broken_link_and_refuses_an_unwritable_out(tree: Path, checkpoint: Path, tmp_path: Path,
                                                                   capsys) -> None:
    """Issue 29, item 8: a dangling symbolic link in --input is listed and skipped while the rest is predicted (before:
    a traceback, nothing predicted); an --out nobody may write, root included (/sys), is one paragraph before any work
    (before: the traceback of the first class map's write)."""
    photos, out = tmp_path / "photos", tmp_path / "pred"
    photos.mkdir()
    source = sorted((tree / "images" / "validation").glob("*.jpg"))[0]
    (photos / "photo.jpg").write_bytes(source.read_bytes())
    (photos / "gone.jpg").symlink_to(tmp_path / "deleted.jpg")
    assert _predict("--checkpoint", checkpoint, "--input", photos, "--out", out, "--device", "cpu") == 1
    captured = capsys.readouterr()
    assert f"{photos / 'gone.jpg'}: a broken symbolic link (to {tmp_path / 'deleted.jpg'}" in captured.err
    assert "wrote 1 class maps and 1 overlays" in captured.out and (out / "photo.png").is_file()
    assert _predict("--checkpoint", checkpoint, "--input", photos / "photo.jpg", "--out", "/sys", "--device", "cpu") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write to /sys (") and "nothing was predicted" in err and "Traceback" not in err


def test_an_image_folder_that_cannot_be_listed_is_one_paragraph(tree: Path, checkpoint: Path,
                                                               monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """Issue 29, item 8: a folder without read permission (chmod 000 does not stop root, so the listing fails by
    injection) ended the evaluation in a PermissionError traceback."""
    folder, listing = tree / "images" / "validation", Path.iterdir

    def iterdir(self: Path):
        if self == folder:
            raise PermissionError(13, "Permission denied", str(self))
        return listing(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    assert main(["--checkpoint", str(checkpoint), "--data-root", str(tree), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot list the folder {folder} (Permission denied)") and "Traceback" not in err


def test_json_outputs_are_written_whole_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The one JSON writer (evaluate.py, compare.py, the scripts): a failed write names the file and leaves the old
    one as it was, with no temporary file beside it."""
    path = tmp_path / "new" / "result.json"
    workdir.write_json(path, {"mIoU": 1.5})
    assert json.loads(path.read_text()) == {"mIoU": 1.5}

    def full_disk(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(workdir.os, "replace", full_disk)
    with pytest.raises(UserError, match=f"could not write {path} \\(No space left on device\\)"):
        workdir.write_json(path, {"mIoU": 2.5})
    assert json.loads(path.read_text()) == {"mIoU": 1.5} and [p.name for p in path.parent.iterdir()] == ["result.json"]
    with pytest.raises(UserError, match="could not write"):
        workdir.write_json(path / "under_a_file.json", {})


def test_out_of_memory_in_evaluation_is_one_paragraph(checkpoint: Path, capsys: pytest.CaptureFixture) -> None:
    """A test scale of 100000 asks the CPU allocator for hundreds of terabytes: one paragraph with the settings that
    shrink the work (evaluate.py's flags), not the allocator's traceback."""
    code = main(["--checkpoint", str(checkpoint), "--device", "cpu", "--scales", "1.0,100000", "--max-images", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "DefaultCPUAllocator" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]  # one paragraph, after the bar
    assert line.startswith(f"error: out of memory in evaluation of {checkpoint} on the CPU with")
    assert "--scales 1.0 (no view larger than the image)" in err and "--mode slide" in err and "--amp" not in err


def test_amp_is_resolved_by_the_training_rule(checkpoint: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture) -> None:
    """--amp bf16 on a GPU without native bf16 (a T4's device_info) and on the CPU is refused before any work."""
    import evaluate

    t4 = DeviceInfo("2.14.1", "13.0", ("sm_75", "sm_80"), True, "Tesla T4", (7, 5), "580.65.06")
    monkeypatch.setattr(evaluate, "read_device_info", lambda: t4)
    assert main(["--checkpoint", str(checkpoint), "--amp", "bf16"]) == 2
    assert "error: --amp bf16 needs a GPU with native bfloat16" in capsys.readouterr().err
    assert main(["--checkpoint", str(checkpoint), "--amp", "fp16", "--device", "cpu"]) == 2
    assert "error: --amp fp16 is a GPU setting" in capsys.readouterr().err

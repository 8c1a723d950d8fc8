"""Tests of scripts/compare.py on three tiny demo runs: two seeds of one config and a norm-conv reference."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import engine.comparison as compare
from data.demo import ensure_demo_dataset
from engine.statistics import PerImageCounts
from scripts import compare as compare_cli

REPO = Path(__file__).resolve().parents[1]

TINY = [
    "train.iters=4", "train.val_interval=2", "train.ckpt_interval=2", "train.log_interval=1",
    "data.num_workers=0", "train.val_max_images=4", "train.batch_size=2", f"data.root={REPO / 'data' / 'demo'}",
]
FAST = ["--train-images", "4", "--val-images", "4"]  # evaluate 4 images per split
RUNS = {"v2_s0": ["seed=0"], "v2_s1": ["seed=1"], "norm": ["seed=0", "model.deform.version=0"]}


def run_compare(argv: list[str]) -> tuple[int, str, str]:
    """Call compare.main in this process; return (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = compare_cli.main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def runs(module_dir: Path) -> dict[str, Path]:
    """Three 4-iteration demo runs trained side by side (one thread each), shared by the tests here."""
    root = module_dir / "runs"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ensure_demo_dataset(REPO / "data" / "demo")  # once, before the parallel runs
    procs = {
        name: subprocess.Popen(
            [sys.executable, "train.py", "--config", "demo.yaml", "--work-dir", str(root / name), *TINY, *extra],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for name, extra in RUNS.items()
    }
    for name, proc in procs.items():
        output = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0, f"train.py failed for {name}:\n{output[-3000:]}"
    return {name: root / name for name in RUNS}


@pytest.fixture(scope="module")
def compared(runs: dict[str, Path], module_dir: Path) -> tuple[str, Path]:
    """compare.py over the three runs (evaluating them); returns its stdout and the --out folder."""
    out = module_dir / "compare"
    code, stdout, stderr = run_compare([str(p) for p in runs.values()] + ["--out", str(out), *FAST])
    assert code == 0, stderr
    return stdout, out


def table_rows(markdown: str) -> list[list[str]]:
    """Cells of the data rows of the first markdown table."""
    table = markdown.split("\n\n")[0]  # the first block: tables are separated by blank lines
    lines = [line for line in table.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]


def test_seeds_are_one_row_and_norm_conv_another(compared: tuple[str, Path]) -> None:
    stdout, _ = compared
    header = [line for line in stdout.splitlines() if line.startswith("|")][0]
    assert "val mIoU" in header and "Δ val vs norm-conv" in header and "added params" in header
    rows = table_rows(stdout)
    assert len(rows) == 2
    ref, v2 = rows  # the reference comes first
    assert ref[0] == "demo (model.deform.version=0)" and ref[1] == "1" and ref[4] == "ref"
    assert v2[0] == "demo (model.deform.version=2)" and v2[1] == "2"
    assert "±" in v2[2] and "±" in v2[3]
    assert v2[4].startswith(("+", "-")) and ref[8] == "+0.000M" and v2[8] != "+0.000M"
    assert "(N=2)" in v2[6] and "best-of-N val †" in header and "val mIoU (final)" in header  # 2 validations per run
    assert "demo (model.deform.version=2): " in stdout and "val mIoU vs demo (model.deform.version=0); " in stdout
    assert "seed spread (pooled std)" in stdout and "first 4 validation images" in stdout
    # the paired bootstrap over the same validation images, with the question each interval answers
    assert "## Is the difference real?" in stdout and "test-set sampling: 95% CI [" in stdout
    assert "training randomness:" in stdout and "| frequent" in stdout and "| largest gains and losses |" in stdout


def test_json_holds_mean_and_std_of_the_runs(compared: tuple[str, Path], runs: dict[str, Path]) -> None:
    _, out = compared
    summary = json.loads((out / "comparison.json").read_text())
    groups = {g["label"]: g for g in summary["groups"]}
    v2, ref = groups["demo (model.deform.version=2)"], groups["demo (model.deform.version=0)"]
    assert summary["reference"] == ref["label"] and ref["reference"] and not v2["reference"]
    assert v2["n"] == 2 and sorted(v2["seeds"]) == [0, 1] and ref["n"] == 1
    per_run = {Path(r["run"]).name: r for r in summary["runs"]}
    for key in ("val_miou", "train_miou", "train_images_per_s", "val_images_per_s"):
        values = [per_run[name][key] for name in ("v2_s0", "v2_s1")]
        assert v2[key]["mean"] == pytest.approx(statistics.fmean(values))
        assert v2[key]["std"] == pytest.approx(statistics.stdev(values))
        assert ref[key]["mean"] == pytest.approx(per_run["norm"][key]) and ref[key]["std"] is None
    assert v2["delta_val_miou"] == pytest.approx(v2["val_miou"]["mean"] - ref["val_miou"]["mean"])
    assert v2["val_seed_spread"] == pytest.approx(v2["val_miou"]["std"])  # the only group with two runs
    assert v2["deform_params"] > 0 and ref["deform_params"] == 0
    assert v2["params"] == ref["params"] + v2["deform_params"]
    # The numbers come from the evaluation JSONs that compare.py saved in the run dirs.
    for name in RUNS:
        val = json.loads((runs[name] / compare.VAL_JSON).read_text())
        train = json.loads((runs[name] / compare.TRAIN_JSON).read_text())
        assert per_run[name]["val_miou"] == val["mIoU"] and per_run[name]["train_miou"] == train["mIoU"]
        assert train["num_images"] == 4 and val["num_images"] == 4 and val["split"] == "validation"
        # the per-image counts saved beside it sum to exactly the evaluation's dataset metric
        counts = PerImageCounts.load(runs[name] / compare.VAL_COUNTS)
        assert len(counts) == 4 and counts.metrics()["mIoU"] == val["mIoU"] and counts.metrics()["aAcc"] == val["aAcc"]
    (boot,) = summary["bootstrap"]
    assert boot["label"] == v2["label"] and boot["reference"] == ref["label"] and boot["runs"] == [1, 2]
    ci = boot["test_sampling"]
    assert ci["low"] <= ci["diff"] <= ci["high"]
    assert ci["diff"] == pytest.approx(v2["val_miou"]["mean"] - ref["val_miou"]["mean"], abs=1e-9)


def test_figures_and_markdown_are_written(compared: tuple[str, Path]) -> None:
    stdout, out = compared
    per_class = sorted(out.glob("per_class_*.png"))
    assert [p.name for p in per_class] == ["per_class_demo_model.deform.version_2.png"]
    for name in ("curves.png", "final_miou.png", per_class[0].name):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert (out / "comparison.md").read_text() == stdout


def test_saved_evaluations_are_reused(compared: tuple[str, Path], runs: dict[str, Path]) -> None:
    stamps = {p: p.stat().st_mtime_ns for p in runs.values() for p in (p / compare.VAL_JSON, p / compare.TRAIN_JSON)}
    code, stdout, stderr = run_compare([str(p) for p in runs.values()] + FAST)
    assert code == 0 and "evaluating" not in stderr
    assert stdout == compared[0]
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}


def test_no_eval_falls_back_to_the_checkpoint(runs: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "copy"
    run.mkdir()
    shutil.copy(runs["norm"] / "config.yaml", run / "config.yaml")
    (run / "last.pt").symlink_to(runs["norm"] / "last.pt")
    code, stdout, stderr = run_compare([str(run), "--no-eval"])
    assert code == 0, stderr
    row = table_rows(stdout)[0]
    assert row[2].endswith(compare.NO_EVAL_MARK) and row[3] == "-"
    assert "logged during training at the final iteration" in stdout and "no curves" in stderr


def test_single_run_asks_for_more_seeds(runs: dict[str, Path]) -> None:
    code, stdout, _ = run_compare([str(runs["norm"]), str(runs["v2_s1"]), "--no-eval"])
    assert code == 0
    assert "n=1: no seed spread known, run more seeds (seed=0, seed=2)" in stdout


def test_missing_run_dir_is_a_user_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-run"
    proc = subprocess.run([sys.executable, "scripts/compare.py", str(missing)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and str(missing) in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_run_dir_without_checkpoints_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"model": {}}))
    code, stdout, stderr = run_compare([str(tmp_path)])
    assert code == 2 and stdout == ""
    assert str(tmp_path) in stderr and "last.pt or best.pt" in stderr


def test_groups_are_labelled_by_the_keys_that_differ() -> None:
    def run(seed: int, version: int, lr: float = 0.01) -> compare.Run:
        config = {"config_name": "x", "seed": seed, "model": {"deform": {"version": version}}, "train": {"lr": lr}}
        return compare.Run(path=Path(f"r{seed}{version}"), config=config, checkpoint=Path("c"), seed=seed)

    groups = compare.group_runs([run(0, 2), run(1, 2), run(0, 0), run(0, 2, lr=0.02)], list(compare.IGNORED_KEYS))
    assert [len(g.runs) for g in groups] == [2, 1, 1]
    assert [g.label for g in groups] == [
        "x (model.deform.version=2, train.lr=0.01)",
        "x (model.deform.version=0, train.lr=0.01)",
        "x (model.deform.version=2, train.lr=0.02)",
    ]
    assert compare.pick_reference(groups) is groups[1]
    a, b = compare.stats([1.0, 2.0, 3.0]), compare.stats([5.0, 5.0])
    assert compare.pooled_std(a, b) == pytest.approx(((2 * 1.0 + 1 * 0.0) / 3) ** 0.5)
    assert compare.pooled_std(compare.stats([1.0])) is None

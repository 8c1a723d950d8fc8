"""Tests of scripts/compare.py on three tiny demo runs (two seeds of def-conv-v2 and a norm-conv run), and of what it
refuses: runs of another recipe, schedule or training data, of other classes, a run still training or stopped early,
a re-run sharing a seed; and of what it counts once (the same weights) or evaluates again (other settings)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import engine.comparison as comparison
from data.dataset import build_train_loader
from data.demo import ensure_demo_dataset
from engine.checkpoint import load_checkpoint
from engine.environment import training_data
from engine.evaluation import checkpoint_digest
from engine.metric import metrics_from_counts
from engine.lock import lock_holder
from engine.statistics import PerImageCounts, compare_sides
from scripts import compare as compare_cli
from scripts import simulate_comparison as simulation

REPO = Path(__file__).resolve().parents[1]

TINY = [
    "train.iters=4", "train.val_interval=2", "train.ckpt_interval=2", "train.log_interval=1",
    "data.num_workers=0", "train.val_max_images=4", "train.batch_size=2", f"data.root={REPO / 'data' / 'demo'}",
]
FAST = ["--train-images", "4", "--val-images", "4"]  # evaluate 4 images per split
RUNS = {"v2_s0": ["seed=0"], "v2_s1": ["seed=1"], "norm": ["seed=0", "model.deform.version=0"]}
V2, NORM = "demo-def-conv-v2", "demo-norm-conv"


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
def compared(runs: dict[str, Path], module_dir: Path) -> tuple[str, str, Path]:
    """compare.py over the three runs (evaluating them, also rotated); returns its stdout, stderr and --out folder."""
    out = module_dir / "compare"
    code, stdout, stderr = run_compare([str(p) for p in runs.values()] + ["--out", str(out), "--perturb", "rotate=15",
                                                                          *FAST])
    assert code == 0, stderr
    return stdout, stderr, out


def table_rows(markdown: str) -> list[list[str]]:
    """Cells of the data rows of the first markdown table."""
    lines = [line for line in markdown.split("\n\n")[0].splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]


def fake_run(folder: Path, source: Path, **changes: object) -> Path:
    """A run folder whose last.pt holds ``source``'s config, iteration, environment and changes on resume, changed as
    asked (config keys dotted with '__' for '.'; ``iteration``, ``config_changes`` and ``environment__...`` the
    checkpoint's own), and weights of its own that no model loads: enough for everything compare.py checks before it
    evaluates."""
    state = load_checkpoint(source / "last.pt")
    for key, value in changes.items():
        *parents, last = key.split("__")
        section = state if parents[:1] == ["environment"] or key in ("iteration", "config_changes") else state["config"]
        for part in parents:
            section = section[part]
        section[last] = value
    folder.mkdir(parents=True)
    weights = {"marker": torch.rand(4)}  # weights of its own: no two fake runs are the same run
    torch.save({k: state[k] for k in ("config", "iteration", "environment", "config_changes")} | {"model": weights},
               folder / "last.pt")
    return folder


def test_groups_are_named_by_config_and_variant_with_seeds_counted(compared: tuple[str, str, Path]) -> None:
    stdout, _, _ = compared
    header = [line for line in stdout.splitlines() if line.startswith("|")][0]
    assert "| model | n | val mIoU (final) |" in header and "best logged val †" in header and "added params" in header
    ref, v2 = table_rows(stdout)  # the reference row first
    assert ref[:2] == [NORM, "1"] and ref[4] == "ref" and ref[8] == "+0.000M"
    assert v2[:2] == [V2, "2"] and "±" in v2[2] and v2[4].startswith(("+", "-")) and v2[8] != "+0.000M"
    assert "(of 2)" in v2[6]  # two validations logged per run
    assert f"- {V2}: " in stdout and "(seed 0)" in stdout and "(seed 1)" in stdout
    assert "offset_lr_mult" not in stdout  # a plain network's label carries no offset settings


def test_verdict_lines_answer_one_question_each(compared: tuple[str, str, Path]) -> None:
    stdout, _, _ = compared
    section = stdout.split(f"### {V2} vs {NORM}")[1]
    lines = section.strip().splitlines()
    assert lines[0] == "The models differ in model.deform.version (0 vs 2)."
    assert lines[1].startswith("mIoU ") and lines[1].endswith("(these checkpoints on these 4 images: means over 2 vs "
                                                               "1 seeds)")
    assert lines[2].startswith("- these checkpoints, on other images like these: 95% CI [")
    assert "(paired jackknife over the 4 images, t with " in lines[2] and "degrees of freedom)" in lines[2]
    assert lines[3].startswith("- the recipe (other seeds): no claim (2 vs 1 seeds; an interval needs >= 3 a side).")
    assert "pooled sd" in lines[3] and ", 1 degree of freedom), a two-sided 5% t test detects" in lines[3]
    # the seeds needed at the spread seen, and at the ends of the spread's 80% interval (1 degree of freedom)
    assert re.search(r"the reference study's \+1\.41 with about \d+ \(\d+ to (\d+|more than 1000)\)", lines[3])
    assert "spread" not in "".join(lines[4:]) and "x the" not in stdout  # no other spread verdict
    assert "| rotate=15 | change of mIoU |" in section
    assert "95% CI: these checkpoints, on other images like these (paired jackknife over images) |" in section
    assert "| n/a: in " in section and "images (an interval needs 30) |" in section  # thirds on 4 images: a reason
    assert "No per-class intervals: no class has ground truth in >= 30 of the images." in section  # 4 images
    assert "## Geometric robustness" in stdout and not re.search(r"\(--\d", stdout)  # a sign bug printed "(--0.50)"
    assert "train mIoU on the first 4 training images only (--train-images)." in stdout
    assert "val mIoU on the first 4 validation images only (--val-images)." in stdout


def test_bounds_and_p_values_say_on_which_side_of_0_and_5_percent_they_are() -> None:
    row = {"low": 4.9e-05, "high": 0.77, "p": 0.04997, "images": 40}
    assert comparison._interval(row) == "[+4.9e-05, +0.77], p = 0.04997"  # not "[+0.00, +0.77], p = 0.05"
    row = {"low": -0.004, "high": 0.0, "p": 0.0501, "images": 40}
    assert comparison._interval(row) == "[-0.004, +0.00], p = 0.0501"
    assert comparison._interval({"low": -1.234, "high": 2.0, "p": 0.27, "images": 40}) == "[-1.23, +2.00], p = 0.27"
    assert comparison._interval({"low": None, "high": None, "p": None, "images": 12}) == ("n/a: in 12 images (an "
                                                                                            "interval needs 30)")


def test_json_holds_the_runs_their_digests_and_the_statistics(compared: tuple[str, str, Path],
                                                              runs: dict[str, Path]) -> None:
    _, _, out = compared
    summary = json.loads((out / "comparison.json").read_text())
    groups = {g["label"]: g for g in summary["groups"]}
    assert summary["reference"] == NORM and groups[V2]["n"] == 2 and sorted(groups[V2]["seeds"]) == [0, 1]
    for name in RUNS:
        val = json.loads((runs[name] / "eval_validation.json").read_text())
        assert val["checkpoint_sha256"] == checkpoint_digest(runs[name] / "last.pt") and val["num_images"] == 4
        counts = PerImageCounts.load(runs[name] / "per_image_validation.npz")
        assert counts.checkpoint == val["checkpoint_sha256"]
        assert metrics_from_counts(*counts.counts.sum(0).T)["mIoU"] == val["mIoU"]
        assert (runs[name] / "per_image_validation_rotate-15.npz").is_file()
    values = [json.loads((runs[n] / "eval_validation.json").read_text())["mIoU"] for n in ("v2_s0", "v2_s1")]
    assert groups[V2]["val_miou"]["mean"] == pytest.approx(statistics.fmean(values))
    assert groups[V2]["val_miou"]["std"] == pytest.approx(statistics.stdev(values))
    (pair,) = summary["pairs"]
    assert pair["b_label"] == V2 and pair["a_label"] == NORM and pair["seeds"] == [1, 2]
    assert pair["miou"]["low"] <= pair["miou"]["diff"] <= pair["miou"]["high"] and pair["miou"]["seeds"] is None
    assert pair["miou"]["seeds_and_images"] is None and pair["model_differences"] == {"model.deform.version": [0, 2]}
    assert pair["miou"]["diff"] == pytest.approx(groups[V2]["delta_val_miou"])
    assert pair["seed_spread"] == pytest.approx(statistics.stdev(values))


def test_figures_and_markdown_are_written_and_named(compared: tuple[str, str, Path]) -> None:
    stdout, stderr, out = compared
    for name in ("curves.png",):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "comparison.md").read_text() == stdout
    # on 4 images no class has an interval: no per-class figure is written, and none is said to be
    assert not list(out.glob("per_class_*")) and "per-class" not in stderr and "per_class" not in stderr
    assert stderr.rstrip().endswith(f"wrote {out / 'comparison.md'}, {out / 'comparison.json'}, {out / 'curves.png'}")


def test_comparison_md_is_written_whole_in_utf8_under_any_locale(compared: tuple[str, str, Path],
                                                                  runs: dict[str, Path], tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 29, item 4: under a Latin-1 terminal (PYTHONIOENCODING) and an ASCII locale for files (LC_ALL=C without
    UTF-8 mode), compare.py truncated comparison.md to 0 bytes and then crashed on its Δ. Now the file is written
    whole in UTF-8, the terminal gets the characters it cannot show escaped, and a write that fails leaves the
    previous comparison.md as it was."""
    stdout, _, _ = compared
    out = tmp_path / "out"
    out.mkdir()
    (out / "comparison.md").write_text("the previous comparison\n", encoding="utf-8")
    args = [*map(str, runs.values()), "--no-eval", *FAST, "--perturb", "rotate=15", "--out", str(out)]

    def full_disk(*paths: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    code, _, err = run_compare(args)
    assert code == 2 and f"could not write {out / 'comparison.md'} (No space left on device)" in err
    assert (out / "comparison.md").read_text(encoding="utf-8") == "the previous comparison\n"
    monkeypatch.undo()
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0", "PYTHONIOENCODING": "latin-1"}
    proc = subprocess.run([sys.executable, "scripts/compare.py", *args], cwd=REPO, env=env, capture_output=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr.decode("latin-1")
    assert (out / "comparison.md").read_text(encoding="utf-8") == stdout and "Δ" in stdout
    assert proc.stdout.decode("latin-1") == stdout.encode("latin-1", "backslashreplace").decode("latin-1")


def test_saved_evaluations_of_the_same_checkpoint_are_reused(compared: tuple[str, str, Path],
                                                             runs: dict[str, Path]) -> None:
    stamps = {p: p.stat().st_mtime_ns for r in runs.values() for p in r.glob("eval_*.json")}
    code, stdout, stderr = run_compare([str(p) for p in runs.values()] + ["--perturb", "rotate=15", *FAST])
    assert code == 0 and "evaluating" not in stderr
    assert stdout == compared[0]
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}


def test_an_evaluation_copied_from_another_checkpoint_is_not_used(runs: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "norm-copy"  # norm-conv's checkpoint beside v2's evaluation files
    run.mkdir()
    (run / "last.pt").symlink_to(runs["norm"] / "last.pt")
    for name in ("eval_validation.json", "per_image_validation.npz", "eval_training.json"):
        shutil.copy(runs["v2_s0"] / name, run / name)
    code, stdout, stderr = run_compare([str(run), *FAST])
    assert code == 0, stderr
    assert f"{run / 'eval_validation.json'} was not made from this last.pt" in stderr and "evaluating" in stderr
    own = json.loads((runs["norm"] / "eval_validation.json").read_text())["mIoU"]
    assert table_rows(stdout)[0][2] == f"{own:.2f}"
    assert json.loads((run / "eval_validation.json").read_text())["checkpoint_sha256"] == checkpoint_digest(
        runs["norm"] / "last.pt")


def test_a_copied_run_is_not_a_second_seed(runs: dict[str, Path], compared: tuple[str, str, Path],
                                           tmp_path: Path) -> None:
    copy = tmp_path / "v2_s1_copy"
    shutil.copytree(runs["v2_s1"], copy, ignore=shutil.ignore_patterns("*.pt"))
    (copy / "last.pt").symlink_to(runs["v2_s1"] / "last.pt")
    code, stdout, stderr = run_compare([str(runs["norm"]), str(runs["v2_s1"]), str(copy), "--no-eval", *FAST])
    assert code == 0, stderr
    assert f"{copy} holds the same weights as {runs['v2_s1']}" in stderr and "counted once" in stderr
    assert table_rows(stdout)[1][:2] == [V2, "1"]


def test_a_re_run_with_the_same_seed_is_refused_by_name(runs: dict[str, Path], tmp_path: Path) -> None:
    rerun = fake_run(tmp_path / "v2_s1_again", runs["v2_s1"])
    code, stdout, stderr = run_compare([str(runs["v2_s1"]), str(rerun), "--no-eval"])
    assert code == 2 and stdout == ""
    assert str(runs["v2_s1"]) in stderr and str(rerun) in stderr and "same seed ([1])" in stderr
    assert stderr.count("\n") == 1 and "Traceback" not in stderr


def test_runs_of_another_recipe_are_refused_naming_the_keys(runs: dict[str, Path], tmp_path: Path) -> None:
    shorter = fake_run(tmp_path / "norm-2-iters", runs["norm"], train__iters=2, iteration=2)
    code, stdout, stderr = run_compare([str(runs["v2_s0"]), str(shorter), "--no-eval"])
    assert code == 2 and stdout == ""
    assert "train.iters: 4 (" in stderr and f"2 ({shorter})" in stderr and "--allow-differences" in stderr
    assert "model.deform.version" not in stderr.split("differ only in the model")[0]  # the model may differ
    code, stdout, stderr = run_compare([str(runs["v2_s0"]), str(shorter), "--no-eval", "--allow-differences"])
    assert code == 0, stderr
    assert stdout.startswith("**Not one recipe** (--allow-differences): the runs also differ in train.iters")


def test_runs_trained_on_other_data_are_refused(runs: dict[str, Path], tmp_path: Path) -> None:
    """The training data each run read is recorded at its start (folder, images, listing digest); a run trained on
    other data is no seed of the same recipe, whatever its data.root."""
    recorded = load_checkpoint(runs["v2_s0"] / "last.pt")["environment"]["training_data"]
    config = load_checkpoint(runs["v2_s0"] / "last.pt")["config"]
    assert recorded == training_data(build_train_loader(config, 0, 1, start_iter=0).dataset)
    assert recorded["images"] == 400
    data = {**recorded, "images": 200, "sha256": "0" * 64}  # half the training images, the same folder name
    half = fake_run(tmp_path / "half-data", runs["v2_s1"], environment__training_data=data)
    code, stdout, stderr = run_compare([str(runs["v2_s0"]), str(half), "--no-eval"])
    assert code == 2 and stdout == ""
    assert "training data: 400 images listed with sha256" in stderr
    assert "200 images listed with sha256 000000000000" in stderr
    assert str(half) in stderr and "--allow-differences" in stderr


def test_a_schedule_changed_on_resume_is_refused(runs: dict[str, Path], tmp_path: Path) -> None:
    changes = {"train.lr": [0.02, 0.04], "train.log_interval": [1, 5]}
    changed = fake_run(tmp_path / "lr-changed", runs["v2_s1"], config_changes=[{"iteration": 2, "changes": changes}])
    code, stdout, stderr = run_compare([str(runs["v2_s0"]), str(changed), "--no-eval"])
    assert code == 2 and stdout == ""
    assert "changes on resume: none (" in stderr and f"train.lr 0.02 -> 0.04 at iteration 2 ({changed})" in stderr
    assert "log_interval" not in stderr  # a bookkeeping key may change on resume
    logging_only = fake_run(tmp_path / "log-changed", runs["v2_s1"],
                            config_changes=[{"iteration": 2, "changes": {"train.log_interval": [1, 5]}}])
    code, _, stderr = run_compare([str(runs["v2_s0"]), str(logging_only), "--no-eval"])
    assert code == 0, stderr


def test_runs_of_other_classes_are_refused_naming_the_key(runs: dict[str, Path], tmp_path: Path) -> None:
    fewer = fake_run(tmp_path / "twenty-classes", runs["norm"], model__num_classes=20)
    code, stdout, stderr = run_compare([str(runs["v2_s0"]), str(fewer), "--no-eval", "--allow-differences"])
    assert code == 2 and stdout == ""
    assert f"model.num_classes: 150 ({runs['v2_s0']}), 20 ({fewer})" in stderr and "same images" not in stderr


def test_a_checkpoint_re_saved_with_another_seed_is_the_same_run(runs: dict[str, Path], compared: tuple[str, str, Path],
                                                                  tmp_path: Path) -> None:
    state = load_checkpoint(runs["v2_s1"] / "last.pt")
    state["config"]["seed"] = 7  # the same weights under another seed: a new sha256, not a new seed
    (tmp_path / "resaved").mkdir()
    torch.save(state, tmp_path / "resaved" / "last.pt")
    code, stdout, stderr = run_compare([str(runs["norm"]), str(runs["v2_s1"]), str(tmp_path / "resaved"), "--no-eval",
                                        *FAST])
    assert code == 0, stderr
    assert f"{tmp_path / 'resaved'} holds the same weights as {runs['v2_s1']}" in stderr and "counted once" in stderr
    assert table_rows(stdout)[1][:2] == [V2, "1"]


def test_evaluations_with_other_test_time_settings_are_not_used(runs: dict[str, Path], compared: tuple[str, str, Path],
                                                                 tmp_path: Path) -> None:
    for key, value in (("data.scale", [1024, 256]), ("eval.slide_stride", 100), ("data.root", "/elsewhere")):
        run = tmp_path / key
        run.mkdir()
        (run / "last.pt").symlink_to(runs["norm"] / "last.pt")
        for name in ("per_image_validation.npz", "eval_training.json"):
            shutil.copy(runs["norm"] / name, run / name)
        record = json.loads((runs["norm"] / "eval_validation.json").read_text())
        section, name = key.split(".")
        record["config"][section][name] = value  # evaluated by hand with another setting
        (run / "eval_validation.json").write_text(json.dumps(record))
        code, stdout, stderr = run_compare([str(run), "--no-eval", *FAST])
        assert code == 0, stderr
        assert f"validation not evaluated ({run / 'eval_validation.json'} used other settings ({key}=" in stderr
        assert table_rows(stdout)[0][2] == "-"  # not the saved mIoU


def test_a_mean_over_some_of_the_runs_says_so(runs: dict[str, Path], compared: tuple[str, str, Path],
                                              tmp_path: Path) -> None:
    unevaluated = fake_run(tmp_path / "v2_s5", runs["v2_s1"], seed=5)
    code, stdout, stderr = run_compare([str(runs["v2_s0"]), str(runs["v2_s1"]), str(unevaluated), "--no-eval", *FAST])
    assert code == 0, stderr
    (row,) = table_rows(stdout)
    assert row[1] == "3" and row[2].endswith("(2 of 3 runs)") and "±" in row[2]


def test_unfinished_and_training_runs_are_refused(runs: dict[str, Path], tmp_path: Path) -> None:
    stopped = fake_run(tmp_path / "stopped", runs["norm"], iteration=2)
    code, _, stderr = run_compare([str(stopped), "--no-eval"])
    assert code == 2 and "stopped at iteration 2 of 4" in stderr and "--resume" in stderr
    training = fake_run(tmp_path / "training", runs["norm"])
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # the training process
    try:
        (training / ".lock").write_text(json.dumps({"pid": alive.pid, "host": socket.gethostname()}))
        code, _, stderr = run_compare([str(training), "--no-eval"])
    finally:
        alive.kill()
    assert code == 2 and "is still training" in stderr and str(training / ".lock") in stderr
    (training / ".lock").write_text(json.dumps({"pid": 2**22 + 12345, "host": socket.gethostname()}))  # stale
    assert lock_holder(training / ".lock") is None


def test_any_two_groups_can_be_compared(runs: dict[str, Path], compared: tuple[str, str, Path]) -> None:
    code, stdout, stderr = run_compare([str(p) for p in runs.values()] + ["--no-eval", "--reference", V2,
                                                                          "--pair", NORM, V2, *FAST])
    assert code == 0, stderr
    assert table_rows(stdout)[0][0] == V2 and f"### {NORM} vs {V2}" in stdout and stdout.count("### ") == 1
    code, _, stderr = run_compare([str(p) for p in runs.values()] + ["--no-eval", "--pair", V2, "dilated"])
    assert code == 2 and "no group is called 'dilated'" in stderr and f"here are: {V2}, {NORM}." in stderr


def test_unreadable_per_image_file_is_one_paragraph(runs: dict[str, Path], compared: tuple[str, str, Path],
                                                   tmp_path: Path) -> None:
    run = tmp_path / "norm-link"
    run.mkdir()
    (run / "last.pt").symlink_to(runs["norm"] / "last.pt")
    shutil.copy(runs["norm"] / "eval_validation.json", run / "eval_validation.json")
    (run / "per_image_validation.npz").write_bytes(np.random.default_rng(0).bytes(4096))
    code, _, stderr = run_compare([str(run), "--no-eval", *FAST])
    error = stderr.splitlines()[-1]  # after the warning that the copy has no tb/
    assert code == 2 and error.startswith("error: could not read the per-image counts") and str(run) in error
    assert stderr.count("error") == 1 and "Traceback" not in stderr


def test_groups_of_one_config_file_get_the_variant_and_collisions_the_keys() -> None:
    def run(seed: int, version: int, lr_mult: float = 0.1) -> comparison.Run:
        config = {k: None for k in comparison.MODEL_KEYS} | {
            "config_name": "x", "seed": seed, "model.deform.version": version, "model.deform.dilation": 0,
            "model.deform.offset_lr_mult": lr_mult}
        name = f"r{seed}{version}{lr_mult}"
        return comparison.Run(path=Path(name), digest=name, weights=name, config=config, packages={},
                              training_data=None, resumed_with=[])

    groups = comparison.group_runs([run(0, 2), run(1, 2), run(0, 0), run(0, 1, 1.0), run(0, 1)], {})
    labels = [g.label for g in groups]
    assert labels == ["x-def-conv-v2", "x-norm-conv", "x-def-conv-v1 (deform.offset_lr_mult=1.0)",
                      "x-def-conv-v1 (deform.offset_lr_mult=0.1)"]
    assert [len(g.runs) for g in groups] == [2, 1, 1, 1]
    plain = {**run(0, 0).config, "model.deform.offset_lr_mult": 1.0}  # means nothing without offsets
    assert comparison.model_settings(plain) == comparison.model_settings(run(0, 0).config)


def test_missing_run_dir_is_a_user_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-run"
    proc = subprocess.run([sys.executable, "scripts/compare.py", str(missing)], cwd=REPO, capture_output=True,
                          text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and str(missing) in proc.stderr and "no last.pt" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_per_class_rows_are_recipe_evidence_only_with_three_seeds_a_side() -> None:
    """With fewer than 3 seeds a side the per-class rows are labelled checkpoint differences and carry no BH column;
    with 3, their intervals are the recipe's on other images and BH marks those that survive."""
    sim = simulation.simulate(np.random.default_rng(3), 200, 3, 0.05)
    names = [f"class {i}" for i in range(150)]
    for seeds, recipe in ((1, False), (2, False), (3, True)):
        pair = compare_sides(sim["runs"][0][:seeds], sim["runs"][1][:seeds]) | {"a_label": "A", "b_label": "B"}
        text = "\n".join(comparison.breakdown(pair, [], names))
        assert "| class | images |" in text and ("| BH |" in text) == recipe
        assert ("checkpoint differences, not evidence about the recipes" in text) == (not recipe)
        assert ("Were the recipes no different, about" in text) == recipe
        assert ("95% CI: the recipe (other seeds), on other images like these (seeds x images)" in text) == recipe


def test_robustness_cells_sign_the_change() -> None:
    group = {"label": "x", "n": 1, "val_miou": {"mean": 40.0}, "perturbed": {"rotate=15": 40.5, "scale=0.5": 38.25}}
    table = comparison.robustness_table({"perturb": ["rotate=15", "scale=0.5"], "groups": [group]})
    assert "| x | 1 | 40.00 | 40.50 (+0.50) | 38.25 (-1.75) |" in table  # issue 22: a gain printed as "(--0.50)"

"""scripts/data_speed.py: the data pipeline timing, alone and against a stand-in for mmsegmentation."""

from __future__ import annotations

import pytest

from scripts import data_speed

SMALL = ["--split", "training", "--samples", "3", "--rounds", "2", "data.scale=[40,30]", "data.crop_size=16"]


def test_times_the_pipeline_and_prints_the_ratio(make_ade_tree, monkeypatch, capsys) -> None:
    calls = []

    def peer(dataset):
        def sample(index: int, seed: int) -> None:
            calls.append((index, seed))

        return sample

    monkeypatch.setattr(data_speed, "mmseg_sampler", peer)
    assert data_speed.main(["--root", str(make_ade_tree()), *SMALL]) == 0
    out = capsys.readouterr().out
    assert "4 files of" in out and "crop_size=16" in out
    assert "this repository  samples per CPU second:" in out and "mmsegmentation   samples per CPU second:" in out
    assert "this repository / mmsegmentation:" in out
    assert calls == [(0, 0), (0, 0), (1, 1), (2, 2), (0, 3), (1, 4), (2, 5)]  # warm-up, then the rounds' keys


def test_without_mmseg_it_times_this_repository_alone(make_ade_tree, monkeypatch, capsys) -> None:
    monkeypatch.setattr(data_speed, "mmseg_sampler", lambda dataset: "ModuleNotFoundError: No module named 'mmseg'")
    assert data_speed.main(["--root", str(make_ade_tree()), *SMALL]) == 0
    out = capsys.readouterr().out
    assert "mmsegmentation is not importable (ModuleNotFoundError" in out and "docs/gpu-and-clusters.md" in out
    assert "this repository  samples per CPU second" in out and "/ mmsegmentation" not in out


def test_bad_input_is_one_message(tmp_path, capsys) -> None:
    assert data_speed.main(["--root", str(tmp_path), *SMALL]) == 2
    assert "no images found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        data_speed.main(["--root", str(tmp_path), "--samples", "0"])
    assert "must be a positive integer" in capsys.readouterr().err

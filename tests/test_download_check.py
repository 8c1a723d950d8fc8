"""Tests of scripts/download_ade20k.py: the --check mode, the no-network message, reuse of an
existing zip, and resumed downloads against a local HTTP server (no real network)."""

from __future__ import annotations

import importlib.util
import io
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from configs import UserError

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "download_ade20k.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("download_ade20k", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


download_ade20k = _load_script()


def _zip_tree(tree: Path) -> bytes:
    """The bytes of a zip holding ``tree`` under ADEChallengeData2016/, like the official archive."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(tree.rglob("*")):
            archive.write(path, Path("ADEChallengeData2016") / path.relative_to(tree))
    return buffer.getvalue()


class _Server:
    """A local HTTP server for one payload; ``mode`` is 'range', 'ignore-range' or 'truncate'."""

    def __init__(self, payload: bytes, mode: str = "range") -> None:
        self.payload, self.mode, self.ranges = payload, mode, []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                requested = self.headers.get("Range")
                owner.ranges.append(requested)
                body, total = owner.payload, len(owner.payload)
                if requested and owner.mode != "ignore-range":
                    start = int(requested.removeprefix("bytes=").rstrip("-"))
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{total - 1}/{total}")
                    body = body[start:]
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if owner.mode == "truncate" else body)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/ADEChallengeData2016.zip"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def serve(monkeypatch):
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("NO_PROXY", "*")
    servers = []

    def start(payload: bytes, mode: str = "range") -> _Server:
        servers.append(_Server(payload, mode))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def _refuse(*args, **kwargs):
    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")


# ---------------------------------------------------------------- --check


def test_check_cli_reports_a_bad_file(make_ade_tree) -> None:
    root = make_ade_tree()
    bad = root / "annotations" / "validation" / "ADE_val_00000002.png"
    Image.fromarray(np.full((30, 40), 200, np.uint8), "L").save(bad)
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--check", str(root)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1
    assert "ADE_val_00000002.png" in output and "200" in output
    assert "Traceback" not in output


def test_check_accepts_16_bit_annotations_as_training_does(make_ade_tree, capsys) -> None:
    """A 16-bit single-channel annotation with ids 0..150 trains fine, so --check must not call it broken;
    an RGB annotation is named with its mode and channel count."""
    root = make_ade_tree()
    label = root / "annotations" / "validation" / "ADE_val_00000001.png"
    ids = np.asarray(Image.open(label)).astype(np.uint16)
    Image.fromarray(ids).save(label)  # mode I;16
    assert Image.open(label).mode.startswith("I")
    assert download_ade20k.main(["--check", str(root)]) == 0
    Image.fromarray(np.stack([ids.astype(np.uint8)] * 3, axis=-1), "RGB").save(label)
    assert download_ade20k.main(["--check", str(root)]) == 1
    assert "mode RGB (3 channels)" in capsys.readouterr().out


def test_check_passes_a_valid_tree_and_fails_a_missing_one(make_ade_tree, tmp_path, capsys) -> None:
    root = make_ade_tree()
    assert download_ade20k.main(["--check", str(root)]) == 0
    assert "validation: 2 images, 2 annotations" in capsys.readouterr().out
    assert download_ade20k.main(["--check", str(tmp_path / "missing")]) == 1
    assert "does not exist" in capsys.readouterr().out


def test_check_takes_upper_case_and_jpeg_extensions_and_names_stray_files(make_ade_tree, capsys) -> None:
    """Issue 23, item 1: X.JPG / X.jpeg beside X.png pair up as training and evaluation read them (before: "annotation
    without an image"); a file nothing reads is named, never passed over."""
    root = make_ade_tree()
    images = root / "images" / "validation"
    (images / "ADE_val_00000001.jpg").rename(images / "ADE_val_00000001.JPG")
    (images / "ADE_val_00000002.jpg").rename(images / "ADE_val_00000002.jpeg")
    assert download_ade20k.main(["--check", str(root)]) == 0
    assert "validation: 2 images, 2 annotations" in capsys.readouterr().out
    (images / "ADE_val_00000003.gif").write_bytes(b"GIF89a")
    assert download_ade20k.main(["--check", str(root)]) == 1
    assert f"PROBLEM: {images / 'ADE_val_00000003.gif'}: not an image file" in capsys.readouterr().out


# ---------------------------------------------------------------- download


def test_no_network_gives_one_message_with_the_manual_steps(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(urllib.request, "urlopen", _refuse)
    assert download_ade20k.main(["--root", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: the download of")
    message = errors[0]
    assert "name resolution" in message and download_ade20k.URL in message
    assert "browser" in message and f"{tmp_path}/" in message and "--check" in message
    assert "Traceback" not in captured.out + captured.err


def test_no_network_in_a_real_process(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--root", str(tmp_path), "--url", "http://127.0.0.1:9/ADEChallengeData2016.zip"],
        cwd=REPO, capture_output=True, text=True, timeout=120, env={"PATH": "", "no_proxy": "*"},
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: the download of") and "Traceback" not in result.stderr


def test_existing_zip_is_used_without_downloading(make_ade_tree, tmp_path, monkeypatch) -> None:
    target = tmp_path / "data"
    target.mkdir()
    (target / download_ade20k.ZIP_NAME).write_bytes(_zip_tree(make_ade_tree()))
    monkeypatch.setattr(urllib.request, "urlopen", _refuse)
    assert download_ade20k.main(["--root", str(target)]) == 0
    assert (target / "ADEChallengeData2016" / "images" / "training" / "ADE_train_00000001.jpg").is_file()
    assert download_ade20k.main(["--root", str(target)]) == 0  # already extracted: nothing to do


def test_download_resumes_a_partial_file(serve, tmp_path) -> None:
    payload = bytes(range(256)) * 5000
    server = serve(payload)
    dest = tmp_path / "file.zip"
    dest.with_name("file.zip.part").write_bytes(payload[:300_000])
    download_ade20k.download(server.url, dest)
    assert dest.read_bytes() == payload and not dest.with_name("file.zip.part").exists()
    assert server.ranges == ["bytes=300000-"]


def test_download_restarts_when_the_server_ignores_the_range(serve, tmp_path) -> None:
    payload = bytes(range(256)) * 1000
    server = serve(payload, mode="ignore-range")
    dest = tmp_path / "file.zip"
    dest.with_name("file.zip.part").write_bytes(b"stale bytes")
    download_ade20k.download(server.url, dest)
    assert dest.read_bytes() == payload


def test_short_download_is_kept_for_resuming(serve, tmp_path) -> None:
    payload = bytes(range(256)) * 1000
    server = serve(payload, mode="truncate")
    dest = tmp_path / "file.zip"
    with pytest.raises(UserError, match="(?i)run the same command again"):
        download_ade20k.download(server.url, dest)
    part = dest.with_name("file.zip.part")
    assert not dest.exists() and 0 < part.stat().st_size < len(payload)
    server.mode = "range"
    download_ade20k.download(server.url, dest)
    assert dest.read_bytes() == payload


def test_full_download_extract_and_check(make_ade_tree, serve, tmp_path, capsys) -> None:
    server = serve(_zip_tree(make_ade_tree()))
    target = tmp_path / "data"
    assert download_ade20k.main(["--root", str(target), "--url", server.url]) == 0
    assert (target / download_ade20k.ZIP_NAME).is_file()
    assert (target / "ADEChallengeData2016" / "annotations" / "validation" / "ADE_val_00000002.png").is_file()
    assert "looks complete" in capsys.readouterr().out

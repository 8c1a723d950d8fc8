"""Getting ADE20K: download (resumable), extraction and the instructions for doing it by hand.

The archive is the MIT Scene Parsing Benchmark zip that mmsegmentation and torchvision users
download by hand (``ADEChallengeData2016.zip``, about 923 MB). ``download`` resumes an interrupted
download with an HTTP Range request and checks its size against the server's Content-Length;
``extract`` unpacks it once, through a temporary folder. ``data.dataset.check_layout`` checks the result.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from tqdm import tqdm

from configs import UserError

URL = "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip"
ZIP_NAME = "ADEChallengeData2016.zip"
FOLDER = "ADEChallengeData2016"
CHUNK = 1 << 20


def manual_steps(root: Path, url: str) -> str:
    """The instructions for installing the dataset by hand."""
    return (
        f"To install it by hand: download {url} in a browser (about 923 MB), put {ZIP_NAME} into {root}/ and "
        f"run `python scripts/download_ade20k.py --root {root}` again (it then uses that zip without "
        f"downloading); or unzip it yourself so that {root / FOLDER}/images/training exists and run "
        f"`python scripts/download_ade20k.py --check {root / FOLDER}`."
    )


def _total_size(response, start: int) -> int | None:
    """Full file size from Content-Range (``bytes a-b/total``) or Content-Length, if the server says."""
    match = re.search(r"/(\d+)\s*$", response.headers.get("Content-Range", "") or "")
    if match:
        return int(match.group(1))
    length = response.headers.get("Content-Length")
    return start + int(length) if length is not None else None


def download(url: str, dest: Path) -> None:
    """Download ``url`` to ``dest`` through ``dest.part``, resuming a partial file with a Range request; UserError
    on any network error or a size that does not match the server's."""
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    start = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={start}-"} if start else {}
    try:
        try:
            response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60)
        except urllib.error.HTTPError as err:
            if err.code != 416 or not start:
                raise
            # 416: the range starts at or past the end; the partial file is stale, start over.
            part.unlink()
            start = 0
            response = urllib.request.urlopen(urllib.request.Request(url), timeout=60)
        with response:
            status = getattr(response, "status", None) or response.getcode()
            if start and status != 206:  # the server ignored the range: start again from the beginning
                start = 0
            total = _total_size(response, start)
            bar = tqdm(total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name)
            with bar, part.open("ab" if start else "wb") as f:
                while chunk := response.read(CHUNK):
                    f.write(chunk)
                    bar.update(len(chunk))
    except (OSError, http.client.HTTPException) as err:  # URLError and HTTPError are OSErrors
        reason = err if isinstance(err, urllib.error.HTTPError) else getattr(err, "reason", None) or err
        kept = f" The partial file {part} is kept; a rerun resumes it." if part.exists() else ""
        raise UserError(
            f"the download of {url} failed ({reason}).{kept} {manual_steps(dest.parent, url)}"
        ) from None
    size = part.stat().st_size
    if total is not None and size != total:
        raise UserError(
            f"the download of {url} stopped early: {part} has {size:,} of {total:,} bytes. Run the same "
            f"command again to resume it. {manual_steps(dest.parent, url)}"
        )
    os.replace(part, dest)


def zip_complete(path: Path) -> bool:
    """True if ``path`` opens as a zip (its central directory, written last, is intact)."""
    try:
        with zipfile.ZipFile(path):
            return True
    except (zipfile.BadZipFile, OSError):
        return False


def extract(zip_path: Path, root: Path) -> Path:
    """Extract ``zip_path`` into ``root/ADEChallengeData2016`` via a temporary folder; return that folder."""
    target = root / FOLDER
    if target.exists():
        raise UserError(
            f"{target} exists but has no images/ folder, so it is not a complete extraction. Delete it and run "
            f"`python scripts/download_ade20k.py --root {root}` again."
        )
    tmp = root / f".{FOLDER}.extracting"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with zipfile.ZipFile(zip_path) as archive:
            for member in tqdm(archive.infolist(), unit="file", desc="extracting"):
                archive.extract(member, tmp)
        inner = tmp / FOLDER if (tmp / FOLDER).is_dir() else tmp
        os.replace(inner, target)
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise UserError(
            f"could not extract {zip_path} ({err}); the zip is damaged. Delete it and run "
            f"`python scripts/download_ade20k.py --root {root}` again to download a fresh copy."
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target

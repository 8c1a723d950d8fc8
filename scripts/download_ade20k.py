"""Download, extract and check ADE20K (the ADEChallengeData2016 scene-parsing release).

The archive is the MIT Scene Parsing Benchmark zip that mmsegmentation and torchvision users
download by hand (``ADEChallengeData2016.zip``, about 923 MB). This script resumes an interrupted
download with an HTTP Range request, checks its size against the server's Content-Length,
extracts it once, and checks the result with ``data.dataset.check_layout``.
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import shutil
import sys
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs import UserError  # noqa: E402
from data.dataset import check_layout  # noqa: E402

URL = "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip"
ZIP_NAME = "ADEChallengeData2016.zip"
FOLDER = "ADEChallengeData2016"
CHUNK = 1 << 20

try:
    from tqdm import tqdm
except ImportError:  # progress bars are optional
    tqdm = None


class _Bar:
    """A tqdm bar, or nothing when tqdm is not installed."""

    def __init__(self, **kwargs) -> None:
        self.bar = tqdm(**kwargs) if tqdm is not None else None

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


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
    """Download ``url`` to ``dest`` through ``dest.part``, resuming a partial file with a Range request.

    Raises:
        UserError: on any network error or when the size does not match the server's.
    """
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
            bar = _Bar(total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name)
            with part.open("ab" if start else "wb") as f:
                while chunk := response.read(CHUNK):
                    f.write(chunk)
                    bar.update(len(chunk))
            bar.close()
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


def _zip_complete(path: Path) -> bool:
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
            members = archive.infolist()
            bar = _Bar(total=len(members), unit="file", desc="extracting")
            for member in members:
                archive.extract(member, tmp)
                bar.update(1)
            bar.close()
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


def report(folder: Path) -> int:
    """Run ``check_layout`` on ``folder``, print its report and every problem; 0 if fine, else 1."""
    try:
        problems, lines = check_layout(folder)
    except OSError as err:  # e.g. a folder that cannot be listed
        problems, lines = [f"{folder}: cannot be read ({err})"], []
    for line in lines:
        print(line)
    for problem in problems:
        print(f"PROBLEM: {problem}")
    if problems:
        print(f"{len(problems)} problem(s) found in {folder}; fix or re-download the files named above.")
        return 1
    print(f"{folder} looks complete. Use it with data.root={folder}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Download ADEChallengeData2016.zip (about 923 MB) into DIR, resuming a partial\n"
        "download, extract it to DIR/ADEChallengeData2016 and check every file (pairs, sizes, label\n"
        "values 0..150, every file decodes). An existing complete zip in DIR is used without\n"
        "downloading, and an existing extracted folder is not extracted again. Exit status: 0 if the\n"
        "dataset is complete, 1 if the check found problems, 2 on errors such as a failed download.",
        epilog="examples:\n  python scripts/download_ade20k.py --root data\n"
        "  python scripts/download_ade20k.py --check data/ADEChallengeData2016",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--root", type=Path, default=Path("data"), metavar="DIR", help="folder for the zip and the dataset "
                        "(default: data, giving data/ADEChallengeData2016, the path the configs expect)")
    parser.add_argument("--check", type=Path, metavar="ROOT", help="only check an existing ADEChallengeData2016 "
                        "folder: print the report and every problem, exit 0 if none, else 1")
    parser.add_argument("--url", default=URL, help="download address (default: the official MIT server)")
    args = parser.parse_args(argv)
    try:
        if args.check is not None:
            return report(args.check)
        root: Path = args.root
        folder, zip_path = root / FOLDER, root / ZIP_NAME
        if not (folder / "images").is_dir() and (root / "images" / "training").is_dir():
            print(f"{root} itself looks like an ADEChallengeData2016 folder; checking it")
            return report(root)
        if (folder / "images").is_dir():
            print(f"{folder} already exists; skipping download and extraction")
        else:
            if zip_path.is_file() and _zip_complete(zip_path):
                print(f"using the existing {zip_path}")
            else:
                if zip_path.is_file():
                    print(f"{zip_path} is incomplete or damaged; downloading it again")
                    zip_path.unlink()
                print(f"downloading {args.url} to {zip_path}")
                download(args.url, zip_path)
            print(f"extracting {zip_path} to {folder}")
            extract(zip_path, root)
        return report(folder)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

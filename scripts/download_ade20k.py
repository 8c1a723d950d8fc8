"""Download, extract and check ADE20K (the ADEChallengeData2016 scene-parsing release).

The command line around ``data.download`` (download, extraction) and ``data.dataset.check_layout``
(the full check of every pair).

    python scripts/download_ade20k.py --root data
    python scripts/download_ade20k.py --check data/ADEChallengeData2016
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from configs import UserError
from data.dataset import check_layout
from data.download import FOLDER, URL, ZIP_NAME, download, extract, zip_complete
from engine.console import command_line


def report(folder: Path) -> int:
    """Run ``check_layout`` on ``folder``, print its report and every problem; 0 if fine, else 1."""
    try:
        problems, lines = check_layout(folder)
    except UserError as err:  # a folder that cannot be listed
        problems, lines = [str(err)], []
    for line in lines:
        print(line)
    for problem in problems:
        print(f"PROBLEM: {problem}")
    if problems:
        print(f"{len(problems)} problem(s) found in {folder}; fix or re-download the files named above.")
        return 1
    print(f"{folder} looks complete. Use it with data.root={folder}")
    return 0


@command_line
def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; exit status 0 (complete), 1 (problems found) or 2 (errors)."""
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
        if zip_path.is_file() and zip_complete(zip_path):
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


if __name__ == "__main__":
    sys.exit(main())

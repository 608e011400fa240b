"""Scan a dataset before training on it: counts per split and class, and every video that is missing,
unreadable or shorter than a clip.

    python -m timesformer.data.check data=kinetics400 data.root=/datasets/kinetics400
    python -m timesformer.data.check data=ucf101 data.root=/datasets/ucf101 data.split=2 --workers 8
    python -m timesformer.data.check data=ssv2 data.root=/datasets/ssv2 --write-clean /datasets/ssv2/clean
    python -m timesformer.data.check data=diving48 data.root=/datasets/diving48 --no-decode   # files only
    python -m timesformer.data.check data=kinetics400 data.root=... --limit 200    # a quick look

Arguments other than the options below are Hydra overrides of configs/train.yaml (`data=...`, `data.root=...`,
`model.num_frames=16`, ...): the dataset is read exactly as training would read it. The exit status is 1 when a
video is missing or unreadable, or usable but left out of `--write-clean`'s lists (its name is not UTF-8; the lists
are still written), else 0.

Each video is read as training reads it (`decode_clip` with `data.decoder`): its first, middle and last frames
are decoded (a truncated file usually fails on the last), and an MP4/MOV holding fewer frames than its index lists,
an AVI fewer than its header counts or a Matroska/WebM file whose frames span well under the duration its header
declares (cut short: it would read as a shorter video) is reported too. Videos decoded from their first frame for every
clip (AVI with h264 B-frames, MPEG-PS files whose packets lack timestamps) are listed: they work, slowly; their
`timesformer.data.resize` copies seek. "Too short" videos have fewer frames than one clip
needs; they still work (frames are repeated) but are listed. `--write-clean DIR` writes DIR/train.csv, DIR/val.csv
(and DIR/test.csv for a separate test split) with the usable videos, and DIR/classes.txt with the class order, for
`data=csv` (lists already in DIR, e.g. the dataset's own train.csv, are refused before any decoding unless
`--overwrite`); the command it prints keeps the dataset's recipe (e.g. SSv2's segment sampling, no flips;
Kinetics' sampling rate):

    python train.py data=csv data.root=DIR data.sampling=segment data.sampling_rate=32 data.horizontal_flip=false
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import re
import shlex
import sys
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from timesformer.data.dataset import SPLITS
from timesformer.data.sampling import dense_clip_frames

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
PROGRESS_EVERY = 1000  # videos between progress lines


@dataclass
class VideoCheck:
    path: str
    label: int
    num_frames: int = 0
    fps: float = 0.0
    error: str | None = None
    read_from_start: bool = False  # decoded from its first frame for every clip (`video.read_from_start`)


def check_video(path: str, label: int, decoder: str = "decord") -> VideoCheck:
    """Read a video as the data loading does (`decode_clip` with ``decoder``): its first, middle and last frames."""
    from timesformer.data.video import check_whole, decode_clip, read_from_start

    result = VideoCheck(path, label)

    def first_middle_last(num_frames: int, fps: float) -> list[int]:
        result.num_frames, result.fps = num_frames, fps
        if num_frames == 0:
            raise ValueError("no frames")
        return sorted({0, (num_frames - 1) // 2, num_frames - 1})

    try:
        if os.path.getsize(path) == 0:
            result.error = "empty file (0 bytes)"
            return result
        decode_clip(path, first_middle_last, decoder=decoder)
        result.error = check_whole(path)  # a file cut short reads as a shorter video
        result.read_from_start = result.error is None and read_from_start(path, decoder)
    except FileNotFoundError:
        result.error = "missing"
    except Exception as error:  # VideoDecodeError with FFmpeg's message, or "no frames"
        result.error = " ".join(str(error).split()).replace(path, os.path.basename(path))[:300]
    return result


def frames_needed(datamodule, fps: float) -> int:
    """Frames one clip spans in a video at `fps`, first to last (a shorter video gets repeated frames, as the
    dataset counts them: `dense_clip_frames`)."""
    if datamodule.sampling == "segment":
        return datamodule.num_frames
    fps = fps if fps > 0 and math.isfinite(fps) else datamodule.target_fps
    return dense_clip_frames(datamodule.num_frames, datamodule.sampling_rate, fps, datamodule.target_fps)


def compose_data_config(overrides: Sequence[str]) -> dict:
    """The `data` config of `python train.py <overrides>`, resolved."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import timesformer.resolvers  # noqa: F401  (registers the config resolvers)

    os.environ.setdefault("TIMESFORMER_ROOT", str(CONFIG_DIR.parent))
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides))
    return OmegaConf.to_container(cfg.data, resolve=True)


def compose_datamodule(overrides: Sequence[str]):
    """The DataModule that `python train.py <overrides>` would build (nothing is read from disk yet)."""
    import hydra

    return hydra.utils.instantiate(compose_data_config(overrides), _convert_="all")


def clean_list_command(overrides: Sequence[str], folder: Path) -> str:
    """`python train.py data=csv data.root=FOLDER ...` with the overrides that keep the checked dataset's clip
    sampling and augmentation (`data=csv` has its own defaults: dense sampling 8 apart, flips)."""
    others = [override for override in overrides if not override.lstrip("+~").startswith(("data=", "data."))]
    command = ["data=csv", f"data.root={_override_value(str(folder))}"]
    checked, as_csv = compose_data_config(overrides), compose_data_config([*others, *command])
    for key, value in checked.items():
        if key not in ("_target_", "source", "root", "split") and as_csv.get(key) != value:
            command.append(f"data.{key}={_override_value(value)}")
    return "python train.py " + " ".join(_shell_word(word) for word in [*others, *command])


def _override_value(value: object) -> str:
    """A value as Hydra's override grammar reads it back: strings with spaces, commas, brackets, quotes, ... quoted."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, list | tuple):
        return "[" + ",".join(_override_value(item) for item in value) + "]"
    if isinstance(value, str) and not re.fullmatch(r"[\w/.+:@~%-]+", value):
        return "'" + value.replace("'", "\\'") + "'"
    return str(value)


def _shell_word(word: str) -> str:
    """One command-line argument as a shell reads it back (double quotes where they suffice: easier to read)."""
    if shlex.quote(word) == word:
        return word
    return f'"{word}"' if not re.search(r'["$`\\!]', word) else shlex.quote(word)


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(value).ljust(width) if i == 0 else str(value).rjust(width)
                       for i, (value, width) in enumerate(zip(row, widths, strict=True)))
             for row in [header, *rows]]
    return "\n".join([lines[0], "  ".join("-" * width for width in widths), *lines[1:]])


def printable(path: str) -> str:
    """A path as it can be printed: bytes of a name that is not UTF-8 (os.listdir's surrogate escapes) as \\xNN."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def is_utf8(path: str) -> bool:
    """Whether a path can be written to a list file: they are read as UTF-8 (`sources.read_annotation_text`)."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _list(title: str, items: list[str], max_listed: int) -> None:
    if not items:
        return
    print(f"\n{title} ({len(items)}):")
    for item in items[:max_listed]:
        print(f"  {printable(item)}")
    if len(items) > max_listed:
        print(f"  ... and {len(items) - max_listed} more (--max-listed N shows more)")


def clean_list_files(folder: Path, splits: Sequence[str]) -> list[Path]:
    """The files `write_clean` writes in `folder` for these splits."""
    return [folder / "classes.txt", *(folder / f"{split}.csv" for split in splits)]


def write_clean(folder: Path, class_names: list[str], checked: dict[str, list[VideoCheck]],
                dataset_root: Path | None = None, train_command: str | None = None) -> list[str]:
    """The usable videos as `data=csv` lists (class names) and the class order. Paths are relative to the lists'
    folder when it is inside the dataset (a copy of the tree, e.g. by `timesformer.data.resize`, then reads its own
    videos), absolute otherwise. Returns the usable videos left out: those whose names (or class names) are not
    UTF-8, which a list cannot hold."""
    folder.mkdir(parents=True, exist_ok=True)
    # abspath, not resolve: a dataset of symlinks stays in its own tree
    folder_path = os.path.abspath(folder)
    inside = dataset_root is not None and Path(folder_path).is_relative_to(os.path.abspath(dataset_root))

    def listed(path: str) -> str:
        return os.path.relpath(os.path.abspath(path), folder_path) if inside else os.path.abspath(path)
    # A class named by a folder whose name is not UTF-8 is left out with its videos (their paths hold its name)
    (folder / "classes.txt").write_text("".join(f"{name}\n" for name in class_names if is_utf8(name)),
                                        encoding="utf-8")
    not_utf8 = []
    for split, results in checked.items():
        with open(folder / f"{split}.csv", "w", newline="", encoding="utf-8") as file:
            writer = csv.writer(file)
            writer.writerow(["path", "label"])
            for result in results:
                if result.error is None and not (is_utf8(listed(result.path)) and is_utf8(class_names[result.label])):
                    not_utf8.append(result.path)
                elif result.error is None:
                    writer.writerow([listed(result.path), class_names[result.label]])
    root_override = _shell_word(f"data.root={_override_value(str(folder))}")
    train_command = train_command or f"python train.py data=csv {root_override}"
    print(f"\nWrote the usable videos to {folder} (classes.txt, {', '.join(f'{s}.csv' for s in checked)}). "
          f"Train on them with: {train_command}")
    return not_utf8


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m timesformer.data.check", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides: data=kinetics400 data.root=PATH ...")
    parser.add_argument("--splits", default="train,val,test", help="comma-separated splits to check")
    parser.add_argument("--limit", type=int, default=None, help="check only the first N videos of each split")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="decoding threads")
    parser.add_argument("--no-decode", action="store_true", help="only count and find the files (fast)")
    parser.add_argument("--write-clean", metavar="DIR", type=Path, help="write lists of the usable videos here")
    parser.add_argument("--overwrite", action="store_true", help="let --write-clean replace lists already in DIR")
    parser.add_argument("--max-listed", type=int, default=20, help="videos listed per problem (default 20)")
    args = parser.parse_args(argv)
    requested = [split.strip() for split in args.splits.split(",") if split.strip()]
    if not requested or any(split not in SPLITS for split in requested):
        parser.error(f"--splits={args.splits}: valid splits are {', '.join(SPLITS)} (comma-separated)")
    for option, value in (("--limit", args.limit), ("--workers", args.workers), ("--max-listed", args.max_listed)):
        if value is not None and value < (0 if option == "--max-listed" else 1):
            parser.error(f"{option} must be {'>= 0' if option == '--max-listed' else '>= 1'}, got {value}")
    if args.write_clean and args.limit is not None:
        parser.error("--write-clean lists every usable video: it cannot follow --limit (a part of each split)")

    datamodule = compose_datamodule(args.overrides)
    source = datamodule.source
    source.prepare()
    if hasattr(source, "scan"):  # the real-dataset sources: also tell which annotated videos are missing
        scan = source.scan()
        index, missing = source.index_from_scan(scan), scan.missing
    else:
        index, missing = source.load(), {}
    splits = [split for split in requested if split in index.splits]
    for split in sorted(set(requested) - set(splits), key=requested.index):
        print(f"(the dataset has no {split} split; it has {', '.join(index.splits)})", file=sys.stderr)
    test_is_val = "val" in index.splits and index.splits.get("test") is index.splits["val"]
    if test_is_val and "test" in splits:  # the same videos as val: checked, counted and listed once, as val
        splits = list(dict.fromkeys("val" if split == "test" else split for split in splits))
    if args.write_clean and not args.overwrite:  # before any decoding; e.g. DIR = the dataset's own train.csv's folder
        existing = [str(path) for path in clean_list_files(args.write_clean, splits) if path.exists()]
        if existing:
            print(f"--write-clean {args.write_clean}: {', '.join(existing)} exist already; choose another folder, or "
                  "pass --overwrite to replace them", file=sys.stderr)
            return 2
    title = getattr(source, "title", type(source).__name__)
    print(f"{title} at {getattr(source, 'root', '?')}: {index.num_classes} classes"
          + (" (test = val)" if test_is_val else ""))

    checked: dict[str, list[VideoCheck]] = {}
    for split in splits:
        entries = index.splits[split][: args.limit]
        if args.no_decode:
            checked[split] = [VideoCheck(path, label) for path, label in entries]
            continue
        print(f"checking {len(entries)} {split} videos with {args.workers} threads ...", file=sys.stderr)
        checked[split] = []
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=max(args.workers, 1)) as pool:
            # In chunks: a progress line each (Kinetics' 240k videos take hours), and not 240k futures at once
            for start in range(0, len(entries), PROGRESS_EVERY):
                chunk = entries[start:start + PROGRESS_EVERY]
                checked[split] += pool.map(lambda entry: check_video(*entry, datamodule.decoder), chunk)
                if len(checked[split]) < len(entries):
                    elapsed = time.monotonic() - started
                    left = elapsed * (len(entries) - len(checked[split])) / len(checked[split])
                    print(f"  {split}: {len(checked[split])}/{len(entries)} videos, {elapsed / 60:.1f} min, "
                          f"~{left / 60:.0f} min left", file=sys.stderr, flush=True)

    rows = []
    for split in splits:
        results = checked[split]
        unreadable = sum(result.error is not None for result in results)
        short = sum(result.error is None and result.num_frames < frames_needed(datamodule, result.fps)
                    for result in results)
        rows.append([split, len(results), len(missing.get(split, [])), "-" if args.no_decode else unreadable,
                     "-" if args.no_decode else short, len(results) - unreadable])
    print()
    print(_table(rows, ["split", "videos", "missing", "unreadable", "too short", "usable"]))

    counts = {split: Counter(result.label for result in checked[split]) for split in splits}
    per_class = [[printable(name), *(counts[split][label] for split in splits)]
                 for label, name in enumerate(index.class_names)]
    print()
    print(_table(per_class, ["class", *splits]))

    for split in splits:
        results = checked[split]
        _list(f"{split}: missing (annotated, no file)", missing.get(split, []), args.max_listed)
        _list(f"{split}: unreadable", [f"{r.path}: {r.error}" for r in results if r.error], args.max_listed)
        if not args.no_decode:  # the frame counts come from decoding
            _list(f"{split}: too short (frames are repeated)",
                  [f"{r.path}: {r.num_frames} frames, a clip spans {frames_needed(datamodule, r.fps)}"
                   for r in results if r.error is None and r.num_frames < frames_needed(datamodule, r.fps)],
                  args.max_listed)
            _list(f"{split}: decoded from their first frame for every clip (slow: their timestamps do not order "
                  "their frames; a `python -m timesformer.data.resize` copy seeks)",
                  [r.path for r in results if r.read_from_start], args.max_listed)

    not_listed: list[str] = []
    if args.write_clean:
        if args.no_decode:
            print("\n--write-clean needs the videos decoded; run it without --no-decode", file=sys.stderr)
            return 2
        not_listed = write_clean(args.write_clean, index.class_names, checked, getattr(source, "root", None),
                                 clean_list_command(args.overrides, args.write_clean))
        _list("NOT in the lists: usable, but their names are not UTF-8, which a list file cannot hold (rename them, "
              "e.g. `convmv -r -f latin1 -t utf8 --notest DIR`, and check again)", not_listed, args.max_listed)
    # Non-zero when a video is missing, unreadable or left out of the lists, so that a script can stop before
    # training on a broken copy (too-short videos work: repeated frames)
    problems = any(missing.get(split) for split in splits) or any(
        result.error is not None for results in checked.values() for result in results) or bool(not_listed)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

"""Copy a dataset with its videos re-encoded at a smaller size: decoding then costs less for every epoch.

    python -m timesformer.data.resize /datasets/kinetics400 /datasets/kinetics400_256 --short-side 256 --workers 16
    python train.py data=kinetics400 data.root=/datasets/kinetics400_256

Decoding is most of a training clip's cost, and it grows with the frame size: an 8 x 32 clip of a 640x360 video
takes ~2x the decode time of the same clip at 340x256 (benchmarks/RESULTS.md, part 3). The training crops are cut
after scaling the short side to 256-320 px, so storing more than that is decoded and thrown away every epoch.
This is the usual preparation for Kinetics (short side 256, as mmaction2 and PySlowFast users keep it).

The folder tree is mirrored: every video (by suffix) whose short side is above `--short-side` is re-encoded
with its short side at that size (aspect ratio kept, even sides), the same frames and timestamps (where these do
not order the frames, as in AVI files with B-frames or MPEG-PS files joined with `cat`, a constant frame rate), as
h264 (x264 CRF 23, preset veryfast) in the same container (VP9 for .webm; an MP4 container, name kept, for
suffixes whose container cannot hold h264: .mpg, .ts, .wmv, ...); smaller videos and every other file (annotation
CSVs, split lists) are copied, so the same data config reads the copy: absolute paths into `src` in text files
(PySlowFast lists, `data=csv` lists) are rewritten to point into `dst`. Folders reached through symbolic links are
mirrored as folders; hidden files and folders (`.DS_Store`, macOS `._*` files) are left out, as the data
loaders leave them out. Audio is dropped. Files
already in the destination are skipped, so an interrupted run continues. Videos that cannot be decoded, files cut
short (an MP4/MOV holding fewer frames than its index lists, an AVI or Matroska/WebM file ending well before its
header's length; copied or re-encoded alike) and videos whose frame size changes mid-way (one size would
stretch the other part) are listed (and written to `<dst>/resize_failures.txt`) and the command exits with
status 1: nothing is dropped, shortened or distorted silently.
"""

from __future__ import annotations

import argparse
import ctypes
import multiprocessing
import os
import re
import shutil
import signal
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import av

from timesformer.data.sources import is_video_file
from timesformer.data.video import (
    check_whole,
    missing_from_index,
    open_video,
    shorter_than_declared,
    timestamps_order_the_frames,
    upright_rgb,
)

# Copied files whose absolute paths into the source are rewritten (video lists, annotations).
TEXT_SUFFIXES = (".csv", ".txt", ".json", ".tsv", ".lst")


def scaled_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) with the short side at `short_side`, the aspect ratio kept, both even (yuv420p)."""
    scale = short_side / min(width, height)
    return max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2)


def resize_video(src: Path, dst: Path, short_side: int, crf: int = 23, preset: str = "veryfast") -> str:
    """Re-encode `src` to `dst` with its short side at `short_side` (or copy it when it is not larger).
    Returns "resized" or "copied"; raises av.FFmpegError (or ValueError) for a video that cannot be read."""
    partial = dst.with_name(f".{dst.name}.partial")  # renamed when complete: a crash leaves no half file at dst
    with av.open(str(src)) as source:
        if not source.streams.video:
            raise ValueError("no video stream")
        in_stream = source.streams.video[0]
        in_stream.thread_type = "AUTO"
        width, height = in_stream.codec_context.width, in_stream.codec_context.height
        if min(width, height) <= short_side:
            problem = check_whole(src)  # (a cut-short file copied as it is would pass for a whole one)
            if problem:
                raise ValueError(problem)
            shutil.copyfile(src, partial)
            partial.replace(dst)
            return "copied"
        new_width, new_height = scaled_size(width, height, short_side)
        codec = "libvpx-vp9" if dst.suffix.lower() == ".webm" else "libx264"
        with av.open(str(partial), mode="w", format=_muxer_for(dst)) as target:
            rate = in_stream.average_rate or in_stream.guessed_rate or 30
            out_stream = target.add_stream(codec, rate=rate)
            out_stream.width, out_stream.height, out_stream.pix_fmt = new_width, new_height, "yuv420p"
            # The same timestamps, frame for frame: the muxer's and the encoder's time base (left at 1/rate, the
            # encoder rounded a variable frame rate's timestamps onto that grid, or made two of them equal)
            out_stream.time_base = out_stream.codec_context.time_base = in_stream.time_base
            out_stream.options = {"crf": str(crf)} | ({"preset": preset} if codec == "libx264" else {"b": "0"})
            if dst.suffix.lower() == ".avi":  # AVI has no presentation timestamps: B-frames would be misread
                out_stream.options |= {"bf": "0"}
            # Where the source's timestamps do not order its frames (AVI with B-frames: in decode order; MPEG-PS
            # files joined with `cat`: each part starts again), the muxer refused them: the copy's frames go on a
            # constant-rate grid from the first one, in the order they are decoded, as the loader numbers them.
            frame_step = max(1, round(1 / (rate * in_stream.time_base)))  # (the decoded frames' time base)
            with open_video(src) as probe:
                keep_timestamps = timestamps_order_the_frames(probe)
            frames = packets_held = 0
            first_size = first_pts = None
            timings = []  # (pts, duration) of every packet, for shorter_than_declared
            for source_packet in source.demux(in_stream):
                packets_held += source_packet.size > 0
                timings.append((source_packet.pts, source_packet.duration))
                for frame in source_packet.decode():
                    first_size = first_size or (frame.width, frame.height)
                    first_pts = first_pts if first_pts is not None else frame.pts or 0
                    if (frame.width, frame.height) != first_size:  # scaled to the first size, it would be stretched
                        first = "x".join(map(str, first_size))
                        raise ValueError(f"its frame size changes at frame {frames}, from {first} to "
                                         f"{frame.width}x{frame.height} (files joined?)")
                    small = frame.reformat(width=new_width, height=new_height, format="yuv420p",
                                           interpolation="AREA")
                    if round(frame.rotation / 90) % 4:  # a display matrix (phone video): written upright, without one
                        small = av.VideoFrame.from_ndarray(upright_rgb(small), format="rgb24")
                        if frames == 0:
                            out_stream.width, out_stream.height = small.width, small.height
                    small.pts = frame.pts if keep_timestamps else first_pts + frames * frame_step
                    small.time_base = frame.time_base
                    for packet in out_stream.encode(small):
                        target.mux(packet)
                    frames += 1
            for packet in out_stream.encode():
                target.mux(packet)
        problem = "no frame could be decoded" if frames == 0 else (
            missing_from_index(source, packets_held) or shorter_than_declared(source, timings))
        if problem:  # (a cut-short file's copy would be a clean, shorter video: nothing could tell it was cut)
            partial.unlink(missing_ok=True)
            raise ValueError(problem)
    partial.replace(dst)
    return "resized"


def _muxer_for(path: Path) -> str:
    """The container for a suffix; h264 in an mp4 for the suffixes whose own container cannot hold it (decoders
    recognise the content, not the name)."""
    muxers = {".mkv": "matroska", ".webm": "webm", ".avi": "avi", ".mov": "mov", ".flv": "flv", ".3gp": "3gp"}
    return muxers.get(path.suffix.lower(), "mp4")


def _job(args: tuple[Path, Path, int, int, str]) -> tuple[Path, str]:
    src, dst, short_side, crf, preset = args
    try:
        return src, resize_video(src, dst, short_side, crf, preset)
    except (av.FFmpegError, ValueError, OSError) as error:
        dst.with_name(f".{dst.name}.partial").unlink(missing_ok=True)
        return src, f"failed: {' '.join(str(error).split())}"


def resize_dataset(src: Path, dst: Path, short_side: int = 256, workers: int = 1, crf: int = 23,
                   preset: str = "veryfast") -> dict[str, list]:
    """Mirror `src` into `dst` (see the module docstring). Returns {"resized", "copied", "skipped", "failed"}
    lists of source paths ("failed": (path, reason) pairs)."""
    # Lists may name the source as given or through its real path (the given one may hold a symbolic link).
    src_names = tuple(dict.fromkeys([os.path.abspath(src), os.path.realpath(src)]))
    src, dst = Path(src).resolve(), Path(dst).resolve()
    if not src.is_dir():
        raise NotADirectoryError(f"source folder not found: {src}")
    if dst == src or src in dst.parents or dst in src.parents:  # (a parent: every video was "inside the copy")
        raise ValueError(f"the destination {dst} must be outside the source {src}, and not hold it")
    outcome: dict[str, list] = {"resized": [], "copied": [], "skipped": [], "failed": []}
    jobs = []
    (dst / "resize_failures.txt").unlink(missing_ok=True)  # this run's failures only (a rerun retries them)
    made: set[Path] = set()  # folders made (a mkdir per file cost 240k metadata calls: minutes on NFS)
    for path in _files(src, skip=dst):
        if path == src / "resize_failures.txt":  # an earlier resize's: not this copy's
            continue
        target = dst / path.relative_to(src)
        if target.exists():
            outcome["skipped"].append(path)
            continue
        if target.parent not in made:
            target.parent.mkdir(parents=True, exist_ok=True)
            made.add(target.parent)
        if is_video_file(path.name):
            jobs.append((path, target, short_side, crf, preset))
        else:
            _copy(path, target, src_names, dst)
            outcome["copied"].append(path)
    print(f"{len(jobs)} videos to resize, {len(outcome['copied'])} other files copied, {len(outcome['skipped'])} "
          "files already there", flush=True)
    # fork on Linux: forkserver (Python 3.14's default) makes the workers children of its server, not of this process
    context = multiprocessing.get_context("fork") if sys.platform.startswith("linux") else None
    pool = (ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_end_with_parent,
                                initargs=(os.getpid(),)) if workers > 1 else _InProcess())
    with pool:
        for done, (path, result) in enumerate(pool.map(_job, jobs), start=1):
            if result.startswith("failed: "):
                outcome["failed"].append((path, result.removeprefix("failed: ")))
                print(f"could not resize {path}: {outcome['failed'][-1][1]}", file=sys.stderr, flush=True)
            else:
                outcome[result].append(path)
            if done % 100 == 0:
                print(f"{done}/{len(jobs)} videos", flush=True)
    if outcome["failed"]:
        # (a file name that is not UTF-8 keeps its own bytes: the list ended in a UnicodeEncodeError, empty)
        (dst / "resize_failures.txt").write_text("".join(f"{path}\t{reason}\n" for path, reason in outcome["failed"]),
                                                 encoding="utf-8", errors="surrogateescape")
    return outcome


def _files(src: Path, skip: Path | None = None) -> list[Path]:
    """The files under `src`, through symbolic links to folders (a link back up its own path, or into `skip`, the
    destination, is not followed), hidden ones left out."""
    skipped = os.path.realpath(skip) if skip is not None else None
    files: list[Path] = []

    def walk(folder: Path, ancestors: frozenset[str]) -> None:
        for entry in sorted(os.scandir(folder), key=lambda entry: entry.name):
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            if entry.is_dir():  # (follows links)
                real = os.path.realpath(path)
                inside_skipped = skipped is not None and (real == skipped or real.startswith(skipped + os.sep))
                if real not in ancestors and not inside_skipped:  # a loop otherwise; the copy copying itself
                    walk(path, ancestors | {real})
            elif entry.is_file():
                files.append(path)

    walk(src, frozenset({os.path.realpath(src)}))
    return sorted(files)


def _copy(path: Path, target: Path, src_names: tuple[str, ...], dst: Path) -> None:
    """Copy a file; in a text file, absolute paths into the source (any of `src_names`) become paths into `dst`
    (so that lists of absolute paths, PySlowFast's usual form, read the copy and not the originals). Written to a
    partial file renamed when complete, as videos are: a rerun skips what exists, which must not be a cut copy."""
    partial = target.with_name(f".{target.name}.partial")
    if path.suffix.lower() in TEXT_SUFFIXES:
        try:
            with open(path, encoding="utf-8", newline="") as file:  # newline="": CRLF lists stay CRLF
                text = file.read()
        except UnicodeDecodeError:
            text = None
        prefixes = [name + os.sep for name in src_names if text is not None and name + os.sep in text]
        if prefixes:
            for prefix in prefixes:  # where a path starts (not inside another path, e.g. ../data/k400/...)
                text = re.sub(r"(?<![^\s,;:='\"(\[])" + re.escape(prefix), lambda _: os.fspath(dst) + os.sep, text)
            with open(partial, "w", encoding="utf-8", newline="") as file:
                file.write(text)
            partial.replace(target)
            return
    shutil.copyfile(path, partial)
    partial.replace(target)


def _end_with_parent(parent: int) -> None:
    """Run in each worker: end when the resize process ends. Killed (`kill`, an OOM kill), it left its workers
    waiting for work forever, each holding its memory."""
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # it ended before the prctl
            os._exit(1)


class _InProcess:
    """`map` in this process (for workers=1: no pool to start)."""

    def __enter__(self) -> _InProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    @staticmethod
    def map(fn: Callable, items: Iterable) -> Iterator:
        return map(fn, items)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m timesformer.data.resize", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path, help="the dataset's folder")
    parser.add_argument("dst", type=Path, help="where the copy goes (outside src)")
    parser.add_argument("--short-side", type=int, default=256, help="short side of the re-encoded videos (256)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all cores)")
    parser.add_argument("--crf", type=int, default=23, help="x264 / VP9 quality (lower: better, larger; 23)")
    parser.add_argument("--preset", default="veryfast", help="x264 preset (veryfast: ~3x faster to encode than "
                        "medium, and its files decode faster)")
    args = parser.parse_args(argv)
    if args.short_side < 2:
        parser.error(f"--short-side must be at least 2 pixels, got {args.short_side}")
    if not 0 <= args.crf <= 51:  # x264's range (VP9's is 0-63): FFmpeg would clamp a value outside it silently
        parser.error(f"--crf must be in 0-51, got {args.crf}")
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    outcome = resize_dataset(args.src, args.dst, args.short_side, args.workers, args.crf, args.preset)
    print(f"{len(outcome['resized'])} videos resized, {len(outcome['copied'])} files copied, "
          f"{len(outcome['skipped'])} already there, {len(outcome['failed'])} failed"
          + (f" (listed in {args.dst / 'resize_failures.txt'})" if outcome["failed"] else ""))
    return 1 if outcome["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())

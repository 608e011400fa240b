"""python -m timesformer.data.resize: a dataset copied with its videos re-encoded at a smaller size."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import ROOT
from timesformer.data import decode_frames, read_video_info
from timesformer.data.resize import main, resize_dataset, scaled_size


def _write_smooth_video(path, codec: str, num_frames: int = 40, options: dict[str, str] | None = None) -> None:
    """64x48, a smooth pattern drifting right: detail that survives downscaling and lossy re-encoding."""
    y, x = np.mgrid[0:48, 0:64].astype(np.float32)
    with av.open(str(path), mode="w", options=options or {}) as container:
        stream = container.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for t in range(num_frames):
            phase = (x - 1.5 * t) / 9.0
            # red repeats every ~38 frames; blue's own period (44) keeps frames t and t + 38 apart
            rgb = np.stack([128 + 100 * np.sin(phase), 128 + 100 * np.cos(y / 7.0), 128 + 60 * np.sin(t / 7 + y / 11)])
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb.transpose(1, 2, 0).astype(np.uint8)),
                                               format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_scaled_size_keeps_the_aspect_ratio_with_even_sides():
    assert scaled_size(640, 360, 256) == (456, 256)  # 455.1 -> the nearest even width
    assert scaled_size(360, 640, 256) == (256, 456)  # portrait
    assert scaled_size(340, 256, 128) == (170, 128)


@pytest.fixture()
def dataset(tmp_path):
    """root/train/<class>/<video> (a 64x48 h264 mp4 and an MPEG-4 AVI), an annotation CSV and a broken video."""
    src = tmp_path / "src"
    for folder in ("train/walking", "train/running"):
        (src / folder).mkdir(parents=True)
    _write_smooth_video(src / "train/walking/a.mp4", "libx264")
    _write_smooth_video(src / "train/running/b.avi", "mpeg4")
    (src / "train.csv").write_text("label,youtube_id\nwalking,a\n")
    (src / "train/broken.mp4").write_text("not a video\n")
    return src


def test_videos_are_resized_other_files_copied_and_failures_listed(dataset, tmp_path, capsys):
    dst = tmp_path / "dst"
    # CRF 12: nearly lossless, so that what is compared below is the resizing, not x264's losses
    assert main([str(dataset), str(dst), "--short-side", "32", "--workers", "1", "--crf", "12"]) == 1  # 1 broken
    for name in ("train/walking/a.mp4", "train/running/b.avi"):
        original, resized = read_video_info(dataset / name), read_video_info(dst / name)
        assert (resized.width, resized.height) == (42, 32)  # 64x48 -> short side 32, even width
        assert (resized.num_frames, resized.fps) == (original.num_frames, original.fps)  # frame for frame
        # The content is the original, downscaled, frame for frame: each frame of the copy is closest to the
        # area-downscaled original of the same number (margin >= 0.9 over the next closest), and close to it in
        # absolute terms (<= 5 of 255: swscale's area filter and chroma subsampling differ from torch's).
        originals = F.interpolate(decode_frames(dataset / name, list(range(40))).permute(0, 3, 1, 2).float(),
                                  size=(32, 42), mode="area")  # (40, 3, 32, 42)
        indices = list(range(40))
        got = decode_frames(dst / name, indices).permute(0, 3, 1, 2).float()
        errors = (got[:, None] - originals[None]).abs().mean(dim=(2, 3, 4))  # (40, 40)
        assert errors.argmin(dim=1).tolist() == indices, name
        assert errors[indices, indices].max() < 7, name
    assert (dst / "train.csv").read_bytes() == (dataset / "train.csv").read_bytes()
    failures = (dst / "resize_failures.txt").read_text()
    assert "broken.mp4" in failures and not (dst / "train" / "broken.mp4").exists()
    assert "could not resize" in capsys.readouterr().err
    assert not list(dst.rglob(".*.partial"))


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the workers end by prctl(PR_SET_PDEATHSIG)")
def test_workers_end_when_the_resize_process_is_killed(dataset, tmp_path):
    """A `kill -9` (or an OOM kill) of the resize left its workers waiting for work forever. The process runs with
    forkserver as its start method (Python 3.14's default), whose workers, children of its server, all exited."""
    started = tmp_path / "started"
    started.mkdir()
    script = textwrap.dedent(f"""
        import multiprocessing, os, time
        import timesformer.data.resize as resize

        def slow_job(job):  # a long video: the workers are busy when the kill comes
            open(os.path.join({str(started)!r}, str(os.getpid())), "w").close()
            time.sleep(300)

        if __name__ == "__main__":
            multiprocessing.set_start_method("forkserver")
            resize._job = slow_job
            resize.resize_dataset({str(dataset)!r}, {str(tmp_path / "dst")!r}, short_side=32, workers=2)
    """)
    (tmp_path / "run.py").write_text(script)
    process = subprocess.Popen([sys.executable, str(tmp_path / "run.py")], cwd=ROOT,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 60
        while len(list(started.iterdir())) < 2 and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.1)
        workers = [int(path.name) for path in started.iterdir()]
        assert len(workers) == 2, "the pool's workers did not start their jobs"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    deadline = time.monotonic() + 20
    while not all(_gone(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = [pid for pid in workers if not _gone(pid)]
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    assert not alive, f"workers {alive} outlived the killed resize process"


def test_small_videos_are_copied_and_a_rerun_skips_what_is_done(dataset, tmp_path, capsys):
    dst = tmp_path / "dst"
    first = resize_dataset(dataset, dst, short_side=48)  # the videos are 64x48: nothing to shrink
    assert len(first["copied"]) == 3 and not first["resized"] and len(first["failed"]) == 1
    assert (dst / "train/walking/a.mp4").read_bytes() == (dataset / "train/walking/a.mp4").read_bytes()
    assert "3 videos to resize, 1 other files copied, 0 files already there" in capsys.readouterr().out
    again = resize_dataset(dataset, dst, short_side=48)
    assert len(again["skipped"]) == 3 and len(again["failed"]) == 1  # the broken one is tried again
    # what a restart finds is said before the first video (a restart of 240k files was silent for minutes)
    assert "1 videos to resize, 0 other files copied, 3 files already there" in capsys.readouterr().out


def test_variable_frame_rate_keeps_its_timestamps(tmp_path):
    """The encoder's time base was 1/average fps: a variable frame rate's times were rounded onto that grid (two of
    them equal, which the mp4 muxer refused: the video failed)."""
    gaps = [40, 20, 120, 40, 60, 40, 20, 80] * 3  # ms
    src = tmp_path / "src"
    src.mkdir()
    with av.open(str(src / "vfr.mp4"), mode="w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.time_base = stream.codec_context.time_base = Fraction(1, 1000)
        for i, pts in enumerate(np.cumsum([0, *gaps[:-1]])):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 10 * i, np.uint8), format="rgb24")
            frame.pts, frame.time_base = int(pts), Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)

    def times(path):
        with av.open(str(path)) as container:
            return [round(float(frame.time), 3) for frame in container.decode(video=0)]

    outcome = resize_dataset(src, tmp_path / "dst", short_side=32)
    assert not outcome["failed"] and len(outcome["resized"]) == 1
    assert times(tmp_path / "dst" / "vfr.mp4") == times(src / "vfr.mp4")


def test_reruns_never_keep_a_cut_copy_nor_copy_their_own_output(dataset, tmp_path, monkeypatch):
    import shutil

    import timesformer.data.resize as resize

    dst = tmp_path / "dst"
    real_copy = shutil.copyfile

    def killed_mid_copy(source, target):
        with open(target, "wb") as file:
            file.write(open(source, "rb").read()[:5])
        raise KeyboardInterrupt

    monkeypatch.setattr(resize.shutil, "copyfile", killed_mid_copy)
    with pytest.raises(KeyboardInterrupt):
        resize_dataset(dataset, dst, short_side=48)
    monkeypatch.setattr(resize.shutil, "copyfile", real_copy)
    assert not list(dst.rglob("*.*sv")) and not list(dst.rglob("*.mp4"))  # no cut file a rerun would skip
    (dataset / "train" / "broken.mp4").unlink()  # fixed since the last run
    (dataset / "extra").symlink_to(dst, target_is_directory=True)  # a link from the source to the copy
    for _ in range(2):
        outcome = resize_dataset(dataset, dst, short_side=48)
        assert not outcome["failed"]
    assert (dst / "train.csv").read_bytes() == (dataset / "train.csv").read_bytes()
    assert not (dst / "resize_failures.txt").exists()  # it listed the broken video of the run before
    assert not (dst / "extra").exists()  # the copy copied itself, one level deeper each run


def test_destination_inside_the_source_is_refused(dataset):
    with pytest.raises(ValueError, match="outside the source"):
        resize_dataset(dataset, dataset / "small")
    # ... nor hold it (`resize data/k400 data`, as cp -r SRC DIR/): every video was "inside the copy", none resized
    with pytest.raises(ValueError, match="and not hold it"):
        resize_dataset(dataset, dataset.parent)
    with pytest.raises(NotADirectoryError, match="missing"):
        resize_dataset(dataset / "missing", dataset.parent / "dst")


@pytest.mark.parametrize("option", ["--crf=200", "--crf=-1", "--workers=0"])
def test_out_of_range_options_are_refused_by_name(dataset, tmp_path, capsys, option):
    """FFmpeg clamps a CRF outside 0-51 silently (--crf 200 wrote what --crf 51 writes)."""
    with pytest.raises(SystemExit):
        main([str(dataset), str(tmp_path / "dst"), option])
    assert option.split("=")[0] in capsys.readouterr().err and not (tmp_path / "dst").exists()


def test_an_mp4_cut_short_is_reported_not_copied_shorter(tmp_path):
    """An MP4 cut short (a download that stopped; its index, at the front, lists every frame): its copy was a clean
    30-frame video of the 100-frame one, which nothing could tell from a whole video."""
    folder = tmp_path / "src" / "train" / "walking"
    folder.mkdir(parents=True)
    _write_smooth_video(folder / "whole.mp4", "libx264", num_frames=100, options={"movflags": "faststart"})
    data = (folder / "whole.mp4").read_bytes()
    (folder / "cut.mp4").write_bytes(data[: len(data) * 6 // 10])
    outcome = resize_dataset(tmp_path / "src", tmp_path / "dst", short_side=32)
    assert [path.name for path in outcome["resized"]] == ["whole.mp4"]
    [(path, reason)] = outcome["failed"]
    assert path.name == "cut.mp4" and reason.startswith("cut short: it holds ") and "of the 100 frames" in reason
    assert not (tmp_path / "dst/train/walking/cut.mp4").exists()
    assert (tmp_path / "dst/resize_failures.txt").read_text().count("cut.mp4") == 1


def _write_flat_frames(path, width: int, height: int, first_value: int, codec: str = "mpeg2video",
                       num_frames: int = 30) -> bytes:
    """Flat frames whose grey level grows by 4 a frame from `first_value` (MPEG-2 in a program stream by default)."""
    with av.open(str(path), mode="w", format="mpeg" if path.suffix == ".mpg" else None) as container:
        stream = container.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for t in range(num_frames):
            frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), first_value + 4 * t, np.uint8), "rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path.read_bytes()


@pytest.mark.parametrize("name", ["joined.mpg", "h264_bframes.avi"])
def test_timestamps_that_do_not_order_the_frames_are_replaced_in_the_copy(tmp_path, name):
    """MPEG-PS files joined with `cat` (DVD .vob parts): the second part's timestamps start again. AVI with h264
    B-frames: the timestamps follow the decode order. The muxer refused both ("Invalid argument"): the videos were
    listed as failed, although the loader reads them (numbering the frames as they come out of the decoder)."""
    src = tmp_path / "src"
    src.mkdir()
    if name == "joined.mpg":
        parts = [_write_flat_frames(tmp_path / f"{part}.mpg", 96, 64, first) for part, first in (("a", 16), ("b", 136))]
        (src / name).write_bytes(b"".join(parts))
    else:
        _write_flat_frames(src / name, 96, 64, 16, codec="libx264", num_frames=60)
    outcome = resize_dataset(src, tmp_path / "dst", short_side=32)
    assert not outcome["failed"] and len(outcome["resized"]) == 1
    copy = tmp_path / "dst" / name
    assert read_video_info(copy).num_frames == 60 and read_video_info(copy).height == 32
    with av.open(str(copy)) as container:
        times = [float(frame.time) for frame in container.decode(video=0)]
    assert np.allclose(np.diff(times), 1 / 25)  # evenly spaced at the source's rate
    expected = torch.tensor([16.0 + 4 * t for t in range(60)])  # joined.mpg: b.mpg's 136 follows a.mpg's 132
    for decoder in ("decord", "pyav"):
        levels = decode_frames(copy, list(range(60)), decoder=decoder).float().mean(dim=(1, 2, 3))
        assert (levels - expected).abs().max() < 3, decoder


def test_a_frame_size_change_is_reported_not_stretched(tmp_path):
    """Joined parts of two sizes: the second was scaled to the first part's size, its picture stretched."""
    src = tmp_path / "src"
    src.mkdir()
    parts = [_write_flat_frames(tmp_path / "a.mpg", 96, 64, 16), _write_flat_frames(tmp_path / "b.mpg", 128, 64, 136)]
    (src / "joined.mpg").write_bytes(b"".join(parts))
    outcome = resize_dataset(src, tmp_path / "dst", short_side=32)
    [(path, reason)] = outcome["failed"]
    # (at 29, not 30: FFmpeg's decoder drops a.mpg's last frame when the size changes)
    assert path.name == "joined.mpg" and "frame size changes at frame 29, from 96x64 to 128x64" in reason
    assert not (tmp_path / "dst" / "joined.mpg").exists()


@pytest.mark.parametrize("name, codec", [("cut.avi", "mpeg4"), ("cut.mkv", "libx264")])
@pytest.mark.parametrize("short_side", [32, 48])  # re-encoded, and copied as it is (48: not larger)
def test_an_avi_or_matroska_file_cut_short_is_reported_not_copied_shorter(tmp_path, name, codec, short_side):
    """check reports an AVI or Matroska file cut short (its header declares more); its resized copy, or its copy as
    it is when small, read as a whole shorter video, and the resize exited 0. An earlier resize's failures list in
    the source is not copied as this copy's."""
    folder = tmp_path / "src" / "train" / "walking"
    folder.mkdir(parents=True)
    _write_smooth_video(folder / f"whole{name[3:]}", codec, num_frames=100)
    with av.open(str(folder / f"whole{name[3:]}")) as container:
        ends = [packet.pos + packet.size for packet in container.demux(container.streams.video[0]) if packet.size]
    (folder / name).write_bytes((folder / f"whole{name[3:]}").read_bytes()[: ends[29]])
    (tmp_path / "src" / "resize_failures.txt").write_text("old\tfailure\n")
    outcome = resize_dataset(tmp_path / "src", tmp_path / "dst", short_side=short_side)
    [(path, reason)] = outcome["failed"]
    assert path.name == name and reason.startswith("cut short: ")
    assert not (tmp_path / "dst/train/walking" / name).exists()
    assert (tmp_path / "dst/resize_failures.txt").read_text().startswith(str(path))  # this run's only


def test_a_file_name_that_is_not_utf8_is_listed_with_its_own_bytes(tmp_path):
    """A broken video named in Latin-1 (caf\\xe9.mp4): writing the failures list raised UnicodeEncodeError, which
    left it empty and printed no summary."""
    import os

    folder = tmp_path / "src" / "train" / "walking"
    folder.mkdir(parents=True)
    with open(os.path.join(os.fsencode(folder), b"caf\xe9.mp4"), "wb") as file:
        file.write(b"not a video")
    assert main([str(tmp_path / "src"), str(tmp_path / "dst"), "--workers=1"]) == 1
    assert b"caf\xe9.mp4\t" in (tmp_path / "dst" / "resize_failures.txt").read_bytes()

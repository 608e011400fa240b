"""Decoding video files, reading only the frames a clip needs: decord (the default) or PyAV.

Both decoders give the same frames for the same indices (frame i = the i-th frame in presentation order, the
same RGB conversion; tests/test_data.py checks it pixel for pixel, for 8-bit video: 10-bit 4:2:0 differs by up to 7
levels, their chroma upsampling differing). They differ in the work they skip:

- "decord": seeks to the keyframe before a wanted frame when that skips frames, then decodes every frame up to
  it. Frame-threading is off (num_threads=1), as DataLoader workers are one per core.
- "pyav": the same keyframe seeking, and it also tells FFmpeg to skip decoding the frames that are neither
  wanted nor referenced by other frames (h264/HEVC/MPEG-4 part 2 "non-reference" frames: most B-frames; see
  SKIP_NONREF_DECODERS). For the 8 x 32 recipe on x264-encoded 10 s clips that is ~1.4-1.5x less decode time than
  decord (benchmarks/RESULTS.md, part 3).
  decord has no way to skip a frame's decoding.

decord returns wrong frames after a seek in some kinds of file (listed at `decord_misreads`): the "decord" path
reads those with PyAV.
"""

from __future__ import annotations

import bisect
import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import av
import decord
import numpy as np
import torch

DECODERS = ("decord", "pyav")


class VideoDecodeError(RuntimeError):
    """A video file exists but could not be decoded (empty, truncated, not a video, ...)."""


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    fps: float
    height: int
    width: int


def _open(path: str | os.PathLike, num_threads: int = 1) -> decord.VideoReader:
    path = os.fspath(path)
    # decord reports a missing file with the same RuntimeError as a corrupt one; check first so the two
    # cases get different, accurate errors.
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Video file not found: {path}")
    # No width/height (decode-time resize): measured on an 8 x 32 clip of a 640x360 h264 video it is no faster
    # (the decode is the cost), and decord2 3.4 fails on some target sizes (a buffer size
    # mismatch) and does not keep the aspect ratio with -1. The transforms resize the few kept uint8 frames.
    try:
        return decord.VideoReader(path, ctx=decord.cpu(0), num_threads=num_threads)
    except Exception as error:  # decord raises DECORDError (or AssertionError) with FFmpeg's message
        raise VideoDecodeError(f"Could not open video {path}: {error}") from error


def plausible_fps(reported: float, num_frames: int, span: float) -> float:
    """The container's average frame rate (``reported``), or the one the frames' timestamps measure where the reported
    one is well above it: a Matroska/WebM track need not state its frame rate (DefaultDuration), and without it both
    decoders report 1000 fps, its timestamps' 1 ms tick, so that a dense clip became frame 0 and then the video's
    last frame 7 times. ``span``: seconds from the first frame's timestamp to the last's (0 where unknown)."""
    # (to 3 decimals: decord's timestamps are float32 seconds, and both decoders should give the same rate)
    measured = round((num_frames - 1) / span, 3) if num_frames > 1 and span > 0 else 0.0
    return measured if measured and reported > 1.5 * measured else reported


def decord_fps(reader: decord.VideoReader) -> float:
    """`plausible_fps` for a decord reader (its frame timestamps are read from the index: no decoding)."""
    num_frames = len(reader)
    span = 0.0
    if num_frames > 1:
        starts = reader.get_frame_timestamp([0, num_frames - 1])[:, 0]
        span = float(starts[1] - starts[0])
    return plausible_fps(float(reader.get_avg_fps()), num_frames, span)


def read_video_info(path: str | os.PathLike) -> VideoInfo:
    """Frame count and average fps (container metadata) and frame size of a video.

    decord has no size query, so this decodes the first frame; the data loading path uses `decode_clip`,
    which gets the size from the frames it decodes anyway.
    """
    reader = _open(path)
    try:
        height, width = reader[0].shape[:2]
        return VideoInfo(num_frames=len(reader), fps=decord_fps(reader), height=height, width=width)
    except Exception as error:
        raise VideoDecodeError(f"Could not read video {os.fspath(path)}: {error}") from error


def missing_from_index(container: av.container.InputContainer, frames_held: int) -> str | None:
    """Why a video is cut short, or None: an MP4/MOV lists every frame in its index (its samples), and a file that
    holds fewer video packets (``frames_held``: a download that stopped, a copy cut off) reads as a shorter video
    that nothing tells from a whole one; both decoders count the packets it holds. AVI and Matroska declare a length
    instead (`shorter_than_declared`)."""
    if "mp4" not in container.format.name.split(",") or not container.streams.video:
        return None
    listed = container.streams.video[0].frames
    if frames_held >= listed - 1:  # (slack for one zero-size sample)
        return None
    return f"cut short: it holds {frames_held} of the {listed} frames its index lists"


def shorter_than_declared(container: av.container.InputContainer,
                          packets: Sequence[tuple[int | None, int | None]]) -> str | None:
    """`missing_from_index` for AVI and Matroska/WebM, which declare a length in their header (written first, so a
    download that stopped keeps it) but list no frames: an AVI its frame count, which counts packed B-frames'
    placeholders and the empty chunks a muxer writes for skipped frames, against the frame number (its timestamp)
    of the last frame it holds; a Matroska file its video track's end time from 0 (FFmpeg's DURATION tag: a video
    that starts at 2 s and lasts 3 has 5), else, with no other track to run longer, the segment's duration, against
    the end of the last frame it holds (a still held at the end lasts its own duration). ``packets``: (presentation
    timestamp, duration) of every video packet, empty ones included (the demuxer's final flush packet has no
    timestamp). Only a gap that rounding does not explain is reported: over a tenth of the declared length and over
    1 s (AVI: 10% of its frames)."""
    stream = container.streams.video[0]
    held = [(pts, duration) for pts, duration in packets if pts is not None]
    if container.format.name == "avi":  # (its time base is one frame: a timestamp is a frame number)
        declared, last = stream.frames, max((pts for pts, _ in held), default=-1)
        if declared and last + 1 < 0.9 * declared - 1:
            return f"cut short: it holds frames up to {last + 1} of the {declared} its header lists"
        return None
    if container.format.name != "matroska,webm" or len(held) < 2:
        return None
    try:  # as FFmpeg and mkvmerge write it: "00:00:10.000000000"
        hours, minutes, seconds = stream.metadata["DURATION"].split(":")
        declared = int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    except (KeyError, ValueError):
        if len(container.streams) > 1:  # the segment lasts as long as its longest track (an audio track, say)
            return None
        declared = (container.duration or 0) / av.time_base
    first, last = min(pts for pts, _ in held), max(pts for pts, _ in held)
    frame = float((last - first) * stream.time_base) / (len(held) - 1)  # (for a packet that states no duration)
    ends = max(float(pts * stream.time_base) + (float(duration * stream.time_base) if duration else frame)
               for pts, duration in held)
    if declared - ends > max(1.0, 0.1 * declared):
        return f"cut short: its frames end at {ends:.1f} s of the {declared:.1f} s its header declares"
    return None


def open_video(path: str | os.PathLike) -> av.container.InputContainer:
    """``av.open`` for reading, without FFmpeg decoding frames to probe the streams: its probe
    (avformat_find_stream_info) decodes the first frames to learn what the container does not say, mostly the
    pixel format, which the decoder learns anyway; the frame rate, frame count, B-frame delay and timestamps are
    the same. Opening a 10 s 340x256 h264 mp4 takes 0.6 ms instead of 2.1, once per clip."""
    return av.open(os.fspath(path), options={"skip_frame": "all"})


def check_whole(path: str | os.PathLike) -> str | None:
    """`missing_from_index` and `shorter_than_declared` for a file that decodes (its video packets read, none
    decoded); None where PyAV cannot read it (the decoders' own errors say what is wrong with such a file)."""
    try:
        with open_video(path) as container:
            if not container.streams.video:
                return None
            packets = [(packet.size, packet.pts, packet.duration)
                       for packet in container.demux(container.streams.video[0])]
            held = sum(size > 0 for size, _, _ in packets)
            return missing_from_index(container, held) or shorter_than_declared(
                container, [(pts, duration) for _, pts, duration in packets])
    except av.FFmpegError:
        return None


def _drop_row_padding(frame: np.ndarray) -> np.ndarray:
    """(H, W, C) with C != 3 from decord2's padded-row bug (see `_get_batch`) -> the real (H, W, 3) RGB frame."""
    height, width, channels = frame.shape
    if channels == 3:
        return frame
    # Each of the H rows holds W*C bytes: the W*3 bytes of the row, then FFmpeg's alignment padding.
    return frame.reshape(height, width * channels)[:, : width * 3].reshape(height, width, 3)


def _get_batch(reader: decord.VideoReader, indices: list[int]) -> np.ndarray:
    """decord's get_batch, working around a decord2 (3.4) bug for some small frame widths.

    For widths such as 16, 24, 32, 48, 96 and 144 px, FFmpeg pads each RGB row and decord2 reads the padding
    as extra channels: single frames come back as (H, W, 4) or (H, W, 6) and get_batch fails with "Check
    failed: from_size == to_size ... DECORDArrayCopyFromTo". The bytes are right, so decode those videos
    frame by frame and drop the padding. Common real-video widths (>= 160 px) are not affected.
    """
    try:
        frames = reader.get_batch(indices).asnumpy()  # (T, H, W, C) uint8
    except Exception as error:  # decord raises DECORDError, a plain Exception subclass
        if "DECORDArrayCopyFromTo" not in str(error):
            raise
        decoded = {index: _drop_row_padding(reader[index].asnumpy()) for index in sorted(set(indices))}
        return np.stack([decoded[index] for index in indices])
    if frames.shape[-1] != 3:
        frames = np.stack([_drop_row_padding(frame) for frame in frames])
    return frames


def decode_clip(
    path: str | os.PathLike,
    choose_indices: Callable[[int, float], Sequence[int]],
    num_threads: int = 1,
    decoder: str = "decord",
) -> tuple[torch.Tensor, VideoInfo]:
    """Open a video once, choose frame indices from its length and fps, and decode just those frames.

    `choose_indices(num_frames, fps)` returns the indices to decode (in order, repeats allowed).
    Returns the frames as a uint8 tensor (T, H, W, C), RGB, and the video's info. `decoder` is one of
    `DECODERS` (see the module docstring); both give the same frames. "decord" reads the files it would misread
    with PyAV (see `decord_misreads`), and retries with PyAV a file it cannot decode.
    """
    if decoder not in DECODERS:
        raise ValueError(f"decoder={decoder!r} is not supported; valid values: {', '.join(DECODERS)}")

    def choose(num_frames: int, fps: float) -> list[int]:
        try:
            indices = list(choose_indices(num_frames, fps))
        except VideoDecodeError:
            raise  # the caller's verdict on the file (e.g. it has no frames)
        except Exception as error:
            raise _CallersError(error) from error
        for index in indices:
            if not 0 <= index < num_frames:
                raise _CallersError(IndexError(
                    f"frame index {index} is out of range for {os.fspath(path)}, which has {num_frames} frames"))
        return indices

    try:
        if decoder == "pyav" or decord_misreads(path):
            return _read(_decode_clip_pyav, path, choose, num_threads)
        try:
            return _read(_decode_clip_decord, path, choose, num_threads)
        except VideoDecodeError as error:  # e.g. HEVC streams decord2 cannot feed to FFmpeg ("Error sending packet")
            try:
                return _read(_decode_clip_pyav, path, choose, num_threads)
            except VideoDecodeError as pyav_error:
                raise VideoDecodeError(f"{error} (PyAV could not read it either: {pyav_error})") from error
    except _CallersError as carried:
        callers_error = carried.args[0]
    raise callers_error  # (outside the except: its own cause and context stay as they were)


class _CallersError(Exception):
    """An error of `decode_clip`'s caller (its ``choose_indices`` raised, or chose a frame the video lacks), carried
    past the decoders' handling of bad files (`_read`) and raised as it was."""


def _read(
    decode: Callable[..., tuple[torch.Tensor, VideoInfo]], path: str | os.PathLike,
    choose_indices: Callable[[int, float], Sequence[int]], num_threads: int,
) -> tuple[torch.Tensor, VideoInfo]:
    """``decode(path, choose_indices, num_threads)``, with any error of decord, PyAV or FFmpeg a `VideoDecodeError`
    naming the file. Damaged files raise more than their decoders' own errors (fuzzed: a UnicodeDecodeError from
    metadata that is not UTF-8, a stream without a codec context, an IndexError from a reader of no frames, an
    InvalidDataError where a fallback decodes), and training only replaces the videos that raise VideoDecodeError:
    the others stopped the run without naming the file."""
    try:
        return decode(path, choose_indices, num_threads)
    except (VideoDecodeError, FileNotFoundError, _CallersError, MemoryError, RecursionError):
        raise  # (the last two are this process's trouble, not the file's)
    except Exception as error:
        raise VideoDecodeError(f"Could not read video {os.fspath(path)}: {type(error).__name__}: {error}") from error


def _decode_clip_decord(
    path: str | os.PathLike, choose_indices: Callable[[int, float], Sequence[int]], num_threads: int
) -> tuple[torch.Tensor, VideoInfo]:
    reader = _open(path, num_threads)
    num_frames, fps = len(reader), decord_fps(reader)
    indices = list(choose_indices(num_frames, fps))
    try:
        frames = _get_batch(reader, indices)  # (T, H, W, C) uint8
    except Exception as error:
        raise VideoDecodeError(f"Could not decode frames {indices} of video {os.fspath(path)}: {error}") from error
    info = VideoInfo(num_frames=num_frames, fps=fps, height=frames.shape[1], width=frames.shape[2])
    return torch.from_numpy(frames), info


# decord seeks wrongly in AVI files that hold h264 (with or without B-frames: after a seek to the keyframe before
# frame 20 it returned frame 8, counted from the start of the file) or MPEG-4 part 2 with B-frames, and returns no
# frame timestamps for them; the decord path reads AVI files with PyAV, which numbers their frames right. The suffix
# only saves reading the packets: an AVI under another name (.mp4, none) is known by its container format.
DECORD_UNRELIABLE_SUFFIXES = (".avi",)


@functools.lru_cache(maxsize=1 << 16)  # per process: a DataLoader worker reads each file's packets once
def decord_misreads(path: str | os.PathLike) -> bool:
    """Whether decord (0.6, decord2 3.4) would return wrong frames for some indices of this video.

    - AVI files, whatever their name (see DECORD_UNRELIABLE_SUFFIXES), and MPEG-4 part 2 with B-frames (frame 13
      asked, 15 returned).
    - Edit lists hiding frames (an mp4 cut with ``ffmpeg -ss ... -c copy``): decord numbers the hidden pre-roll
      as frames, and inconsistently (index 0 is the first frame shown, index 20 the 30th).
    - Keyframes that are not shown at their decode position: open GOPs (x265's default, x264 --open-gop), whose
      leading pictures follow the keyframe in decode order but are shown before it. decord numbers keyframes by
      their decode position and lands beside the frame asked for after a seek (HEVC: 250 asked, 251 returned;
      open-GOP h264 in mkv: 29 asked, 1 returned).
    - MPEG program and transport streams (.mpg, .ts: MPEG-2 13 asked, 1 returned; h264 in TS 13 -> 33), and any
      file whose packets lack timestamps.
    - Files that start between keyframes (a stream capture, a cut made without re-encoding): decord counts the
      frames before the first keyframe, which give no picture, and returns each frame that many frames late (an mkv
      starting 14 frames before its first keyframe: 14 asked, 28 returned).
    Read from the packets (no decoding): ~1.3 ms for a 10 s 340x256 clip, once per file and process.
    """
    path = os.fspath(path)
    if os.path.splitext(path)[1].lower() in DECORD_UNRELIABLE_SUFFIXES:
        return True
    try:
        with open_video(path) as container:
            if container.format.name in ("mpeg", "mpegts", "avi"):
                return True
            stream = container.streams.video[0]
            codec = stream.codec_context
            if codec.name == "mpeg4" and codec.has_b_frames:
                return True
            timestamps, keyframes = [], []  # decode order
            for packet in container.demux(stream):
                if packet.is_discard:
                    return True  # an edit list's hidden pre-roll: decord counts it as frames
                if packet.size:
                    if packet.is_keyframe:
                        keyframes.append(len(timestamps))
                    timestamps.append(packet.pts)
    except Exception:  # unreadable (FFmpeg's errors, and PyAV's own on damaged metadata): the decoders say so
        return False
    if None in timestamps:
        return True  # no presentation order: decord cannot number the frames after a seek; PyAV counts them
    if keyframes and keyframes[0] != 0:
        return True  # it starts between keyframes
    shown_at = {pts: at for at, pts in enumerate(sorted(timestamps))}
    return any(shown_at[timestamps[at]] != at for at in keyframes)


def decode_frames(
    path: str | os.PathLike, indices: Sequence[int], num_threads: int = 1, decoder: str = "decord"
) -> torch.Tensor:
    """Decode the frames at `indices` (in that order, repeats allowed). Returns uint8 (T, H, W, C), RGB."""
    frames, _ = decode_clip(path, lambda num_frames, fps: indices, num_threads, decoder)
    return frames


# -- PyAV ------------------------------------------------------------------------------------------------------


def _decode_clip_pyav(
    path: str | os.PathLike, choose_indices: Callable[[int, float], Sequence[int]], num_threads: int
) -> tuple[torch.Tensor, VideoInfo]:
    """`decode_clip` with PyAV: read the packets (cheap: no decoding), number the frames by presentation time,
    then decode only the stretches that lead to a wanted frame, skipping non-reference frames on the way."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Video file not found: {path}")
    try:
        container = open_video(path)
    except av.FFmpegError as error:
        raise VideoDecodeError(f"Could not open video {path}: {error}") from error
    with container:
        if not container.streams.video:
            raise VideoDecodeError(f"Could not open video {path}: it has no video stream")
        stream = container.streams.video[0]
        # One thread per DataLoader worker by default; frame threads (num_threads > 1) also honour skip_frame.
        stream.thread_type = "NONE" if num_threads == 1 else "AUTO"
        stream.thread_count = num_threads
        try:
            packets = [packet for packet in container.demux(stream) if packet.size]  # decode order
        except av.FFmpegError as error:
            raise VideoDecodeError(f"Could not read video {path}: {error}") from error
        # A file that starts between keyframes (a stream capture, a cut made without re-encoding) holds frames that
        # reference frames it lacks: FFmpeg gives no picture for them and players start at the first keyframe, so
        # frame 0 is the first frame shown from there (a file whose packets flag no keyframe is read whole).
        packets = packets[next((at for at, packet in enumerate(packets) if packet.is_keyframe), 0):]
        # The frames shown: an edit list (an mp4 cut with `ffmpeg -ss ... -c copy`) hides the pre-roll from the
        # keyframe before the cut; those packets are decoded (later frames reference them), their pictures dropped.
        num_frames = sum(not packet.is_discard for packet in packets)
        # The average frame rate, as decord's (`decord_fps`); 0 when neither the container nor the timestamps say
        # (the caller copes).
        shown = [packet.pts for packet in packets if not packet.is_discard and packet.pts is not None]
        span = float((max(shown) - min(shown)) * stream.time_base) if shown else 0.0
        fps = plausible_fps(float(stream.average_rate or stream.guessed_rate or 0.0), num_frames, span)
        indices = list(choose_indices(num_frames, fps))
        try:
            frames = _decode_wanted(stream.codec_context, packets, indices, container.format.name)
        except _DecodeOrderTimestamps:  # see _decode_wanted: number the pictures as they come out instead
            stream.codec_context.flush_buffers()
            stream.codec_context.skip_frame = "DEFAULT"
            frames = _decode_sequentially(stream.codec_context, packets, indices)
        except av.FFmpegError as error:
            raise VideoDecodeError(f"Could not decode frames {indices} of video {path}: {error}") from error
        missing = sorted(set(indices) - set(frames))
        if missing:
            raise VideoDecodeError(f"Could not decode frames {missing} of video {path}: the decoder gave no picture")
    sizes = sorted({frames[index].shape[:2] for index in indices})
    if len(sizes) > 1:  # a stream whose frame size changes mid-way (e.g. concatenated MPEG-PS files)
        raise VideoDecodeError(f"Could not decode frames {indices} of video {path}: their sizes differ {sizes}")
    clip = np.stack([frames[index] for index in indices])  # (T, H, W, C) uint8
    info = VideoInfo(num_frames=num_frames, fps=fps, height=clip.shape[1], width=clip.shape[2])
    return torch.from_numpy(clip), info


def upright_rgb(picture: av.VideoFrame) -> np.ndarray:
    """(H, W, 3) RGB array of a picture as players show it: turned by its display matrix (phone videos store
    portrait frames landscape and say so there), as decord turns them."""
    rgb = picture.to_ndarray(format="rgb24")
    turns = round(picture.rotation / 90) % 4  # counter-clockwise quarter turns (FFmpeg: -90 for a portrait phone video)
    return np.ascontiguousarray(np.rot90(rgb, turns)) if turns else rgb


# Containers that record each frame's presentation time (FFmpeg's format names): where their timestamps never go
# back, the encoder placed no B-frame (x264 on noise, say), although the stream allows them.
PRESENTATION_TIME_FORMATS = ("mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm")


def timestamps_give_the_order(timestamps: Sequence[int | None], has_b_frames: bool, format_name: str) -> bool:
    """Whether the packets' presentation timestamps (in decode order) number the frames of a stream in a container
    of FFmpeg's ``format_name``; where they do not, the frames are numbered as they come out of the decoder."""
    if None in timestamps or len(set(timestamps)) != len(timestamps):
        return False  # missing (some AVI files) or repeated (MPEG-PS files joined with `cat`: each starts again)
    # The codec reorders frames but the container's timestamps never do: AVI, which has no presentation timestamps,
    # stores h264 B-frames this way.
    in_decode_order = all(a < b for a, b in zip(timestamps, timestamps[1:], strict=False))
    return not (has_b_frames and in_decode_order and format_name not in PRESENTATION_TIME_FORMATS)


def read_from_start(path: str | os.PathLike, decoder: str = "decord") -> bool:
    """Whether `decode_clip` decodes this video from its first frame for every clip: PyAV reads it (``decoder``
    "pyav", or a file `decord_misreads`) and its timestamps do not order its frames (`timestamps_give_the_order`).
    Slow: a 10 s 340x256 h264 AVI with B-frames took 71 ms a clip where the same video as an mp4 took 45; a copy
    written by `timesformer.data.resize` seeks. False for a file PyAV cannot read (the decoders say why)."""
    path = os.fspath(path)
    if decoder == "decord" and not decord_misreads(path):
        return False  # decord seeks to the keyframe before each wanted frame
    try:
        with open_video(path) as container:
            return not timestamps_order_the_frames(container)
    except Exception:  # unreadable (see decord_misreads): the decoders say why
        return False


def timestamps_order_the_frames(container: av.container.InputContainer) -> bool:
    """`timestamps_give_the_order` for the first video stream of a container opened for reading (its packets are
    read to the end)."""
    stream = container.streams.video[0]
    timestamps = [packet.pts for packet in container.demux(stream) if packet.size]
    return timestamps_give_the_order(timestamps, stream.codec_context.has_b_frames, container.format.name)


# FFmpeg's decoders that read skip_frame for each packet (measured: h264, HEVC, MPEG-4 part 2 and MPEG-1/2 skip their
# unreferenced B-frames). Others ignore it (vp9) or read it once, when they open: libdav1d (AV1), opened while told
# to skip non-reference frames, skipped them for good, wanted ones included ("the decoder gave no picture").
SKIP_NONREF_DECODERS = ("h264", "hevc", "mpeg4", "mpeg1video", "mpeg2video")


class _DecodeOrderTimestamps(Exception):
    """The packets' timestamps follow the decode order, not the presentation order (h264 with B-frames in AVI)."""


def _decode_wanted(codec: av.CodecContext, packets: list[av.Packet], wanted: Sequence[int],
                   format_name: str) -> dict[int, np.ndarray]:
    """Frame number -> (H, W, 3) RGB array for the `wanted` frame numbers (presentation order) of `packets`
    (decode order, one frame each). Frames are numbered by their presentation timestamps, which lets whole
    stretches be skipped; where the timestamps cannot be trusted for that, the pictures are counted as they
    come out of a sequential decode instead (slower, always right)."""
    timestamps = [packet.pts for packet in packets]
    if not timestamps_give_the_order(timestamps, codec.has_b_frames, format_name):
        return _decode_sequentially(codec, packets, wanted)
    # Frame 0 is the first frame shown: hidden pre-roll (edit list) gets negative numbers, and no picture.
    first_shown = min((packet.pts for packet in packets if not packet.is_discard), default=None)
    pre_roll = (sum(packet.is_discard and packet.pts < first_shown for packet in packets)
                if first_shown is not None else 0)
    frame_of_pts = {pts: number - pre_roll for number, pts in enumerate(sorted(timestamps))}
    number = [frame_of_pts[packet.pts] for packet in packets]  # frame number of each packet, in decode order
    position = {frame: at for at, frame in enumerate(number)}  # and back
    keyframes = [at for at, packet in enumerate(packets) if packet.is_keyframe] or [0]
    keyframe_numbers = [number[at] for at in keyframes]
    # A wanted frame needs every packet from the last keyframe (in presentation order) at or before it up to
    # its own packet: the frames it references are among them (an open GOP's leading B-frames, decoded after
    # the next keyframe, fall inside the previous keyframe's stretch, which reaches past that keyframe).
    feed = [False] * len(packets)
    for frame in set(wanted):
        start = keyframes[max(bisect.bisect_right(keyframe_numbers, frame) - 1, 0)]
        for at in range(start, position[frame] + 1):
            feed[at] = True

    targets, out = set(wanted), {}
    last_out = -1  # pictures come out in presentation order: their frame numbers must grow
    skip_unwanted = "NONREF" if codec.name in SKIP_NONREF_DECODERS else "DEFAULT"

    def keep(decoded: list[av.VideoFrame]) -> None:
        nonlocal last_out
        for picture in decoded:
            frame = frame_of_pts.get(picture.pts)
            if frame is None or frame <= last_out:
                raise _DecodeOrderTimestamps  # a guard for what the check above cannot see
            last_out = frame
            if frame in targets:
                out[frame] = upright_rgb(picture)

    previous = None
    for at, packet in enumerate(packets):
        if not feed[at]:
            continue
        if previous is not None and at != previous + 1:  # a jump to a later keyframe: finish, then start afresh
            codec.skip_frame = "DEFAULT"
            keep(codec.decode(None))
            codec.flush_buffers()
            last_out = -1
        previous = at
        # Unwanted frames that no other frame references need not be decoded at all (FFmpeg skips them).
        codec.skip_frame = "DEFAULT" if number[at] in targets else skip_unwanted
        keep(codec.decode(packet))
        if len(out) == len(targets):
            return out
    codec.skip_frame = "DEFAULT"
    keep(codec.decode(None))  # the frames the decoder still holds back (B-frame reordering)
    return out


def _decode_sequentially(codec: av.CodecContext, packets: list[av.Packet], wanted: Sequence[int]) -> dict:
    """Decode from the first packet, numbering the pictures as they come out."""
    targets, out, last = set(wanted), {}, max(wanted)
    count = 0
    for packet in [*packets, None]:
        for picture in codec.decode(packet):
            if count in targets:
                out[count] = upright_rgb(picture)
            count += 1
        if count > last:
            break
    return out

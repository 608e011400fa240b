"""Decoding video files with decord, reading only the frames a clip needs."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import decord
import numpy as np
import torch


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
    # (~240 ms either way: the decode is the cost), and decord2 3.4 fails on some target sizes (a buffer size
    # mismatch) and does not keep the aspect ratio with -1. The transforms resize the few kept uint8 frames.
    try:
        return decord.VideoReader(path, ctx=decord.cpu(0), num_threads=num_threads)
    except Exception as error:  # decord raises DECORDError (or AssertionError) with FFmpeg's message
        raise VideoDecodeError(f"Could not open video {path}: {error}") from error


def read_video_info(path: str | os.PathLike) -> VideoInfo:
    """Frame count and average fps (container metadata) and frame size of a video.

    decord has no size query, so this decodes the first frame; the data loading path uses `decode_clip`,
    which gets the size from the frames it decodes anyway.
    """
    reader = _open(path)
    try:
        height, width = reader[0].shape[:2]
        return VideoInfo(num_frames=len(reader), fps=float(reader.get_avg_fps()), height=height, width=width)
    except Exception as error:
        raise VideoDecodeError(f"Could not read video {os.fspath(path)}: {error}") from error


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
) -> tuple[torch.Tensor, VideoInfo]:
    """Open a video once, choose frame indices from its length and fps, and decode just those frames.

    `choose_indices(num_frames, fps)` returns the indices to decode (in order, repeats allowed).
    Returns the frames as a uint8 tensor (T, H, W, C), RGB, and the video's info.
    """
    reader = _open(path, num_threads)
    num_frames, fps = len(reader), float(reader.get_avg_fps())
    indices = list(choose_indices(num_frames, fps))  # errors here are the caller's, not the file's
    try:
        frames = _get_batch(reader, indices)  # (T, H, W, C) uint8
    except IndexError:
        raise  # an out-of-range index is the caller's bug, not a bad file
    except Exception as error:
        raise VideoDecodeError(f"Could not decode frames {indices} of video {os.fspath(path)}: {error}") from error
    info = VideoInfo(num_frames=num_frames, fps=fps, height=frames.shape[1], width=frames.shape[2])
    return torch.from_numpy(frames), info


def decode_frames(path: str | os.PathLike, indices: Sequence[int], num_threads: int = 1) -> torch.Tensor:
    """Decode the frames at `indices` (in that order, repeats allowed). Returns uint8 (T, H, W, C), RGB."""
    frames, _ = decode_clip(path, lambda num_frames, fps: indices, num_threads)
    return frames

"""Decoding video files with decord, reading only the frames a clip needs."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import decord
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
    try:
        return decord.VideoReader(path, ctx=decord.cpu(0), num_threads=num_threads)
    except Exception as error:  # decord raises RuntimeError / DECORDError with FFmpeg's message
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
        frames = reader.get_batch(indices).asnumpy()  # (T, H, W, C) uint8
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

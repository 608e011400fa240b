"""The clip dataset, the video index it is built from, and the interface of dataset sources."""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch.utils.data import Dataset

from timesformer.data.sampling import dense_clip_frames, dense_clip_indices, segment_clip_indices
from timesformer.data.video import DECODERS, VideoDecodeError, decode_clip

SPLITS = ("train", "val", "test")


class VideoEntries(Sequence[tuple[str, int]]):
    """A split's (video path, label) entries in two arrays, not a list of tuples: DataLoader workers (forked) read
    them without copying. Reading a Python object writes its reference count, so each worker copied the pages of
    every entry it read: 57 MB per worker for Kinetics-400's 240k videos, per worker of every GPU."""

    def __init__(self, entries: Sequence[tuple[str | os.PathLike, int]]) -> None:
        pairs = [(os.fsencode(path), int(label)) for path, label in entries]  # (one pass: an iterator works too)
        self._offsets = np.cumsum([0, *(len(path) for path, _ in pairs)], dtype=np.int64)
        self._paths = b"".join(path for path, _ in pairs)  # (a name that is not UTF-8 keeps its bytes)
        self._labels = np.array([label for _, label in pairs], dtype=np.int64)

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index: int | slice) -> tuple[str, int] | list[tuple[str, int]]:  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"entry {index} of {len(self)}")
        start, end = self._offsets[index], self._offsets[index + 1]
        return os.fsdecode(self._paths[start:end]), int(self._labels[index])


@dataclass
class VideoIndex:
    """A dataset's class names and, per split ("train", "val", "test"), its (video path, label) entries.

    "test" may be the same list as "val" for datasets without a separate test split.
    """

    class_names: list[str]
    splits: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    # Per split, the annotated videos that are not on disk (left out of ``splits``; logged when the index is read)
    missing: dict[str, list[str]] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def split(self, name: str) -> list[tuple[str, int]]:
        if name not in self.splits:
            raise KeyError(f"The dataset has no split {name!r}; it has {sorted(self.splits)}")
        return self.splits[name]


@runtime_checkable
class VideoSource(Protocol):
    """Where a dataset's videos come from.

    `prepare()` does the one-off work (generating files, checking that they exist; never downloading). train.py,
    evaluate.py and predict.py call it in every process (the class list must be known before the model is built),
    so it must be safe to run in several processes at once. `load()` reads the index from disk, in every process.
    """

    def prepare(self) -> None: ...

    def load(self) -> VideoIndex: ...


SAMPLINGS = ("dense", "segment")


class VideoClipDataset(Dataset):
    """Clips of videos: {"video": uint8 (T, C, H, W), "label", "index", "view", "valid", "replaced", "padded",
    "decode_errors"}. "padded": the clip was longer than its video, whose last frame fills the rest.

    Training: one item per video, a random clip (dense: a random start; segment: a random frame per segment)
    through the random `transform`.
    Evaluation: `temporal_clips x spatial_crops` items (views) per video, item = index * views + view with
    view = temporal_clip * spatial_crops + spatial_crop, so that the views of a video are neighbours. "index" is
    the video's position in `entries` and "view" the view number: the LightningModule aggregates the views per
    video. The transform is an `EvalViewTransform` (or any callable when there is one spatial crop); a decoded
    and resized clip is kept for the next item, so the spatial crops of a clip decode it once (decoding is
    nearly all of the cost: ~100 ms for an 8 x 32 clip of a 640x360 h264 video, benchmarks/RESULTS.md part 3).

    Broken videos (unreadable, empty, truncated, not a video, deleted since the index was read): decoding is
    retried `decode_retries` times, then
    - training: another random video replaces it ("replaced": True), up to `max_replacements` in a row, after
      which the data is taken to be misconfigured and an error is raised;
    - evaluation: the item is a zero clip with "valid": False, so that the video is reported, not dropped.
    Every failed file is named in "decode_errors" ("<path>\t<error>" lines, "" when none) for the DataModule,
    which warns once per file, counts failures per epoch and stops a run when too many fail.

    `decoder`: "decord" or "pyav" (same frames; see timesformer/data/video.py). `repeated_augmentation` = k > 1
    (training only): each decoded clip is augmented k times with independent scale / crop / flip draws and the
    item's "video" is (k, T, C, H, W); the DataModule flattens those into the batch. Decoding is most of a
    clip's cost, so k clips cost little more than one (repeated augmentation, Hoffer et al. 2020).

    Randomness (clip start here, crop/scale/flip in the transform, replacements) comes from torch's global RNG.
    A training item may be asked for as ``(video index, seed)`` (what `ResumableSampler` yields): its draws then
    come from that seed alone, whichever process or worker reads it, and the global RNG is left as it was. A plain
    index draws from the global RNG as it stands.
    """

    def __init__(
        self,
        entries: Sequence[tuple[str, int]],
        num_frames: int,
        sampling_rate: int,
        transform: Callable[[torch.Tensor], torch.Tensor],
        training: bool,
        target_fps: float = 30.0,
        decode_threads: int = 1,
        sampling: str = "dense",
        temporal_clips: int = 1,
        spatial_crops: int = 1,
        decode_retries: int = 1,
        max_replacements: int = 10,
        decoder: str = "decord",
        repeated_augmentation: int = 1,
    ) -> None:
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling={sampling!r} is not supported; valid values: {', '.join(SAMPLINGS)}")
        if temporal_clips < 1 or spatial_crops < 1:
            raise ValueError(f"temporal_clips and spatial_crops must be >= 1, got {temporal_clips}, {spatial_crops}")
        if training and temporal_clips * spatial_crops != 1:
            raise ValueError("a training dataset has one random view per video (temporal_clips = spatial_crops = 1)")
        if not training and not hasattr(transform, "crop"):
            if spatial_crops > 1:
                raise TypeError("several spatial crops need an EvalViewTransform (with resize() and crop())")
            transform = _WholeClipTransform(transform)
        if decoder not in DECODERS:
            raise ValueError(f"decoder={decoder!r} is not supported; valid values: {', '.join(DECODERS)}")
        if repeated_augmentation < 1 or (repeated_augmentation > 1 and not training):
            raise ValueError(f"repeated_augmentation must be >= 1, and 1 for evaluation; got {repeated_augmentation}")
        if decode_retries < 0 or max_replacements < 0:
            raise ValueError(f"decode_retries and max_replacements must be >= 0, got {decode_retries}, "
                             f"{max_replacements}")
        self.entries = VideoEntries(entries)
        self.num_frames = num_frames
        self.sampling_rate = sampling_rate
        self.transform = transform
        self.training = training
        self.target_fps = target_fps
        self.decode_threads = decode_threads
        self.sampling = sampling
        self.temporal_clips = temporal_clips
        self.spatial_crops = spatial_crops
        self.decode_retries = decode_retries
        self.max_replacements = max_replacements
        self.decoder = decoder
        self.repeated_augmentation = repeated_augmentation
        # The last decoded clip: ((video index, temporal clip), resized uint8 frames or its error line, whether it
        # ran past the video's end). Views are neighbours and a batch goes to one DataLoader worker, so the spatial
        # crops of a clip hit it.
        self._cached: tuple[tuple[int, int], torch.Tensor | str, bool] | None = None
        self._ran_past_end = False  # the last clip chosen was longer than its video: its last frame is repeated

    @property
    def views_per_video(self) -> int:
        return self.temporal_clips * self.spatial_crops

    def __len__(self) -> int:
        return len(self.entries) * self.views_per_video

    def _choose_indices(self, video_num_frames: int, video_fps: float, temporal_clip: int | None) -> list[int]:
        if video_num_frames <= 0:
            raise VideoDecodeError("the video has no frames")
        if not (video_fps > 0 and math.isfinite(video_fps)):
            video_fps = self.target_fps  # broken container metadata: assume the usual rate rather than fail
        # A fresh stdlib RNG seeded from torch's: keeps sampling.py free of torch while the draws follow torch's
        # per-worker, per-epoch seeding.
        rng = random.Random(int(torch.randint(0, 2**62, ()))) if temporal_clip is None else None
        self._ran_past_end = video_num_frames < (
            self.num_frames if self.sampling == "segment"
            else dense_clip_frames(self.num_frames, self.sampling_rate, video_fps, self.target_fps))
        if self.sampling == "segment":
            return segment_clip_indices(video_num_frames, self.num_frames, temporal_clip, self.temporal_clips, rng)
        return dense_clip_indices(
            video_num_frames,
            self.num_frames,
            self.sampling_rate,
            video_fps,
            target_fps=self.target_fps,
            clip_index=temporal_clip,
            num_clips=self.temporal_clips,
            rng=rng,
        )

    def _decode(self, path: str, temporal_clip: int | None) -> torch.Tensor:
        """uint8 (T, C, H, W); tries `1 + decode_retries` times (a training retry draws another clip, which may
        avoid a broken stretch of the file). A missing file is not retried."""
        for attempt in range(self.decode_retries + 1):
            try:
                frames, _ = decode_clip(path, lambda n, fps: self._choose_indices(n, fps, temporal_clip),
                                        num_threads=self.decode_threads, decoder=self.decoder)
                return frames.permute(0, 3, 1, 2)  # (T, C, H, W), the layout torchvision transforms expect
            except VideoDecodeError:
                if attempt == self.decode_retries:
                    raise
        raise AssertionError("unreachable")

    def __getitem__(self, item: int | tuple[int, int]) -> dict:
        if isinstance(item, tuple):  # (video index, seed): the draws of this item follow from its seed
            if not self.training:
                raise TypeError("seeded items are for training datasets; an evaluation view is deterministic")
            video_index, seed = item
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return self._training_item(int(video_index))
        video_index, view = divmod(item, self.views_per_video)
        if self.training:
            return self._training_item(video_index)
        return self._evaluation_item(video_index, view)

    def _training_item(self, video_index: int) -> dict:
        errors: list[str] = []
        candidate = video_index
        for _ in range(self.max_replacements + 1):
            path, label = self.entries[candidate]
            try:
                frames = self._decode(path, temporal_clip=None)
            except (VideoDecodeError, FileNotFoundError) as error:
                errors.append(_error_line(path, error))
                candidate = int(torch.randint(len(self.entries), ()))
                continue
            if self.repeated_augmentation == 1:
                video = self.transform(frames)
            else:  # one decode, several draws of scale / crop / flip: (repeated_augmentation, T, C, H, W)
                video = torch.stack([self.transform(frames) for _ in range(self.repeated_augmentation)])
            return {"video": video, "label": label, "index": candidate, "view": 0, "valid": True,
                    "replaced": candidate != video_index, "padded": self._ran_past_end,
                    "decode_errors": "\n".join(errors)}
        raise RuntimeError(
            f"{len(errors)} videos in a row could not be decoded; the data looks misconfigured (wrong data.root, "
            f"files that are not videos, a codec FFmpeg lacks?). The last: {errors[-1].replace(chr(9), ': ')}. "
            "`python -m timesformer.data.check data=... data.root=...` lists every unreadable video."
        )

    def _evaluation_item(self, video_index: int, view: int) -> dict:
        path, label = self.entries[video_index]
        temporal_clip, spatial_crop = divmod(view, self.spatial_crops)
        key = (video_index, temporal_clip)
        if self._cached is None or self._cached[0] != key:
            try:
                self._cached = (key, self.transform.resize(self._decode(path, temporal_clip)), self._ran_past_end)
            except (VideoDecodeError, FileNotFoundError) as error:
                self._cached = (key, _error_line(path, error), False)  # the views of this clip fail alike
        resized, padded = self._cached[1], self._cached[2]
        if isinstance(resized, str):
            video = torch.zeros(self.num_frames, 3, *self._crop_shape(), dtype=torch.uint8)
            valid, errors = False, resized
        else:
            video, valid, errors = self.transform.crop(resized, spatial_crop), True, ""
        return {"video": video, "label": label, "index": video_index, "view": view, "valid": valid,
                "replaced": False, "padded": padded, "decode_errors": errors}

    def _crop_shape(self) -> tuple[int, int]:
        size = getattr(self.transform, "crop_size", None)
        if size is None:  # a plain transform: ask it for the shape of a small black clip
            return tuple(self.transform.crop(torch.zeros(1, 3, 64, 64, dtype=torch.uint8)).shape[-2:])
        return size, size


class _WholeClipTransform:
    """A plain evaluation transform (frames in, one view out) in the resize() / crop() steps of
    `EvalViewTransform`: resize() keeps the frames, crop() applies the transform."""

    def __init__(self, transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.transform = transform

    def resize(self, frames: torch.Tensor) -> torch.Tensor:
        return frames

    def crop(self, frames: torch.Tensor, crop_index: int = 0) -> torch.Tensor:
        return self.transform(frames)


def _error_line(path: str, error: Exception) -> str:
    """One "<path>\t<reason>" line (FFmpeg's messages can span lines; the path is named once, up front)."""
    if isinstance(error, FileNotFoundError):
        return f"{path}\tthe file does not exist (any more)"
    reason = " ".join(str(error).split()).replace(path, os.path.basename(path))
    return f"{path}\t{reason}"

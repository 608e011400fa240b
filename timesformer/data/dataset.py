"""The clip dataset, the video index it is built from, and the interface of dataset sources."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch.utils.data import Dataset

from timesformer.data.sampling import dense_clip_indices
from timesformer.data.video import decode_clip

SPLITS = ("train", "val", "test")


@dataclass
class VideoIndex:
    """A dataset's class names and, per split ("train", "val", "test"), its (video path, label) entries.

    "test" may be the same list as "val" for datasets without a separate test split.
    """

    class_names: list[str]
    splits: dict[str, list[tuple[str, int]]] = field(default_factory=dict)

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

    `prepare()` does the one-off work (generating files, checking that they exist; never downloading) and is
    run once, on rank 0 only. `load()` reads the index from disk and is run in every process.
    """

    def prepare(self) -> None: ...

    def load(self) -> VideoIndex: ...


class VideoClipDataset(Dataset):
    """One dense clip per video: {"video": float32 (T, C, H, W), "label": int, "index": int}.

    `index` is the position of the video in `entries`, so that evaluation can gather several views of one
    video. Training clips start at a random frame; evaluation clips are the centred clip.

    Randomness (clip start here, crop/scale/flip in the transform) comes from torch's global RNG, which the
    DataLoader seeds per worker and per epoch from its own generator (`VideoDataModule(seed=...)` seeds that):
    workers draw different clips, every epoch draws new ones, and a run is reproducible. With
    num_workers=0 the draws happen in the main process; seed it with `lightning.seed_everything`.
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
    ) -> None:
        self.entries = [(str(path), int(label)) for path, label in entries]
        self.num_frames = num_frames
        self.sampling_rate = sampling_rate
        self.transform = transform
        self.training = training
        self.target_fps = target_fps
        self.decode_threads = decode_threads

    def __len__(self) -> int:
        return len(self.entries)

    def _choose_indices(self, video_num_frames: int, video_fps: float) -> list[int]:
        if self.training:
            # A fresh stdlib RNG seeded from torch's: keeps sampling.py free of torch while the draws follow
            # torch's per-worker, per-epoch seeding.
            rng = random.Random(int(torch.randint(0, 2**62, ())))
            clip_index = None
        else:
            rng, clip_index = None, 0
        return dense_clip_indices(
            video_num_frames,
            self.num_frames,
            self.sampling_rate,
            video_fps,
            target_fps=self.target_fps,
            clip_index=clip_index,
            num_clips=1,
            rng=rng,
        )

    def __getitem__(self, index: int) -> dict:
        path, label = self.entries[index]
        frames, _ = decode_clip(path, self._choose_indices, num_threads=self.decode_threads)  # (T, H, W, C)
        frames = frames.permute(0, 3, 1, 2)  # (T, C, H, W), the layout torchvision transforms expect
        video = self.transform(frames)  # float32 (T, C, crop, crop)
        return {"video": video, "label": label, "index": index}

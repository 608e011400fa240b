"""Clip transforms: uint8 (T, C, H, W) in, uint8 (T, C, crop, crop) out; `normalize` makes the model's input.

Clips stay uint8 until they reach the device the model runs on, where `normalize` turns them into float32
((x / 255 - mean) / std; `VideoDataModule.on_after_batch_transfer` calls it). A uint8 clip is a quarter of the
bytes through the DataLoader's collate, shared memory, pinned memory and the host-to-device copy, and a worker
spends no time normalising. Per 8 x 224 clip on one core that saves 3.4 ms of normalising and 3.1 ms of
handing the batch over, of ~60 ms (benchmarks/RESULTS.md, part 3); a GPU normalises in microseconds.

Built on torchvision.transforms.v2. A plain (T, C, H, W) tensor is treated by v2 as a batch of T images
and each random transform samples its parameters once per call, so every frame of a clip gets the same
scale, crop and flip (tests/test_data.py checks this): the motion inside the clip is left intact.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torchvision.transforms import v2

# The original TimeSformer training statistics (also in the Hub checkpoints' preprocessing configs).
DEFAULT_MEAN = (0.45, 0.45, 0.45)
DEFAULT_STD = (0.225, 0.225, 0.225)


def check_mean_std(mean: Sequence[float], std: Sequence[float]) -> tuple[list[float], list[float]]:
    """mean and std as lists of 3 floats; an error for any other length or a std <= 0."""
    mean, std = [float(m) for m in mean], [float(s) for s in std]
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (one per RGB channel), got mean={mean} std={std}")
    if any(s <= 0 for s in std):
        raise ValueError(f"std values must be positive, got std={std}")
    return mean, std


def _check_crop_size(crop_size: int) -> None:
    if crop_size < 1:
        raise ValueError(f"crop_size must be a positive number of pixels, got {crop_size}")


class RandomShortSide(v2.RandomShortestSize):
    """Scales the short side to a size drawn from `min_size`, exactly; the long side keeps the aspect ratio.

    torchvision's RandomShortestSize scales both sides by size / short side and truncates, which for many frame
    sizes gives one pixel less (318 x 424 to 224: 223 x 298): a crop as large as the smallest size then failed in
    the DataLoader worker. The size is drawn as RandomShortestSize draws it, so seeded runs keep their draws.
    """

    def make_params(self, flat_inputs: list) -> dict:
        height, width = v2.query_size(flat_inputs)
        side = self.min_size[int(torch.randint(len(self.min_size), ()))]
        if height <= width:
            return {"size": (side, int(width * side / height))}
        return {"size": (int(height * side / width), side)}


def train_transform(
    crop_size: int,
    short_side_range: Sequence[int] = (256, 320),
    horizontal_flip: bool = True,
) -> v2.Transform:
    """Random short-side scale in `short_side_range` (inclusive), random square crop, optional flip (uint8 out).

    Turn `horizontal_flip` off for data whose labels depend on left/right (e.g. the synthetic motion
    dataset, or Something-Something "pushing something from left to right").
    """
    _check_crop_size(crop_size)
    low, high = (int(side) for side in short_side_range)
    if not 0 < low <= high:
        raise ValueError(f"short_side_range must be (low, high) with 0 < low <= high, got {tuple(short_side_range)}")
    if crop_size > low:
        raise ValueError(
            f"crop_size={crop_size} is larger than the smallest short side {low} of short_side_range; "
            f"the crop would not fit"
        )
    steps: list[v2.Transform] = [
        RandomShortSide(list(range(low, high + 1))),  # one short side for the whole clip
        v2.RandomCrop(crop_size),
    ]
    if horizontal_flip:
        steps.append(v2.RandomHorizontalFlip(p=0.5))
    return v2.Compose(steps)


def eval_transform(crop_size: int) -> v2.Transform:
    """Short side to `crop_size`, centre crop (uint8 out). Deterministic."""
    _check_crop_size(crop_size)
    return v2.Compose([v2.Resize(crop_size, antialias=True), v2.CenterCrop(crop_size)])  # int: the short side


def normalize(video: torch.Tensor, mean: Sequence[float] = DEFAULT_MEAN,
              std: Sequence[float] = DEFAULT_STD) -> torch.Tensor:
    """uint8 clips (..., C, H, W), on any device -> float32 (x / 255 - mean) / std, the model's input.

    torchvision's ``ToDtype(scale=True)`` and ``Normalize``, bit for bit, with the mean and std tensors made once
    per device: a tensor built on a GPU from Python numbers is a blocking copy, i.e. a host sync every batch.
    """
    if video.dtype != torch.uint8:
        raise TypeError(f"normalize takes uint8 clips (what the transforms return), got {video.dtype}")
    mean_t, std_t = _statistics(*(tuple(values) for values in check_mean_std(mean, std)), video.device)
    return v2.functional.to_dtype(video, torch.float32, scale=True).sub_(mean_t).div_(std_t)


@functools.lru_cache(maxsize=16)
def _statistics(mean: tuple[float, ...], std: tuple[float, ...],
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """mean and std as float32 (C, 1, 1) tensors on ``device``."""
    return (torch.tensor(mean, dtype=torch.float32, device=device).view(-1, 1, 1),
            torch.tensor(std, dtype=torch.float32, device=device).view(-1, 1, 1))


def spatial_crop_offset(length: int, crop_size: int, crop_index: int, num_crops: int) -> int:
    """Where crop `crop_index` of `num_crops` starts along a side of `length` pixels: evenly spread from one
    end to the other (0, centre, end for 3 crops); the centre for one crop."""
    if num_crops == 1:
        return int(round((length - crop_size) / 2.0))  # as torchvision's CenterCrop rounds
    return round((length - crop_size) * crop_index / (num_crops - 1))


def eval_short_side(crop_size: int, num_crops: int, train_short_side_min: int) -> int:
    """The short side evaluation views are cut from, as the original (PySlowFast) tests: several crops from the
    short side at the crop size (together they span the frame), one centre crop from the short side at the
    smallest training scale (256 for 224 crops: the scale the training crops were cut at)."""
    return int(crop_size) if num_crops > 1 else int(train_short_side_min)


class EvalViewTransform:
    """Evaluation views: short side to `short_side` (default `crop_size`), then crop `crop_index` of `num_crops`
    square crops spread along the long side (left/centre/right for landscape video, top/centre/bottom for
    portrait), centred across the short side.

    Split in two steps so that a dataset can resize a decoded clip once and cut all its crops from it:
    `resize(frames)` and `crop(resized, crop_index)`, uint8 in and out.
    With `num_crops=1` and the default short side it equals `eval_transform` (the centre crop).
    """

    def __init__(self, crop_size: int, num_crops: int = 1, short_side: int | None = None) -> None:
        _check_crop_size(crop_size)
        if num_crops < 1:
            raise ValueError(f"num_crops must be >= 1, got {num_crops}")
        self.crop_size = int(crop_size)
        self.num_crops = int(num_crops)
        self.short_side = self.crop_size if short_side is None else int(short_side)
        if self.short_side < self.crop_size:
            raise ValueError(f"the evaluation short side ({self.short_side}) is smaller than the crop size "
                             f"({self.crop_size})")
        self._resize = v2.Resize(self.short_side, antialias=True)  # an int resizes the short side

    def resize(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 (T, C, H, W) -> uint8 (T, C, H', W') with min(H', W') == short_side."""
        return self._resize(frames)

    def crop(self, resized: torch.Tensor, crop_index: int = 0) -> torch.Tensor:
        """A resized clip -> crop `crop_index` (T, C, crop_size, crop_size)."""
        if not 0 <= crop_index < self.num_crops:
            raise ValueError(f"crop_index must be in [0, {self.num_crops - 1}], got {crop_index}")
        height, width = resized.shape[-2:]
        size = self.crop_size
        # centred across the short side
        top, left = spatial_crop_offset(height, size, 0, 1), spatial_crop_offset(width, size, 0, 1)
        if width >= height:
            left = spatial_crop_offset(width, size, crop_index, self.num_crops)
        else:
            top = spatial_crop_offset(height, size, crop_index, self.num_crops)
        return resized[..., top : top + size, left : left + size]

    def __call__(self, frames: torch.Tensor, crop_index: int = 0) -> torch.Tensor:
        return self.crop(self.resize(frames), crop_index)

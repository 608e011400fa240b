"""Clip transforms: uint8 (T, C, H, W) in, normalised float32 (T, C, crop, crop) out.

Built on torchvision.transforms.v2. A plain (T, C, H, W) tensor is treated by v2 as a batch of T images
and each random transform samples its parameters once per call, so every frame of a clip gets the same
scale, crop and flip (tests/test_data.py checks this): the motion inside the clip is left intact.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import v2

# The original TimeSformer training statistics (also in the Hub checkpoints' preprocessing configs).
DEFAULT_MEAN = (0.45, 0.45, 0.45)
DEFAULT_STD = (0.225, 0.225, 0.225)


def _check_mean_std(mean: Sequence[float], std: Sequence[float]) -> tuple[list[float], list[float]]:
    mean, std = [float(m) for m in mean], [float(s) for s in std]
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (one per RGB channel), got mean={mean} std={std}")
    if any(s <= 0 for s in std):
        raise ValueError(f"std values must be positive, got std={std}")
    return mean, std


def _check_crop_size(crop_size: int) -> None:
    if crop_size < 1:
        raise ValueError(f"crop_size must be a positive number of pixels, got {crop_size}")


def train_transform(
    crop_size: int,
    short_side_range: Sequence[int] = (256, 320),
    horizontal_flip: bool = True,
    mean: Sequence[float] = DEFAULT_MEAN,
    std: Sequence[float] = DEFAULT_STD,
) -> v2.Transform:
    """Random short-side scale in `short_side_range` (inclusive), random square crop, optional flip, normalise.

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
    mean, std = _check_mean_std(mean, std)
    steps: list[v2.Transform] = [
        # Picks one short side for the whole clip; the long side keeps the aspect ratio.
        v2.RandomShortestSize(min_size=list(range(low, high + 1)), antialias=True),
        v2.RandomCrop(crop_size),
    ]
    if horizontal_flip:
        steps.append(v2.RandomHorizontalFlip(p=0.5))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=mean, std=std)]
    return v2.Compose(steps)


def eval_transform(
    crop_size: int,
    mean: Sequence[float] = DEFAULT_MEAN,
    std: Sequence[float] = DEFAULT_STD,
) -> v2.Transform:
    """Short side to `crop_size`, centre crop, normalise. Deterministic."""
    _check_crop_size(crop_size)
    mean, std = _check_mean_std(mean, std)
    return v2.Compose(
        [
            v2.Resize(crop_size, antialias=True),  # an int resizes the short side
            v2.CenterCrop(crop_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=mean, std=std),
        ]
    )

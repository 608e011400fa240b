"""The Lightning DataModule: a dataset source plus clip sampling and transforms."""

from __future__ import annotations

from collections.abc import Sequence

import lightning
import torch
from torch.utils.data import DataLoader

from timesformer.data.dataset import SPLITS, VideoClipDataset, VideoIndex, VideoSource
from timesformer.data.transforms import DEFAULT_MEAN, DEFAULT_STD, eval_transform, train_transform


class VideoDataModule(lightning.LightningDataModule):
    """Dense-clip video classification data from any source (an object with `prepare()` and `load()`).

    Batches are dicts: "video" float32 (B, T, C, H, W), "label" int64 (B,), "index" int64 (B,) (the video's
    position in its split, to gather several views per video).

    Training: a random clip of `num_frames` frames `sampling_rate` apart (at `target_fps`), short side
    jittered in `train_short_side_range`, random `image_size` crop, optional horizontal flip.
    Validation / test / predict: the centred clip, short side to `image_size`, centre crop.

    `seed` seeds the training loader's shuffling and its workers' RNGs (different per worker and epoch,
    reproducible across runs). Sequence arguments accept lists (as Hydra passes them).
    """

    def __init__(
        self,
        source: VideoSource,
        num_frames: int,
        sampling_rate: int,
        image_size: int,
        batch_size: int,
        num_workers: int = 2,
        train_short_side_range: Sequence[int] = (256, 320),
        horizontal_flip: bool = True,
        mean: Sequence[float] = DEFAULT_MEAN,
        std: Sequence[float] = DEFAULT_STD,
        target_fps: float = 30.0,
        decode_threads: int = 1,
        pin_memory: bool = False,
        persistent_workers: bool | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not (callable(getattr(source, "prepare", None)) and callable(getattr(source, "load", None))):
            raise TypeError(f"VideoDataModule source must have prepare() and load() methods, got {source!r}")
        for name, value in (
            ("num_frames", num_frames),
            ("sampling_rate", sampling_rate),
            ("image_size", image_size),
            ("batch_size", batch_size),
            ("decode_threads", decode_threads),
        ):
            if value < 1:
                raise ValueError(f"VideoDataModule {name} must be >= 1, got {value}")
        if num_workers < 0:
            raise ValueError(f"VideoDataModule num_workers must be >= 0, got {num_workers}")
        if target_fps <= 0:
            raise ValueError(f"VideoDataModule target_fps must be positive, got {target_fps}")
        if len(train_short_side_range) != 2:
            raise ValueError(
                f"VideoDataModule train_short_side_range must be [low, high], got {list(train_short_side_range)}"
            )
        low, high = (int(side) for side in train_short_side_range)
        if not 0 < low <= high:
            raise ValueError(
                f"VideoDataModule train_short_side_range must be [low, high] with 0 < low <= high, got {[low, high]}"
            )
        if image_size > low:
            raise ValueError(
                f"VideoDataModule image_size={image_size} is larger than train_short_side_range[0]={low}: "
                "training crops would not fit. Lower image_size or raise train_short_side_range."
            )
        if persistent_workers is None:
            persistent_workers = num_workers > 0
        if persistent_workers and num_workers == 0:
            raise ValueError("VideoDataModule persistent_workers=True needs num_workers > 0")

        self.save_hyperparameters(ignore=["source"])
        self.source = source
        self.num_frames = int(num_frames)
        self.sampling_rate = int(sampling_rate)
        self.image_size = int(image_size)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.train_short_side_range = (low, high)
        self.horizontal_flip = bool(horizontal_flip)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.target_fps = float(target_fps)
        self.decode_threads = int(decode_threads)
        self.pin_memory = bool(pin_memory)
        self.persistent_workers = bool(persistent_workers)
        self.seed = int(seed)

        # Build the transforms now so that bad mean/std fail at construction, not in a worker.
        self.train_transform = train_transform(
            self.image_size, self.train_short_side_range, self.horizontal_flip, self.mean, self.std
        )
        self.eval_transform = eval_transform(self.image_size, self.mean, self.std)
        # The training loader's own generator: shuffling and worker seeds follow `seed` and advance every
        # epoch. Kept here so that a re-created loader continues the sequence instead of repeating it.
        self.train_generator = torch.Generator().manual_seed(self.seed)
        self.index: VideoIndex | None = None
        self.datasets: dict[str, VideoClipDataset] = {}

    def state_dict(self) -> dict:
        """Saved in Lightning checkpoints: a resumed run continues the shuffling sequence, not restarts it."""
        return {"train_generator": self.train_generator.get_state()}

    def load_state_dict(self, state_dict: dict) -> None:
        if "train_generator" in state_dict:
            self.train_generator.set_state(state_dict["train_generator"])

    def prepare_data(self) -> None:
        self.source.prepare()  # Lightning runs this once, on rank 0 only

    def _load_index(self) -> VideoIndex:
        if self.index is None:
            self.index = self.source.load()
        return self.index

    @property
    def class_names(self) -> list[str]:
        """The dataset's class names (loads the index if `setup` has not run; `prepare_data` must have)."""
        return list(self._load_index().class_names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def setup(self, stage: str | None = None) -> None:
        index = self._load_index()
        for split in SPLITS:
            if split in index.splits and split not in self.datasets:
                training = split == "train"
                self.datasets[split] = VideoClipDataset(
                    index.splits[split],
                    num_frames=self.num_frames,
                    sampling_rate=self.sampling_rate,
                    transform=self.train_transform if training else self.eval_transform,
                    training=training,
                    target_fps=self.target_fps,
                    decode_threads=self.decode_threads,
                )

    def _dataset(self, split: str) -> VideoClipDataset:
        if split not in self.datasets:
            if self.index is None:
                raise RuntimeError(f"VideoDataModule.setup() must run before the {split} dataloader is requested")
            raise RuntimeError(f"The dataset has no {split!r} split (it has {sorted(self.index.splits)})")
        return self.datasets[split]

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        dataset = self._dataset(split)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            drop_last=False,
            generator=self.train_generator if shuffle else None,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

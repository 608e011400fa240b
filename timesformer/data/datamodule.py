"""The Lightning DataModule: a dataset source plus clip sampling, evaluation views, transforms, and the
bookkeeping of videos that fail to decode."""

from __future__ import annotations

import functools
import gc
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import lightning
import torch
from lightning.fabric.utilities.seed import pl_worker_init_function
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler

from timesformer.data.dataset import SAMPLINGS, SPLITS, VideoClipDataset, VideoIndex, VideoSource
from timesformer.data.resumable import ResumableDataLoader, ResumableSampler
from timesformer.data.transforms import (
    DEFAULT_MEAN,
    DEFAULT_STD,
    EvalViewTransform,
    check_mean_std,
    eval_short_side,
    normalize,
    train_transform,
)
from timesformer.data.video import DECODERS

log = logging.getLogger(__name__)

# More clips than this longer than their videos (their last frame repeated) are warned about, once per stage.
PADDED_WARNING_FRACTION = 0.2
# The failure fraction is judged once this many videos (or the whole split, if smaller) have been read in an
# epoch: a few unlucky early batches must not stop a run.
MIN_VIDEOS_READ = 100


class DecodeFailureMonitor:
    """Counts the videos that fail to decode, per stage and epoch, in the main process (it sees every worker's
    batches): names each failed file once, logs a count per epoch, and raises when more than
    `max_failed_fraction` of the videos read in a training or validation epoch fail."""

    def __init__(self, max_failed_fraction: float, clip: str = "") -> None:
        self.max_failed_fraction = max_failed_fraction
        self.clip = clip  # what a clip spans, for the padded-clips warning
        self.reported: set[str] = set()
        self.period: tuple[str, int] | None = None  # (stage, epoch) being counted
        self.failed = self.read = self.padded = self.items = 0
        self.padding_reported: set[str] = set()  # stages warned about clips longer than their videos

    def update(self, stage: str, epoch: int, error_lines: Sequence[str], num_items: int, split_size: int,
               padded: int = 0) -> None:
        """One batch of `stage` ("train", "val", "sanity_check", "test") from a split of `split_size`
        videos: its "decode_errors" lines, number of items and how many of them were clips longer than their
        video (``padded``). A training item may have replaced failed videos (each an extra read); an evaluation
        item that failed is a zero clip (one read)."""
        if self.period != (stage, epoch):
            self.finish_period()
            self.period, self.failed, self.read, self.padded, self.items = (stage, epoch), 0, 0, 0, 0
        self.padded += padded
        self.items += num_items
        failures = [line.split("\t", 1) for text in error_lines for line in text.splitlines() if line]
        self.failed += len(failures)
        self.read += num_items + (len(failures) if stage == "train" else 0)
        what = "replaced by another video" if stage == "train" else "evaluated as failed (a zero clip)"
        for path, *reason in failures:
            if path not in self.reported:
                self.reported.add(path)
                log.warning("Could not decode %s (%s); %s. Further failures of this file are not reported.",
                            path, reason[0] if reason else "?", what)
        judged = stage in ("train", "val", "sanity_check") and self.read >= min(MIN_VIDEOS_READ, split_size)
        if judged and self.failed > self.max_failed_fraction * self.read:
            raise RuntimeError(
                f"{self.failed} of the {self.read} {'videos' if stage == 'train' else 'views'} read in this {stage} "
                "epoch could not be decoded, more than "
                f"data.max_failed_fraction={self.max_failed_fraction}: the data looks misconfigured (wrong "
                "data.root, partial download, files that are not videos, a codec FFmpeg lacks?). The files are "
                "named in the warnings above; `python -m timesformer.data.check data=... data.root=...` lists every "
                "unreadable video and can write a clean list (--write-clean)."
            )

    def finish_period(self) -> None:
        if self.period is not None and self.failed:
            stage, epoch = self.period
            what = "videos" if stage == "train" else "views"
            log.warning("%s, epoch %d: %d of %d %s read could not be decoded", stage, epoch, self.failed, self.read,
                        what)
        if self.period is not None and self.padded > PADDED_WARNING_FRACTION * self.items:
            stage, epoch = self.period
            if stage not in self.padding_reported:  # once per stage: the videos do not get longer
                self.padding_reported.add(stage)
                log.warning("%s, epoch %d: %d of %d clips were longer than their videos (%s), which repeat their "
                            "last frame to fill them: lower data.sampling_rate, or sample whole videos with "
                            "data.sampling=segment", stage, epoch, self.padded, self.items, self.clip)
        self.period = None


class VideoDataModule(lightning.LightningDataModule):
    """Video classification data from any source (an object with `prepare()` and `load()`, or a factory of one
    that takes `root=` and, with `split` set, `split=`: the real-dataset configs pass data.root this way).

    Batches are dicts: "video" (B, T, C, H, W), "label" int64 (B,), "index" int64 (B,) (the video's
    position in its split), "view" int64 (B,) (the view of that video), "valid" bool (B,) (False: the video
    could not be decoded, "video" is zeros), "replaced" bool (B,) (training: a broken video was replaced by
    another one), "repeated" True (only in the evaluation batches of a process that runs a view again so as to
    have a batch, see `WholeVideoSampler`: they count nowhere). `on_before_batch_transfer` takes the names of the
    failed files out of the batch (see `DecodeFailureMonitor`). "video" leaves the loaders as uint8 and
    `on_after_batch_transfer` normalises it with `mean` and `std` on the device (float32): a quarter of the bytes
    to move, and no work in the workers.
    Outside a Trainer, call `timesformer.data.normalize(video, datamodule.mean, datamodule.std)`.

    Clips: `sampling="dense"`: `num_frames` frames `sampling_rate` apart at `target_fps` (scaled by the video's
    real fps); `"segment"`: one frame from each of `num_frames` equal segments of the whole video (TSN).
    Training: a random clip, short side jittered in `train_short_side_range`, random `image_size` crop,
    optional horizontal flip.
    Test: `test_temporal_clips x test_spatial_crops` views per video: evenly spread clips, crops spread
    along the long side (left/centre/right) of the short side scaled to `image_size`; a single (centre) crop is
    cut at `train_short_side_range[0]` instead, as in the original (`eval_short_side`). Validation: the same views
    with `val_views_full`, else the centre clip and crop only.

    Decoding: `decoder` "decord" (default) or "pyav", the same frames either way (pyav skips decoding unwanted
    non-reference frames: faster on h264 with B-frames; benchmarks/RESULTS.md part 3). `repeated_augmentation`
    = k: each decoded training video gives k clips with their own scale / crop / flip; `batch_size` still counts
    clips (batch_size / k videos per batch), so it must be a multiple of k.

    `seed` decides the training order and every training clip's draws (a new order and new draws each epoch):
    a run is reproducible whatever the number of workers and processes, and a checkpoint resumes it where it
    stopped, mid-epoch too (`timesformer/data/resumable.py`). Sequence arguments accept lists (as Hydra passes
    them).
    """

    def __init__(
        self,
        source: VideoSource | Callable[..., VideoSource],
        num_frames: int,
        sampling_rate: int,
        image_size: int,
        batch_size: int,
        num_workers: int = 8,
        train_short_side_range: Sequence[int] = (256, 320),
        horizontal_flip: bool = True,
        mean: Sequence[float] = DEFAULT_MEAN,
        std: Sequence[float] = DEFAULT_STD,
        target_fps: float = 30.0,
        decode_threads: int = 1,
        pin_memory: bool | None = None,
        persistent_workers: bool | None = None,
        seed: int = 0,
        root: str | os.PathLike | None = None,
        split: int | None = None,
        sampling: str = "dense",
        test_temporal_clips: int = 1,
        test_spatial_crops: int = 3,
        val_views_full: bool = False,
        decode_retries: int = 1,
        max_failed_fraction: float = 0.05,
        decoder: str = "decord",
        repeated_augmentation: int = 1,
    ) -> None:
        super().__init__()
        source = self._build_source(source, root, split)
        for name, value in (
            ("num_frames", num_frames),
            ("sampling_rate", sampling_rate),
            ("image_size", image_size),
            ("batch_size", batch_size),
            ("decode_threads", decode_threads),
            ("test_temporal_clips", test_temporal_clips),
            ("test_spatial_crops", test_spatial_crops),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:  # 2.5 was truncated to 2
                raise ValueError(f"data.{name} must be an integer >= 1, got {value!r}" + (
                    " (model.num_frames / model.image_size set it)" if name in ("num_frames", "image_size") else ""))
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {num_workers}")
        for name, value, optional in (("horizontal_flip", horizontal_flip, False),
                                      ("val_views_full", val_views_full, False), ("pin_memory", pin_memory, True),
                                      ("persistent_workers", persistent_workers, True)):
            if not isinstance(value, bool) and not (optional and value is None):  # "no" would count as true
                raise ValueError(f"data.{name} must be true or false{' (or null)' if optional else ''}, "
                                 f"got {value!r}")
        if target_fps <= 0:
            raise ValueError(f"data.target_fps must be positive, got {target_fps}")
        if len(train_short_side_range) != 2:
            raise ValueError(
                f"data.train_short_side_range must be [low, high], got {list(train_short_side_range)}"
            )
        low, high = (int(side) for side in train_short_side_range)
        if not 0 < low <= high:
            raise ValueError(
                f"data.train_short_side_range must be [low, high] with 0 < low <= high, got {[low, high]}"
            )
        if image_size > low:
            raise ValueError(
                f"data.image_size={image_size} is larger than train_short_side_range[0]={low}: "
                "training crops would not fit. Lower image_size or raise train_short_side_range."
            )
        if sampling not in SAMPLINGS:
            raise ValueError(f"data.sampling={sampling!r} is not supported; valid values: "
                             f"{', '.join(SAMPLINGS)}")
        if decoder not in DECODERS:
            raise ValueError(f"data.decoder={decoder!r} is not supported; valid values: "
                             f"{', '.join(DECODERS)}")
        if repeated_augmentation < 1 or batch_size % repeated_augmentation:
            raise ValueError(
                f"data.repeated_augmentation={repeated_augmentation} must be >= 1 and divide "
                f"batch_size={batch_size}: a training batch is batch_size clips, repeated_augmentation from each "
                "decoded video"
            )
        if decode_retries < 0:
            raise ValueError(f"data.decode_retries must be >= 0, got {decode_retries}")
        if not 0 <= max_failed_fraction <= 1:
            raise ValueError(f"data.max_failed_fraction must be in [0, 1], got {max_failed_fraction}")
        if pin_memory is None:
            pin_memory = torch.cuda.is_available()
        if persistent_workers is None:
            persistent_workers = num_workers > 0
        if persistent_workers and num_workers == 0:
            raise ValueError("data.persistent_workers=True needs num_workers > 0")

        self.save_hyperparameters(ignore=["source"])
        self.source = source
        self.num_frames = int(num_frames)
        self.sampling_rate = int(sampling_rate)
        self.image_size = int(image_size)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.train_short_side_range = (low, high)
        self.horizontal_flip = bool(horizontal_flip)
        self.mean, self.std = (tuple(values) for values in check_mean_std(mean, std))
        self.target_fps = float(target_fps)
        self.decode_threads = int(decode_threads)
        self.pin_memory = bool(pin_memory)
        self.persistent_workers = bool(persistent_workers)
        self.seed = int(seed)
        self.sampling = sampling
        self.test_temporal_clips = int(test_temporal_clips)
        self.test_spatial_crops = int(test_spatial_crops)
        self.val_views_full = bool(val_views_full)
        self.decode_retries = int(decode_retries)
        self.decoder = decoder
        self.repeated_augmentation = int(repeated_augmentation)
        clip = (f"one frame from each of {self.num_frames} segments" if self.sampling == "segment" else
                f"{self.num_frames} frames {self.sampling_rate} apart at {self.target_fps:g} fps, "
                f"{self.num_frames * self.sampling_rate / self.target_fps:.1f} s")
        self.failures = DecodeFailureMonitor(float(max_failed_fraction), clip)

        self.train_transform = train_transform(self.image_size, self.train_short_side_range, self.horizontal_flip)
        self.index: VideoIndex | None = None
        self.datasets: dict[str, VideoClipDataset] = {}
        self._train_loader: ResumableDataLoader | None = None
        self._train_loader_state: dict | None = None  # from a checkpoint, for the next training loader
        self._repeating_splits: set[str] = set()  # whose loader, in this process, only repeats a view

    @staticmethod
    def _build_source(source: Any, root: str | os.PathLike | None, split: int | None) -> VideoSource:
        """A source object, or (real-dataset configs) a partial of a source class that takes data.root and,
        for datasets with official splits, data.split; keeping them out of the source's own config lets
        `evaluate.py ckpt=... data.root=NEW` point a saved run at data elsewhere."""
        if callable(getattr(source, "prepare", None)) and callable(getattr(source, "load", None)):
            if root is not None or split is not None:
                raise ValueError(f"data.root / data.split are for sources built by the DataModule; {source!r} "
                                 "already has its own (set them in data.source)")
            return source
        if not callable(source):
            raise TypeError(f"data.source must have prepare() and load() methods, got {source!r}")
        if root is None:
            raise ValueError("data.root is not set: set data.root=PATH to the dataset's folder (see data/README.md)")
        preset = getattr(source, "keywords", {})  # a functools.partial's own arguments (data.source.*)
        for name, value in (("root", root), ("split", split)):
            if name in preset and value is not None and preset[name] != value:
                raise ValueError(f"data.source.{name}={preset[name]} and data.{name}={value} disagree: set "
                                 f"data.{name} only")
        built = source(root=root) if split is None else source(root=root, split=split)
        if not (callable(getattr(built, "prepare", None)) and callable(getattr(built, "load", None))):
            raise TypeError(f"data.source must have prepare() and load() methods, got {built!r}")
        return built

    def state_dict(self) -> dict:
        """Saved in Lightning checkpoints: how far the training loader got in its epoch (`ResumableDataLoader`)."""
        return {"train_loader": self._train_loader.state_dict()} if self._train_loader is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        if "train_generator" in state_dict:  # the shuffling generator that checkpoints held before the loader's place
            log.warning("This checkpoint was written by a version of timesformer before resumable data loading: its "
                        "data order is not restored, and if it was written in the middle of an epoch, that epoch "
                        "starts again from its first batch (from an epoch's end, only the order differs)")
        self._train_loader_state = state_dict.get("train_loader")
        if self._train_loader is not None and self._train_loader_state is not None:
            self._train_loader.load_state_dict(self._train_loader_state)

    def prepare_data(self) -> None:
        self.source.prepare()  # (train.py calls it in every process first: sources allow that, see VideoSource)

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

    def number_classes_as(self, class_names: Sequence[str], key: Callable[[str], str] = str) -> None:
        """Label the videos by their class's position in ``class_names`` (a trained model's classes) rather than in
        the dataset's own list: evaluating on a subset or another copy of the dataset, whose classes (or their
        order) differ. Every class of the dataset must be among them; names are matched by ``key(name)`` (the
        model's `class_key`: SSv2's templates with and without brackets are the same classes)."""
        index = self._load_index()
        if list(index.class_names) == list(class_names):
            return
        position = {key(name): number for number, name in enumerate(class_names)}
        unknown = sorted(name for name in index.class_names if key(name) not in position)
        if unknown:
            raise ValueError(
                f"{len(unknown)} of the dataset's {len(index.class_names)} classes are not among the model's "
                f"{len(class_names)}: {', '.join(unknown[:10])}{' ...' if len(unknown) > 10 else ''} (is data= the "
                "dataset the model was trained on?)")
        relabel = [position[key(name)] for name in index.class_names]
        self.index = VideoIndex(list(class_names), {
            split: [(path, relabel[label]) for path, label in entries] for split, entries in index.splits.items()},
            missing=index.missing)
        self.datasets.clear()

    def views(self, split: str) -> tuple[int, int]:
        """(temporal clips, spatial crops) per video of a split: one random clip in training; the test views for
        test, and for validation with val_views_full (else the centre clip only, which is cheaper)."""
        if split == "train" or (split == "val" and not self.val_views_full):
            return 1, 1
        return self.test_temporal_clips, self.test_spatial_crops

    def setup(self, stage: str | None = None) -> None:
        index = self._load_index()
        for split in SPLITS:
            if split in index.splits and split not in self.datasets:
                self.datasets[split] = self._clip_dataset(index.splits[split], split == "train", *self.views(split))

    def evaluation_dataset(self, split: str) -> VideoClipDataset:
        """Any split, the training split too, with the test views and no augmentation (feature extraction)."""
        entries = self._load_index().split(split)  # an error naming the splits the dataset has
        return self._clip_dataset(entries, False, self.test_temporal_clips, self.test_spatial_crops)

    def _clip_dataset(self, entries: Sequence[tuple[str, int]], training: bool, temporal_clips: int,
                      spatial_crops: int) -> VideoClipDataset:
        return VideoClipDataset(
            entries,
            num_frames=self.num_frames,
            sampling_rate=self.sampling_rate,
            transform=self.train_transform if training else EvalViewTransform(
                self.image_size, spatial_crops, eval_short_side(self.image_size, spatial_crops,
                                                                self.train_short_side_range[0])),
            training=training,
            target_fps=self.target_fps,
            decode_threads=self.decode_threads,
            sampling=self.sampling,
            temporal_clips=temporal_clips,
            spatial_crops=spatial_crops,
            decode_retries=self.decode_retries,
            decoder=self.decoder,
            repeated_augmentation=self.repeated_augmentation if training else 1,
        )

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Takes the failed-video report and the padded-clip flags out of a batch (in the main process, which sees
        every worker's batches) and hands them to the failure monitor; the batch keeps its tensors ("replaced",
        "valid", ...). With repeated augmentation, flattens a training batch's (B, k, T, C, H, W) clips to
        (B*k, T, C, H, W)."""
        if not isinstance(batch, dict) or "decode_errors" not in batch:
            return batch
        error_lines = batch.pop("decode_errors")
        padded = batch.pop("padded", None)
        trainer = self.trainer
        if trainer is None:
            stage, epoch = "train", 0
        elif trainer.training:
            stage, epoch = "train", trainer.current_epoch
        elif trainer.sanity_checking or trainer.validating:
            stage, epoch = ("sanity_check" if trainer.sanity_checking else "val"), trainer.current_epoch
        else:
            stage, epoch = "test", 0
        split = "val" if stage == "sanity_check" else stage
        dataset = self.datasets.get(split)
        # Each DDP process reads its share of the split.
        world_size = trainer.world_size if trainer is not None else 1
        split_size = len(dataset.entries) // max(world_size, 1) if dataset is not None else 0
        self.failures.update(stage, epoch, error_lines, len(batch["video"]), split_size,
                             int(padded.sum()) if isinstance(padded, torch.Tensor) else 0)
        if split in self._repeating_splits:
            batch["repeated"] = True
        return flatten_repeated_clips(batch)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Normalises the batch's uint8 clips where they now are (the model's device): float32 out, or the dtype of a
        "true" precision (bf16-true, 16-true, 64-true), whose input conversion Lightning made before the transfer, on
        the uint8 clips, which it leaves alone."""
        video = batch.get("video") if isinstance(batch, dict) else None
        if isinstance(video, torch.Tensor) and video.dtype == torch.uint8:
            batch["video"] = normalize(video, self.mean, self.std)
            if self.trainer is not None:
                batch["video"] = self.trainer.precision_plugin.convert_input(batch["video"])
        return batch

    def teardown(self, stage: str | None = None) -> None:
        self.failures.finish_period()

    def _dataset(self, split: str) -> VideoClipDataset:
        if split not in self.datasets:
            if self.index is None:
                raise RuntimeError(f"VideoDataModule.setup() must run before the {split} dataloader is requested")
            raise RuntimeError(f"The dataset has no {split!r} split (it has {sorted(self.index.splits)})")
        return self.datasets[split]

    def _loader_settings(self, dataset: VideoClipDataset) -> dict[str, Any]:
        worker_init_fn, context = None, None
        if self.num_workers:
            rank = self.trainer.global_rank if self.trainer is not None else 0
            worker_init_fn = functools.partial(init_worker, os.getpid(), rank)
            # Forked workers start with one thread, whose signal mask every later thread inherits; spawned ones
            # (forkserver is Python 3.14's default) have started OpenBLAS's threads, unmasked, before worker_init_fn.
            context = "fork" if sys.platform == "linux" else None
        # batch_size counts clips: with repeated augmentation, each video gives `repeated_augmentation`
        batch_size = self.batch_size // dataset.repeated_augmentation
        if batch_size >= dataset.spatial_crops:
            # Whole clips per batch: a batch goes to one worker, and a clip's crops split over two batches (8 views,
            # 3 crops) were decoded by two workers, ~25% more decoding.
            batch_size -= batch_size % dataset.spatial_crops
        return {"batch_size": batch_size, "num_workers": self.num_workers,
                "pin_memory": self.pin_memory, "persistent_workers": self.persistent_workers, "drop_last": False,
                "worker_init_fn": worker_init_fn, "multiprocessing_context": context}

    def train_dataloader(self) -> ResumableDataLoader:
        """The shuffled training order of this process (its share under DDP, which Lightning would otherwise
        give it with a sampler of its own), resumable mid-epoch."""
        dataset = self._dataset("train")
        trainer = self.trainer
        if trainer is not None and trainer.overfit_batches:  # Lightning reads the first batches, in order
            return DataLoader(dataset, shuffle=False, **self._loader_settings(dataset))
        replicas = (trainer.distributed_sampler_kwargs if trainer is not None else None) or {}
        sampler = ResumableSampler(dataset, self.seed, replicas.get("num_replicas", 1), replicas.get("rank", 0))
        epoch = (lambda: trainer.current_epoch) if trainer is not None else None
        self._train_loader = ResumableDataLoader(dataset, sampler, epoch, **self._loader_settings(dataset))
        if self._train_loader_state is not None:
            self._train_loader.load_state_dict(self._train_loader_state)
        return self._train_loader

    def _evaluation_loader(self, split: str) -> DataLoader:
        """The split in order; under DDP each process gets every ``num_replicas``-th video with all its views
        (`WholeVideoSampler`), without the repeats Lightning's own sampler pads the last batches with (they were
        counted again in the clip-level loss and accuracy; the video-level results drop them anyway). Processes may
        then run a batch more than others: nothing in an evaluation step waits for the other processes. A process
        left without a view (fewer views than processes) evaluates one again, which its batches mark "repeated"."""
        dataset = self._dataset(split)
        replicas = (self.trainer.distributed_sampler_kwargs if self.trainer is not None else None) or {}
        num_replicas, rank = replicas.get("num_replicas", 1), replicas.get("rank", 0)
        sampler = None
        if num_replicas > 1 and len(dataset):
            sampler = WholeVideoSampler(dataset, num_replicas, rank)
        self._repeating_splits.discard(split)
        if sampler is not None and sampler.repeats:
            self._repeating_splits.add(split)
        return DataLoader(dataset, sampler=sampler, shuffle=False, **self._loader_settings(dataset))

    def val_dataloader(self) -> DataLoader:
        return self._evaluation_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._evaluation_loader("test")


class WholeVideoSampler(DistributedSampler, SequentialSampler):
    """Evaluation under DDP: videos ``rank``, ``rank + num_replicas``, ... of a dataset, each with all its views in
    a row, each view once. A clip's spatial crops stay in one process (and, batches being whole clips, one batch
    and one DataLoader worker), which decodes the clip once for all of them; dealt view by view, as Lightning's
    samplers do, the 3 crops of a clip went to 3 processes and each decoded it. Being a DistributedSampler,
    Lightning leaves it in place; being a SequentialSampler (it does not shuffle) too, also with
    `trainer.overfit_batches` (which put a SequentialSampler in its place, then its own DistributedSampler, whose
    padding had two processes evaluate the same views).

    Fewer videos than processes: views ``rank``, ``rank + num_replicas``, ... A process left without any (fewer
    views than processes) gets the first view again and ``repeats`` is True: Lightning skips the evaluation,
    epoch-end hooks included, of a process without a batch, and the others would wait for it forever where the
    metrics are gathered (Lightning's own sampler repeats views instead, which the clip-level metrics counted).
    The DataModule marks such batches "repeated", and the evaluation steps count them nowhere."""

    def __init__(self, dataset: VideoClipDataset, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        views = dataset.views_per_video
        if len(dataset.entries) >= num_replicas:
            self.items = [video * views + view for video in range(rank, len(dataset.entries), num_replicas)
                          for view in range(views)]
        else:
            self.items = list(range(rank, len(dataset), num_replicas))
        self.repeats = not self.items
        if self.repeats:
            self.items = [0]
        self.num_samples, self.total_size = len(self.items), len(dataset)

    def __iter__(self) -> Iterator[int]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


def init_worker(main_pid: int, rank: int, worker_id: int) -> None:
    """A DataLoader worker's ``worker_init_fn``: Lightning's seeding when ``seed_everything(workers=True)`` asked for
    it, the objects the worker inherited frozen for the garbage collector, and signals left to the main process
    (`keep_worker_through_sigterm`).

    A forked worker shares the main process's memory until it writes to it, and a full garbage collection writes to
    every object it examines: each training worker's private memory went from 17 to 143 MB at its first one (tiny
    model, train.py, CSV logger), ~8 GB over the 64 workers of an 8-GPU node. Frozen, those objects are never
    examined (`gc.freeze`); objects the worker makes are collected as before.
    """
    if int(os.environ.get("PL_SEED_WORKERS", 0)):
        pl_worker_init_function(worker_id, rank)
    gc.freeze()
    keep_worker_through_sigterm(main_pid)


def keep_worker_through_sigterm(main_pid: int) -> None:
    """SIGTERM from anyone but the process that reads this DataLoader worker's batches, and SIGUSR1, are left to
    that process.

    A cluster preempting a job (SLURM: every process of the job step), `kill -- -PGID` and `timeout` signal the
    workers with the main process. PyTorch's handler in a worker exits only for its parent's SIGTERM and dies of
    any other, and the main process then raises "DataLoader worker is killed by signal: Terminated" instead of
    finishing its batch and writing the preemption checkpoint. Here the worker keeps serving batches until the
    main process shuts it down as usual; SIGTERM from the main process (or the worker's parent) still ends it at
    once, as PyTorch's does. The sender is read from the signal (``sigwaitinfo``), which a Python handler cannot
    see.
    """
    if hasattr(signal, "SIGUSR1"):
        # SLURM's --signal=SIGUSR1 (the time limit is near) reaches the workers too, whose default action was to die
        # of it (or a forked worker ran its copy of the trainer's handler); the main process handles it
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):  # macOS, Windows: PyTorch's handling as it is
        return
    # Blocked in this thread (and the threads it starts: decoders, queue feeders), the signal waits for the thread
    # below.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def wait_for_sigterm() -> None:
        while True:
            sender = signal.sigwaitinfo({signal.SIGTERM}).si_pid
            if sender in (main_pid, os.getppid()):
                os._exit(0)

    threading.Thread(target=wait_for_sigterm, name="sigterm", daemon=True).start()


def flatten_repeated_clips(batch: dict[str, Any]) -> dict[str, Any]:
    """A batch of repeatedly augmented clips, "video" (B, k, T, C, H, W), as B*k clips (T, C, H, W) in a row, with
    "label", "index", "view" and "valid" repeated to match; "replaced" stays one entry per video (it counts
    videos). Other batches are returned as they are."""
    video = batch["video"]
    if video.ndim != 6:
        return batch
    repeats = video.shape[1]
    batch["video"] = video.flatten(0, 1)
    for key in ("label", "index", "view", "valid"):
        if key in batch:
            batch[key] = batch[key].repeat_interleave(repeats)
    return batch

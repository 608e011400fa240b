"""The training data order as a function of (seed, epoch), so that a checkpoint can resume it exactly.

A run killed and resumed must draw the same clips, crops and flips as one that never stopped, from an epoch's end
or from the middle of an epoch (a step checkpoint, a preemption), with any number of DataLoader workers and
processes. Two things make that so:

- **Per-item seeds.** `ResumableSampler` yields ``(video index, seed)`` pairs; the seed comes from (seed, epoch,
  the item's position in the epoch's order), and the dataset draws the item's clip start, scale, crop, flip and
  any replacement of a broken video from it (`VideoClipDataset`). Which worker reads the item, and what that
  worker read before, no longer matter: persistent workers' RNGs are seeded once, when they start, so a resumed
  run's workers could not continue the draws of the run before.
- **A loader that knows how far the epoch got.** `ResumableDataLoader` counts the batches it has handed to the
  training loop in the current epoch, and takes the epoch from the trainer when an epoch starts. `VideoDataModule`
  saves the count in checkpoints and, resuming, loads it into the loader before its first batch: the sampler then
  skips the items already trained on, in the same order.

The order itself is `DistributedSampler`'s (a permutation from seed + epoch, every ``num_replicas``-th item for
each process, padded to an even split), so one class serves one process and DDP alike; being a DistributedSampler,
Lightning leaves it in place under DDP instead of swapping in its own.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

from torch.utils.data import DataLoader, Dataset, DistributedSampler


def item_seed(seed: int, epoch: int, position: int) -> int:
    """The seed of the item at `position` of epoch `epoch`'s order: independent draws per item, the same in every
    process and run (a string seed goes through SHA-512, not Python's per-process hash)."""
    return random.Random(f"{seed}/{epoch}/{position}").getrandbits(63)


class ResumableSampler(DistributedSampler):
    """Shuffled training order: ``(video index, item seed)`` pairs, this process's share of the epoch.

    `set_epoch` picks the epoch (`ResumableDataLoader` calls it with the trainer's); `skip_next(n)` makes the next
    iteration start after the first `n` items of this process's share (resuming mid-epoch).
    """

    def __init__(self, dataset: Dataset, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self._skip = 0

    def skip_next(self, items: int) -> None:
        self._skip = items

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(super().__iter__())  # this process's share: positions rank, rank + replicas, ... of the order
        skip, self._skip = self._skip, 0
        for number in range(skip, len(indices)):
            position = self.rank + number * self.num_replicas
            yield indices[number], item_seed(self.seed, self.epoch, position)


class ResumableDataLoader(DataLoader):
    """A DataLoader over a `ResumableSampler` that knows how far into its epoch it is.

    ``epoch``: where the epoch number comes from at the start of each iteration (the DataModule passes the
    trainer's ``current_epoch``: Lightning's own ``set_epoch`` call is one epoch ahead after some resumes, e.g.
    with ``max_steps``); None: the sampler's ``set_epoch``.

    ``state_dict()`` is (epoch, batches handed out in it, and the batch size and process count they were cut
    with); after ``load_state_dict``, the iteration of that epoch starts at the next batch, and the iteration of
    any other epoch (the checkpoint was written at an epoch's end) at the first. The state is applied when the
    first batch is asked for, so it may be loaded before or after ``iter()`` and ``set_epoch``, in whatever order
    Lightning calls them. Resuming mid-epoch with another batch size or process count is refused: Lightning's
    loops count that epoch in batches of the old size.

    Lightning saves the state of a DataLoader with these two methods with its loops, but loads it back only when
    the loader is created after the loops are restored; `LightningModule.configure_optimizers` asking for
    ``trainer.estimated_stepping_batches`` creates it before, and the state is never loaded. So
    `VideoDataModule` saves it too (its own state is restored first) and loads it into the loader it creates.
    """

    def __init__(self, dataset: Dataset, sampler: ResumableSampler, epoch: Callable[[], int] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(dataset, sampler=sampler, **kwargs)
        self.epoch = epoch
        self.batches_taken = 0  # batches handed out in the epoch of the last iteration...
        self._iterated_epoch: int | None = None  # ...this one (the sampler's may be set for the next already)
        self._resume: dict[str, int] | None = None  # a checkpoint's state_dict()

    def __iter__(self) -> Iterator[Any]:
        # A generator: nothing runs at iter() (Lightning calls it before set_epoch when a run resumes). The sampler
        # is read, and indices are handed to the workers, at the first next().
        if self.epoch is not None:
            self.sampler.set_epoch(self.epoch())
        resume, self._resume = self._resume, None
        self._iterated_epoch, self.batches_taken = self.sampler.epoch, 0
        if resume is not None and resume["epoch"] == self.sampler.epoch:
            self.batches_taken = resume["batches_taken"]
            self._check_same_batches(resume)
        self.sampler.skip_next(self.batches_taken * self.batch_size)
        for batch in super().__iter__():
            self.batches_taken += 1
            yield batch

    def _check_same_batches(self, resume: dict[str, int]) -> None:
        saved = (resume.get("batch_size", self.batch_size), resume.get("num_replicas", self.sampler.num_replicas))
        mid_epoch = self.batches_taken < resume.get("batches", len(self))
        if mid_epoch and saved != (self.batch_size, self.sampler.num_replicas):
            raise ValueError(
                f"The checkpoint was written {self.batches_taken} batches into epoch {resume['epoch']}, with batches "
                f"of {saved[0]} videos per process and {saved[1]} processes; this run has {self.batch_size} and "
                f"{self.sampler.num_replicas}. Resume mid-epoch with the checkpoint's data.batch_size (and process "
                "count), or from a checkpoint written at an epoch's end (checkpoints/last.ckpt of an earlier epoch)."
            )

    def state_dict(self) -> dict[str, int]:
        epoch = self.sampler.epoch if self._iterated_epoch is None else self._iterated_epoch
        return {"epoch": epoch, "batches_taken": self.batches_taken, "batches": len(self),
                "batch_size": self.batch_size, "num_replicas": self.sampler.num_replicas}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._resume = {key: int(value) for key, value in state_dict.items()}

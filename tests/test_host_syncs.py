"""Host syncs in a training step, counted on the CPU.

On a GPU, every call that reads a device value back to Python (``.item()``, ``bool(t)``, ``.cpu()``, a
boolean mask, ``unique``), and every tensor built on the device from Python numbers (``torch.tensor``, a
blocking copy), stops the CPU until the device has caught up, and the device then idles while the CPU queues
the next work. CPU tensors have no such cost, but the same Python calls happen, so a
``TorchFunctionMode`` can count them here. Issue #7 asks for none from metrics and logging.
"""

from __future__ import annotations

import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils.data import DataLoader

from tests.conftest import TINY_DATA, compose_config
from timesformer.callbacks import TrainingProgressBar
from timesformer.model import TimeSformer, TimeSformerConfig
from timesformer.module import VideoClassifier
from timesformer.pipeline import train

ROOT = Path(__file__).resolve().parents[1]
# Tensor methods and functions that wait for the device when their tensor is on it, and the factories that do
# when they build a tensor on it from Python numbers (a blocking host-to-device copy; here every such tensor
# counts, since the CPU cannot tell where it would be built). (Not ``.to``: here the batch's transfer to the
# device is a ``.to("cpu")``.)
SYNCING = {"item", "__bool__", "__int__", "__float__", "__index__", "tolist", "numpy", "cpu", "nonzero", "unique",
           "unique_consecutive", "masked_select", "bincount", "equal", "allclose", "tensor", "as_tensor"}
# Code whose tensors stay on the CPU in a GPU run: optimizer step counters (torch.optim keeps them there unless
# capturable/fused; the training step runs inside optimizer.step, so only the calling frame is checked) and
# the DataLoader's fetching and collating (in worker processes; the batch's normalisation on the device, after
# the transfer, is not in it and counts), and the data module's on_before_batch_transfer (Lightning calls it
# before moving the batch: it counts the batch's padded clips on the host).
OPTIMIZER_CODE = str(Path(torch.__file__).parent / "optim")
DATA_LOADING_CODE = str(Path(torch.__file__).parent / "utils" / "data")
HOST_SIDE_HOOKS = {"on_before_batch_transfer"}


def _is_sync(func: Any, args: tuple, kwargs: dict) -> bool:
    name = getattr(func, "__name__", "")
    if name in SYNCING:
        return True
    if name == "__getitem__":  # boolean-mask indexing: the result's size depends on the values
        index = args[1] if len(args) > 1 else None
        indices = index if isinstance(index, tuple) else (index,)
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)
    return False


class HostSyncCounter(TorchFunctionMode):
    """Counts syncing calls by their caller: (innermost file outside torch, function, line)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[tuple[str, str, int]] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_sync(func, args, kwargs):
            frames = traceback.extract_stack()[:-1]
            in_data_loading = any(frame.filename.startswith(DATA_LOADING_CODE) or frame.name in HOST_SIDE_HOOKS
                                  for frame in frames)
            if not in_data_loading and not frames[-1].filename.startswith(OPTIMIZER_CODE):
                torch_dir = str(Path(torch.__file__).parent)
                caller = next(f for f in reversed(frames) if not f.filename.startswith(torch_dir))
                self.calls[(Path(caller.filename).name, caller.name, caller.lineno)] += 1
        return func(*args, **kwargs)


def _syncs_in_training(synthetic_root: Path, output_dir: Path, steps: int) -> Counter:
    overrides = ["experiment=demo", f"data.source.root={synthetic_root}", *TINY_DATA, "data.batch_size=1",
                 "trainer.max_epochs=1", f"trainer.limit_train_batches={steps}", "trainer.limit_val_batches=0",
                 "test=false", "trainer.log_every_n_steps=1000"]
    cfg = compose_config("train", overrides, output_dir)
    counter = HostSyncCounter()
    with counter:
        train(cfg)
    return counter.calls


def test_a_training_step_syncs_once_between_logging_intervals(synthetic_root, tmp_path):
    # The full train.py path (default callbacks: progress bar, checkpoints, LR monitor; CSV logger), logging at
    # step 0 only. The difference between a 2- and a 6-step epoch is what 4 steps cost.
    short = _syncs_in_training(synthetic_root, tmp_path / "short", steps=2)
    long = _syncs_in_training(synthetic_root, tmp_path / "long", steps=6)
    per_four_steps = {site: long[site] - short[site] for site in long if long[site] != short[site]}
    # The one left on purpose: the non-finite loss check, so no update is ever made from a NaN loss (read once the
    # backward pass is queued, so that the GPU has work while the host waits).
    assert len(per_four_steps) == 1, per_four_steps
    (file, function, _), count = next(iter(per_four_steps.items()))
    assert (file, function, count) == ("module.py", "on_after_backward", 4)


def test_the_progress_bar_shows_the_loss_read_at_the_logging_interval(tmp_path):
    torch.manual_seed(0)
    config = TimeSformerConfig(image_size=32, patch_size=8, num_frames=2, hidden_size=32, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=64, num_classes=2)
    module = VideoClassifier(TimeSformer(config), optimizer={"name": "sgd", "lr": 0.1, "weight_decay": 0.0},
                             scheduler={"name": "constant"})
    samples = [{"video": torch.randn(2, 3, 32, 32), "label": i % 2, "index": i} for i in range(5)]
    logged: list[float] = []

    class RecordLoss(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            logged.append(float(trainer.callback_metrics["train/loss"]))

    bar = TrainingProgressBar()
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, log_every_n_steps=2, logger=False,
                        enable_checkpointing=False, callbacks=[RecordLoss(), bar], default_root_dir=tmp_path)
    trainer.fit(module, DataLoader(samples, batch_size=1))
    assert len(set(logged)) == 5  # a new loss every step...
    assert bar._shown_loss == logged[3]  # ...shown at batches 1 and 3 (steps 2 and 4), when the loggers read it
    assert bar.get_metrics(trainer, module)["train/loss"] == f"{logged[3]:.4g}"
    # Not from the module's logging: a prog_bar step metric would be read back after every batch.
    assert "train/loss" not in trainer.progress_bar_metrics



class SyncRecorder(TorchFunctionMode):
    """Appends "sync" to ``events`` at every syncing call made from timesformer/module.py."""

    def __init__(self, events: list[str]) -> None:
        super().__init__()
        self.events = events

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_sync(func, args, kwargs) and Path(traceback.extract_stack()[-2].filename).name == "module.py":
            self.events.append("sync")
        return func(*args, **kwargs)


@pytest.mark.parametrize("nonfinite_loss", ["error", "skip"])
def test_the_host_waits_for_the_device_only_once_the_backward_is_queued(nonfinite_loss, tmp_path):
    """A host sync leaves the GPU idle from the moment its value is ready until the host queues more work. With
    nonfinite_loss="error" (the default), the non-finite check reads its flag after backward() has queued the
    backward pass, and the metrics and logs run there too. With "skip" the check must come before backward() (a
    skipped batch runs its backward on another graph): there the sync precedes it."""
    torch.manual_seed(0)
    config = TimeSformerConfig(image_size=32, patch_size=8, num_frames=2, hidden_size=32, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=64, num_classes=2)
    module = VideoClassifier(TimeSformer(config), optimizer={"name": "sgd", "lr": 0.1, "weight_decay": 0.0},
                             scheduler={"name": "constant"}, nonfinite_loss=nonfinite_loss)
    samples = [{"video": torch.randn(2, 3, 32, 32), "label": i % 2, "index": i, "replaced": 0} for i in range(3)]
    events: list[str] = []

    def recorded(name: str, function):
        def wrapper(*args, **kwargs):
            out = function(*args, **kwargs)
            events.append(name if name != "log" else f"log {args[0] if args else kwargs['name']}")
            return out
        return wrapper

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            events.append("step")

        def on_before_backward(self, trainer, pl_module, loss):
            events.append("backward")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            events.append("end")

    module.train_metrics.update = recorded("metrics", module.train_metrics.update)
    module.log = recorded("log", module.log)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, callbacks=[Record()], default_root_dir=tmp_path)
    with SyncRecorder(events):
        trainer.fit(module, DataLoader(samples, batch_size=1))
    steps = [step.split(" end")[0].split() for step in " ".join(events).split("step")[1:]]
    assert len(steps) == 3
    for words in steps:
        assert words.count("sync") == 1 and words.count("backward") == 1, words
        first = ["backward", "sync"] if nonfinite_loss == "error" else ["sync", "backward"]
        assert [w for w in words if w in first] == first, words
        metrics, logs = words.index("metrics"), " ".join(words).index("log train/loss")
        assert words.index("backward") < metrics and " ".join(words).index("backward") < logs, words
        assert "log train/replaced_videos" in " ".join(words), words

"""Callbacks that keep long runs from losing work (used by the configs in configs/callbacks/)."""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)


class PreemptedError(RuntimeError):
    """Raised after a preemption checkpoint was written; train.py exits cleanly on it."""

    def __init__(self, checkpoint: Path, signal_name: str) -> None:
        super().__init__(f"{signal_name} received: checkpoint written to {checkpoint}; "
                         f"run the same command with resume=auto to continue")
        self.checkpoint = checkpoint


class PreemptionCheckpoint(L.Callback):
    """On SIGTERM (or SIGUSR1), finish the current batch, write ``<dirpath>/last.ckpt`` and stop.

    Lightning already catches SIGTERM (``trainer.received_sigterm``, broadcast from rank 0 every step) and
    handles SIGUSR1 itself on SLURM with auto-requeue; elsewhere SIGUSR1 would kill the process, so this
    callback installs a handler for it. The checkpoint is a full one (optimizer, schedulers, loops), written
    atomically by Lightning, so ``resume=auto`` continues from the very next batch.
    """

    def __init__(self, dirpath: str | Path, filename: str = "last.ckpt") -> None:
        self.path = Path(dirpath) / filename
        self._usr1 = False
        self._previous_usr1: Any = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if hasattr(signal, "SIGUSR1") and signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None):
            self._previous_usr1 = signal.signal(signal.SIGUSR1, self._on_usr1)

    def _on_usr1(self, signum: int, frame: Any) -> None:
        log.info("Received SIGUSR1: checkpointing after this batch")
        self._usr1 = True

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        usr1 = trainer.strategy.reduce_boolean_decision(self._usr1, all=False) if trainer.world_size > 1 else self._usr1
        if usr1:
            trainer.save_checkpoint(self.path)
            raise PreemptedError(self.path, "SIGUSR1")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # Lightning raises SIGTERMException at the end of the batch during which SIGTERM arrived (on every
        # rank: rank 0 broadcasts it), where the loops are in a resumable state.
        if isinstance(exception, SIGTERMException):
            trainer.save_checkpoint(self.path)
            log.warning("%s", PreemptedError(self.path, "SIGTERM"))

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous_usr1 is not None:
            signal.signal(signal.SIGUSR1, self._previous_usr1)
            self._previous_usr1 = None

"""Callbacks that tests inject into train.py runs (``+callbacks.x._target_=tests.callbacks.X``)."""

import os
import signal
from pathlib import Path

import lightning as L
import torch


class KillAtEpoch(L.Callback):
    """SIGKILL this process when epoch ``epoch`` starts: a crash that no handler can soften."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGKILL)


class SignalAtStep(L.Callback):
    """Send ``signal_name`` to this process after global step ``step`` (what a cluster does on preemption)."""

    def __init__(self, step: int, signal_name: str = "SIGTERM") -> None:
        self.step, self.signum = step, getattr(signal, signal_name)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and not getattr(self, "sent", False):
            self.sent = True
            os.kill(os.getpid(), self.signum)


class DumpWeights(L.Callback):
    """Write each rank's final weights to ``<dirpath>/weights_rank<r>.pt``."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in pl_module.model.state_dict().items()}
        torch.save(state, self.dirpath / f"weights_rank{trainer.global_rank}.pt")

"""Callbacks that tests inject into train.py runs (``+callbacks.x._target_=tests.callbacks.X``)."""

import os
import signal
import subprocess
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
    """Send ``signal_name`` to this process after global step ``step`` (what a cluster does on preemption); with
    ``group``, to its whole process group, DataLoader workers included (as SLURM signals every process of a job
    step; start the run in a session of its own)."""

    def __init__(self, step: int, signal_name: str = "SIGTERM", group: bool = False) -> None:
        self.step, self.signum, self.group = step, getattr(signal, signal_name), group

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and not getattr(self, "sent", False):
            self.sent = True
            if self.group:  # from another process, as from the cluster (PyTorch's workers exit for their parent's)
                assert os.getpgid(0) == os.getpid(), "a process group of its own: start the run in a new session"
                subprocess.run(["kill", "-s", self.signum.name[3:], "--", f"-{os.getpid()}"], check=False)
            else:
                os.kill(os.getpid(), self.signum)


class SignalInEpoch(L.Callback):
    """Send ``signal_name`` to this process once, in epoch ``epoch`` (None: any), as training batch ``train_batch``,
    validation batch ``validation_batch`` or test batch ``test_batch`` starts (the index within the epoch /
    evaluation run): a signal arrives while a batch runs. With ``train_end``, as training ends instead (after the
    fit loop's last check for one)."""

    def __init__(self, epoch: int | None = None, train_batch: int | None = None, validation_batch: int | None = None,
                 test_batch: int | None = None, signal_name: str = "SIGTERM", rank: int | None = None,
                 train_end: bool = False) -> None:
        self.epoch, self.train_batch, self.validation_batch = epoch, train_batch, validation_batch
        self.test_batch, self.rank = test_batch, rank  # rank: only that process gets it (None: every process)
        self.signum, self.sent, self.train_end = getattr(signal, signal_name), False, train_end

    def on_train_end(self, trainer, pl_module) -> None:
        if self.train_end:
            self._send(trainer, 0, 0)

    def _send(self, trainer, batch_idx: int, wanted: int | None) -> None:
        if self.rank not in (None, trainer.global_rank):
            return
        if self.epoch in (None, trainer.current_epoch) and batch_idx == wanted and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._send(trainer, batch_idx, self.train_batch)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            self._send(trainer, batch_idx, self.validation_batch)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._send(trainer, batch_idx, self.test_batch)


class DumpWeights(L.Callback):
    """Write each rank's final weights to ``<dirpath>/weights_rank<r>.pt``."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in pl_module.model.state_dict().items()}
        torch.save(state, self.dirpath / f"weights_rank{trainer.global_rank}.pt")

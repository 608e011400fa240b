"""Loggers that need a fix over Lightning's own."""

from __future__ import annotations

import csv
import itertools
import os
from typing import Any

from lightning.pytorch import loggers
from lightning.pytorch.loggers import csv_logs
from lightning.pytorch.loggers.logger import rank_zero_experiment

_WRITERS = itertools.count()


class TensorBoardLogger(loggers.TensorBoardLogger):
    """Lightning's TensorBoardLogger, with a unique event-file name for every writer it opens.

    tensorboardX names an event file by the second it was opened and the host. Lightning closes the writer after
    `fit`, and for `test` the closed writer reopens its file under a new name of that form: when that happened
    within the same second (a short run), it truncated the first file and the training and validation curves
    were lost.
    """

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        if self._experiment is None:
            self._kwargs["filename_suffix"] = f".{os.getpid()}.{next(_WRITERS)}"
        return super().experiment

    def finalize(self, status: str) -> None:
        super().finalize(status)
        self._experiment = None  # a later stage (test after fit) gets a new writer and a new file


STEP_KEYS = ("epoch", "step")  # the columns that say where a row was logged, not what


class _ResumingExperimentWriter(csv_logs.ExperimentWriter):
    """Lightning's CSV writer, continuing the ``metrics.csv`` of the run it resumes: the rows of the steps before
    the checkpoint are kept, those logged after it (the steps the resumed run does again) are dropped, except the
    results of a test at the checkpoint's step (a test is logged at the step training ended; no training step does
    it again): a finished run started again keeps its test row, and a run trained on from its end keeps the test of
    its first part. A test logged later (a run resumed from an earlier checkpoint) is dropped with that later
    training."""

    def __init__(self, log_dir: str, purge_step: int) -> None:
        self.purge_step = purge_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            reader = csv.DictReader(file)
            # the columns the kept rows have, in the order Lightning's writer keeps them in (it sorts them)
            self.metrics_keys = sorted(reader.fieldnames or [])
            kept = [row for row in reader if row.get("step", "") == "" or int(row["step"]) < self.purge_step
                    or int(row["step"]) == self.purge_step and all(
                        key.startswith("test/") for key, value in row.items() if value and key not in STEP_KEYS)]
        with self._fs.open(self.metrics_file_path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(kept)


class CSVLogger(loggers.CSVLogger):
    """Lightning's CSVLogger, which continues the run dir's ``metrics.csv`` when train.py resumes a run.

    Lightning deletes the file when a logger opens a folder that has one: a run resumed in its own run dir
    (``resume=auto``) lost every row written before the interruption. ``purge_step`` (train.py sets it to the
    checkpoint's step when it resumes): keep the rows of the steps before it and append; None (a new run):
    start the file afresh, as Lightning does.
    """

    def __init__(self, *args: Any, purge_step: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.purge_step = purge_step

    @property
    @rank_zero_experiment
    def experiment(self) -> csv_logs.ExperimentWriter:
        if self._experiment is None and self.purge_step is not None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ResumingExperimentWriter(self.log_dir, self.purge_step)
        return super().experiment


class WandbLogger(loggers.WandbLogger):
    """Lightning's WandbLogger, uploading (``log_model``) only the checkpoints of a ModelCheckpoint that monitors a
    metric. Lightning takes every ModelCheckpoint's, and one without a metric (``last.ckpt``, the step checkpoints)
    counts its latest file as its "best": W&B's ``best`` alias ended on ``last.ckpt``, after the real best's."""

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        if checkpoint_callback.monitor is not None:
            super().after_save_checkpoint(checkpoint_callback)

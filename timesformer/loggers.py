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


class _AppendingExperimentWriter(csv_logs.ExperimentWriter):
    """Lightning's CSV writer, continuing an existing ``metrics.csv`` instead of deleting it."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):  # its header: the columns the rows already written have
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = next(csv.reader(file), [])


class CSVLogger(loggers.CSVLogger):
    """Lightning's CSVLogger, appending to the run dir's ``metrics.csv``.

    Lightning deletes the file when a logger opens a folder that has one: a run resumed in its own run dir
    (``resume=auto``) lost every row written before the interruption.
    """

    @property
    @rank_zero_experiment
    def experiment(self) -> csv_logs.ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingExperimentWriter(log_dir=self.log_dir)
        return self._experiment

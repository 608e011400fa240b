"""Loggers that need a fix over Lightning's own."""

from __future__ import annotations

import itertools
import os
from typing import Any

from lightning.pytorch import loggers
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

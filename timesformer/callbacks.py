"""train.py's callbacks (configs/callbacks/): preemption checkpoints that resume exactly, the progress bar, training
speed (clips/s, data wait, MFU) and W&B media (validation clips, confusion matrix)."""

from __future__ import annotations

import logging
import math
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from timesformer.profile import count_flops, datasheet_bf16_tflops

log = logging.getLogger(__name__)


def preempted_message(checkpoint: Path, signal_name: str) -> str:
    # (in the same run dir: Lightning forgets the best checkpoint of a run continued in another)
    return (f"{signal_name} received: checkpoint written to {checkpoint}; continue with the same command: as it is if "
            f"it has resume=auto, else with ckpt_path={checkpoint} hydra.run.dir={checkpoint.parent.parent}")


# A partial checkpoint file not written to for this long is a write that was killed (writing one takes seconds).
ABANDONED_PARTIAL_CHECKPOINT_S = 600


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, with each local checkpoint written next to its place and renamed over it.

    Lightning writes a checkpoint to a temporary file in ``$TMPDIR`` and moves it into place: where the run dir is on
    another filesystem (node-local /tmp, the run on NFS or Lustre: a cluster's usual layout) the move copies the bytes
    over the old file, so a kill during the copy (SLURM's SIGKILL after a slow preemption save) left ``last.ckpt``
    empty and the epochs since the best checkpoint lost. Here the file is written in the checkpoint's own folder,
    flushed to disk, and renamed over the old one: at every moment there is a whole checkpoint at its path. Remote
    paths (``s3://``, ...) keep Lightning's way."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        # Left by a process killed mid-write: this name's, and any other name's that nobody has written to for a
        # while (a best checkpoint's name, its epoch and metric, is never written again, and its partial file held
        # up to a whole checkpoint, 1.5 GB for ViT-B with AdamW, for good). Another process's write still going on
        # in the folder is left alone.
        for stale in path.parent.glob(".*.tmp"):
            if not re.fullmatch(r"\..+\.\d+\.tmp", stale.name):
                continue
            try:
                idle_s = time.time() - stale.stat().st_mtime
            except FileNotFoundError:
                continue
            if stale.name.startswith(f".{path.name}.") or idle_s > ABANDONED_PARTIAL_CHECKPOINT_S:
                stale.unlink(missing_ok=True)
        try:
            with open(partial, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)


class PreemptionCheckpoint(L.Callback):
    """On SIGTERM (or SIGUSR1) during fit, write ``<dirpath>/last.ckpt`` at the next point a run resumes from
    exactly, and stop.

    Lightning catches SIGTERM itself (``trainer.received_sigterm``; under DDP rank 0's flag is broadcast every
    step) and stops at its next check, after a batch, by raising ``SIGTERMException``; the checkpoint is written
    then (``on_exception``: a full one, optimizer, schedulers, loops and data position, atomically). Two such
    points would lose work, so Lightning does not see the signal there:

    - inside a gradient-accumulation window, the gradients of its first batches are in no checkpoint: the window
      is finished (its optimizer step taken) first;
    - during validation, a resumed run would never validate that epoch: validation is finished first.

    Under DDP the processes must stop at the same batch, whichever of them got the signal (a cluster signals all,
    ``kill`` one): they stop on rank 0's flag only, which Lightning broadcasts as each batch starts. Lightning's
    own handler also broadcasts from inside the signal handler, i.e. at whatever collective the process is in
    (gloo: "Received data size doesn't match expected size"); here the handler only sets the flag.

    SIGUSR1 is handled the same way. Under SLURM (``--signal=SIGUSR1@<seconds>``: the time limit is near) the job
    is then due for a requeue (``requeue_due``), unless ``slurm_requeue`` is false: train.py calls `requeue_if_due`
    (``scontrol requeue``, rank 0) once it has written its results and closed W&B, as SLURM ends the job when it
    requeues it (a script of your own calls it at its end). train.py turns Lightning's own auto-requeue off, which
    checkpointed from inside its signal handler, mid-batch or mid-validation, and trained on. Were it on (a
    ``SLURMEnvironment(auto_requeue=True)`` in ``trainer.plugins``), SIGUSR1 is left to it.

    A signal during train.py's test after training stops the test after the current batch and writes nothing
    (``last.ckpt`` keeps the final state; under SLURM, SIGUSR1 requeues the job, which tests again). So does one that
    came after the fit's last check (during its last checkpoint, say): the test would otherwise start as if none had
    come. Under DDP the processes stop the test together on rank 0's flag, broadcast after each test batch but the
    last of the process with the fewest (a test's processes may have a batch more or less): one stopping alone left
    the others waiting for it in the test's final gather. (A test of several dataloaders is not stopped under DDP.)
    """

    def __init__(self, dirpath: str | Path, filename: str = "last.ckpt", slurm_requeue: bool = True) -> None:
        self.path = Path(dirpath) / filename
        self.slurm_requeue = slurm_requeue
        self._on_slurm = False
        self._trainer: L.Trainer | None = None
        self._signal_name = "SIGTERM"
        self._mid_window = False  # the last training batch did not end an accumulation window
        self._validating = False
        self._distributed = False
        self._broadcasting = False  # inside Lightning's per-batch broadcast of rank 0's flag
        self._signal_after_fit = False  # received after the fit's last check: the test stops after its first batch
        self._stop_test = False  # under DDP: rank 0's flag, as last broadcast during the test
        self._test_batches_to_agree_on = 0.0  # under DDP: the test batches after which every process checks
        self._previous_usr1: Any = None
        self.requeue_due = False

    def _lightning_may_see_signal(self) -> bool:
        resumable = not (self._mid_window or self._validating)
        return resumable and (self._broadcasting or not self._distributed)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._trainer = trainer
        self._mid_window = self._validating = self._broadcasting = False
        self._distributed = trainer.world_size > 1
        _gate_signal_flag(trainer._signal_connector, self._lightning_may_see_signal)
        if self._distributed:
            epoch_loop = trainer.fit_loop.epoch_loop
            broadcast = epoch_loop._broadcast_sigterm_tensor

            def broadcast_rank_zero_flag() -> None:
                self._broadcasting = True
                try:
                    broadcast()
                finally:
                    self._broadcasting = False

            epoch_loop._broadcast_sigterm_tensor = broadcast_rank_zero_flag
        self._handle_usr1(trainer)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "test":
            return
        # (here, before Lightning registers its SIGTERM handler, which takes the connector's notifier as it is then)
        # A signal stops the test where Lightning checks, after each batch: the notifier without its broadcast, as in
        # the fit. SIGUSR1's default action ends the process: the test after training stops as on SIGTERM instead
        # (train.py keeps the training's results; a requeued SLURM job runs the test again).
        self._trainer = trainer
        self._distributed, self._stop_test = trainer.world_size > 1, False
        _gate_signal_flag(trainer._signal_connector, lambda: self._stop_test or not self._distributed)
        self._handle_usr1(trainer)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._signal_after_fit:  # (Lightning cleared the flag as the test started)
            trainer._signal_connector.received_sigterm = True
            self._signal_after_fit = False
            if trainer.is_global_zero:  # (under DDP rank 0's flag decides, as in the fit)
                log.warning("%s came after training's last check: the test stops", self._signal_name)
        if self._distributed:  # every process stops after a batch that none of them ends its test with
            # (one test dataloader of known length: Lightning numbers each loader's batches from 0 and does not check
            # its last, so with several the processes could not agree; those tests are not stopped under DDP)
            loaders = trainer.num_test_batches
            count = float(loaders[0]) if len(loaders) == 1 and math.isfinite(loaders[0]) else 0.0
            batches = torch.tensor([count], device=trainer.strategy.root_device)
            self._test_batches_to_agree_on = float(trainer.strategy.all_gather(batches).min()) - 1

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self._distributed or batch_idx >= self._test_batches_to_agree_on:
            return
        connector = trainer._signal_connector
        flag = torch.tensor([int(connector.__dict__.get("_received", False))], device=trainer.strategy.root_device)
        torch.distributed.broadcast(flag, src=0)
        self._stop_test = bool(flag.item())
        if self._stop_test:
            connector.received_sigterm = True  # (a process the signal did not reach stops too)

    def _handle_usr1(self, trainer: L.Trainer) -> None:
        environment = trainer._accelerator_connector.cluster_environment
        self._on_slurm = isinstance(environment, SLURMEnvironment)
        lightning_requeues = self._on_slurm and environment.auto_requeue
        if not hasattr(signal, "SIGUSR1") or lightning_requeues:
            return
        current = signal.getsignal(signal.SIGUSR1)
        # A fit that ended in an exception skips the teardown hooks, and Lightning's own teardown puts back the
        # handler it found (that fit's): the next run in this process (a sweep's) would keep a finished trainer's
        stale = getattr(current, "__func__", None) is PreemptionCheckpoint._on_usr1
        if current in (signal.SIG_DFL, None) or stale:
            previous = signal.signal(signal.SIGUSR1, self._on_usr1)
            self._previous_usr1 = signal.SIG_DFL if stale else previous

    def _on_usr1(self, signum: int, frame: Any) -> None:
        log.info("Received SIGUSR1: checkpointing at the next point a run can resume from")
        self._signal_name = "SIGUSR1"
        if self._trainer is not None:
            # Lightning's SIGTERM handling from here on, its notifier included: under DDP it tells the other
            # processes (a flag set on this process only left them waiting for it in a collective: a hang).
            self._trainer._signal_connector._sigterm_notifier_fn(signum, frame)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # (Lightning's own test of whether this batch ends an accumulation window, or the epoch.)
        self._mid_window = trainer.fit_loop.epoch_loop._should_accumulate()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._validating = trainer.state.fn == TrainerFn.FITTING

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._validating = False

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        if trainer.state.fn == TrainerFn.FITTING:
            trainer.save_checkpoint(self.path)  # (every process returns once the file is written)
            log.warning("%s", preempted_message(self.path, self._signal_name))
        if self._signal_name == "SIGUSR1" and self._on_slurm and self.slurm_requeue and trainer.is_global_zero:
            self.requeue_due = True

    def requeue_if_due(self) -> bool:
        """Requeue the SLURM job (`requeue_slurm_job`) if a SIGUSR1 stopped the run and asked for it; call it last,
        as SLURM then ends the job. True when it was requeued."""
        if not self.requeue_due:
            return False
        self.requeue_due = False
        return requeue_slurm_job()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._trainer is not None:
            connector = self._trainer._signal_connector
            self._signal_after_fit = stage == "fit" and bool(connector.__dict__.get("_received"))
            _gate_signal_flag(connector, None)
            self._trainer.fit_loop.epoch_loop.__dict__.pop("_broadcast_sigterm_tensor", None)
            self._trainer = None
        if self._previous_usr1 is not None:
            signal.signal(signal.SIGUSR1, self._previous_usr1)
            self._previous_usr1 = None


def requeue_slurm_job() -> bool:
    """Put this SLURM job back in the queue (``scontrol requeue <job>``, as Lightning's auto-requeue does); SLURM then
    ends the running job. The requeued job runs the same command: with ``resume=auto`` (or as a requeued job,
    ``SLURM_RESTART_COUNT``) it continues from the newest checkpoint. True on success; a failure is logged."""
    job_id = os.environ.get("SLURM_JOB_ID", "")
    if os.environ.get("SLURM_ARRAY_JOB_ID"):  # an array task is requeued by its own id
        job_id = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
    if not job_id:
        log.warning("SIGUSR1 under SLURM but no SLURM_JOB_ID: the job was not requeued")
        return False
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
        problem = f"exit code {result.returncode}: {result.stderr.strip()}" if result.returncode else ""
    except (OSError, subprocess.TimeoutExpired) as error:
        problem = str(error)
    if problem:
        log.warning("Could not requeue SLURM job %s (%s); requeue it with `scontrol requeue %s` or submit the script "
                    "again (with resume=auto it continues from the checkpoint)", job_id, problem, job_id)
        return False
    log.warning("Requeued SLURM job %s: it continues from the checkpoint when it starts again", job_id)
    return True


def _gate_signal_flag(connector: Any, is_open: Callable[[], bool] | None) -> None:
    """Make Lightning's signal connector report a received signal (``received_sigterm``, which every check of
    Lightning's reads) only while ``is_open()``; the signal is kept, and seen at the next open check. None
    restores the plain flag."""
    base = getattr(type(connector), "_ungated", type(connector))
    if is_open is None:
        if base is not type(connector):
            connector.__class__ = base
            connector.received_sigterm = connector.__dict__.pop("_received", False)
        return

    class GatedSignalConnector(base):
        _ungated = base

        @property
        def received_sigterm(self) -> bool:
            return self._received and is_open()

        @received_sigterm.setter
        def received_sigterm(self, value: bool) -> None:
            self._received = value

        def _sigterm_notifier_fn(self, signum: int, frame: Any) -> None:
            # Lightning's, less its broadcast from inside the signal handler (see PreemptionCheckpoint).
            log.info("Received signal %d", signum)
            if not self._received and self.trainer.strategy.launcher is not None:
                self.trainer.strategy.launcher.kill(signum)
            self._received = True

    received = connector.__dict__.pop("received_sigterm", connector.__dict__.get("_received", False))
    connector._received = received
    connector.__class__ = GatedSignalConnector


class TrainingProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar, showing the training loss without a GPU sync every step.

    Lightning turns every step metric logged with ``prog_bar=True`` into a Python number after each batch (and
    again until the epoch ends), and on a GPU each conversion waits for the whole step to finish. So the module
    logs ``train/loss`` without ``prog_bar``, and this bar reads it at the logging interval
    (``trainer.log_every_n_steps``), when the loggers read it too.
    """

    def __init__(self, refresh_rate: int = 1, leave: bool = False) -> None:
        super().__init__(refresh_rate=refresh_rate, leave=leave)
        self._shown_loss: float | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # The loggers' own condition (checked right after this hook), so that the one read serves both.
        if trainer._logger_connector.should_update_logs:
            loss = trainer.callback_metrics.get("train/loss")  # None until a step has logged one
            if loss is not None:
                self._shown_loss = float(loss)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, int | str | float | dict]:
        metrics = super().get_metrics(trainer, pl_module)
        if self._shown_loss is not None:
            metrics["train/loss"] = f"{self._shown_loss:.4g}"
        return metrics


class TrainingSpeed(L.Callback):
    """Logs how fast training goes and whether the GPU waits for data, at the logging interval, without a sync.

    - ``perf/clips_per_s``: training clips per second over the last interval, all processes together;
    - ``perf/step_ms``: wall time per training batch;
    - ``perf/data_wait_fraction``: the share of that time spent between one batch's end and the next one's start,
      which is where the loop waits for the DataLoader (and does Lightning's own work between batches). Near 0:
      the model is the limit. Well above 0.1: the workers cannot keep up (more workers, ``data.decoder=pyav``, resized
      videos or ``data.repeated_augmentation``; README, "Feeding the GPU");
    - ``perf/mfu`` on a GPU in bf16: model FLOPs (3 x the forward's, ``timesformer.profile.count_flops``) per
      second over the GPU's dense bf16 peak (``peak_tflops``, or the datasheet's for known GPUs).

    Wall-clock times: the training step's one host sync keeps the CPU within a step of the GPU, so they follow
    the GPU's pace. The first batch of an epoch (compilation, warm-up) and the intervals that validation or an
    epoch's end interrupts are left out. Written to the loggers directly (as Lightning's LearningRateMonitor
    does), so nothing is moved to the GPU and back. Without a logger it does nothing.
    """

    def __init__(self, peak_tflops: float | None = None) -> None:
        self.peak_tflops = peak_tflops
        self._flops_per_clip: float | None = None
        self._restart()

    def _restart(self) -> None:
        self._start: float | None = None  # the end of the batch before the interval's first
        self._last_end: float | None = None
        self._wait = 0.0
        self._clips = 0
        self._batches = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        peak = self.peak_tflops
        if peak is None and trainer.strategy.root_device.type == "cuda" and "bf16" in str(trainer.precision):
            peak = datasheet_bf16_tflops(torch.cuda.get_device_name(trainer.strategy.root_device))
        config = getattr(getattr(pl_module, "model", None), "config", None)
        if peak and config is not None:
            try:  # forward x 3 (the backward is twice the forward), 2 FLOPs per multiply-add
                self._flops_per_clip, self.peak_tflops = 6 * count_flops(config), peak
            except RuntimeError as error:  # a PyTorch whose FLOP counter misses attention: no MFU, no crash
                log.warning("TrainingSpeed: no perf/mfu (%s)", error)
        self._restart()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._last_end is not None:
            self._wait += time.perf_counter() - self._last_end

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not trainer.log_every_n_steps:  # step logging off
            return
        now = time.perf_counter()
        if self._start is None:  # the first batch after a (re)start is not counted: compilation, warm-up
            self._start = self._last_end = now
            return
        self._last_end = now
        self._clips += len(batch["video"]) if isinstance(batch, dict) and "video" in batch else 0
        self._batches += 1
        if self._batches < max(trainer.log_every_n_steps, 1) * trainer.accumulate_grad_batches:
            return
        seconds = now - self._start
        metrics = {"perf/clips_per_s": self._clips * trainer.world_size / seconds,
                   "perf/step_ms": 1000 * seconds / self._batches,
                   "perf/data_wait_fraction": self._wait / seconds}
        if self._flops_per_clip:
            metrics["perf/mfu"] = self._clips / seconds * self._flops_per_clip / (self.peak_tflops * 1e12)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=logging_step(trainer))
        self._restart()
        self._start = self._last_end = now

    # Epoch ends (checkpoints) and validation are not training.
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restart()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restart()


class WandbMediaLogger(L.Callback):
    """Log a few validation clips (GIFs captioned with predicted vs true class) and the video-level confusion
    matrix to Weights & Biases after each validation. Does nothing without a WandbLogger."""

    def __init__(self, num_clips: int = 4, fps: int = 4) -> None:
        self.num_clips, self.fps = num_clips, fps
        self._clips: dict[str, Any] | None = None

    @staticmethod
    def _wandb_logger(trainer: L.Trainer) -> Any:
        from lightning.pytorch.loggers import WandbLogger

        return next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if batch_idx != 0 or trainer.sanity_checking or self._wandb_logger(trainer) is None:
            return
        import torch

        videos = batch["video"][: self.num_clips]
        with torch.no_grad():
            predictions = pl_module(videos).argmax(-1)
        self._clips = {"videos": videos.detach().float().cpu(), "labels": batch["label"][: self.num_clips].cpu(),
                       "predictions": predictions.cpu()}

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        wandb_logger = self._wandb_logger(trainer)
        if wandb_logger is None or trainer.sanity_checking or not trainer.is_global_zero:
            return
        import io
        import tempfile

        import wandb
        from PIL import Image

        from timesformer.evaluation import plot_confusion_matrix

        names = pl_module.class_names or [str(c) for c in range(pl_module.model.config.num_classes)]
        media: dict[str, Any] = {}
        # W&B is handed the files' contents, which it writes into its run dir itself: the files went (two folders a
        # validation) to the node's /tmp for good, and given their paths, W&B links to them with
        # allow_media_symlink (left dangling once they are removed)
        with tempfile.TemporaryDirectory(prefix="timesformer_media_") as folder:
            if self._clips is not None:
                datamodule = trainer.datamodule
                mean, std = getattr(datamodule, "mean", (0.45,) * 3), getattr(datamodule, "std", (0.225,) * 3)
                clips = []
                for i, video in enumerate(self._clips["videos"]):
                    caption = (f"pred: {names[int(self._clips['predictions'][i])]} / "
                               f"true: {names[int(self._clips['labels'][i])]}")
                    path = Path(folder) / f"clip{i}.gif"
                    write_gif(video, mean, std, path, self.fps)
                    clips.append(wandb.Video(io.BytesIO(path.read_bytes()), caption=caption, format="gif"))
                media["val/clips"] = clips
                self._clips = None
            results = getattr(pl_module, "last_val_results", None)
            if results is not None and len(results.indices):
                path = Path(folder) / "confusion_matrix.png"
                plot_confusion_matrix(results.confusion_matrix(len(names)), names, path)
                with Image.open(path) as image:
                    media["val/confusion_matrix"] = wandb.Image(image)
            if media:
                wandb_logger.experiment.log({**media, "trainer/global_step": logging_step(trainer)})


def logging_step(trainer: L.Trainer) -> int:
    """The step Lightning logs the current batch's (or validation's) metrics at, as its LearningRateMonitor does:
    ``global_step`` is one ahead once the batch's optimizer step is made (perf/* and W&B media were logged one
    step after the metrics of the same batch or validation)."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def write_gif(video: Any, mean: Any, std: Any, path: Path, fps: int = 4) -> None:
    """Normalised float (T, C, H, W) clip -> an animated GIF (the clip as the model saw it)."""
    import torch
    from PIL import Image

    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    frames = ((video.float() * std_t + mean_t).clamp(0, 1) * 255).round().to(torch.uint8)  # (T, C, H, W)
    images = [Image.fromarray(frame.permute(1, 2, 0).numpy()) for frame in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)

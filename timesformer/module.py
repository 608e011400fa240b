"""The LightningModule: trains a TimeSformer classifier.

Lightning owns devices, precision, DDP and checkpointing; this file only says what a step is, which metrics
are kept and how the optimizer and learning-rate schedule are built.
"""

from __future__ import annotations

import inspect
import logging
import math
import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from timesformer.evaluation import AGGREGATIONS, VideoResults, ViewAggregator
from timesformer.model import TimeSformer

log = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "sgd")
# The metrics VideoClassifier logs (per epoch; train/loss, the mean over an optimizer step's batches, and
# train/grad_norm per logging interval).
LOGGED_METRICS = (
    "train/loss", "train/acc", "train/acc_top5", "train/grad_norm", "train/replaced_videos", "train/skipped_batches",
    *(f"{stage}/{name}" for stage in ("val", "test") for name in (
        "loss", "acc", "acc_top5", "failed_views", "video_acc", "video_acc_top5", "video_mean_class_acc")),
)
SCHEDULERS = ("cosine", "multistep", "constant")


def _layer_id(param_name: str, num_layers: int) -> int:
    """0 for the embeddings, i + 1 for block i, num_layers + 1 for the final norm and the head."""
    if param_name.startswith(("cls_token", "pos_embed", "time_embed", "patch_embed")):
        return 0
    if param_name.startswith("blocks."):
        return int(param_name.split(".")[1]) + 1
    return num_layers + 1


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, momentum: float = 0.9,
                    nesterov: bool = True, betas: tuple[float, float] = (0.9, 0.999),
                    decay_norm_bias_embed: bool = False, layer_decay: float | None = None,
                    fused: bool | None = None) -> torch.optim.Optimizer:
    """AdamW or SGD over parameter groups.

    ``decay_norm_bias_embed=False`` exempts biases, norms and the cls/position/time embeddings from weight
    decay (the usual ViT recipe, DeiT/timm's; the original decays everything, mmaction2 all but the embeddings).
    ``layer_decay`` (e.g. 0.75) scales block i's learning rate by ``layer_decay ** (num_layers + 1 - layer)``:
    layer-wise decay for fine-tuning (BEiT/MAE).
    ``fused``: one fused kernel per step; None: when every parameter is on a GPU.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer.name={name!r} is not supported; valid values: {', '.join(OPTIMIZERS)}")
    if layer_decay is not None and not 0 < layer_decay <= 1:
        raise ValueError(f"optimizer.layer_decay={layer_decay} must be in (0, 1] (e.g. 0.75), or null for none")
    num_layers = len(getattr(model, "blocks", []))
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for param_name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_embedding = param_name.split(".")[-1] in ("cls_token", "pos_embed", "time_embed")
        decays = decay_norm_bias_embed or not (param.ndim <= 1 or is_embedding)
        layer = _layer_id(param_name, num_layers) if layer_decay else 0
        group = groups.setdefault((layer, decays), {
            "params": [], "weight_decay": weight_decay if decays else 0.0,
            "lr": lr * (layer_decay ** (num_layers + 1 - layer) if layer_decay else 1.0),
        })
        group["params"].append(param)
    param_groups = list(groups.values())
    # On the GPU, one fused kernel per step instead of a series of multi-tensor ones (Lightning moves the model
    # to its device before configure_optimizers). PyTorch's default stays on the CPU.
    if fused is None:
        fused = True if all(p.is_cuda for group in param_groups for p in group["params"]) else None
    if name == "adamw":
        return torch.optim.AdamW(param_groups, lr=lr, betas=tuple(betas), fused=fused)
    return torch.optim.SGD(param_groups, lr=lr, momentum=momentum, nesterov=nesterov, fused=fused)


def lr_multiplier(step: int, name: str, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0,
                  milestones: tuple[float, ...] = (), gamma: float = 0.1) -> float:
    """Learning-rate factor at optimizer step ``step``: linear warmup, then cosine / step decay / constant.

    ``milestones`` are fractions of training (the paper's steps at epochs 11 and 14 of 15 are 11/15, 14/15),
    so they hold whatever the epoch length.
    """
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler.name={name!r} is not supported; valid values: {', '.join(SCHEDULERS)}")
    if not all(0 < m < 1 for m in milestones):
        raise ValueError(f"scheduler.milestones={list(milestones)}: milestones are fractions of training in (0, 1) "
                         f"(epoch 11 of 15 is 0.7333), not epochs or steps")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if name == "cosine":
        progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if name == "multistep":
        return gamma ** sum(step >= m * total_steps for m in milestones)
    return 1.0


def check_settings(optimizer: dict[str, Any], scheduler: dict[str, Any], label_smoothing: float = 0.0) -> None:
    """Values torch would accept and train badly with (or reject only at the first step), named by their option."""
    problems = []
    # Keys nothing reads (`+optimizer.eps=1e-6`) failed only at configure_optimizers, as a bare TypeError
    known = {"optimizer": set(inspect.signature(build_optimizer).parameters) - {"model"},
             "scheduler": {*inspect.signature(lr_multiplier).parameters, "warmup_epochs"}
             - {"step", "total_steps", "warmup_steps"}}
    for group, settings in (("optimizer", optimizer), ("scheduler", scheduler)):
        problems += [f"{group}.{key} is not an option; valid {group} options: {', '.join(sorted(known[group]))}"
                     for key in sorted(set(settings) - known[group])]
    numbers = {"optimizer.lr": optimizer.get("lr"), "optimizer.weight_decay": optimizer.get("weight_decay", 0.0),
               "optimizer.momentum": optimizer.get("momentum", 0.0), "module.label_smoothing": label_smoothing,
               **{f"scheduler.{key}": scheduler.get(key, 0.0) for key in ("warmup_epochs", "min_lr_ratio", "gamma")}}
    not_numbers = [f"{name} must be a number, got {value!r}" for name, value in numbers.items()
                   if isinstance(value, bool) or not isinstance(value, int | float)]
    if not_numbers:  # (float() below would fail with a message naming no option)
        raise ValueError("; ".join(problems + not_numbers))
    if not 0.0 <= float(label_smoothing) < 1.0:
        problems.append(f"module.label_smoothing={label_smoothing} must be in [0, 1)")
    if not float(optimizer["lr"]) > 0:
        problems.append(f"optimizer.lr={optimizer['lr']} must be > 0")
    if float(optimizer.get("weight_decay", 0.0)) < 0:  # torch checks its defaults, not parameter groups
        problems.append(f"optimizer.weight_decay={optimizer['weight_decay']} must be >= 0")
    betas = optimizer.get("betas")
    if betas is not None and (len(betas) != 2 or not all(0.0 <= float(b) < 1.0 for b in betas)):
        problems.append(f"optimizer.betas={list(betas)} must be two numbers in [0, 1), e.g. [0.9, 0.999]")
    if not 0.0 <= float(scheduler.get("min_lr_ratio", 0.0)) <= 1.0:
        problems.append(f"scheduler.min_lr_ratio={scheduler['min_lr_ratio']} must be in [0, 1] (a fraction of the "
                        "peak learning rate)")
    if not 0.0 < float(scheduler.get("gamma", 0.1)) <= 1.0:
        problems.append(f"scheduler.gamma={scheduler['gamma']} must be in (0, 1] (the factor at each milestone)")
    if float(scheduler.get("warmup_epochs", 0.0)) < 0:
        problems.append(f"scheduler.warmup_epochs={scheduler['warmup_epochs']} must be >= 0")
    milestones = scheduler.get("milestones") or ()
    if not all(isinstance(m, int | float) and 0 < m < 1 for m in milestones):  # (lr_multiplier's rule, checked early)
        problems.append(f"scheduler.milestones={list(milestones)}: milestones are fractions of training in (0, 1) "
                        f"(epoch 11 of 15 is 0.7333), not epochs or steps")
    if optimizer.get("name") == "sgd" and optimizer.get("nesterov") and not float(optimizer.get("momentum", 0.0)) > 0:
        problems.append(f"optimizer.nesterov=true needs optimizer.momentum > 0 (it is {optimizer.get('momentum', 0)}); "
                        f"set optimizer.nesterov=false for plain SGD")
    # Options the chosen optimizer or schedule does not read (a `+optimizer.momentum=0.8` under adamw did nothing)
    unused = {"adamw": ("momentum", "nesterov"), "sgd": ("betas",)}.get(optimizer.get("name"), ())
    problems += [f"optimizer.{key} has no effect with optimizer.name={optimizer['name']} (choose the optimizer with "
                 f"optimizer={optimizer['name']}, which has its own options, or drop the key: ~optimizer.{key})"
                 for key in unused if key in optimizer]
    unused = {"cosine": ("milestones", "gamma"), "multistep": ("min_lr_ratio",),
              "constant": ("min_lr_ratio", "milestones", "gamma")}.get(scheduler.get("name"), ())
    problems += [f"scheduler.{key} has no effect with scheduler.name={scheduler['name']} (choose the schedule with "
                 f"scheduler={scheduler['name']}, or drop the key: ~scheduler.{key})"
                 for key in unused if key in scheduler]
    for name in ("nesterov", "decay_norm_bias_embed"):
        if name in optimizer and not isinstance(optimizer[name], bool):
            problems.append(f"optimizer.{name} must be true or false, got {optimizer[name]!r}")
    if problems:
        raise ValueError("; ".join(problems))


class VideoClassifier(L.LightningModule):
    """Cross-entropy training of a TimeSformer with top-1/top-5 accuracy.

    Args:
        model: the backbone + head (plain PyTorch).
        optimizer: ``build_optimizer`` keyword arguments (``name``, ``lr``, ``weight_decay``, ...).
        scheduler: ``lr_multiplier`` settings: ``name``, ``warmup_epochs`` (may be fractional), ``min_lr_ratio``,
            ``milestones``, ``gamma``. Stepped every optimizer step.
        label_smoothing: cross-entropy label smoothing.
        nonfinite_loss: "error": a NaN/inf loss saves ``nonfinite-step<N>.ckpt`` (the weights before that step)
            beside the other checkpoints and stops with an error naming the step; "skip": the batch is skipped
            (no weights, momentum or weight decay change; counted in ``train/skipped_batches``; under gradient
            accumulation the step's other batches keep their 1/N share, as in a last, shorter window of an epoch).
            Under DDP a non-finite loss on any process counts for all (they stop, or skip that batch, together).
        compile: run the model through ``torch.compile`` (the state dict keeps its plain names).
        view_aggregation: how evaluation views of one video are combined: "softmax" (mean of probabilities,
            mmaction2) or "logits" (mean of logits; the original sums them, which ranks the same).
        run_config: the resolved run configuration, saved in checkpoints (``evaluate.py`` rebuilds the data
            from it) and sent to the loggers as hyper-parameters.
    """

    def __init__(self, model: TimeSformer, optimizer: dict[str, Any], scheduler: dict[str, Any],
                 label_smoothing: float = 0.0, nonfinite_loss: str = "error", compile: bool = False,
                 view_aggregation: str = "softmax", run_config: dict[str, Any] | None = None) -> None:
        super().__init__()
        # The architecture is saved by on_save_checkpoint (timesformer_config); the weights by Lightning.
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        # Fail now, not after the first epoch, on a misspelt optimizer or scheduler name.
        if optimizer.get("name") not in OPTIMIZERS:
            raise ValueError(f"optimizer.name={optimizer.get('name')!r} is not supported; "
                             f"valid values: {', '.join(OPTIMIZERS)}")
        if scheduler.get("name") not in SCHEDULERS:
            raise ValueError(f"scheduler.name={scheduler.get('name')!r} is not supported; "
                             f"valid values: {', '.join(SCHEDULERS)}")
        if nonfinite_loss not in ("error", "skip"):
            raise ValueError(f"module.nonfinite_loss={nonfinite_loss!r} is not supported; valid values: error, skip")
        if view_aggregation not in AGGREGATIONS:  # ("mean", for features, is not a way to score views)
            raise ValueError(f"module.view_aggregation={view_aggregation!r} is not supported; valid values: "
                             f"{', '.join(AGGREGATIONS)}")
        # Kept out of the module tree so that checkpoints hold the plain model's names.
        self._compiled = [torch.compile(model)] if compile else []
        self.skipped_batches = 0
        # Batches of the current optimizer step (gradient accumulation) and how many of them had a non-finite loss
        self._micro_batches = self._skipped_micro_batches = 0
        # The sum of the losses of this optimizer step's batches (skipped ones left out) and how many they are
        self._step_loss: torch.Tensor | None = None
        self._step_losses = 0
        # The last training batch's logits, labels, loss, replaced-video count and non-finite flag (a device tensor):
        # metrics, logs and, with nonfinite_loss="error", the check, after backward() has queued the backward pass
        self._after_backward: tuple[torch.Tensor, ...] | None = None
        num_classes = model.config.num_classes
        top_k = min(5, num_classes)

        def accuracy_metrics(prefix: str) -> MetricCollection:
            return MetricCollection(
                {"acc": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
                 "acc_top5": MulticlassAccuracy(num_classes, top_k=top_k, average="micro")},
                prefix=prefix,
            )

        self.train_metrics = accuracy_metrics("train/")
        self.val_metrics = accuracy_metrics("val/")
        self.test_metrics = accuracy_metrics("test/")
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        # Video-level accuracy: views of a video aggregated, every video once across ranks.
        self.val_videos, self.test_videos = ViewAggregator(view_aggregation), ViewAggregator(view_aggregation)
        self.test_results: VideoResults | None = None
        self.last_val_results: VideoResults | None = None

    @property
    def class_names(self) -> list[str] | None:
        return self.model.config.class_names

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """(B, T, C, H, W) -> logits (B, num_classes)."""
        return self._compiled[0](video) if self._compiled else self.model(video)

    # -- steps ---------------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self(batch["video"])
        loss = F.cross_entropy(logits, batch["label"], label_smoothing=self.hparams.label_smoothing)
        self._micro_batches += 1
        # Every DDP process must take the same branch (one alone skipping or stopping would leave the others waiting
        # in the gradient all-reduce): a NaN/inf loss anywhere counts for all. One host sync per step: the price of
        # never training on (or saving) NaN weights.
        nonfinite = self.trainer.strategy.reduce((~torch.isfinite(loss)).float(), reduce_op="sum")
        # "skip" must know now: a skipped batch runs its backward on another graph. "error" reads the flag in
        # on_after_backward, once backward() has queued the backward pass: read here, the GPU would idle from the
        # forward's end until backward() launches (1.4-1.7 ms a step on an H200; benchmarks/gpu.py's "GPU idle
        # before backward ms"). The optimizer step comes after either check: no update is ever made from a NaN loss.
        if self.hparams.nonfinite_loss == "skip" and nonfinite > 0:
            return self._skip_nonfinite_batch()
        self._after_backward = (logits.detach(), batch["label"], loss.detach(), batch.get("replaced"), nonfinite)
        return loss

    def on_after_backward(self) -> None:
        if self._after_backward is None:  # a skipped batch
            return
        logits, labels, loss, replaced, nonfinite = self._after_backward
        self._after_backward = None
        if self.hparams.nonfinite_loss == "error" and nonfinite > 0:  # the step's one host sync
            self._stop_on_nonfinite_loss(loss)
        self.train_metrics.update(logits, labels)
        if replaced is not None:  # broken videos the dataset replaced by others
            self.log("train/replaced_videos", replaced.sum().float(), on_step=False, on_epoch=True, reduce_fx="sum",
                     sync_dist=True, batch_size=len(logits))
        # train/loss is the mean over the optimizer step's batches, logged by on_before_optimizer_step: under
        # gradient accumulation the step's last batch alone would stand for it.
        self._step_loss = loss if self._step_loss is None else self._step_loss + loss
        self._step_losses += 1
        self.log_dict(self.train_metrics, on_step=False, on_epoch=True, batch_size=len(logits))

    def _skip_nonfinite_batch(self) -> torch.Tensor:
        self.skipped_batches += 1
        self._skipped_micro_batches += 1
        self.log("train/skipped_batches", float(self.skipped_batches), reduce_fx="max")
        # A zero loss reaching every parameter: its backward gives zero gradients everywhere, so DDP's all-reduce
        # runs as on any step (Lightning refuses a skipped training_step under DDP); on_before_optimizer_step
        # then drops the gradients of a step whose batches were all skipped.
        return sum(param.sum() for param in self.model.parameters() if param.requires_grad) * 0.0

    def _stop_on_nonfinite_loss(self, loss: torch.Tensor) -> None:
        step = self.trainer.global_step
        # The weights are still finite (this step's update has not happened; its gradients are not kept): keep
        # them for inspection. Under DDP every process gets here (the flag is all-reduced): the checkpoint's
        # barrier is met.
        checkpoint_dir = Path(self.trainer.default_root_dir) / "checkpoints"
        checkpoint = checkpoint_dir / f"nonfinite-step{step}.ckpt"
        self.trainer.save_checkpoint(checkpoint)
        raise FloatingPointError(
            f"non-finite training loss at global step {step} (this process's: {loss.item()}); the weights before "
            f"this step are in {checkpoint}. Lower the learning rate, check the data, or set "
            f"module.nonfinite_loss=skip"
        )

    def _eval_step(self, batch: dict[str, torch.Tensor], metrics: MetricCollection, loss_metric: MeanMetric,
                   videos: ViewAggregator, prefix: str) -> None:
        """Clip-level loss/accuracy (each view on its own) and the views kept for video-level accuracy."""
        logits = self(batch["video"])
        if batch.get("repeated"):  # a view another process evaluates (WholeVideoSampler): this one runs it to take
            # part in the epoch's end, where the metrics are gathered, and counts it nowhere
            logits = logits[:0]
            batch = {key: value[:0] if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
        videos.update(logits, batch["label"], batch["index"], batch.get("view"), batch.get("valid"))
        valid = batch.get("valid")
        if valid is not None:
            self.log(f"{prefix}/failed_views", (~valid.bool()).sum().float(), on_step=False, on_epoch=True,
                     reduce_fx="sum", sync_dist=True, batch_size=len(valid))
        if valid is not None:  # views that failed to decode are reported by the video-level results
            logits, labels = logits[valid.bool()], batch["label"][valid.bool()]
        else:
            labels = batch["label"]
        if len(logits):
            loss_metric.update(F.cross_entropy(logits, labels), weight=len(logits))
            metrics.update(logits, labels)
        self.log(f"{prefix}/loss", loss_metric, on_step=False, on_epoch=True, batch_size=len(logits))
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=prefix == "val", batch_size=len(logits))

    def _log_video_metrics(self, videos: ViewAggregator, prefix: str) -> VideoResults:
        results = videos.compute()  # gathers from every rank: the same numbers everywhere
        videos.reset()
        metrics = results.metrics(self.model.config.num_classes)
        self.log(f"{prefix}/video_acc", metrics["top1"], sync_dist=False)
        self.log(f"{prefix}/video_acc_top5", metrics["top5"], sync_dist=False)
        self.log(f"{prefix}/video_mean_class_acc", metrics["mean_class_accuracy"], sync_dist=False)
        return results

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, self.val_loss, self.val_videos, "val")

    def on_validation_epoch_end(self) -> None:
        self.last_val_results = self._log_video_metrics(self.val_videos, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, self.test_loss, self.test_videos, "test")

    def on_test_epoch_end(self) -> None:
        self.test_results = self._log_video_metrics(self.test_videos, "test")

    # -- optimisation --------------------------------------------------------------------------------------
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._micro_batches and self._skipped_micro_batches == self._micro_batches:
            # Every batch of this step had a non-finite loss: the optimizers leave a parameter without a gradient
            # untouched (no update, momentum or weight decay).
            optimizer.zero_grad(set_to_none=True)
        self._micro_batches = self._skipped_micro_batches = 0
        logging_step = self.trainer._logger_connector.should_update_logs
        if self._step_loss is not None:
            loss = self._step_loss / self._step_losses
            # The mean over the processes (rank 0's alone stood for the global batch) where the loggers write it, and
            # at an epoch's last step and the run's, whose value metrics.json and sweeps read: one all-reduce. (Every
            # process takes the same branch: they step alike.)
            last_step = self.trainer.is_last_batch or 0 < self.trainer.max_steps <= self.trainer.global_step + 1
            if logging_step or last_step:
                loss = self.trainer.strategy.reduce(loss, reduce_op="mean")
            # Not prog_bar: Lightning would read it back to the host after every step. TrainingProgressBar shows it.
            self.log("train/loss", loss)
        self._step_loss, self._step_losses = None, 0
        # The global gradient norm, at the logging interval only (it costs a reduction over every parameter): the
        # loggers' own condition, so that the step it is logged at is the step it was measured at.
        if logging_step:
            norms = [p.grad.detach().norm(2) for p in self.model.parameters() if p.grad is not None]
            if norms:
                self.log("train/grad_norm", torch.stack(norms).norm(2))

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Lightning's clipping, except for a fused optimizer under bf16: Lightning's mixed-precision plugin refuses to
        clip for an optimizer that unscales gradients in its step (loss scaling), though bf16 has no scaling."""
        scaled = getattr(self.trainer.precision_plugin, "scaler", None) is not None
        # (a negative value would flip the gradients in clip_grad_norm_: pipeline.train refuses it)
        if (gradient_clip_val or 0) > 0 and getattr(optimizer, "_step_supports_amp_scaling", False) and not scaled:
            parameters = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            if gradient_clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(parameters, gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(parameters, gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self) -> dict[str, Any]:
        trainer = self.trainer
        options = dict(self.hparams.optimizer)
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            # fp16 loss scaling: a fused optimizer unscales the gradients only inside its step, so clipping (which
            # Lightning then refuses) and train/grad_norm would see them scaled. Unfused, Lightning unscales first.
            options.setdefault("fused", False)
        optimizer = build_optimizer(self.model, **options)
        settings = dict(self.hparams.scheduler)
        total_steps = trainer.estimated_stepping_batches
        if not math.isfinite(total_steps):
            raise ValueError("The learning-rate schedule needs a finite length: set trainer.max_epochs or "
                             "trainer.max_steps (max_epochs=-1 without max_steps trains forever)")
        total_steps = max(int(total_steps), 1)
        if trainer.train_dataloader is None:  # max_epochs=-1: Lightning's estimate did not load the data
            trainer.fit_loop.setup_data()
        batches = trainer.num_training_batches  # per epoch and process (limit_train_batches applied)
        # Warmup is counted in real epochs, whatever stops training (max_epochs, or max_steps first).
        steps_per_epoch = math.ceil(batches / trainer.accumulate_grad_batches) if math.isfinite(batches) else None
        warmup_epochs = settings.pop("warmup_epochs", 0.0)
        if warmup_epochs and steps_per_epoch is None:
            raise ValueError("scheduler.warmup_epochs needs a dataset with a length (an epoch of known size)")
        warmup_steps = int(round(warmup_epochs * steps_per_epoch)) if warmup_epochs else 0
        if warmup_steps > total_steps:
            log.warning("scheduler.warmup_epochs=%s is %d steps, longer than the %d steps of training: the learning "
                        "rate never reaches its peak (%.2g of it at the end)", warmup_epochs, warmup_steps,
                        total_steps, total_steps / warmup_steps)
        settings["milestones"] = tuple(settings.get("milestones", ()))

        def factor(step: int) -> float:
            return lr_multiplier(step, total_steps=total_steps, warmup_steps=warmup_steps, **settings)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- checkpoints carry the architecture so that from_pretrained/evaluate.py need nothing else ------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["timesformer_config"] = self.model.config.to_dict()
        # Lightning does not restore the global RNGs; with them a resumed run draws the same shuffles,
        # augmentations and drop-path masks as an uninterrupted one.
        # (numpy's state as plain types and a tensor, so the checkpoint still loads with weights_only=True)
        algorithm, keys, position, has_gauss, cached_gaussian = np.random.get_state()
        numpy_state = (algorithm, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss),
                       float(cached_gaussian))
        checkpoint["rng_states"] = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
        if torch.cuda.is_available():
            checkpoint["rng_states"]["cuda"] = torch.cuda.get_rng_state_all()
        checkpoint["skipped_batches"] = self.skipped_batches  # train/skipped_batches counts the whole run

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Applied in on_train_start: the sanity-check validation that runs in between draws from the RNGs.
        self._rng_states_to_restore = checkpoint.get("rng_states")
        self.skipped_batches = int(checkpoint.get("skipped_batches", 0))

    def on_fit_start(self) -> None:
        self._run_seed = torch.initial_seed()  # seed_everything's: train.py's `seed`

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Stochastic depth and dropout draw from the global RNG. Each batch reseeds it from (run seed, epoch, batch,
        # rank), so that
        # - the masks differ across processes (seed_everything seeds every process alike: 32 GPUs drew the same
        #   decisions 32 times);
        # - a resumed run draws the masks an uninterrupted one does. The RNG state restored from a checkpoint is not
        #   enough: the DataLoader iterator a resumed run creates draws its base seed from the global RNG after the
        #   restore, where the uninterrupted run drew it earlier (and checkpoints hold rank 0's state only).
        torch.manual_seed(hash((self._run_seed, self.current_epoch, batch_idx, self.global_rank)) % 2**63)

    def on_train_start(self) -> None:
        states, self._rng_states_to_restore = getattr(self, "_rng_states_to_restore", None), None
        if not states:
            return
        torch.set_rng_state(states["torch"])
        algorithm, keys, position, has_gauss, cached_gaussian = states["numpy"]
        np.random.set_state((algorithm, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
        random.setstate(states["python"])
        if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states["cuda"])

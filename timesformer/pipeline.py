"""What ``train.py`` and ``evaluate.py`` do, given a composed Hydra config.

Kept out of the entry points so that tests and notebooks can call ``train(cfg)`` / ``evaluate(cfg)``.
"""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
import urllib.parse
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.plugins.environments import ClusterEnvironment, SLURMEnvironment, TorchElasticEnvironment
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from timesformer.callbacks import AtomicCheckpointIO, PreemptionCheckpoint
from timesformer.evaluation import write_report_files
from timesformer.loggers import CSVLogger
from timesformer.model import TimeSformer, TimeSformerConfig
from timesformer.model.config import ARCHITECTURE_FIELDS
from timesformer.model.timesformer import class_key
from timesformer.model.weights import load_checkpoint_file
from timesformer.module import LOGGED_METRICS, VideoClassifier, check_settings
from timesformer.resolvers import slurm_launch_name, torchrun_launch_name

log = logging.getLogger(__name__)

# Model config keys that are not TimeSformerConfig fields.
_WEIGHT_SOURCES = ("pretrained", "init_from")
# Fields a pretrained checkpoint may have changed for fine-tuning. Its architecture fields must be the config's (an
# error otherwise: the run config would describe another model); num_frames and image_size resize its embeddings.
_REGULARISATION_FIELDS = ("drop_path_rate", "hidden_dropout_prob", "attention_probs_dropout_prob")
_FINETUNE_FIELDS = (*_REGULARISATION_FIELDS, "gradient_checkpointing", "memory_saving_backward", "bf16_residual_stream",
                    "fused_short_attention")


def build_model(model_cfg: DictConfig, class_names: list[str], resumed_from: Path | None = None) -> TimeSformer:
    """A TimeSformer for ``class_names``: new, from a pretrained video checkpoint, or from an image ViT; or, for a run
    that continues ``resumed_from`` (a train.py checkpoint), built as that checkpoint's model, its weights left to
    Lightning's restore."""
    fields: dict[str, Any] = OmegaConf.to_container(model_cfg, resolve=True)
    sources = {key: fields.pop(key, None) for key in _WEIGHT_SOURCES}
    num_classes = fields.pop("num_classes", None) or len(class_names)
    if num_classes != len(class_names):
        raise ValueError(f"model.num_classes={num_classes} but the dataset has {len(class_names)} classes; "
                         f"leave model.num_classes=null to take it from the data")
    if resumed_from is not None:
        return _resumed_model(resumed_from, fields, class_names)
    if sources["pretrained"]:
        wanted = (*ARCHITECTURE_FIELDS, "num_frames", "image_size", *_FINETUNE_FIELDS)
        return TimeSformer.from_pretrained(sources["pretrained"], num_classes=num_classes, class_names=class_names,
                                           **{key: fields[key] for key in wanted if key in fields})
    if sources["init_from"]:
        return TimeSformer.from_image_vit(sources["init_from"], **fields, num_classes=num_classes,
                                          class_names=class_names)
    return TimeSformer(TimeSformerConfig(**fields, num_classes=num_classes, class_names=list(class_names)))


def _resumed_model(path: Path, fields: dict[str, Any], class_names: list[str]) -> TimeSformer:
    """The model of the run ``path`` continues (`_check_resumable` compared its settings), with new weights: Lightning
    restores every one. model.pretrained and init_from are not read: a requeued job must continue when the file it
    started from is gone (from a scratch disk, a cache)."""
    saved = (load_checkpoint_file(path, mmap=True).get("timesformer_config") or {})
    if not saved:  # (a checkpoint older than the config it now holds: the run's config describes its model)
        return TimeSformer(TimeSformerConfig(**fields, num_classes=len(class_names), class_names=list(class_names)))
    saved_classes = saved.get("class_names") or [str(i) for i in range(saved["num_classes"])]
    if list(saved_classes) != list(class_names):
        different = next((name for name in class_names if name not in saved_classes), None)
        raise ValueError(
            f"{path} continues a run on {len(saved_classes)} classes ({', '.join(map(str, saved_classes[:3]))}, ...) "
            f"and this run's data has {len(class_names)}"
            + (f" (e.g. {different!r} is new)" if different else ", numbered otherwise")
            + f": resuming would keep its head, whose rows are its classes. Resume on the run's own data, or start a "
            f"new run from its weights with model.pretrained={path} (a new head, or its rows matched by class name)")
    log.info("Resuming from %s: its model is rebuilt and restored (model.pretrained / init_from are not read)", path)
    free = {key: fields[key] for key in _FINETUNE_FIELDS if key in fields}  # how it runs, not what it is
    return TimeSformer(TimeSformerConfig.from_dict({**saved, **free}))


def _instantiate_all(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a config group (callbacks, loggers; `check_run_options` saw their _target_s); None
    entries are skipped."""
    if not group:
        return []
    return [hydra.utils.instantiate(entry, _convert_="all") for entry in group.values() if entry]


def _use_wandb_offline_without_credentials(cfg: DictConfig) -> None:
    """Never block a user without a W&B account: log offline (``wandb sync`` later) when no key is set."""
    uses_wandb = any("WandbLogger" in str(entry.get("_target_", "")) for entry in (cfg.get("logger") or {}).values()
                     if entry)
    if not uses_wandb or os.environ.get("WANDB_MODE"):
        return
    if not _wandb_credentials_exist():
        log.warning("No W&B credentials found: logging offline. Upload later with `wandb sync <run dir>/wandb`.")
        os.environ["WANDB_MODE"] = "offline"


def _continue_wandb_run(cfg: DictConfig, output_dir: Path) -> None:
    """A resumed run logs to the W&B run it started (its id, from the run dir's wandb/ folder), not a new one."""
    if os.environ.get("WANDB_RUN_ID"):  # a sweep agent's run
        return
    for entry in (cfg.get("logger") or {}).values():
        if not entry or "WandbLogger" not in str(entry.get("_target_", "")) or entry.get("id"):
            continue
        runs = Path(entry.get("save_dir") or output_dir) / "wandb"
        started = sorted(runs.glob("*run-*-*"), key=lambda path: path.stat().st_mtime) if runs.is_dir() else []
        if started:
            with open_dict(entry):
                entry.id = started[-1].name.rsplit("-", 1)[-1]  # (offline-)run-<date>_<time>-<id>
                entry.resume = "allow"
            log.info("W&B: continuing run %s", entry.id)


def _wandb_credentials_exist() -> bool:
    """Where wandb looks for a key: $WANDB_API_KEY (or an identity token file), else the netrc file ($NETRC or
    ~/.netrc, ~/_netrc) entry for the server ($WANDB_BASE_URL, self-hosted, or api.wandb.ai)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    url = urllib.parse.urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    hosts = dict.fromkeys([url.netloc, url.hostname])  # wandb writes host:port for a server on a port
    candidates = ([Path(os.environ["NETRC"]).expanduser()] if os.environ.get("NETRC")
                  else [Path.home() / ".netrc", Path.home() / "_netrc"])
    for path in candidates:
        try:
            entries = netrc.netrc(path)
        except (OSError, netrc.NetrcParseError):
            continue
        if any(host and entries.authenticators(host) for host in hosts):
            return True
    return False


def _print_summary(title: str, metrics: dict[str, float]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in sorted(metrics.items()):
        table.add_row(name, f"{value:.4f}" if isinstance(value, float) else str(value))
    Console().print(table)


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float, torch.Tensor))}


def _global_step(path: Path) -> int | None:
    """The global step a full train.py checkpoint was written at; None when it cannot be read or is not one."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # tensors are not read
    except Exception as error:  # truncated or half-written: any unpickling error
        log.warning("resume=auto: skipping %s, which cannot be read (%s)", path, type(error).__name__)
        return None
    if not (isinstance(checkpoint, dict) and "state_dict" in checkpoint and "loops" in checkpoint):
        return None
    return int(checkpoint.get("global_step", 0))


def find_resume_checkpoint(output_dir: Path) -> Path | None:
    """The readable full checkpoint of the run in ``output_dir`` furthest into training (None for a fresh run).

    Candidates are ``checkpoints/*.ckpt`` and Lightning's SLURM ``hpc_ckpt_*.ckpt``, ranked by the global step they
    were written at, then by modification time (last.ckpt after a best checkpoint of the same step). Modification
    times alone ranked a copied run dir (rsync without -t, a cloud sync, a restore) by the copy's order. A file that
    cannot be loaded (killed mid-write) is skipped with a warning.
    """
    candidates = [*(output_dir / "checkpoints").glob("*.ckpt"), *output_dir.glob("hpc_ckpt_*.ckpt")]
    candidates = [c for c in candidates if not c.name.startswith("nonfinite-")]
    steps = {path: _global_step(path) for path in candidates}
    readable = [path for path, step in steps.items() if step is not None]
    return max(readable, key=lambda path: (steps[path], path.stat().st_mtime), default=None)


def _resolve_ckpt_path(cfg: DictConfig, output_dir: Path) -> str | None:
    resume, ckpt_path = cfg.get("resume"), cfg.get("ckpt_path")
    if resume not in (None, "auto"):
        raise ValueError(f"resume={resume!r} is not supported; valid values: auto, null (or set ckpt_path=PATH)")
    for variable, restarted in (("SLURM_RESTART_COUNT", "a requeued SLURM job"),
                                ("TORCHELASTIC_RESTART_COUNT", "a restarted torchrun attempt (--max-restarts)")):
        restarts = os.environ.get(variable, "0")
        if not (restarts.isdigit() and int(restarts) > 0):
            continue
        # A requeued SLURM job (preempted, or requeued at its time limit) runs its command again, and torchrun
        # restarts its processes after a failure, in the same run dir when they can (_run_dir_is_found_again): they
        # continue from its newest checkpoint (started afresh, or from ckpt_path again, they overwrote them).
        found = _continue_from_newest(output_dir, cfg, f"{restarted} ({variable}={restarts})")
        if found:
            return found
        if not _run_dir_is_found_again(cfg, output_dir):
            log.warning("This is %s (%s=%s), but its run dir is named by the time it started: it cannot find the "
                        "checkpoints of the attempt before it and TRAINS FROM THE START. Add resume=auto to the "
                        "command (or name the run dir: hydra.run.dir=...)", restarted, variable, restarts)
    if ckpt_path:
        if not Path(ckpt_path).is_file():
            raise FileNotFoundError(f"ckpt_path={ckpt_path}: no such checkpoint file" + (
                " (a folder: pass one of its .ckpt files)" if Path(ckpt_path).is_dir() else ""))
        _check_resumable(Path(ckpt_path), cfg)
        run_dir = Path(ckpt_path).resolve().parent.parent
        if (run_dir / ".hydra").is_dir() and run_dir != output_dir.resolve():
            log.warning("ckpt_path=%s continues the run in %s in another run dir, %s: Lightning forgets which "
                        "checkpoint was its best (the test after training takes this run's best), and its logs and "
                        "metrics.csv are split. Continue it in its own dir: hydra.run.dir=%s", ckpt_path, run_dir,
                        output_dir, run_dir)
        return str(ckpt_path)
    if output_dir.name == torchrun_launch_name() and resume != "auto" and find_resume_checkpoint(output_dir):
        # (its restarts continued above): another launch with the same --rdzv-id would train over its checkpoints
        raise FileExistsError(f"{output_dir} holds the checkpoints of an earlier torchrun launch with this --rdzv-id "
                              f"({os.environ.get('TORCHELASTIC_RUN_ID')}): give this launch an id of its own, continue "
                              f"that run with resume=auto, or name another dir: hydra.run.dir=...")
    if resume == "auto":
        _check_sweep_dir_is_fixed()
        found = _continue_from_newest(output_dir, cfg, "resume=auto")
        if not found:
            log.info("resume=auto: no checkpoint in %s, starting a new run", output_dir)
        return found
    return None


def _continue_from_newest(output_dir: Path, cfg: DictConfig, option: str) -> str | None:
    """The run dir's newest checkpoint (`find_resume_checkpoint`), checked against ``cfg``; ``option`` names what
    asked for it, in the log and in errors."""
    found = find_resume_checkpoint(output_dir)
    if found:
        log.info("%s: continuing from %s", option, found)
        _check_resumable(found, cfg, option=option)
    return str(found) if found else None


def _trainer_plugins(plugins: Any) -> list[Any]:
    """``trainer.plugins`` (a config: one, a list or none), built, with `AtomicCheckpointIO` unless it holds a
    checkpoint writer, and Lightning's SLURM environment with its auto-requeue off under SLURM: on SIGUSR1 it
    checkpointed from inside its signal handler, mid-batch or mid-validation (the interrupted batch was then never
    trained on), and trained on until SLURM killed the job. ``PreemptionCheckpoint`` stops at a point that resumes
    exactly and requeues the job instead (``_requeue_only_where_the_run_continues``). A cluster environment in
    ``trainer.plugins`` is kept as it is."""
    plugins = hydra.utils.instantiate(plugins, _convert_="all")
    plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):  # (one the user chose is kept)
        plugins.append(AtomicCheckpointIO())
    if (any(isinstance(plugin, ClusterEnvironment) for plugin in plugins) or TorchElasticEnvironment.detect()
            or not SLURMEnvironment.detect()):
        return plugins  # (torchrun inside a SLURM job: Lightning takes torchrun's ranks, as it should)
    return [*plugins, SLURMEnvironment(auto_requeue=False)]


def _run_dir_is_found_again(cfg: DictConfig, output_dir: Path) -> bool:
    """Whether the same command, run again (a requeued SLURM job), writes to ``output_dir`` again: resume=auto's
    run dir and ``slurm-<job id>`` (several tasks) are named by the command and the job, a dir set on the command line
    (``hydra.run.dir``, ``paths.output_dir``; ``hydra.sweep.dir`` under -m) is the same unless it holds the time
    (``${now:...}``), and so is one a caller of ``train(cfg)`` chose without Hydra. The default one is named by the
    time the run started."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if cfg.get("resume") == "auto" or output_dir.name in (slurm_launch_name(), torchrun_launch_name()):
        return True
    if not HydraConfig.initialized():
        return True
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        return _named_on_command_line("hydra.sweep.dir")
    return _named_on_command_line("hydra.run.dir", "paths.output_dir")


def _named_on_command_line(*keys: str) -> bool:
    """Whether this run's command line sets one of ``keys`` (a dir) to a name without the time in it (``${now:}``)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return False
    written = OmegaConf.to_container(HydraConfig.get().overrides, resolve=False)  # as typed: ${now:...} unresolved
    overrides = [override.lstrip("+").partition("=") for override in [*written["hydra"], *written["task"]]]
    return any(key in keys and "${now:" not in value for key, _, value in overrides)


def _requeue_only_where_the_run_continues(callbacks: list[Any], cfg: DictConfig, output_dir: Path) -> None:
    """A requeued SLURM job runs its command again and continues from the run dir it finds again. In a run dir
    named for this start, a requeue would start the run over, at every requeue: SIGUSR1 then only checkpoints."""
    if not os.environ.get("SLURM_JOB_ID") or _run_dir_is_found_again(cfg, output_dir):
        return
    for callback in callbacks:
        if isinstance(callback, PreemptionCheckpoint) and callback.slurm_requeue:
            log.warning("SIGUSR1 will checkpoint but not requeue this SLURM job: the requeued job would not find the "
                        "run dir %s again and would start over. Add resume=auto to the command (or name the run "
                        "dir: hydra.run.dir=...)", output_dir)
            callback.slurm_requeue = False


def _check_resumable(path: Path, cfg: DictConfig, option: str = "ckpt_path") -> None:
    """ckpt_path (or resume=auto) continues a train.py run: a Lightning checkpoint of a model built as ``cfg.model``
    builds it (`_RESUMED_MODEL_FIELDS`), trained with ``cfg.optimizer`` (its saved state, which Lightning restores,
    holds the learning rates, weight decays and momenta: another value on the command line would be logged and never
    used), ``cfg.scheduler`` and ``cfg.module``'s loss, on clips and batches drawn as ``cfg.data`` draws them
    (`_RESUMED_DATA_KEYS`). A restarted Optuna sweep's job N, say, has other settings than the job N whose checkpoint
    it finds."""
    checkpoint = load_checkpoint_file(path, option, mmap=True)
    if not isinstance(checkpoint, dict) or "pytorch-lightning_version" not in checkpoint:
        raise ValueError(f"{option}: {path} is not a checkpoint of a train.py run (resuming continues one, with its "
                         f"optimizer and loop state); to start from its weights use model.pretrained={path}")
    saved = checkpoint.get("timesformer_config") or {}
    differ = [f"model.{name}={cfg.model.get(name)!r} (it has {saved[name]!r})" for name in _RESUMED_MODEL_FIELDS
              if name in saved and cfg.model.get(name) is not None and cfg.model.get(name) != saved[name]]
    hyper_parameters = checkpoint.get("hyper_parameters") or {}
    run_config = hyper_parameters.get("run_config") or {}
    sections = {"optimizer": hyper_parameters.get("optimizer") or {},
                "scheduler": hyper_parameters.get("scheduler") or {},
                "module": {key: value for key, value in (run_config.get("module") or {}).items()
                           if key in _RESUMED_MODULE_KEYS},
                "data": {key: value for key, value in (run_config.get("data") or {}).items()
                         if key in _RESUMED_DATA_KEYS}}
    for section, saved_settings in sections.items():
        chosen = OmegaConf.to_container(cfg[section], resolve=True) if cfg.get(section) else {}
        # (fused is how the step runs, not state; a key older checkpoints lack is not a difference)
        differ += [f"{section}.{key}={chosen[key]!r} (it has {saved_settings[key]!r})"
                   for key in sorted((set(chosen) & set(saved_settings)) - {"fused"})
                   if chosen[key] != saved_settings[key]]
    if differ:
        raise ValueError(f"{option}: {path} continues a run with other settings: {', '.join(differ)}. Resume with the "
                         f"run's own config (its .hydra/ folder), or start a new run from its weights with "
                         f"model.pretrained={path}")


def _check_same_global_batch(path: Path, global_batch: int) -> None:
    """A resumed run's global batch (processes x data.batch_size x accumulation) must be the run's: the schedule's
    restored step counts optimizer steps of that size, and with another the rest of training ran at the minimum
    learning rate (or past the schedule's end)."""
    hyper_parameters = load_checkpoint_file(path, mmap=True).get("hyper_parameters") or {}
    saved = (hyper_parameters.get("run_config") or {}).get("global_batch_size")
    if saved is not None and saved != global_batch:
        raise ValueError(f"{path} continues a run with a global batch of {saved} clips per optimizer step; this one's "
                         f"is {global_batch} (data.batch_size x processes x accumulate_grad_batches), and the learning-"
                         f"rate schedule, which counts optimizer steps, would not be the run's. Keep its global batch: "
                         f"global_batch_size={saved} derives the accumulation for any process count")


def _check_sweep_dir_is_fixed() -> None:
    """resume=auto under ``-m``: each job continues from its own dir, ``<sweep dir>/<job number>``, which only a sweep
    dir named on the command line keeps (the default one is named by the time)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    if not _named_on_command_line("hydra.sweep.dir"):
        raise ValueError("resume=auto under -m (multirun) needs a sweep dir of its own, e.g. "
                         "hydra.sweep.dir=logs/train/multiruns/my_sweep: the default one is named by the time, so a "
                         "restarted sweep would never find its checkpoints. Each job then continues from "
                         "<sweep dir>/<job number> (the basic sweeper numbers its jobs the same way each time)")


def _apply_global_batch_size(trainer: L.Trainer, global_batch_size: int | None, batch_size: int) -> None:
    """Derive gradient accumulation from the target global batch (the original code hides it)."""
    per_step = batch_size * trainer.world_size
    if global_batch_size:
        if global_batch_size % per_step:
            fitting = global_batch_size // trainer.world_size
            hint = (f" (e.g. data.batch_size={fitting}: {fitting} x {trainer.world_size} = {global_batch_size})"
                    if fitting and global_batch_size % trainer.world_size == 0 else "")
            raise ValueError(
                f"global_batch_size={global_batch_size} is not a multiple of data.batch_size={batch_size} x "
                f"{trainer.world_size} processes = {per_step}; change one of them{hint}")
        accumulation = global_batch_size // per_step
        if trainer.accumulate_grad_batches not in (1, accumulation):
            raise ValueError(
                f"global_batch_size={global_batch_size} means {accumulation} accumulation steps (data.batch_size="
                f"{batch_size} x {trainer.world_size} processes), but trainer.accumulate_grad_batches="
                f"{trainer.accumulate_grad_batches}; set only one of them")
        trainer.accumulate_grad_batches = accumulation
    log.info("Global batch %d = %d per device x %d processes x %d accumulation steps",
             per_step * trainer.accumulate_grad_batches, batch_size, trainer.world_size,
             trainer.accumulate_grad_batches)


def check_run_options(cfg: DictConfig) -> None:
    """train.py options that would otherwise fail late (a misspelt monitored metric: after the first validation) or
    be misread (``test=no`` is true), before any data is read."""
    problems = []
    clip = cfg.trainer.get("gradient_clip_val")
    if clip is not None and clip < 0:  # Lightning skips it; torch's clip_grad_norm_ would flip the gradients
        problems.append(f"trainer.gradient_clip_val={clip} must be >= 0 (0 or null: no clipping)")
    global_batch = cfg.get("global_batch_size")
    if global_batch is not None and (not isinstance(global_batch, int) or global_batch <= 0):
        problems.append(f"global_batch_size={global_batch} must be a positive integer (or null)")
    for name, value in (("test", cfg.get("test")), ("module.compile", (cfg.get("module") or {}).get("compile"))):
        if value is not None and not isinstance(value, bool):
            problems.append(f"{name} must be true or false, got {value!r}")
    metrics = [(f"callbacks.{key}.monitor", entry.get("monitor")) for key, entry in (cfg.get("callbacks") or {}).items()
               if entry and "monitor" in entry]
    for option, metric in [*metrics, ("optimized_metric", cfg.get("optimized_metric"))]:
        # our metrics only: a callback of the user's may log others
        if metric and str(metric).split("/")[0] in ("train", "val", "test") and metric not in LOGGED_METRICS:
            problems.append(f"{option}={metric} is not a metric the model logs; valid values: "
                            f"{', '.join(LOGGED_METRICS)}")
    problems += _direction_problems(cfg)
    if cfg.trainer.get("accelerator") in ("gpu", "cuda") and not torch.cuda.is_available():
        problems.append("trainer.accelerator=gpu (trainer=gpu, ddp) needs a CUDA GPU and none is visible here: use "
                        "trainer=cpu, or trainer=default, which takes what there is")
    for group in ("callbacks", "logger"):  # e.g. +callbacks.x.y=1: nothing would be built from it
        problems += [f"{group}.{key}: an entry of this group needs a _target_ (the class to build); set it to null "
                     "to turn an entry off" for key, entry in (cfg.get(group) or {}).items()
                     if entry and "_target_" not in entry]
    problems += [f"{key} is not an option of train.py (nothing reads it): remove the +{key}=..., or check its "
                 f"spelling against {', '.join(sorted(k for k in cfg if k != key))}" for key in created_keys(cfg)]
    problems += _model_problems(cfg.model)
    # The data config reads the clip length and crop size from the model (configs/data/common): a data.num_frames of
    # its own trained the model's embeddings interpolated at every step, and its exports described the model's
    for key in ("num_frames", "image_size"):
        if cfg.data.get(key) is not None and cfg.data.get(key) != cfg.model.get(key):
            problems.append(f"data.{key}={cfg.data.get(key)} differs from model.{key}={cfg.model.get(key)}: the model "
                            f"sets the clip for both; set model.{key}={cfg.data.get(key)} instead")
    try:  # optimizer, schedule and loss settings (checked for training only: evaluate.py ignores them)
        check_settings(OmegaConf.to_container(cfg.optimizer, resolve=True),
                       OmegaConf.to_container(cfg.scheduler, resolve=True),
                       (cfg.get("module") or {}).get("label_smoothing", 0.0))
    except ValueError as error:
        problems.append(str(error))
    if problems:
        raise ValueError("; ".join(problems))


def _check_weight_sources(model_cfg: DictConfig) -> None:
    """model.pretrained / model.init_from name a file or folder that exists, checked before the dataset is indexed
    (or generated), which can take minutes."""
    for key in _WEIGHT_SOURCES:
        path = model_cfg.get(key)
        if path and not Path(path).exists():
            raise FileNotFoundError(f"model.{key}={path}: no such file or folder")


def _model_problems(model_cfg: DictConfig) -> list[str]:
    """The model's settings, checked as build_model will check them, but before the dataset is indexed (which can
    take minutes for a real one, and the class count it gives is not needed to judge the rest)."""
    fields = OmegaConf.to_container(model_cfg, resolve=True)
    if fields.get("pretrained") and fields.get("init_from"):
        return ["set at most one of model.pretrained (a video checkpoint) and model.init_from (an image ViT)"]
    fields = {key: value for key, value in fields.items() if key not in (*_WEIGHT_SOURCES, "num_classes")}
    try:
        TimeSformerConfig.from_dict(fields)
    except ValueError as error:
        return [f"model: {error}"]
    return []


def _direction_problems(cfg: DictConfig) -> list[str]:
    """A loss monitored with mode=max, an accuracy optimised with direction=minimize: the best checkpoint or trial
    would be the worst one. (Only our metrics, whose direction is known: losses go down, accuracies up.)"""
    from hydra.core.hydra_config import HydraConfig

    def wanted(metric: object) -> str | None:
        if str(metric) not in LOGGED_METRICS:
            return None
        return "min" if str(metric).endswith("/loss") else "max" if "acc" in str(metric) else None

    problems = []
    for key, entry in (cfg.get("callbacks") or {}).items():
        if entry and wanted(entry.get("monitor")) and entry.get("mode", "min") != wanted(entry.get("monitor")):
            problems.append(f"callbacks.{key}.monitor={entry.monitor} with mode={entry.get('mode', 'min')}: the best "
                            f"checkpoint would be the worst; set callbacks.{key}.mode={wanted(entry.monitor)}")
    if HydraConfig.initialized() and wanted(cfg.get("optimized_metric")):
        direction = (HydraConfig.get().sweeper or {}).get("direction")
        expected = wanted(cfg.optimized_metric) + "imize"
        if isinstance(direction, str) and direction != expected:
            problems.append(f"optimized_metric={cfg.optimized_metric} with hydra.sweeper.direction={direction}: the "
                            f"search would look for the worst runs; set hydra.sweeper.direction={expected}")
    return problems


def _override_keys() -> list[str]:
    """The keys of this run's command-line overrides, as written (``+x``, ``++data.y``, ``z``)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return [override.split("=", 1)[0] for override in HydraConfig.get().overrides.task]


def created_keys(cfg: DictConfig) -> list[str]:
    """Top-level keys of ``cfg`` that a ``+key=`` override created (a single + without a dot can only create: Hydra
    refuses + for a key that exists), e.g. ``+global_batch=64`` for global_batch_size."""
    created = {key[1:] for key in _override_keys() if key.startswith("+") and not key.startswith("++")
               and "." not in key}
    return added_keys(declared={str(key) for key in cfg} - created)


def added_keys(declared: set[str]) -> list[str]:
    """Keys added on the command line with ``+key=`` / ``++key=`` under a top-level node ``declared`` does not hold
    (e.g. ``+global_batch=64`` for global_batch_size, ``+model.num_frames=16`` in evaluate.py): nothing reads them."""
    return [key.lstrip("+") for key in _override_keys()
            if key.startswith("+") and key.lstrip("+").split(".")[0] not in declared]


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit, test the best checkpoint, write ``metrics.json`` in the run dir; return the final metrics."""
    check_run_options(cfg)
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = _resolve_ckpt_path(cfg, output_dir)

    datamodule: L.LightningDataModule = hydra.utils.instantiate(cfg.data, _convert_="all")
    if ckpt_path is None:  # (a resumed run does not read them)
        _check_weight_sources(cfg.model)
    datamodule.prepare_data()  # generated data is written here, before the model needs the class list
    model = build_model(cfg.model, datamodule.class_names, resumed_from=Path(ckpt_path) if ckpt_path else None)
    if (cfg.optimizer.get("layer_decay") and not cfg.model.get("pretrained") and not cfg.model.get("init_from")):
        log.warning("optimizer.layer_decay=%s on a model trained from scratch only slows its early blocks down: it is "
                    "for fine-tuning (model.init_from= or model.pretrained=); optimizer.layer_decay=null turns it off",
                    cfg.optimizer.layer_decay)
    log.info("TimeSformer (%s): %.2fM parameters, %d classes", model.config.attention_type,
             model.num_parameters() / 1e6, model.config.num_classes)

    _use_wandb_offline_without_credentials(cfg)
    if ckpt_path is not None:
        _continue_wandb_run(cfg, output_dir)
    loggers = _instantiate_all(cfg.get("logger"))
    resumed_step = None
    if ckpt_path is not None:  # a resumed run continues its CSV file (Lightning's CSVLogger would delete it)
        resumed_step = int(torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)["global_step"])
        for logger in loggers:
            if isinstance(logger, CSVLogger):
                logger.purge_step = resumed_step
    callbacks = _instantiate_all(cfg.get("callbacks"))
    if not loggers:  # logger=none: Lightning refuses a LearningRateMonitor without a logger to write to
        callbacks = [callback for callback in callbacks if not isinstance(callback, LearningRateMonitor)]
    if not cfg.trainer.get("enable_progress_bar", True):  # Lightning refuses a progress bar callback then
        callbacks = [callback for callback in callbacks if not isinstance(callback, ProgressBar)]
    if not cfg.trainer.get("enable_checkpointing", True):  # ...and checkpoint callbacks (preemption still saves)
        callbacks = [callback for callback in callbacks if not isinstance(callback, ModelCheckpoint)]
    _requeue_only_where_the_run_continues(callbacks, cfg, output_dir)
    trainer_options = OmegaConf.to_container(cfg.trainer, resolve=True)
    plugins = _trainer_plugins(trainer_options.pop("plugins", None))
    trainer: L.Trainer = hydra.utils.instantiate(trainer_options, callbacks=callbacks, logger=loggers or False,
                                                 plugins=plugins or None)
    _apply_global_batch_size(trainer, cfg.get("global_batch_size"), cfg.data.batch_size)
    # The run's config as the loggers and checkpoints record it, with the accumulation derived from global_batch_size
    # (the config says 1), the precision Lightning runs, the processes and the global batch they make
    run_config = OmegaConf.to_container(cfg, resolve=True)
    run_config["trainer"]["accumulate_grad_batches"] = trainer.accumulate_grad_batches
    run_config["trainer"]["precision"] = str(trainer.precision)  # what runs: Lightning makes 16-mixed bf16 on a CPU
    run_config["world_size"] = trainer.world_size
    run_config["global_batch_size"] = cfg.data.batch_size * trainer.world_size * trainer.accumulate_grad_batches
    if ckpt_path is not None:
        _check_same_global_batch(Path(ckpt_path), run_config["global_batch_size"])
    module = VideoClassifier(
        model,
        optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True),
        scheduler=OmegaConf.to_container(cfg.scheduler, resolve=True),
        **OmegaConf.to_container(cfg.get("module") or {}, resolve=True),
        run_config=run_config,
    )
    if any(limit != 0 and (isinstance(limit, int) or limit != 1.0)  # an int counts batches: 1 is one batch
           for limit in (trainer.limit_val_batches, trainer.limit_test_batches)):
        log.warning("trainer.limit_val_batches / limit_test_batches: validation and test read the first batches of "
                    "their lists in order (class by class in most lists), so their accuracy is not the split's, nor "
                    "the best checkpoint chosen by it")
    try:
        metrics = _fit_and_test(cfg, trainer, module, datamodule, ckpt_path, resumed_step, output_dir)
        _finish_wandb(loggers)
    except BaseException:
        try:
            _finish_wandb(loggers, exit_code=1)  # under -m the next job would log into this run
        except Exception as error:  # (a W&B service error must not replace the run's own)
            log.warning("Could not close the W&B run: %s", error)
        raise
    finally:  # last: SLURM ends the job as it requeues it (a SIGUSR1 stopped the run; the checkpoint is written)
        for callback in callbacks:
            if isinstance(callback, PreemptionCheckpoint):
                callback.requeue_if_due()
    return metrics


def _fit_and_test(cfg: DictConfig, trainer: L.Trainer, module: VideoClassifier, datamodule: L.LightningDataModule,
                  ckpt_path: str | None, resumed_step: int | None, output_dir: Path) -> dict[str, float]:
    """Fit (from ``ckpt_path``, at ``resumed_step``), test the best checkpoint, write ``metrics.json``."""
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except SIGTERMException:
        log.warning("Training stopped by a signal (preemption); continue it as the message above says")
        return {"preempted": 1.0}
    results_file = output_dir / "metrics.json"
    metrics = _scalars(trainer.callback_metrics)
    if resumed_step is not None and trainer.global_step == resumed_step and results_file.is_file():
        # A finished run started again (resume=auto, a restarted sweep): nothing trained, so Lightning has no metrics;
        # its results stand (they were overwritten with {}, and a sweeper found no objective). A test that did not
        # run (test=false then, or a signal stopped it) runs now.
        previous = json.loads(results_file.read_text())
        if previous:
            if not cfg.get("test") or any(key.startswith("test/") for key in previous):
                log.info("The run in %s was complete: its results are kept (%s)", output_dir, results_file)
                return previous
            metrics = previous

    if cfg.get("test") and not trainer.fast_dev_run:
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if not best:
            log.warning("No best checkpoint was saved: testing the weights at the end of training")
        try:
            test_metrics = trainer.test(module, datamodule=datamodule, ckpt_path=best or None)[0]
        except SIGTERMException:
            log.warning("The test after training was stopped by a signal; training is complete (checkpoints in "
                        "%s). Test with: python evaluate.py ckpt=%s", output_dir / "checkpoints",
                        best or output_dir / "checkpoints" / "last.ckpt")
            test_metrics = {}
        metrics.update(_scalars(test_metrics))
        if test_metrics and module.test_results is not None and not len(module.test_results.indices):
            # torchmetrics gives 0.0 for accuracies that saw no sample, and the loss is NaN: null, as in eval.json
            metrics.update({key: None for key in test_metrics if key != "test/failed_views"})
            log.warning("None of the %d test videos could be decoded: the test results are null. `python -m "
                        "timesformer.data.check` scans a dataset for videos that do not decode",
                        len(module.test_results.failed))
        metrics["best_checkpoint"] = best  # type: ignore[assignment]

    if trainer.is_global_zero:
        # NaN and inf are not JSON (json.dumps wrote them as bare tokens that strict parsers refuse): null
        finite = {key: None if isinstance(value, float) and not math.isfinite(value) else value
                  for key, value in metrics.items()}
        results_file.write_text(json.dumps(finite, indent=2, allow_nan=False) + "\n")
        _print_summary(f"Run summary ({output_dir})", metrics)
    return metrics


def sweep_objective(metrics: dict[str, float], name: str | None, required: bool = False) -> float | None:
    """The value of ``optimized_metric`` (what a Hydra sweeper optimises), None when the run has none; with
    ``required`` (a sweeper that optimises it, which would fail on None), an error naming the results there are
    instead (a misspelt metric, no validation, a preempted run)."""
    if name is None:
        return None
    if metrics.get(name) is None:
        if not required:
            return None
        why = ("the run was preempted (resume it with resume=auto)" if "preempted" in metrics
               else f"the run's results are {', '.join(sorted(metrics))}")
        raise KeyError(f"optimized_metric={name} has no value: {why}")
    return float(metrics[name])


def _finish_wandb(loggers: list[Any], exit_code: int = 0) -> None:
    """Close W&B runs (Lightning leaves them open): flushes the summary, marks a run that failed (``exit_code``),
    and lets a sweep start the next run in a run of its own."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish(exit_code=exit_code)


# How a model's clips are cut. `data=<name>` (evaluate.py, predict.py) swaps the dataset, but these stay the
# checkpoint's unless set on the command line: the new config's values are for training on that dataset.
CLIP_KEYS = ("num_frames", "image_size", "sampling", "sampling_rate", "target_fps", "mean", "std",
             "train_short_side_range")
# Data settings a resumed run must share with the run it continues (`_check_resumable`): how clips are cut and batched,
# and the seed of their draws (the data position is restored as a count of batches, the draws from the seed).
_RESUMED_DATA_KEYS = (*CLIP_KEYS, "batch_size", "repeated_augmentation", "seed")
# And of the model, its architecture and regularisation (configs/hparams_search/optuna.yaml searches drop_path_rate);
# of the module, the loss.
_RESUMED_MODEL_FIELDS = (*ARCHITECTURE_FIELDS, "num_frames", "image_size", "num_classes", *_REGULARISATION_FIELDS)
_RESUMED_MODULE_KEYS = ("label_smoothing",)


def command_line_data_keys() -> set[str]:
    """The data keys set on this run's command line (``data.<key>=``, ``++data.<key>=``), as Hydra recorded them."""
    names = (key.lstrip("+~") for key in _override_keys())
    return {name.split(".")[1] for name in names if name.startswith("data.")}


def swap_dataset(saved_data: DictConfig | dict[str, Any], chosen: DictConfig) -> DictConfig:
    """``chosen`` (a ``data=<name>`` config) with the clip settings (`CLIP_KEYS`) of ``saved_data`` (a
    checkpoint's), except those set on the command line."""
    explicit = command_line_data_keys()
    kept = {key: saved_data[key] for key in CLIP_KEYS if key in saved_data and key not in explicit}
    log.info("data=<name>: clips cut as the checkpoint's (%s)%s", ", ".join(f"{k}={v}" for k, v in kept.items()),
             f"; from the command line: {', '.join(sorted(explicit & set(CLIP_KEYS)))}"
             if explicit & set(CLIP_KEYS) else "")
    saved_source = (saved_data.get("source") or {}).get("_target_")
    if (saved_source and saved_source == (chosen.get("source") or {}).get("_target_") and "split" not in explicit
            and saved_data.get("split") is not None and saved_data.get("split") != chosen.get("split")):
        # The same dataset with numbered splits (UCF101's 1-3): the checkpoint's, whose test videos it did not train
        # on (split 1's test groups are split 2's training ones)
        kept["split"] = saved_data["split"]
        log.info("data=<name>: the checkpoint's data.split=%s (it trained on that split's training list)",
                 saved_data["split"])
    return OmegaConf.merge(chosen, kept)


def require_ckpt(cfg: DictConfig, script: str, what: str) -> None:
    """A clear error for a missing ``ckpt=`` (Hydra's own is a MissingMandatoryValue traceback), naming the newest
    train.py checkpoints under ``paths.log_dir``, which is usually the one wanted."""
    if not OmegaConf.is_missing(cfg, "ckpt"):
        return
    runs = Path(cfg.paths.log_dir) / "train"
    written = [*runs.glob("runs/*/checkpoints/*.ckpt"), *runs.glob("multiruns/*/*/checkpoints/*.ckpt")]
    written = [path for path in written if not path.name.startswith("nonfinite-")]  # the weights before a NaN loss
    newest = sorted(written, key=lambda path: path.stat().st_mtime, reverse=True)[:3]
    found = (f"; the newest under {runs}: " + ", ".join(map(str, newest))) if newest else ""
    raise ValueError(f"{script} needs ckpt=PATH, {what}{found}")


def _saved_run_config(ckpt_path: str) -> DictConfig:
    checkpoint = load_checkpoint_file(ckpt_path, "ckpt", mmap=True)
    if not isinstance(checkpoint, dict):
        raise ValueError(f"ckpt={ckpt_path} is not a train.py checkpoint")
    run_config = checkpoint.get("hyper_parameters", {}).get("run_config")
    if run_config is None:
        raise ValueError(f"{ckpt_path} carries no run config: it was not written by train.py. For a Hugging Face "
                         "folder or an original *.pyth: `python predict.py ckpt=PATH input=VIDEOS`, or test it on a "
                         "dataset with `python train.py model.pretrained=PATH data=... trainer.max_epochs=0`")
    return OmegaConf.create(run_config)


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Rebuild model and data from the checkpoint's saved config, test, write eval.json in the run dir.

    ``cfg.data``, when set, is merged over the saved data config; a full data config (a ``data=<name>``
    group choice, with ``_target_``) replaces it, except how clips are cut (``CLIP_KEYS``, `swap_dataset`),
    which stays the checkpoint's unless the command line sets it.
    """
    unread = added_keys({"task_name", "seed", "ckpt", "module", "data", "trainer", "paths"})
    if unread:
        raise ValueError(f"evaluate.py does not read {', '.join(unread)}: the model is the checkpoint's; its clips are "
                         "set with data.<key>=... (e.g. data.num_frames, data.test_temporal_clips)")
    require_ckpt(cfg, "evaluate.py", "a checkpoint written by train.py")
    if Path(cfg.ckpt).is_dir():
        raise FileNotFoundError(f"ckpt={cfg.ckpt} is a folder: pass a train.py checkpoint file (e.g. "
                                f"{Path(cfg.ckpt) / 'last.ckpt'}). A Hugging Face folder has no dataset to test on: "
                                "`python predict.py ckpt=FOLDER input=VIDEOS`, or `python train.py "
                                "model.pretrained=FOLDER data=... trainer.max_epochs=0`")
    if not Path(cfg.ckpt).is_file():
        raise FileNotFoundError(f"ckpt={cfg.ckpt}: no such checkpoint file")
    if (Path(cfg.paths.output_dir) / "eval.json").exists():
        # The processes of a torchrun launch name their dir for its --rdzv-id (run_name), which a job's launches
        # may share: a second evaluation there overwrote the first's results. (Checked by every process before any
        # writes: eval.json comes last.)
        raise FileExistsError(f"{cfg.paths.output_dir} already holds the results of an evaluation (eval.json): "
                              "choose another dir with hydra.run.dir=..., or remove that one")
    saved = _saved_run_config(cfg.ckpt)
    data_cfg = cfg.get("data")
    if data_cfg and "_target_" in data_cfg:  # a data=<name> group choice replaces the saved dataset
        # whose ${paths.*} and ${seed} are this command's (the saved config's are the training machine's)
        saved.paths, saved.seed = OmegaConf.to_container(cfg.paths, resolve=True), cfg.seed
        saved.data = swap_dataset(saved.data, data_cfg)
    elif data_cfg:
        saved.data = OmegaConf.merge(saved.data, data_cfg)  # data.<key>=<value> overrides
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    datamodule: L.LightningDataModule = hydra.utils.instantiate(saved.data, _convert_="all")
    datamodule.prepare_data()
    model = TimeSformer.from_pretrained(cfg.ckpt)
    if model.config.class_names:  # another dataset (data=...) may order its classes differently, or hold a subset
        datamodule.number_classes_as(model.config.class_names, key=class_key)
    elif datamodule.num_classes != model.config.num_classes:
        raise ValueError(f"the dataset has {datamodule.num_classes} classes, the model {model.config.num_classes}")
    # (checkpoints from before the `module` section have none: their views are aggregated the default way)
    module_settings = {k: v for k, v in (saved.get("module") or {}).items() if k in ("view_aggregation",)}
    if cfg.get("module", {}).get("view_aggregation") is not None:  # evaluate.py module.view_aggregation=...
        module_settings["view_aggregation"] = cfg.module.view_aggregation
    module = VideoClassifier(model, optimizer=OmegaConf.to_container(saved.optimizer),
                             scheduler=OmegaConf.to_container(saved.scheduler), **module_settings)
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, logger=False)
    clip_metrics = _scalars(trainer.test(module, datamodule=datamodule)[0])
    if not trainer.is_global_zero:
        return clip_metrics
    results = module.test_results
    entries = datamodule.test_dataloader().dataset.entries
    class_names = model.config.class_names or [str(c) for c in range(model.config.num_classes)]
    video_metrics = results.metrics(len(class_names))
    evaluated = len(results.indices) > 0  # else torchmetrics gives 0.0 for accuracies that saw no sample: null
    report = {
        "checkpoint": str(Path(cfg.ckpt).resolve()),
        "clip": {"top1": clip_metrics.get("test/acc") if evaluated else None,
                 "top5": clip_metrics.get("test/acc_top5") if evaluated else None,
                 "loss": clip_metrics.get("test/loss") if evaluated else None},
        "video": {k: v if evaluated else None for k, v in video_metrics.items()},  # NaN is not JSON
        "views": {"test_temporal_clips": datamodule.test_temporal_clips,
                  "test_spatial_crops": datamodule.test_spatial_crops},
        "clips": {key: OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
                  for key, value in saved.data.items() if key in CLIP_KEYS},
        "view_aggregation": module.test_videos.aggregation,
        "videos_total": len(entries),
        "videos_evaluated": len(results.indices),
        "failed_videos": [entries[i][0] for i in results.failed],
        # annotated in the test list but not on disk: left out of videos_total (part of the official split untested)
        "missing_videos": list(datamodule.index.missing.get("test", [])),
        "class_names": class_names,
    }
    (output_dir / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    write_report_files(output_dir, results, entries, class_names)
    # (a new dir under logs/eval/runs/ unless hydra.run.dir chose one: not the checkpoint's run dir)
    log.info("eval.json, predictions.csv, per_class.csv and confusion_matrix.png written to %s", output_dir)
    if not evaluated:
        raise RuntimeError(f"None of the {len(entries)} test videos could be decoded: nothing was evaluated. They "
                           f"are listed in {output_dir / 'eval.json'} (failed_videos); `python -m "
                           "timesformer.data.check` scans a dataset for videos that do not decode")
    if results.failed:
        log.warning("%d of %d videos could not be decoded and were not evaluated; see eval.json",
                    len(results.failed), len(entries))
    _print_summary(f"Evaluation of {cfg.ckpt}: {len(results.indices)}/{len(entries)} videos ({output_dir})", {
        "clip top-1": report["clip"]["top1"], "clip top-5": report["clip"]["top5"],
        "video top-1": video_metrics["top1"], "video top-5": video_metrics["top5"],
        "video mean class accuracy": video_metrics["mean_class_accuracy"]})
    return {**clip_metrics, **{f"video/{k}": v for k, v in video_metrics.items()}}

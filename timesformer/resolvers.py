"""The resolvers that configs/ use, registered with OmegaConf when this module is imported (the entry points, and
everything that composes configs/: `timesformer.pipeline`, `timesformer.inference`, `timesformer.data.check`).

- ``${scale:VALUE,FACTOR}``: round(VALUE x FACTOR), e.g. a data config's resize range from the crop size;
- ``${run_name:...}``: the run dir's name (`run_name`), ``${process_suffix:}``: a log file's suffix per process.
"""

from __future__ import annotations

import hashlib
import os

from omegaconf import OmegaConf

# ${scale:${model.image_size},1.25} -> int: data configs size their resize ranges from the crop size.
OmegaConf.register_new_resolver("scale", lambda value, factor: int(round(float(value) * float(factor))), replace=True)


def run_name(resume: str | None, overrides: str, timestamp: str) -> str:
    """The run dir's name: a timestamp, or with resume=auto one derived from the command line alone, so
    that the same command, restarted (a requeued SLURM job), finds its own run dir and continues.

    Processes started together by srun or torchrun each compose their own config: their timestamps differ (one
    run dir per process, the checkpoints in one, the logs of the others elsewhere). They share the launch's id
    instead: ``slurm-<job id>.<step id>`` (`slurm_launch_name`), ``torchrun-<run id>`` (``--rdzv-id``, or torchrun
    --standalone's own)."""
    if resume == "auto":
        return "auto-" + hashlib.sha1(overrides.encode()).hexdigest()[:12]
    return slurm_launch_name() or torchrun_launch_name() or timestamp


def torchrun_launch_name() -> str | None:
    """``torchrun-<run id>`` for the processes of a torchrun launch (several), else None; its restarts keep it."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and os.environ.get("TORCHELASTIC_RUN_ID", "none") != "none":
        return f"torchrun-{os.environ['TORCHELASTIC_RUN_ID']}"
    return None


def slurm_launch_name() -> str | None:
    """``slurm-<job id>.<step id>`` for the tasks of one srun step (several tasks), else None. The step tells apart
    the train.py runs of one job (an sbatch script's srun lines, runs in one salloc), which shared a run dir and
    overwrote each other's checkpoints; a requeued job keeps its id and numbers its steps from 0 again."""
    job, step = os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_STEP_ID")
    if int(os.environ.get("SLURM_NTASKS", "1")) <= 1 or not job:
        return None
    return f"slurm-{job}" + (f".{step}" if step else "")


def process_suffix() -> str:
    """``""`` for the first process of a launch (or the only one), ``_rank<N>`` for the others: under srun or torchrun
    every process writes the run dir's log file, which then held every line once per process."""
    slurm_tasks = int(os.environ.get("SLURM_NTASKS", "1"))
    for variable in ("RANK", "SLURM_PROCID"):
        if int(os.environ.get(variable, "0")) > 0 and (variable == "RANK" or slurm_tasks > 1):
            return f"_rank{os.environ[variable]}"
    return ""


OmegaConf.register_new_resolver("run_name", run_name, replace=True)
OmegaConf.register_new_resolver("process_suffix", process_suffix, replace=True)

"""Shared fixtures: composing the project's Hydra configs the way train.py/evaluate.py do."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

import timesformer.resolvers  # noqa: F401  (registers the config resolvers)
from timesformer import TimeSformer, TimeSformerConfig
from timesformer.module import VideoClassifier

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"

# A dataset small enough for fast_dev_run in a second or two (generated once per test session).
TINY_DATA = [
    "data.source.videos_per_class_train=3",
    "data.source.videos_per_class_val=2",
    "data.source.num_video_frames=24",
    "data.num_workers=0",
    "data.batch_size=4",
]


def compose_config(config_name: str, overrides: list[str], output_dir: Path) -> DictConfig:
    """Compose like @hydra.main does, with the run dir at ``output_dir`` and hydra's runtime info set."""
    os.environ.setdefault("TIMESFORMER_ROOT", str(ROOT))
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name, overrides=[*overrides, f"hydra.run.dir={output_dir}"], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)  # what ${hydra:...} interpolations read
    with open_dict(cfg):
        del cfg.hydra  # @hydra.main hands the task function the config without its hydra node
    return cfg


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """Root for the tiny generated dataset shared by the training tests."""
    return tmp_path_factory.mktemp("synthetic")


def once_per_session(tmp_path_factory: pytest.TempPathFactory, name: str, make: Callable[[Path], None]) -> Path:
    """A folder that ``make(folder)`` fills once per test session, for the end-to-end runs (15-60 s) that several tests
    compare with. Under ``pytest -n`` (make test) the workers share it: the first to ask makes it, the others wait for
    it, wherever the scheduler put their tests (module-scoped fixtures ran once per worker)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # pytest-<n>/: this session's, holding each worker's popen-gw<i>/
    folder, done = base / name, base / f"{name}.done"
    with open(base / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # (released as the file closes)
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # a failed attempt's
            folder.mkdir()
            make(folder)
            done.touch()
    return folder


def run_script(*args: str, env: dict[str, str] | None = None, timeout: int = 600, cwd: Path = ROOT,
               new_session: bool = False) -> subprocess.CompletedProcess:
    """``python <args>`` (train.py, evaluate.py, ...) as a user runs it, from the repository; its output captured."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HYDRA_FULL_ERROR": "0", **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          start_new_session=new_session)


def tiny_classifier(**kwargs) -> VideoClassifier:
    """A one-block TimeSformer for 4 frames of 32 x 32 and 2 classes, trained with plain SGD; the same at each call."""
    torch.manual_seed(1)
    config = TimeSformerConfig(image_size=32, patch_size=8, num_frames=4, hidden_size=32, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=64, num_classes=2)
    return VideoClassifier(TimeSformer(config), optimizer={"name": "sgd", "lr": 0.01, "weight_decay": 0.0},
                           scheduler={"name": "constant"}, **kwargs)


# End-to-end training runs on the generated dataset, and the uninterrupted runs that stopped and resumed ones (and
# DDP ones) are compared with.

def base_args(synthetic_root, run_dir) -> list[str]:
    # (stochastic depth on: a resumed run must draw the masks an uninterrupted one does)
    return ["experiment=demo", f"data.source.root={synthetic_root}", *TINY_DATA, "model.drop_path_rate=0.3",
            "trainer.enable_progress_bar=false", "test=false", f"hydra.run.dir={run_dir}"]


def final_weights(run_dir) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]


# Two DataLoader workers (persistent): their clip draws must not depend on which worker reads what, nor on the
# workers having been restarted. 6 training videos in batches of 4: 2 steps an epoch.
WORKERS = ["data.num_workers=2"]


@pytest.fixture(scope="session")
def uninterrupted_run(synthetic_root, tmp_path_factory):
    def make(run_dir):
        result = run_script("train.py", *base_args(synthetic_root, run_dir), *WORKERS, "trainer.max_epochs=2")
        assert result.returncode == 0, result.stderr[-3000:]

    return once_per_session(tmp_path_factory, "straight", make)


def assert_same_run(actual_dir, expected_dir) -> None:
    expected, actual = final_weights(expected_dir), final_weights(actual_dir)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=0, msg=name)
    expected_metrics = json.loads((expected_dir / "metrics.json").read_text())
    actual_metrics = json.loads((actual_dir / "metrics.json").read_text())
    assert actual_metrics["val/acc"] == expected_metrics["val/acc"]


# Batches of 2 (3 an epoch; validation: 2) and 2 batches per optimizer step.
ACCUMULATING = ["data.batch_size=2", "trainer.accumulate_grad_batches=2", "trainer.max_epochs=2"]


@pytest.fixture(scope="session")
def uninterrupted_accumulating_run(synthetic_root, tmp_path_factory):
    def make(run_dir):
        result = run_script("train.py", *base_args(synthetic_root, run_dir), *ACCUMULATING)
        assert result.returncode == 0, result.stderr[-3000:]

    return once_per_session(tmp_path_factory, "straight_accumulating", make)


def slurm_job(tmp_path, restart_count: int = 0) -> dict[str, str]:
    """The environment of a one-task SLURM batch job (4242), with a stand-in ``scontrol`` that records its arguments
    in ``tmp_path/scontrol.log``, and the files of ``tmp_path/run`` as it ran in ``tmp_path/run_at_requeue.txt``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n'
                        f'ls {tmp_path / "run"} > {tmp_path / "run_at_requeue.txt"} 2>&1\nexit 0\n')
    scontrol.chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1",
            "SLURM_JOB_NAME": "timesformer", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
            "SLURM_RESTART_COUNT": str(restart_count)}


DDP = ["trainer=ddp_cpu", "data.batch_size=2", "trainer.max_epochs=2"]  # 2 batches per process and epoch


@pytest.fixture(scope="session")
def uninterrupted_ddp_run(synthetic_root, tmp_path_factory):
    """Two processes, 2 epochs; each rank's final weights in ``weights_rank<r>.pt``."""
    def make(run_dir):
        dump_weights = ["+callbacks.dump._target_=tests.callbacks.DumpWeights", f"+callbacks.dump.dirpath={run_dir}"]
        result = run_script("train.py", *base_args(synthetic_root, run_dir), *DDP, *dump_weights, timeout=240)
        assert result.returncode == 0, result.stderr[-3000:]

    return once_per_session(tmp_path_factory, "straight_ddp", make)

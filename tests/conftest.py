"""Shared fixtures: composing the project's Hydra configs the way train.py/evaluate.py do."""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

import timesformer.pipeline  # noqa: F401  (registers the config resolvers)

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

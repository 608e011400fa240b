"""Experiment tracking: W&B offline runs, sweep configs that launch valid train.py commands, local sweeps."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import CONFIG_DIR, ROOT, TINY_DATA
from tests.wandb_records import logged_keys


def run(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_wandb_offline_run_records_metrics_and_media(synthetic_root, tmp_path):
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}
    env.pop("WANDB_API_KEY", None)
    result = run("train.py", "experiment=demo", f"data.source.root={synthetic_root}", *TINY_DATA, "logger=wandb",
                 "trainer.max_epochs=2", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
                 f"hydra.run.dir={tmp_path / 'run'}", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((tmp_path / "run").rglob("*"))[:20]
    history, config = logged_keys(next(runs[0].glob("run-*.wandb")))
    for key in ("val/acc", "val/video_acc", "train/loss", "train/grad_norm", "test/acc", "lr-AdamW/pg1",
                "val/clips/captions", "val/confusion_matrix/path"):
        assert key in history, sorted(history)
    assert "run_config" in config  # the resolved Hydra config
    media = [p.name for p in (runs[0] / "files" / "media").rglob("*")]
    assert any(name.endswith(".gif") for name in media), media
    assert any(name.endswith(".png") for name in media), media


SWEEPS = sorted((CONFIG_DIR / "sweep").glob("*.yaml"))


@pytest.mark.parametrize("sweep_file", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_wandb_sweep_launches_a_valid_train_command(sweep_file):
    """Build the command `wandb agent` runs (${args_no_hyphens}: param=value) and let Hydra validate it."""
    sweep = yaml.safe_load(sweep_file.read_text())
    assert sweep["program"] == "train.py"
    assert "${args_no_hyphens}" in sweep["command"]
    assert sweep["metric"]["name"] in ("val/acc", "val/video_acc")
    args = []
    for name, spec in sweep["parameters"].items():
        value = spec["values"][0] if "values" in spec else spec.get("value", spec.get("min"))
        args.append(f"{name}={value}")
    command = [part for part in sweep["command"] if not part.startswith("${")]
    result = run("train.py", *command, *args, "--cfg", "job", "--resolve")
    assert result.returncode == 0, result.stderr[-2000:]
    printed = yaml.safe_load(result.stdout)
    for name, spec in sweep["parameters"].items():
        node = printed
        for part in name.split("."):
            node = node[part]
        expected = spec["values"][0] if "values" in spec else spec.get("value", spec.get("min"))
        assert node == expected, name


@pytest.mark.slow
def test_local_optuna_sweep_runs_two_trials(synthetic_root, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    result = run("train.py", "-m", "hparams_search=optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=1",
                 "experiment=demo", f"data.source.root={synthetic_root}", *TINY_DATA, "trainer.max_epochs=1",
                 "trainer.enable_progress_bar=false", "test=false", f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    optimization = yaml.safe_load(Path(tmp_path / "optimization_results.yaml").read_text())
    assert 0.0 <= optimization["best_value"] <= 1.0
    assert len([d for d in tmp_path.iterdir() if d.is_dir() and d.name.isdigit()]) == 2


def _tensorboard_scalars(folder: Path) -> set[str]:
    """Tags of the scalars in TensorBoard event files (TFRecord: length, crc, Event proto, crc)."""
    import struct

    from tensorboardX.proto import event_pb2

    tags = set()
    for path in folder.rglob("events.out.tfevents.*"):
        data, position = path.read_bytes(), 0
        while position + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[position:position + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[position + 12:position + 12 + length])
            tags |= {value.tag for value in event.summary.value}
            position += 12 + length + 4
    return tags


@pytest.mark.slow
def test_tensorboard_and_csv_loggers_record_the_metrics(synthetic_root, tmp_path):
    result = run("train.py", "experiment=demo", f"data.source.root={synthetic_root}", *TINY_DATA,
                 "logger=tensorboard", "+logger.csv._target_=lightning.pytorch.loggers.CSVLogger",
                 f"+logger.csv.save_dir={tmp_path / 'run'}", "trainer.max_epochs=1", "trainer.log_every_n_steps=1",
                 "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr[-3000:]
    tags = _tensorboard_scalars(tmp_path / "run" / "tensorboard")
    for tag in ("val/acc", "val/video_acc", "train/loss", "test/acc"):
        assert tag in tags, sorted(tags)
    header = next((tmp_path / "run").rglob("metrics.csv")).read_text().splitlines()[0].split(",")
    assert "val/acc" in header and "train/loss" in header


def test_tensorboard_writers_opened_in_the_same_second_keep_their_events(tmp_path):
    # Lightning closes the writer after fit and opens another for test; tensorboardX names files by the second.
    from timesformer.loggers import TensorBoardLogger

    logger = TensorBoardLogger(save_dir=str(tmp_path), name="tensorboard", version="")
    logger.log_metrics({"val/acc": 0.5}, step=0)
    logger.finalize("success")
    logger.log_metrics({"test/acc": 0.5}, step=1)
    logger.finalize("success")
    assert {"val/acc", "test/acc"} <= _tensorboard_scalars(tmp_path / "tensorboard")

"""A run that stops (killed, preempted, requeued) and resumes ends like one that did not: same weights, same metrics;
resume=auto and the run dirs it finds again."""

import csv
import os
import signal
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import (
    ACCUMULATING,
    CONFIG_DIR,
    DDP,
    WORKERS,
    assert_same_run,
    base_args,
    run_script,
    slurm_job,
    tiny_classifier,
)
from timesformer.pipeline import find_resume_checkpoint
from timesformer.resolvers import run_name


@pytest.mark.slow
def test_killed_and_resumed_run_ends_like_an_uninterrupted_one(synthetic_root, tmp_path, uninterrupted_run):
    interrupted = tmp_path / "interrupted"
    args = [*base_args(synthetic_root, interrupted), *WORKERS, "trainer.max_epochs=2", "resume=auto"]
    killed = run_script("train.py", *args, "+callbacks.kill._target_=tests.callbacks.KillAtEpoch",
                        "+callbacks.kill.epoch=1")
    assert killed.returncode == -signal.SIGKILL
    resumed = run_script("train.py", *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "continuing from" in resumed.stdout + resumed.stderr
    assert_same_run(interrupted, uninterrupted_run)


@pytest.mark.slow
def test_a_step_bounded_run_resumes_exactly(synthetic_root, tmp_path, uninterrupted_run):
    """With trainer.max_steps Lightning numbers the epochs one ahead after a resume (its set_epoch call): the data
    order follows the trainer's epoch instead. 2 epochs of 2 steps: the same schedule as the 2-epoch run.
    (max_epochs=-1: with both bounds, Lightning 2.6 also stops such a resumed run an epoch early.)"""
    interrupted = tmp_path / "interrupted"
    steps = [*WORKERS, "trainer.max_epochs=-1", "trainer.max_steps=4", "resume=auto"]
    killed = run_script("train.py", *base_args(synthetic_root, interrupted), *steps,
                        "+callbacks.kill._target_=tests.callbacks.KillAtEpoch", "+callbacks.kill.epoch=1")
    assert killed.returncode == -signal.SIGKILL
    resumed = run_script("train.py", *base_args(synthetic_root, interrupted), *steps)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(interrupted, uninterrupted_run)


@pytest.mark.slow
def test_sigterm_mid_epoch_writes_a_checkpoint_that_resumes_exactly(synthetic_root, tmp_path, uninterrupted_run):
    """SIGTERM to the run's whole process group, as a cluster sends it: the DataLoader workers get it too (PyTorch's
    own handler killed them, and the run crashed without a checkpoint)."""
    run_dir = tmp_path / "run"
    args = [*base_args(synthetic_root, run_dir), *WORKERS, "trainer.max_epochs=2", "resume=auto"]
    result = run_script("train.py", *args, "+callbacks.term._target_=tests.callbacks.SignalAtStep",
                        "+callbacks.term.step=3", "+callbacks.term.group=true", new_session=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SIGTERM received: checkpoint written" in result.stdout + result.stderr
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert (checkpoint["epoch"], checkpoint["global_step"]) == (1, 3)  # epoch 1's second batch is still to come
    resumed = run_script("train.py", *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "continuing from" in resumed.stdout + resumed.stderr
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == 1
    assert_same_run(run_dir, uninterrupted_run)


@pytest.mark.slow
@pytest.mark.parametrize("where, signal_name", [("train_batch", "SIGTERM"), ("validation_batch", "SIGUSR1")])
def test_preemption_waits_for_a_point_that_resumes_exactly(synthetic_root, tmp_path, uninterrupted_accumulating_run,
                                                           where, signal_name):
    """A signal after the first batch of an accumulation window (its gradients would be in no checkpoint), or during
    validation (the resumed run would never validate that epoch): the stop waits for the window's step, or the
    validation's end.

    The SIGUSR1 case runs as a SLURM job (``--signal=SIGUSR1@120 --requeue``): Lightning's auto-requeue wrote its
    hpc_ckpt at once, mid-validation, and trained on. Now the job is requeued after our checkpoint, and the requeued
    job (SLURM_RESTART_COUNT=1, here without resume=auto) continues from it."""
    run_dir = tmp_path / "run"
    on_slurm = signal_name == "SIGUSR1"
    result = run_script("train.py", *base_args(synthetic_root, run_dir), *ACCUMULATING, "resume=auto",
                        "+callbacks.term._target_=tests.callbacks.SignalInEpoch", "+callbacks.term.epoch=0",
                        f"+callbacks.term.{where}=0", f"+callbacks.term.signal_name={signal_name}",
                        env=slurm_job(tmp_path) if on_slurm else None)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{signal_name} received: checkpoint written" in result.stdout + result.stderr
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == (1 if where == "train_batch" else 2)  # after the step / epoch 0's end
    if on_slurm:
        assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
        assert not list(run_dir.glob("hpc_ckpt_*.ckpt"))
        resumed = run_script("train.py", *base_args(synthetic_root, run_dir), *ACCUMULATING,
                             env=slurm_job(tmp_path, restart_count=1))
        assert "a requeued SLURM job (SLURM_RESTART_COUNT=1): continuing from" in resumed.stdout + resumed.stderr
        assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"  # the finished job is not requeued
    else:
        resumed = run_script("train.py", *base_args(synthetic_root, run_dir), *ACCUMULATING, "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(run_dir, uninterrupted_accumulating_run)
    with open(run_dir / "csv" / "metrics.csv") as file:
        validated = {row["epoch"] for row in csv.DictReader(file) if row.get("val/acc")}
    assert validated == {"0", "1"}


@pytest.mark.slow
@pytest.mark.parametrize("signal_name, rank, batch", [("SIGUSR1", 0, 0), ("SIGTERM", None, 1)])
def test_preempted_ddp_processes_stop_together_and_resume_exactly(synthetic_root, tmp_path, uninterrupted_ddp_run,
                                                                  signal_name, rank, batch):
    """kill -USR1 <the launching process> reaches rank 0 only: its flag alone left the other process waiting in a
    collective (a hang). A cluster signals every process: on an epoch's last batch Lightning's broadcast from inside
    its signal handler met another collective (gloo: 'Received data size doesn't match expected size')."""
    run_dir = tmp_path / "run"
    signal_at = ["+callbacks.term._target_=tests.callbacks.SignalInEpoch", "+callbacks.term.epoch=0",
                 f"+callbacks.term.train_batch={batch}", f"+callbacks.term.signal_name={signal_name}"]
    if rank is not None:
        signal_at.append(f"+callbacks.term.rank={rank}")
    result = run_script("train.py", *base_args(synthetic_root, run_dir), *DDP, "resume=auto", *signal_at, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{signal_name} received: checkpoint written" in result.stdout + result.stderr
    resumed = run_script("train.py", *base_args(synthetic_root, run_dir), *DDP, "resume=auto", timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(run_dir, uninterrupted_ddp_run)


def test_resume_auto_skips_a_truncated_checkpoint(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    good = checkpoints / "last.ckpt"
    torch.save({"state_dict": {"w": torch.ones(3)}, "loops": {}, "global_step": 5}, good)
    newer = checkpoints / "latest-step.ckpt"
    newer.write_bytes(good.read_bytes()[:40])  # killed mid-write
    os.utime(good, (1, 1))  # the truncated file is the newest
    assert find_resume_checkpoint(tmp_path) == good
    good.unlink()
    assert find_resume_checkpoint(tmp_path) is None


def test_resume_auto_continues_from_the_checkpoint_furthest_into_training(tmp_path):
    """Not the newest file: a run dir copied file by file (rsync without -t, a cloud sync) has the copy's mtimes,
    and resume=auto continued from latest-step.ckpt at step 4, redoing the steps to last.ckpt's 6."""
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    for name, step, mtime in (("last.ckpt", 6, 1), ("latest-step.ckpt", 4, 3), ("epoch=1-val_acc=0.9.ckpt", 6, 0)):
        torch.save({"state_dict": {}, "loops": {}, "global_step": step}, checkpoints / name)
        os.utime(checkpoints / name, (mtime, mtime))
    assert find_resume_checkpoint(tmp_path) == checkpoints / "last.ckpt"  # (the best one: step 6 too, but older)


def test_resume_auto_never_continues_from_the_weights_saved_before_a_nonfinite_loss(tmp_path):
    """nonfinite-step<N>.ckpt (module.nonfinite_loss=error) holds the weights before a NaN loss, for inspection: it is
    furthest into training and newest, and continuing from it would meet the same NaN again. last.ckpt is chosen."""
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    for name, step, mtime in (("last.ckpt", 4, 1), ("nonfinite-step6.ckpt", 6, 2)):
        torch.save({"state_dict": {}, "loops": {}, "global_step": step}, checkpoints / name)
        os.utime(checkpoints / name, (mtime, mtime))
    assert find_resume_checkpoint(tmp_path) == checkpoints / "last.ckpt"
    (checkpoints / "last.ckpt").unlink()
    assert find_resume_checkpoint(tmp_path) is None  # a new run, not the snapshot


def test_a_restarted_torchrun_attempt_continues_and_a_requeue_that_cannot_says_so(tmp_path, monkeypatch, caplog):
    """torchrun --max-restarts restarts every process in the same run dir (torchrun-<run id>): the restarted attempt
    trained from the start over the failed one's checkpoints. A requeued job whose run dir is named by the time
    started over with no word."""
    import logging

    from omegaconf import OmegaConf

    from timesformer import pipeline

    monkeypatch.setattr(pipeline, "_check_resumable", lambda *args, **kwargs: None)  # (a stand-in checkpoint)
    (tmp_path / "checkpoints").mkdir()
    torch.save({"state_dict": {}, "loops": {}, "global_step": 6}, tmp_path / "checkpoints" / "last.ckpt")
    cfg = OmegaConf.create({"resume": None, "ckpt_path": None})
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert pipeline._resolve_ckpt_path(cfg, tmp_path) is None  # the first attempt: a new run
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert pipeline._resolve_ckpt_path(cfg, tmp_path) == str(tmp_path / "checkpoints" / "last.ckpt")

    # The first attempt failed before its first checkpoint: the restart starts anew, in the same dir, without a word
    # (it warned that its dir was named by the time and that it trained from the start)
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    launched = SimpleNamespace(mode=RunMode.RUN, overrides=OmegaConf.create({"hydra": [], "task": []}))
    monkeypatch.setattr(HydraConfig, "initialized", staticmethod(lambda: True))
    monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: launched))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job7")
    with caplog.at_level(logging.WARNING):
        assert pipeline._resolve_ckpt_path(cfg, tmp_path / "torchrun-job7") is None
    assert not caplog.records
    # A new launch (restart count 0) with the id of one whose checkpoints are there trained over them
    (tmp_path / "torchrun-job7" / "checkpoints").mkdir(parents=True)
    (tmp_path / "torchrun-job7" / "checkpoints" / "last.ckpt").write_bytes((tmp_path / "checkpoints" /
                                                                            "last.ckpt").read_bytes())
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    with pytest.raises(FileExistsError, match="checkpoints of an earlier torchrun launch with this --rdzv-id"):
        pipeline._resolve_ckpt_path(cfg, tmp_path / "torchrun-job7")
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    monkeypatch.setattr(pipeline, "_run_dir_is_found_again", lambda cfg, output_dir: False)  # a timestamped dir
    with caplog.at_level(logging.WARNING):
        assert pipeline._resolve_ckpt_path(cfg, tmp_path / "new") is None
    assert "a requeued SLURM job (SLURM_RESTART_COUNT=2), but its run dir is named by the time" in caplog.text
    assert "TRAINS FROM THE START" in caplog.text


def test_ckpt_path_into_another_run_dir_says_how_to_continue_in_its_own(tmp_path, monkeypatch, caplog):
    """The preemption message said to continue with ckpt_path=...: without hydra.run.dir the run went on in a new
    dir, where Lightning forgot its best checkpoint, and the test after training took a worse one."""
    import logging

    from omegaconf import OmegaConf

    from timesformer import pipeline
    from timesformer.callbacks import preempted_message

    monkeypatch.setattr(pipeline, "_check_resumable", lambda *args, **kwargs: None)  # (a stand-in checkpoint)
    run_dir = tmp_path / "runs" / "first"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / "checkpoints").mkdir()
    last = run_dir / "checkpoints" / "last.ckpt"
    torch.save({"state_dict": {}, "loops": {}, "global_step": 6}, last)
    assert f"ckpt_path={last} hydra.run.dir={run_dir}" in preempted_message(last, "SIGTERM")
    cfg = OmegaConf.create({"resume": None, "ckpt_path": str(last)})
    with caplog.at_level(logging.WARNING):
        assert pipeline._resolve_ckpt_path(cfg, run_dir) == str(last)
    assert not caplog.records  # its own dir
    with caplog.at_level(logging.WARNING):
        pipeline._resolve_ckpt_path(cfg, tmp_path / "runs" / "second")
    assert "Lightning forgets which checkpoint was its best" in caplog.text
    assert f"hydra.run.dir={run_dir}" in caplog.text


def test_resume_auto_run_dir_depends_only_on_the_command(tmp_path):
    assert run_name("auto", "a=1,b=2", "2026-01-01") == run_name("auto", "a=1,b=2", "2027-05-05")
    assert run_name("auto", "a=1,b=2", "t") != run_name("auto", "a=1,b=3", "t")
    assert run_name(None, "a=1", "2026-01-01_00-00-00") == "2026-01-01_00-00-00"


def test_processes_launched_together_share_a_run_dir_and_keep_their_own_logs(tmp_path, monkeypatch):
    """Under srun or torchrun each process composed its own timestamped run dir (16 GPUs: 16 run dirs, the
    checkpoints in one), and with resume=auto all of them appended to one train.log."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    def log_file() -> str:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose("train", return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir, cfg.hydra.job.name = str(tmp_path), "train"
        return cfg.hydra.job_logging.handlers.file.filename

    for variable in ("RANK", "WORLD_SIZE", "SLURM_NTASKS", "SLURM_JOB_ID", "SLURM_PROCID", "SLURM_STEP_ID",
                     "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(variable, raising=False)
    assert run_name(None, "a=1", "2026-01-01_00-00-00") == "2026-01-01_00-00-00"
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_PROCID", "3")
    assert run_name(None, "a=1", "2026-01-01_00-00-03") == "slurm-4242"  # every task, whenever it starts
    assert log_file() == f"{tmp_path}/train_rank3.log"
    monkeypatch.setenv("SLURM_STEP_ID", "0")  # an srun step: two in one job are two runs, with two run dirs
    assert run_name(None, "a=1", "t") == "slurm-4242.0"
    monkeypatch.setenv("SLURM_STEP_ID", "1")
    assert run_name(None, "a=1", "t") == "slurm-4242.1"
    for variable in ("SLURM_NTASKS", "SLURM_JOB_ID", "SLURM_PROCID", "SLURM_STEP_ID"):
        monkeypatch.delenv(variable)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc")
    assert run_name(None, "a=1", "t") == "torchrun-abc"
    assert log_file() == f"{tmp_path}/train.log"  # rank 0


def test_processes_draw_their_own_masks_and_the_same_ones_on_resume():
    """seed_everything seeds every process alike: each GPU drew the same stochastic-depth and dropout masks. And a
    resumed single process drew other masks: its new DataLoader iterator took a draw from the restored RNG."""
    module = tiny_classifier()
    module.on_fit_start()

    def draws(rank: int, batch_idx: int = 3, world_size: int = 2) -> torch.Tensor:
        module._trainer = SimpleNamespace(world_size=world_size, global_rank=rank, current_epoch=0)
        module.on_train_batch_start(None, batch_idx)
        return torch.rand(8)

    assert not torch.equal(draws(0), draws(1))
    assert torch.equal(draws(1), draws(1))  # a function of the batch's place: a resumed run draws the same
    assert not torch.equal(draws(1), draws(1, batch_idx=4))
    alone = draws(0, world_size=1)
    torch.empty((), dtype=torch.int64).random_()  # what creating a DataLoader iterator draws
    assert torch.equal(draws(0, world_size=1), alone)
    module._trainer = None


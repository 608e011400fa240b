"""Training at scale without lost work: DDP, global batch, resume, preemption, non-finite losses."""

import csv
import json
import os
import signal
import subprocess
import sys
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from tests.conftest import CONFIG_DIR, ROOT, TINY_DATA, compose_config, once_per_session
from timesformer import TimeSformer, TimeSformerConfig
from timesformer.module import VideoClassifier, check_settings, lr_multiplier
from timesformer.pipeline import _apply_global_batch_size, find_resume_checkpoint, run_name


def run_train(*args: str, timeout: int = 600, new_session: bool = False,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, start_new_session=new_session)


def base_args(synthetic_root, run_dir) -> list[str]:
    return ["experiment=demo", f"data.source.root={synthetic_root}", *TINY_DATA, "trainer.enable_progress_bar=false",
            "test=false", f"hydra.run.dir={run_dir}"]


def final_weights(run_dir) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]


@pytest.mark.slow
def test_ddp_cpu_two_processes_agree_and_validate_on_every_video(synthetic_root, tmp_path, uninterrupted_ddp_run):
    run_dir = uninterrupted_ddp_run
    rank0 = torch.load(run_dir / "weights_rank0.pt")
    rank1 = torch.load(run_dir / "weights_rank1.pt")
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    # Validation accuracy synced over both ranks equals a single-process pass over the whole split.
    metrics = json.loads((run_dir / "metrics.json").read_text())
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    evaluation = subprocess.run(
        [sys.executable, "evaluate.py", f"ckpt={run_dir / 'checkpoints' / 'last.ckpt'}", "trainer=cpu",
         "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp_path / 'eval'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["clip"]["top1"] == pytest.approx(metrics["val/acc"])
    assert report["video"]["top1"] == pytest.approx(metrics["val/video_acc"])

    # 5 videos x 3 clips (frames 1 apart: no two alike): 15 views do not split evenly over 2 processes. Lightning's
    # sampler would repeat one to even them out, and the clip-level loss and accuracy counted it.
    videos = sorted((synthetic_root / "val").glob("*/*.mp4")) + sorted((synthetic_root / "train").glob("*/*.mp4"))[:1]
    assert len(videos) == 5
    (tmp_path / "lists").mkdir()
    for name in ("train.csv", "val.csv", "test.csv"):
        (tmp_path / "lists" / name).write_text("".join(f"{v},{v.parent.name}\n" for v in videos))
    reports = {}
    for trainer in ("cpu", "ddp_cpu"):
        evaluation = subprocess.run(
            [sys.executable, "evaluate.py", f"ckpt={run_dir / 'checkpoints' / 'last.ckpt'}", f"trainer={trainer}",
             "data=csv", f"data.root={tmp_path / 'lists'}", "data.test_temporal_clips=3", "data.test_spatial_crops=1",
             "data.sampling_rate=1", "data.num_workers=0", "data.batch_size=4", "trainer.enable_progress_bar=false",
             f"hydra.run.dir={tmp_path / trainer}"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert evaluation.returncode == 0, evaluation.stderr[-3000:]
        reports[trainer] = json.loads((tmp_path / trainer / "eval.json").read_text())
    assert reports["ddp_cpu"]["clip"] == pytest.approx(reports["cpu"]["clip"], rel=1e-5)
    assert reports["ddp_cpu"]["video"] == pytest.approx(reports["cpu"]["video"], rel=1e-5)


# Two DataLoader workers (persistent): their clip draws must not depend on which worker reads what, nor on the
# workers having been restarted. 6 training videos in batches of 4: 2 steps an epoch.
WORKERS = ["data.num_workers=2"]


@pytest.fixture(scope="module")
def uninterrupted_run(synthetic_root, tmp_path_factory):
    def make(run_dir):
        result = run_train(*base_args(synthetic_root, run_dir), *WORKERS, "trainer.max_epochs=2")
        assert result.returncode == 0, result.stderr[-3000:]

    return once_per_session(tmp_path_factory, "straight", make)


def assert_same_run(actual_dir, expected_dir) -> None:
    expected, actual = final_weights(expected_dir), final_weights(actual_dir)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=0, msg=name)
    expected_metrics = json.loads((expected_dir / "metrics.json").read_text())
    actual_metrics = json.loads((actual_dir / "metrics.json").read_text())
    assert actual_metrics["val/acc"] == expected_metrics["val/acc"]


@pytest.mark.slow
def test_killed_and_resumed_run_ends_like_an_uninterrupted_one(synthetic_root, tmp_path, uninterrupted_run):
    interrupted = tmp_path / "interrupted"
    killed = run_train(*base_args(synthetic_root, interrupted), *WORKERS, "trainer.max_epochs=2", "resume=auto",
                       "+callbacks.kill._target_=tests.callbacks.KillAtEpoch", "+callbacks.kill.epoch=1")
    assert killed.returncode == -signal.SIGKILL
    resumed = run_train(*base_args(synthetic_root, interrupted), *WORKERS, "trainer.max_epochs=2", "resume=auto")
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
    killed = run_train(*base_args(synthetic_root, interrupted), *steps,
                       "+callbacks.kill._target_=tests.callbacks.KillAtEpoch", "+callbacks.kill.epoch=1")
    assert killed.returncode == -signal.SIGKILL
    resumed = run_train(*base_args(synthetic_root, interrupted), *steps)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(interrupted, uninterrupted_run)


@pytest.mark.slow
def test_sigterm_mid_epoch_writes_a_checkpoint_that_resumes_exactly(synthetic_root, tmp_path, uninterrupted_run):
    """SIGTERM to the run's whole process group, as a cluster sends it: the DataLoader workers get it too (PyTorch's
    own handler killed them, and the run crashed without a checkpoint)."""
    run_dir = tmp_path / "run"
    result = run_train(*base_args(synthetic_root, run_dir), *WORKERS, "trainer.max_epochs=2", "resume=auto",
                       "+callbacks.term._target_=tests.callbacks.SignalAtStep", "+callbacks.term.step=3",
                       "+callbacks.term.group=true", new_session=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SIGTERM received: checkpoint written" in result.stdout + result.stderr
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert (checkpoint["epoch"], checkpoint["global_step"]) == (1, 3)  # epoch 1's second batch is still to come
    resumed = run_train(*base_args(synthetic_root, run_dir), *WORKERS, "trainer.max_epochs=2", "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "continuing from" in resumed.stdout + resumed.stderr
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == 1
    assert_same_run(run_dir, uninterrupted_run)


# Batches of 2 (3 an epoch; validation: 2) and 2 batches per optimizer step.
ACCUMULATING = ["data.batch_size=2", "trainer.accumulate_grad_batches=2", "trainer.max_epochs=2"]


@pytest.fixture(scope="module")
def uninterrupted_accumulating_run(synthetic_root, tmp_path_factory):
    def make(run_dir):
        result = run_train(*base_args(synthetic_root, run_dir), *ACCUMULATING)
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
    result = run_train(*base_args(synthetic_root, run_dir), *ACCUMULATING, "resume=auto",
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
        resumed = run_train(*base_args(synthetic_root, run_dir), *ACCUMULATING,
                            env=slurm_job(tmp_path, restart_count=1))
        assert "SLURM requeued this job (SLURM_RESTART_COUNT=1): continuing from" in resumed.stdout + resumed.stderr
        assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"  # the finished job is not requeued
    else:
        resumed = run_train(*base_args(synthetic_root, run_dir), *ACCUMULATING, "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(run_dir, uninterrupted_accumulating_run)
    with open(run_dir / "csv" / "metrics.csv") as file:
        validated = {row["epoch"] for row in csv.DictReader(file) if row.get("val/acc")}
    assert validated == {"0", "1"}


DDP = ["trainer=ddp_cpu", "data.batch_size=2", "trainer.max_epochs=2"]  # 2 batches per process and epoch


@pytest.fixture(scope="module")
def uninterrupted_ddp_run(synthetic_root, tmp_path_factory):
    """Two processes, 2 epochs; each rank's final weights in ``weights_rank<r>.pt``."""
    def make(run_dir):
        dump_weights = ["+callbacks.dump._target_=tests.callbacks.DumpWeights", f"+callbacks.dump.dirpath={run_dir}"]
        result = run_train(*base_args(synthetic_root, run_dir), *DDP, *dump_weights, timeout=240)
        assert result.returncode == 0, result.stderr[-3000:]

    return once_per_session(tmp_path_factory, "straight_ddp", make)


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
    result = run_train(*base_args(synthetic_root, run_dir), *DDP, "resume=auto", *signal_at, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{signal_name} received: checkpoint written" in result.stdout + result.stderr
    resumed = run_train(*base_args(synthetic_root, run_dir), *DDP, "resume=auto", timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(run_dir, uninterrupted_ddp_run)


@pytest.mark.slow
@pytest.mark.parametrize("when", ["test_batch", "train_end"])
def test_a_signal_during_the_test_after_training_keeps_the_training_checkpoints(synthetic_root, tmp_path, when):
    """SLURM's SIGUSR1 (the time limit is near) as the test after training runs: its default action killed the
    process there. The test stops as on SIGTERM and the job is requeued (the requeued job tests again), once the run
    has written its results. So does a SIGUSR1 after the fit loop's last check (``train_end``): Lightning cleared it
    as the test started, which then ran on until the time limit, and nothing requeued the job."""
    run_dir = tmp_path / "run"
    args = [arg for arg in base_args(synthetic_root, run_dir) if arg != "test=false"]
    result = run_train(*args, "trainer.max_epochs=1", "data.batch_size=2", "resume=auto",
                       "+callbacks.term._target_=tests.callbacks.SignalInEpoch", "+callbacks.term.signal_name=SIGUSR1",
                       "+callbacks.term.test_batch=0" if when == "test_batch" else "+callbacks.term.train_end=true",
                       env=slurm_job(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "The test after training was stopped by a signal" in result.stdout + result.stderr
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
    assert "metrics.json" in (tmp_path / "run_at_requeue.txt").read_text().split()  # requeued last
    metrics = json.loads((run_dir / "metrics.json").read_text())  # the training's results are kept...
    assert "val/acc" in metrics and "test/acc" not in metrics
    assert "checkpoint written" not in result.stdout + result.stderr  # ...and its last.ckpt is not overwritten


def test_an_array_task_is_requeued_by_its_own_id_and_a_failed_requeue_says_what_to_do(tmp_path, monkeypatch, caplog):
    from timesformer.callbacks import requeue_slurm_job

    for name, value in slurm_job(tmp_path).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "4240")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    assert requeue_slurm_job()
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4240_2\n"  # not the array's other tasks
    (tmp_path / "bin" / "scontrol").write_text("#!/bin/sh\necho 'Invalid job id' >&2\nexit 1\n")
    assert not requeue_slurm_job()
    assert "Could not requeue SLURM job 4240_2 (exit code 1: Invalid job id)" in caplog.text


def test_preemption_checkpoint_is_written_only_while_fitting(tmp_path):
    from types import SimpleNamespace

    from lightning.pytorch.trainer.states import TrainerFn
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from timesformer.callbacks import PreemptionCheckpoint

    saved = []
    callback = PreemptionCheckpoint(tmp_path)
    for stage in (TrainerFn.TESTING, TrainerFn.FITTING):
        trainer = SimpleNamespace(state=SimpleNamespace(fn=stage), save_checkpoint=saved.append)
        callback.on_exception(trainer, None, SIGTERMException())
    assert saved == [tmp_path / "last.ckpt"]


def test_only_rank_zero_requeues_and_only_on_slurms_sigusr1(tmp_path, monkeypatch):
    from lightning.pytorch.trainer.states import TrainerFn
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    import timesformer.callbacks
    from timesformer.callbacks import PreemptionCheckpoint

    requeued = []
    monkeypatch.setattr(timesformer.callbacks, "requeue_slurm_job", lambda: requeued.append(1) or True)
    cases = [("SIGUSR1", True, True, True), ("SIGTERM", True, True, False), ("SIGUSR1", False, True, False),
             ("SIGUSR1", True, False, False)]
    for signal_name, on_slurm, rank_zero, requeues in cases:
        requeued.clear()
        callback = PreemptionCheckpoint(tmp_path)
        callback._signal_name, callback._on_slurm = signal_name, on_slurm
        trainer = SimpleNamespace(state=SimpleNamespace(fn=TrainerFn.TESTING), is_global_zero=rank_zero)
        callback.on_exception(trainer, None, SIGTERMException())
        assert not requeued  # not yet: the run has its results to write first
        assert callback.requeue_if_due() == requeues and len(requeued) == requeues, (signal_name, on_slurm, rank_zero)
        assert not callback.requeue_if_due() and len(requeued) == requeues  # once
    requeued.clear()
    callback.slurm_requeue = False
    callback._on_slurm = True
    callback.on_exception(SimpleNamespace(state=SimpleNamespace(fn=TrainerFn.TESTING), is_global_zero=True), None,
                          SIGTERMException())
    assert not callback.requeue_if_due() and not requeued


def test_a_requeue_is_kept_for_runs_the_requeued_job_continues(tmp_path, monkeypatch):
    """A one-task job without resume=auto has a run dir named for this start: requeued, it started over, each time.
    A run dir named on the command line is found again (it lost its requeue)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from timesformer.callbacks import PreemptionCheckpoint
    from timesformer.pipeline import _requeue_only_where_the_run_continues

    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    for overrides, run_dir, kept in [([], "2026-12-07_05-00-00", False), (["resume=auto"], "auto-0123456789ab", True),
                                     ([], "slurm-4242", True), ([f"hydra.run.dir={tmp_path}/mine"], "mine", True),
                                     ([f"paths.output_dir={tmp_path}/mine"], "mine", True),
                                     (["hydra.run.dir=logs/${now:%H-%M-%S}"], "05-00-00", False)]:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose("train", overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        callback = PreemptionCheckpoint(tmp_path)
        try:
            _requeue_only_where_the_run_continues([callback], cfg, tmp_path / run_dir)
        finally:
            HydraConfig.instance().cfg = None
        assert callback.slurm_requeue == kept, (overrides, run_dir)


def test_lightnings_requeue_stays_off_whatever_the_plugins_and_torchrun_keeps_its_ranks(monkeypatch):
    """Any trainer.plugins setting brought Lightning's auto-requeue back. torchrun inside a SLURM job was forced onto
    SLURMEnvironment, so every process was rank 0."""
    from lightning.fabric.plugins import TorchCheckpointIO
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from timesformer.pipeline import _plugins_without_lightning_requeue

    def plugins(trainer: dict) -> list:
        return _plugins_without_lightning_requeue(OmegaConf.create({"trainer": trainer})).get("plugins", [])

    for name, value in {"SLURM_NTASKS": "1", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "train"}.items():
        monkeypatch.setenv(name, value)
    [environment] = plugins({})
    assert isinstance(environment, SLURMEnvironment) and not environment.auto_requeue
    checkpoint_io, environment = plugins({"plugins": [{"_target_": "lightning.fabric.plugins.TorchCheckpointIO"}]})
    assert isinstance(checkpoint_io, TorchCheckpointIO) and not environment.auto_requeue
    own = {"plugins": {"_target_": "lightning.fabric.plugins.environments.LightningEnvironment"}}
    assert plugins(own) == []  # the user's own cluster environment: trainer.plugins as it is
    for name, value in {"RANK": "1", "GROUP_RANK": "0", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                        "WORLD_SIZE": "2", "MASTER_ADDR": "localhost", "MASTER_PORT": "29500",
                        "TORCHELASTIC_RUN_ID": "x"}.items():
        monkeypatch.setenv(name, value)
    assert plugins({}) == []  # Lightning's choice: TorchElasticEnvironment


def test_a_signal_during_the_test_broadcasts_nothing_from_the_signal_handler(tmp_path, monkeypatch):
    """Under DDP, Lightning's SIGTERM handler broadcast rank 0's flag from inside the handler, i.e. in whatever
    collective the process was in (and a test's processes have uneven batches: no collective can agree on a stop).
    The test stops where each process checks, after its batch."""
    import torch.distributed

    from timesformer.callbacks import PreemptionCheckpoint

    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    broadcasts = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "broadcast", lambda *args, **kwargs: broadcasts.append(args))
    monkeypatch.setattr(L.Trainer, "world_size", property(lambda self: 2))
    callback = PreemptionCheckpoint(tmp_path)
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        callback.setup(trainer, None, "test")
        trainer._signal_connector.register_signal_handlers()  # as the test starts, after the setup hooks
        for signum in (signal.SIGTERM, signal.SIGUSR1):
            trainer._signal_connector.received_sigterm = False
            signal.getsignal(signum)(signum, None)
            assert trainer.received_sigterm and not broadcasts, signal.Signals(signum).name
    finally:
        trainer._signal_connector.teardown()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def test_a_failed_fits_sigusr1_handler_is_replaced_by_the_next_runs(tmp_path):
    """A fit ending in an exception skips the teardown hooks, and Lightning's teardown put back that fit's handler:
    the next run in the process (a sweep's) kept it, and a SIGUSR1 went to the finished trainer."""
    from timesformer.callbacks import PreemptionCheckpoint

    trainer = SimpleNamespace(_accelerator_connector=SimpleNamespace(cluster_environment=None))
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        first, second = PreemptionCheckpoint(tmp_path), PreemptionCheckpoint(tmp_path)
        first._handle_usr1(trainer)
        second._handle_usr1(trainer)
        assert signal.getsignal(signal.SIGUSR1) == second._on_usr1
        assert second._previous_usr1 == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGUSR1, previous)


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

    for variable in ("RANK", "WORLD_SIZE", "SLURM_NTASKS", "SLURM_JOB_ID", "SLURM_PROCID", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(variable, raising=False)
    assert run_name(None, "a=1", "2026-01-01_00-00-00") == "2026-01-01_00-00-00"
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_PROCID", "3")
    assert run_name(None, "a=1", "2026-01-01_00-00-03") == "slurm-4242"  # every task, whenever it starts
    assert log_file() == f"{tmp_path}/train_rank3.log"
    for variable in ("SLURM_NTASKS", "SLURM_JOB_ID", "SLURM_PROCID"):
        monkeypatch.delenv(variable)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc")
    assert run_name(None, "a=1", "t") == "torchrun-abc"
    assert log_file() == f"{tmp_path}/train.log"  # rank 0


def test_global_batch_size_sets_gradient_accumulation():
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    _apply_global_batch_size(trainer, 64, batch_size=8)
    assert trainer.accumulate_grad_batches == 8
    with pytest.raises(ValueError, match="global_batch_size=60 is not a multiple of data.batch_size=8"):
        _apply_global_batch_size(trainer, 60, batch_size=8)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        accumulate_grad_batches=4)
    with pytest.raises(ValueError, match="trainer.accumulate_grad_batches=4; set only one of them"):
        _apply_global_batch_size(trainer, 16, batch_size=8)  # 2 accumulation steps: which one was meant?
    _apply_global_batch_size(trainer, 32, batch_size=8)  # the two agree
    assert trainer.accumulate_grad_batches == 4
    # The paper's 64 on 2 nodes x 8 GPUs (the SLURM script's): the error says what fits
    sixteen_processes = SimpleNamespace(world_size=16, accumulate_grad_batches=1)
    with pytest.raises(ValueError, match=r"= 128; change one of them \(e.g. data.batch_size=4: 4 x 16 = 64\)"):
        _apply_global_batch_size(sixteen_processes, 64, batch_size=8)
    _apply_global_batch_size(sixteen_processes, 64, batch_size=4)
    assert sixteen_processes.accumulate_grad_batches == 1


def _nan_loader(drop_poisoned: bool = False):
    torch.manual_seed(0)
    videos = torch.randn(4, 4, 3, 32, 32)
    videos[2] = float("nan")  # the third batch is poisoned
    samples = [{"video": v, "label": i % 2, "index": i} for i, v in enumerate(videos)]
    return DataLoader([s for s in samples if not (drop_poisoned and s["index"] == 2)], batch_size=1)


def _tiny_classifier(**kwargs) -> VideoClassifier:
    torch.manual_seed(1)
    config = TimeSformerConfig(image_size=32, patch_size=8, num_frames=4, hidden_size=32, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=64, num_classes=2)
    return VideoClassifier(TimeSformer(config), optimizer={"name": "sgd", "lr": 0.01, "weight_decay": 0.0},
                           scheduler={"name": "constant"}, **kwargs)


def test_nonfinite_loss_saves_a_checkpoint_and_names_the_step(tmp_path):
    module = _tiny_classifier()
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, default_root_dir=tmp_path, logger=False,
                        enable_progress_bar=False, enable_checkpointing=False)
    with pytest.raises(FloatingPointError, match="at global step 2"):
        trainer.fit(module, train_dataloaders=_nan_loader())
    saved = torch.load(tmp_path / "checkpoints" / "nonfinite-step2.ckpt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values())


@pytest.mark.parametrize("mode", ["skip", "error"])
def test_a_nonfinite_loss_on_one_ddp_process_is_handled_by_every_process(mode, tmp_path):
    # Before, "skip" crashed (Lightning refuses a skipped training_step under DDP) and "error" hung for good: the
    # process with the NaN loss waited in the checkpoint's barrier while the other waited for its gradients.
    # Now every process learns of the NaN (an all-reduce of the flag) and they skip or stop together.
    from tests.nonfinite_ddp import POISONED

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, str(ROOT / "tests" / "nonfinite_ddp.py"), mode, str(tmp_path)],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # Lightning's second process too
        pytest.fail(f"nonfinite_loss={mode}: the DDP processes hung")
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    poisoned_rank = next(r for r in ranks if POISONED in r["seen"])
    step = poisoned_rank["seen"].index(POISONED)  # one sample per step
    if mode == "error":
        assert poisoned_rank["seen"][-1] == POISONED  # stopped at that step
        for result in ranks:
            assert f"at global step {step} " in result.get("error", ""), (result, output[-3000:])
        saved = torch.load(tmp_path / "checkpoints" / f"nonfinite-step{step}.ckpt", weights_only=False)
        assert all(torch.isfinite(v).all() for v in saved["state_dict"].values())
        return
    assert [r.get("skipped") for r in ranks] == [1, 1], output[-3000:]
    assert ranks[0]["steps"] == 4  # 8 samples, 4 per process, the poisoned step's update skipped
    for name, weight in ranks[0]["weights"].items():
        assert torch.isfinite(weight).all() and torch.equal(weight, ranks[1]["weights"][name]), name


def test_nonfinite_loss_can_skip_the_batch(tmp_path):
    module = _tiny_classifier(nonfinite_loss="skip")
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, default_root_dir=tmp_path, logger=False,
                        enable_progress_bar=False, enable_checkpointing=False)
    trainer.fit(module, train_dataloaders=_nan_loader())
    assert module.skipped_batches == 1
    # The same as training without the poisoned batch: it left no trace (weights, momentum).
    reference = _tiny_classifier()
    L.Trainer(accelerator="cpu", max_epochs=1, default_root_dir=tmp_path / "ref", logger=False,
              enable_progress_bar=False, enable_checkpointing=False).fit(reference, _nan_loader(drop_poisoned=True))
    for (name, param), expected in zip(module.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(param, expected, msg=name)


def test_a_skipped_batch_under_gradient_accumulation_leaves_the_step_to_the_others(tmp_path):
    # Batches 2 and 3 make one step; batch 2 is poisoned. The step goes on with batch 3's gradient alone (halved, as
    # Lightning divides every batch's loss by the accumulation), the same as a run that never saw batch 2, whose
    # second step is batch 3 alone at the epoch's end.
    module = _tiny_classifier(nonfinite_loss="skip")
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, default_root_dir=tmp_path, logger=False,
                        enable_progress_bar=False, enable_checkpointing=False, accumulate_grad_batches=2)
    trainer.fit(module, train_dataloaders=_nan_loader())
    assert module.skipped_batches == 1 and trainer.global_step == 2
    reference = _tiny_classifier()
    L.Trainer(accelerator="cpu", max_epochs=1, default_root_dir=tmp_path / "ref", logger=False,
              enable_progress_bar=False, enable_checkpointing=False, accumulate_grad_batches=2).fit(
        reference, _nan_loader(drop_poisoned=True))
    for (name, param), expected in zip(module.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(param, expected, msg=name)


def test_ddp_processes_draw_their_own_masks_and_the_same_ones_on_resume():
    """seed_everything seeds every process alike: each GPU drew the same stochastic-depth and dropout masks."""
    module = _tiny_classifier()
    module.on_fit_start()

    def draws(rank: int, batch_idx: int = 3, world_size: int = 2) -> torch.Tensor:
        module._trainer = SimpleNamespace(world_size=world_size, global_rank=rank, current_epoch=0)
        module.on_train_batch_start(None, batch_idx)
        return torch.rand(8)

    assert not torch.equal(draws(0), draws(1))
    assert torch.equal(draws(1), draws(1))  # a function of the batch's place: a resumed run draws the same
    assert not torch.equal(draws(1), draws(1, batch_idx=4))
    module._trainer = None


def test_train_loss_is_the_mean_over_an_accumulated_step(tmp_path):
    # It was the step's last batch's loss alone (k400_paper accumulates 8 on one GPU: 8 of 64 clips).
    module, losses = _tiny_classifier(), []
    training_step = module.training_step

    def recording_step(batch, batch_idx):
        loss = training_step(batch, batch_idx)
        losses.append(float(loss))
        return loss

    module.training_step = recording_step
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, default_root_dir=tmp_path, logger=False, log_every_n_steps=1,
                        enable_progress_bar=False, enable_checkpointing=False, accumulate_grad_batches=3)
    trainer.fit(module, train_dataloaders=_nan_loader(drop_poisoned=True))  # 3 batches: one step
    assert trainer.global_step == 1 and len(losses) == 3 and len(set(losses)) == 3
    assert float(trainer.callback_metrics["train/loss"]) == pytest.approx(sum(losses) / 3, rel=1e-6)


def test_the_slurm_script_asks_for_a_global_batch_its_processes_can_make(tmp_path):
    """scripts/slurm_train.sbatch ran k400_paper (global 64, 8 per GPU) on 16 GPUs: every task failed at start."""
    import re
    import shlex

    script = (ROOT / "scripts" / "slurm_train.sbatch").read_text()
    tasks = (int(re.search(r"--nodes=(\d+)", script).group(1))
             * int(re.search(r"--ntasks-per-node=(\d+)", script).group(1)))
    command = shlex.split(script[script.index("srun "):].replace("\\\n", " "))
    overrides = [arg for arg in command[3:] if "=" in arg and not arg.startswith(("data.root=", "resume="))]
    cfg = compose_config("train", overrides, tmp_path)
    assert cfg.trainer.devices * cfg.trainer.num_nodes == tasks  # one process per task
    _apply_global_batch_size(SimpleNamespace(world_size=tasks, accumulate_grad_batches=1), cfg.global_batch_size,
                             cfg.data.batch_size)


def test_every_experiment_composes(tmp_path):
    for experiment in ("demo", "k400_paper", "k400_adamw", "k400_hr", "k400_large"):
        cfg = compose_config("train", [f"experiment={experiment}"], tmp_path)
        assert cfg.model.num_frames == cfg.data.num_frames
    # The paper's recipe: HR 16x16 @ 448 with jitter [448, 512], L 96x4 @ 224, the rest as the paper's recipe.
    hr, large = (compose_config("train", [f"experiment={name}"], tmp_path) for name in ("k400_hr", "k400_large"))
    assert (hr.data.num_frames, hr.data.sampling_rate, hr.data.image_size) == (16, 16, 448)
    assert list(hr.data.train_short_side_range) == [448, 512]
    assert (large.data.num_frames, large.data.sampling_rate, large.data.image_size) == (96, 4, 224)
    assert hr.optimizer.lr == large.optimizer.lr == 0.005 and hr.global_batch_size == large.global_batch_size == 64
    paper = compose_config("train", ["experiment=k400_paper"], tmp_path)
    assert (paper.optimizer.name, paper.optimizer.lr, paper.optimizer.nesterov) == ("sgd", 0.005, True)
    assert paper.global_batch_size == 64 and paper.trainer.max_epochs == 15
    steps_per_epoch = 3750  # Kinetics-400's ~240k videos at a global batch of 64
    assert paper.scheduler.name == "multistep" and not paper.scheduler.warmup_epochs
    factors = [lr_multiplier(epoch * steps_per_epoch + offset, "multistep", total_steps=15 * steps_per_epoch,
                             milestones=tuple(paper.scheduler.milestones), gamma=paper.scheduler.gamma)
               for epoch in (11, 14) for offset in (-1, 0)]
    assert factors == pytest.approx([1.0, 0.1, 0.1, 0.01])  # the lr drops at the first step of epochs 12 and 15
    # Another schedule on the paper's recipe takes its own options (the experiment's milestones were refused).
    cosine = compose_config("train", ["experiment=k400_paper", "scheduler=cosine"], tmp_path)
    check_settings(OmegaConf.to_container(cosine.optimizer), OmegaConf.to_container(cosine.scheduler))


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_gradient_clipping_with_a_fused_optimizer_under_mixed_precision(precision, monkeypatch):
    """On a GPU the optimizer is fused; Lightning's mixed-precision plugin refused to clip for it (the k400_adamw
    recipe: bf16 + gradient_clip_val crashed at its first step). Forced fused on the CPU here."""
    norms, built = [], []

    class RecordingAdamW(torch.optim.AdamW):
        def __init__(self, params, **options):
            built.append(options.get("fused"))
            super().__init__(params, **{**options, "fused": options.get("fused") is not False})

        def step(self, closure=None):
            if closure is not None:  # (under fp16 Lightning runs it before, for the loss scaler)
                closure()
            grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
            norms.append(float(torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads]))))
            return super().step()

    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    module = _tiny_classifier()
    module.hparams.optimizer.update(name="adamw", lr=1e-3)
    torch.manual_seed(0)
    clips = [{"video": 50 * torch.randn(4, 3, 32, 32), "label": i % 2, "index": i} for i in range(4)]
    # (Lightning turns precision="16-mixed" into bf16 on the CPU; its plugin, given, keeps fp16 and a loss scaler.)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, plugins=[MixedPrecision(precision, "cpu")], gradient_clip_val=1e-3)
    trainer.fit(module, DataLoader(clips, batch_size=2))
    assert len(norms) == 2 and all(norm <= 1e-3 * 1.001 for norm in norms)  # clipped, by the step's time
    # fp16 scales the loss: its gradients are unscaled before clipping, which a fused step would do after.
    assert built == [False if precision == "16-mixed" else None]

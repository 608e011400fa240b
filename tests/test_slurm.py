"""SLURM: SIGUSR1 near the time limit checkpoints, then the job is requeued, once, last, from rank 0, only where the
requeued job continues; signals during the test after training."""

import json
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from tests.conftest import CONFIG_DIR, TINY_DATA, base_args, compose_config, run_script, slurm_job
from timesformer.pipeline import train


@pytest.mark.slow
@pytest.mark.parametrize("when", ["test_batch", "train_end"])
def test_a_signal_during_the_test_after_training_keeps_the_training_checkpoints(synthetic_root, tmp_path, when):
    """SLURM's SIGUSR1 (the time limit is near) as the test after training runs: its default action killed the
    process there. The test stops as on SIGTERM and the job is requeued (the requeued job tests again), once the run
    has written its results. So does a SIGUSR1 after the fit loop's last check (``train_end``): Lightning cleared it
    as the test started, which then ran on until the time limit, and nothing requeued the job."""
    run_dir = tmp_path / "run"
    args = [arg for arg in base_args(synthetic_root, run_dir) if arg != "test=false"]
    result = run_script("train.py", *args, "trainer.max_epochs=1", "data.batch_size=2", "resume=auto",
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
    monkeypatch.setenv("SLURM_NTASKS", "2")  # (the run dir slurm-4242's: one srun step of 2 tasks)
    monkeypatch.delenv("SLURM_STEP_ID", raising=False)
    for overrides, run_dir, kept in [(["~callbacks.wandb_media"], "2026-12-07_05-00-00", False),
                                     (["resume=auto"], "auto-0123456789ab", True),
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


def test_lightnings_requeue_stays_off_whatever_the_plugins_and_torchrun_keeps_its_ranks(synthetic_root, tmp_path,
                                                                                       monkeypatch):
    """Any trainer.plugins setting brought Lightning's auto-requeue back, and one plugin (not a list) failed to merge
    with the list added. torchrun inside a SLURM job was forced onto SLURMEnvironment, so every process was rank 0."""
    from lightning.fabric.plugins import TorchCheckpointIO
    from lightning.fabric.plugins.environments import LightningEnvironment, SLURMEnvironment

    import timesformer.pipeline
    from timesformer.callbacks import AtomicCheckpointIO
    from timesformer.pipeline import _trainer_plugins

    environments, kept = [], []
    build = timesformer.pipeline._trainer_plugins

    def recording(plugins):  # the trainer's plugins, as train() builds it
        built = build(plugins)
        environments.extend(plugin for plugin in built if isinstance(plugin, SLURMEnvironment))
        kept.append([type(plugin) for plugin in built if isinstance(plugin, TorchCheckpointIO)])
        return built

    monkeypatch.setattr(timesformer.pipeline, "_trainer_plugins", recording)
    for name, value in {"SLURM_NTASKS": "1", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "train"}.items():
        monkeypatch.setenv(name, value)
    checkpoint_io = "{_target_: lightning.fabric.plugins.TorchCheckpointIO}"
    for plugins in ("null", checkpoint_io, f"[{checkpoint_io}]"):
        overrides = ["experiment=demo", f"data.source.root={synthetic_root}", *TINY_DATA, "+trainer.fast_dev_run=true",
                     f"+trainer.plugins={plugins}"]
        trainer_fits = train(compose_config("train", overrides, tmp_path / str(len(environments))))
        assert trainer_fits and len(environments) == 1 and not environments.pop().auto_requeue, plugins
        # the user's own checkpoint writer too, else ours (written beside its place, renamed over it)
        assert kept.pop() == [AtomicCheckpointIO if plugins == "null" else TorchCheckpointIO], plugins
    own = {"_target_": "lightning.fabric.plugins.environments.LightningEnvironment"}
    environment, _ = _trainer_plugins(own)
    assert isinstance(environment, LightningEnvironment)  # the user's own cluster environment is kept
    for name, value in {"RANK": "1", "GROUP_RANK": "0", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                        "WORLD_SIZE": "2", "MASTER_ADDR": "localhost", "MASTER_PORT": "29500",
                        "TORCHELASTIC_RUN_ID": "x"}.items():
        monkeypatch.setenv(name, value)
    assert [type(plugin) for plugin in _trainer_plugins(None)] == [AtomicCheckpointIO]  # (torchrun's environment:
    # Lightning's choice, TorchElasticEnvironment)


DDP_TEST = ["trainer=ddp_cpu", "data.batch_size=1", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
            "trainer.limit_val_batches=1"]  # 4 test clips: 2 batches per process


def _signal(name: str, signal_name: str, rank: int, **when: int) -> list[str]:
    """Overrides adding a tests.callbacks.SignalInEpoch callback (``when``: e.g. ``test_batch=0``)."""
    return [f"+callbacks.{name}._target_=tests.callbacks.SignalInEpoch", f"+callbacks.{name}.signal_name={signal_name}",
            f"+callbacks.{name}.rank={rank}", *(f"+callbacks.{name}.{key}={value}" for key, value in when.items())]


@pytest.mark.slow
@pytest.mark.parametrize("signals, stops", [
    (_signal("term", "SIGUSR1", rank=0, test_batch=0), True),
    # rank 1's alone, during training (which stops on rank 0's flag only) and during the test
    ([*_signal("term", "SIGTERM", rank=1, train_batch=0), *_signal("usr1", "SIGUSR1", rank=1, test_batch=0)], False)])
def test_ddp_processes_stop_their_test_together_on_rank_zeros_signal(synthetic_root, tmp_path, signals, stops):
    """A signal in the test after training: each process stopped at its own next batch, and the others waited for it
    in the test's final gather (gloo: "Connection closed by peer"; NCCL: a hang). They stop together on rank 0's
    flag, as in the fit (rank 0 passes its signal on to the processes it started). A signal the fit ignored (rank
    1's) also stopped rank 1's test alone."""
    run_dir = tmp_path / "run"
    args = [arg for arg in base_args(synthetic_root, run_dir) if arg != "test=false"]
    result = run_script("train.py", *args, *DDP_TEST, *signals, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert ("The test after training was stopped by a signal" in result.stdout + result.stderr) == stops
    assert ("test/acc" in metrics) == (not stops)


def test_under_ddp_a_test_stops_only_where_every_process_checks(tmp_path):
    """Lightning numbers each test dataloader's batches from 0 and skips the check at each one's last batch: with
    several loaders the processes broadcast a different number of times (a hang, signal or not). Those tests, and
    loaders of unknown length, are not stopped; one loader is, before the fewest-batch process's last batch."""
    import torch

    from timesformer.callbacks import PreemptionCheckpoint

    callback = PreemptionCheckpoint(tmp_path)
    callback._distributed = True
    for mine, other, agreed in (([4], [3], 2), ([4, 2], [4, 3], -1), ([float("inf")], [float("inf")], -1)):
        trainer = SimpleNamespace(num_test_batches=mine, is_global_zero=True, strategy=SimpleNamespace(
            root_device=torch.device("cpu"),
            all_gather=lambda count, other=other: torch.stack([count, torch.tensor([float(sum(other))])])))
        callback.on_test_start(trainer, None)
        assert callback._test_batches_to_agree_on == agreed, (mine, other)


def test_a_signal_during_the_test_broadcasts_nothing_from_the_signal_handler(tmp_path, monkeypatch):
    """Under DDP, Lightning's SIGTERM handler broadcast rank 0's flag from inside the handler, i.e. in whatever
    collective the process was in. The handler only records the signal; the processes agree on a stop after a test
    batch (test_ddp_processes_stop_their_test_together_on_rank_zeros_signal)."""
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
            assert trainer._signal_connector._received and not broadcasts, signal.Signals(signum).name
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



def test_a_checkpoint_is_written_beside_its_place_and_renamed_over_the_old_one(tmp_path, monkeypatch):
    """Lightning wrote to $TMPDIR and moved the file into place: across filesystems (node-local /tmp, the run dir on
    NFS) the move copies over the old checkpoint, and a kill during the copy left last.ckpt empty. A write that stops
    midway must leave the old checkpoint whole, and nothing behind."""
    import os

    from timesformer.callbacks import AtomicCheckpointIO

    writer, path = AtomicCheckpointIO(), tmp_path / "checkpoints" / "last.ckpt"
    writer.save_checkpoint({"global_step": 1, "w": torch.ones(1000)}, path)
    renames = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: renames.append((src, dst)) or real_replace(src, dst))

    class KilledMidWrite:
        def __reduce__(self):
            raise KeyboardInterrupt  # (as a signal would, after the first bytes went out)

    with pytest.raises(KeyboardInterrupt):
        writer.save_checkpoint({"global_step": 2, "w": torch.zeros(1000), "x": KilledMidWrite()}, path)
    assert torch.load(path, weights_only=False)["global_step"] == 1  # the old one, whole
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"] and not renames
    (path.parent / ".last.ckpt.999999.tmp").write_bytes(b"left by a process killed mid-write")
    # (a best checkpoint's name, which holds its epoch and metric, is not written again)
    abandoned = path.parent / ".epoch=004-val_acc=0.500.ckpt.999998.tmp"
    abandoned.write_bytes(b"left by a process killed mid-write an hour ago")
    os.utime(abandoned, (time.time() - 3600, time.time() - 3600))
    writing = path.parent / ".epoch=005-val_acc=0.600.ckpt.999997.tmp"
    writing.write_bytes(b"another process's write, going on")
    writer.save_checkpoint({"global_step": 3}, path)
    assert torch.load(path, weights_only=False)["global_step"] == 3
    [(source, target)] = renames
    assert Path(source).parent == Path(target).parent == path.parent  # a rename within one folder: atomic
    assert sorted(p.name for p in path.parent.iterdir()) == [writing.name, "last.ckpt"]

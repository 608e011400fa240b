"""DDP and the global batch: processes that agree with one, gradient accumulation from global_batch_size, the loss of
an accumulated step."""

import json
import re
import shlex
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from tests.conftest import ROOT, compose_config, run_script, tiny_classifier
from timesformer.pipeline import _apply_global_batch_size


@pytest.mark.slow
def test_ddp_cpu_two_processes_agree_and_validate_on_every_video(synthetic_root, tmp_path, uninterrupted_ddp_run):
    run_dir = uninterrupted_ddp_run
    rank0 = torch.load(run_dir / "weights_rank0.pt")
    rank1 = torch.load(run_dir / "weights_rank1.pt")
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    # Validation accuracy synced over both ranks equals a single-process pass over the whole split.
    metrics = json.loads((run_dir / "metrics.json").read_text())
    evaluation = run_script("evaluate.py", f"ckpt={run_dir / 'checkpoints' / 'last.ckpt'}", "trainer=cpu",
                            "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp_path / 'eval'}")
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["clip"]["top1"] == pytest.approx(metrics["val/acc"])
    assert report["video"]["top1"] == pytest.approx(metrics["val/video_acc"])

    # 5 videos x 3 clips (frames 1 apart: no two alike): 15 views do not split evenly over 2 processes. Lightning's
    # sampler would repeat one to even them out, and the clip-level loss and accuracy counted it.
    videos = sorted((synthetic_root / "val").glob("*/*.mp4")) + sorted((synthetic_root / "train").glob("*/*.mp4"))[:1]
    assert len(videos) == 5
    _assert_ddp_evaluation_matches_one_process(run_dir, videos, tmp_path, "data.test_temporal_clips=3",
                                               "data.sampling_rate=1", "data.batch_size=4")


def _assert_ddp_evaluation_matches_one_process(run_dir, videos, tmp_path, *overrides: str, processes: int = 2) -> None:
    """evaluate.py of run_dir's last.ckpt on a list of ``videos``, in one process and in ``processes``: the same
    eval.json, clip and video numbers."""
    (tmp_path / "lists").mkdir()
    for name in ("train.csv", "val.csv", "test.csv"):
        (tmp_path / "lists" / name).write_text("".join(f"{v},{v.parent.name}\n" for v in videos))
    reports = {}
    for trainer, devices in (("cpu", 1), ("ddp_cpu", processes)):
        evaluation = run_script(
            "evaluate.py", f"ckpt={run_dir / 'checkpoints' / 'last.ckpt'}", f"trainer={trainer}",
            f"trainer.devices={devices}", "data=csv", f"data.root={tmp_path / 'lists'}", "data.test_spatial_crops=1",
            "data.num_workers=0", "trainer.enable_progress_bar=false", *overrides,
            f"hydra.run.dir={tmp_path / trainer}", timeout=300)
        assert evaluation.returncode == 0, evaluation.stderr[-3000:]
        reports[trainer] = json.loads((tmp_path / trainer / "eval.json").read_text())
    assert reports["ddp_cpu"]["clip"] == pytest.approx(reports["cpu"]["clip"], rel=1e-5)
    assert reports["ddp_cpu"]["video"] == pytest.approx(reports["cpu"]["video"], rel=1e-5)


@pytest.mark.slow
def test_ddp_with_fewer_views_than_processes_counts_each_view_once(synthetic_root, tmp_path, uninterrupted_ddp_run):
    # 2 single-view videos on 3 processes: the third process has no view of its own. Lightning's sampler gave it a
    # repeat, which the clip-level accuracy counted; the repeat is run (every process must reach the epoch's end,
    # where the metrics are gathered) but counted nowhere, so the clip and video numbers are those of one process.
    videos = sorted((synthetic_root / "val").glob("*/*.mp4"))[:2]
    _assert_ddp_evaluation_matches_one_process(uninterrupted_ddp_run, videos, tmp_path, "data.test_temporal_clips=1",
                                               processes=3)


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


def test_the_recorded_global_batch_counts_every_process_and_another_is_refused_on_resume(synthetic_root, tmp_path,
                                                                                          monkeypatch):
    """run_config's global_batch_size is data.batch_size x processes x accumulation (2 stand-in processes here): a
    record without the processes let a run resumed on another process count, whose optimizer steps are another size,
    pass the check. Such a resume is refused."""
    import timesformer.pipeline as pipeline
    from tests.conftest import TINY_DATA

    built = {}

    def record(cfg, trainer, module, *args):
        built.update(run_config=module.hparams.run_config, accumulation=trainer.accumulate_grad_batches)
        return {}

    monkeypatch.setattr(pipeline.L.Trainer, "world_size", property(lambda self: 2))
    monkeypatch.setattr(pipeline, "_fit_and_test", record)
    pipeline.train(compose_config("train", ["experiment=demo", f"data.source.root={synthetic_root}", *TINY_DATA,
                                            "global_batch_size=16", "trainer.max_epochs=1", "test=false"],
                                  tmp_path / "run"))
    run_config = built["run_config"]
    assert built["accumulation"] == 2  # 16 clips = 4 per batch x 2 processes x 2 batches
    assert (run_config["data"]["batch_size"], run_config["world_size"], run_config["global_batch_size"]) == (4, 2, 16)
    checkpoint = tmp_path / "saved.ckpt"
    torch.save({"hyper_parameters": {"run_config": run_config}}, checkpoint)
    pipeline._check_same_global_batch(checkpoint, 16)  # the same global batch on any process count: accepted
    # One process of 4 clips accumulating 2 (the same command without the second process): 8 clips per step
    with pytest.raises(ValueError, match="a global batch of 16 clips per optimizer step; this one's is 8"):
        pipeline._check_same_global_batch(checkpoint, 4 * 1 * 2)


def test_train_loss_is_the_mean_over_an_accumulated_step(tmp_path):
    # It was the step's last batch's loss alone (k400_paper accumulates 8 on one GPU: 8 of 64 clips).
    module, losses = tiny_classifier(), []
    training_step = module.training_step

    def recording_step(batch, batch_idx):
        loss = training_step(batch, batch_idx)
        losses.append(float(loss))
        return loss

    module.training_step = recording_step
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, default_root_dir=tmp_path, logger=False, log_every_n_steps=1,
                        enable_progress_bar=False, enable_checkpointing=False, accumulate_grad_batches=3)
    torch.manual_seed(0)
    clips = [{"video": torch.randn(4, 3, 32, 32), "label": i % 2, "index": i} for i in range(3)]
    trainer.fit(module, train_dataloaders=DataLoader(clips, batch_size=1))  # 3 batches: one step
    assert trainer.global_step == 1 and len(losses) == 3 and len(set(losses)) == 3
    assert float(trainer.callback_metrics["train/loss"]) == pytest.approx(sum(losses) / 3, rel=1e-6)


def test_the_slurm_script_asks_for_a_global_batch_its_processes_can_make(tmp_path):
    """scripts/slurm_train.sbatch ran k400_paper (global 64, 8 per GPU) on 16 GPUs: every task failed at start."""

    script = (ROOT / "scripts" / "slurm_train.sbatch").read_text()
    tasks = (int(re.search(r"--nodes=(\d+)", script).group(1))
             * int(re.search(r"--ntasks-per-node=(\d+)", script).group(1)))
    command = shlex.split(script[script.index("srun "):].replace("\\\n", " "))
    overrides = [arg for arg in command[3:] if "=" in arg and not arg.startswith(("data.root=", "resume="))]
    cfg = compose_config("train", overrides, tmp_path)
    assert cfg.trainer.devices * cfg.trainer.num_nodes == tasks  # one process per task
    _apply_global_batch_size(SimpleNamespace(world_size=tasks, accumulate_grad_batches=1), cfg.global_batch_size,
                             cfg.data.batch_size)


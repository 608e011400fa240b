"""train.py and evaluate.py end to end on a tiny generated dataset."""

import csv
import json

import lightning as L
import pytest
import torch
from hydra.errors import InstantiationException
from lightning.pytorch.plugins.precision import MixedPrecision
from torch.utils.data import DataLoader

from tests.conftest import TINY_DATA, compose_config, run_script, tiny_classifier
from timesformer import TimeSformer
from timesformer.model import ATTENTION_TYPES
from timesformer.pipeline import train


def tiny_overrides(synthetic_root) -> list[str]:
    return ["experiment=demo", f"data.source.root={synthetic_root}", *TINY_DATA]


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
def test_fast_dev_run_per_attention_type(attention_type, synthetic_root, tmp_path):
    overrides = [*tiny_overrides(synthetic_root), f"model.attention_type={attention_type}",
                 "+trainer.fast_dev_run=true"]
    cfg = compose_config("train", overrides, tmp_path)
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert (tmp_path / "metrics.json").is_file()


def test_fast_dev_run_with_pyav_decoder_and_repeated_augmentation(synthetic_root, tmp_path):
    overrides = [*tiny_overrides(synthetic_root), "data.decoder=pyav", "data.repeated_augmentation=2",
                 "+trainer.fast_dev_run=true"]
    cfg = compose_config("train", overrides, tmp_path)
    metrics = train(cfg)
    # The model takes (B, T, C, H, W): it would fail on the dataset's (B, k, T, C, H, W) had the DataModule's
    # on_before_batch_transfer not flattened the repeated clips.
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))


@pytest.mark.parametrize(("precision", "ran"), [("bf16-mixed", "bf16-mixed"), ("bf16-true", "bf16-true"),
                                               ("64-true", "64-true"), ("16-mixed", "bf16-mixed")])
def test_training_in_each_lightning_precision(synthetic_root, tmp_path, precision, ran):
    """trainer=gpu and trainer=ddp train in bf16-mixed; the same Lightning precision plugins run on the CPU. The
    "true" precisions failed at the first forward (float32 clips into bf16 / float64 weights: Lightning converts the
    input before the transfer, when the clips are still uint8). Lightning runs 16-mixed as bf16-mixed on the CPU: the
    run's records said 16-mixed."""
    overrides = [*tiny_overrides(synthetic_root), f"trainer.precision={precision}", "trainer.max_epochs=1",
                 "trainer.limit_train_batches=1", "trainer.limit_val_batches=1", "test=false",
                 "trainer.enable_progress_bar=false"]
    metrics = train(compose_config("train", overrides, tmp_path))
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["hyper_parameters"]["run_config"]["trainer"]["precision"] == ran


def test_training_without_a_logger(synthetic_root, tmp_path):
    # logger=none with the default callbacks: Lightning's LearningRateMonitor refuses a trainer without a logger.
    overrides = [*tiny_overrides(synthetic_root), "logger=none", "trainer.max_epochs=1",
                 "trainer.limit_train_batches=1", "trainer.limit_val_batches=1", "test=false"]
    metrics = train(compose_config("train", overrides, tmp_path))
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))


@pytest.mark.slow
def test_train_then_evaluate_the_checkpoint(synthetic_root, tmp_path):
    train_dir, eval_dir = tmp_path / "train", tmp_path / "eval"
    result = run_script("train.py", *tiny_overrides(synthetic_root), "trainer.max_epochs=2",
                        "trainer.enable_progress_bar=false", f"hydra.run.dir={train_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((train_dir / "metrics.json").read_text())
    for key in ("train/loss", "val/acc", "val/acc_top5", "test/acc", "test/acc_top5"):
        assert key in metrics, metrics
    checkpoints = train_dir / "checkpoints"
    assert (checkpoints / "last.ckpt").is_file()
    assert metrics["best_checkpoint"].startswith(str(checkpoints))

    # The checkpoint alone rebuilds the model, class names included.
    model = TimeSformer.from_pretrained(checkpoints / "last.ckpt")
    assert model.config.class_names == ["moving_horizontally", "moving_vertically"]

    result = run_script("evaluate.py", f"ckpt={metrics['best_checkpoint']}", "data.batch_size=2",
                        "trainer.enable_progress_bar=false", f"hydra.run.dir={eval_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    # It says where its results are (a new dir under logs/eval/runs/ by default, not the checkpoint's run dir)
    assert f"written to {eval_dir}" in result.stdout + result.stderr
    assert f"written to {eval_dir}" in (eval_dir / "evaluate.log").read_text()
    report = json.loads((eval_dir / "eval.json").read_text())
    # The same weights on the same (deterministic) test clips give the same accuracy as train.py's test.
    assert report["clip"]["top1"] == pytest.approx(metrics["test/acc"])
    assert report["video"]["top1"] == pytest.approx(metrics["test/video_acc"])
    num_videos = 2 * len(report["class_names"])  # data.source.videos_per_class_val=2
    assert report["videos_total"] == report["videos_evaluated"] == num_videos and report["failed_videos"] == []
    # predictions.csv agrees with eval.json
    with open(eval_dir / "predictions.csv") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == num_videos
    correct = sum(row["pred_1"] == row["true_label"] for row in rows)
    assert correct / num_videos == pytest.approx(report["video"]["top1"])
    with open(eval_dir / "per_class.csv") as file:
        per_class = list(csv.DictReader(file))
    assert [row["class"] for row in per_class] == report["class_names"]
    assert sum(int(row["videos"]) for row in per_class) == num_videos
    assert (eval_dir / "confusion_matrix.png").stat().st_size > 1000
    assert report["view_aggregation"] == "softmax"  # the run's setting

    result = run_script("evaluate.py", f"ckpt={metrics['best_checkpoint']}", "data.batch_size=2",
                        "module.view_aggregation=logits", "trainer.enable_progress_bar=false",
                        f"hydra.run.dir={tmp_path / 'eval_logits'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "eval_logits" / "eval.json").read_text())["view_aggregation"] == "logits"

    # A dataset swapped in (data=<name>) finds its files under this command's paths.data_dir: it was the training
    # run's (another machine's paths), from the checkpoint's config.
    result = run_script("evaluate.py", f"ckpt={metrics['best_checkpoint']}", "data=synthetic", *TINY_DATA,
                        f"paths.data_dir={tmp_path / 'here'}", "data.batch_size=2", "trainer.enable_progress_bar=false",
                        f"hydra.run.dir={tmp_path / 'eval_swapped'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "here" / "synthetic" / "val").is_dir()
    assert json.loads((tmp_path / "eval_swapped" / "eval.json").read_text())["videos_total"] == num_videos


def test_invalid_attention_type_names_the_valid_choices(synthetic_root, tmp_path):
    result = run_script("train.py", *tiny_overrides(synthetic_root), "model.attention_type=spacetime",
                        f"hydra.run.dir={tmp_path}")
    assert result.returncode != 0
    assert "attention_type='spacetime'" in result.stderr
    assert "divided_space_time, space_only, joint_space_time" in result.stderr


def test_unknown_optimizer_names_the_valid_choices(synthetic_root, tmp_path):
    cfg = compose_config("train", [*tiny_overrides(synthetic_root), "optimizer.name=lamb"], tmp_path)
    with pytest.raises(ValueError, match="optimizer.name='lamb'.*adamw, sgd"):
        train(cfg)


@pytest.mark.parametrize(("override", "message"), [
    ("callbacks.model_checkpoint.monitor=val/acc1", "callbacks.model_checkpoint.monitor=val/acc1 is not a metric"),
    ("optimized_metric=val/accuracy", "optimized_metric=val/accuracy is not a metric the model logs; valid values: "
                                      "train/loss"),
    ("trainer.gradient_clip_val=-1", "gradient_clip_val=-1 must be >= 0"),  # clipping to -1 flipped the gradients
    ("test=no", "test must be true or false, got 'no'"),  # "no" is a non-empty string: true
    ("data.horizontal_flip=off", "horizontal_flip must be true or false, got 'off'"),
    ("global_batch_size=-32", "global_batch_size=-32 must be a positive integer"),
    ("module.label_smoothing=1.5", r"module.label_smoothing=1.5 must be in \[0, 1\)"),
    ("optimizer.weight_decay=-0.1", "optimizer.weight_decay=-0.1 must be >= 0"),
    ("scheduler.min_lr_ratio=2", r"scheduler.min_lr_ratio=2 must be in \[0, 1\]"),
    ("scheduler=multistep scheduler.gamma=2", r"scheduler.gamma=2 must be in \(0, 1\]"),  # the lr grew at milestones
    # keys nothing reads
    ("+global_batch=64", "global_batch is not an option of train.py"),
    ("+optimizer.momentum=0.8", "optimizer.momentum has no effect with optimizer.name=adamw"),
    ("+scheduler.gamma=0.5", "scheduler.gamma has no effect with scheduler.name=cosine"),
    ("optimizer.lr=null", "optimizer.lr must be a number, got None"),  # was float()'s bare TypeError
    ("+optimizer.eps=1e-6", "optimizer.eps is not an option; valid optimizer options: betas, decay_norm_bias_embed"),
    ("+scheduler.warmup_steps=100", "scheduler.warmup_steps is not an option; valid scheduler options: gamma"),
    ("+callbacks.typo.every_n_epochs=1", "callbacks.typo: an entry of this group needs a _target_"),
    pytest.param("trainer=gpu", "needs a CUDA GPU and none is visible here: use trainer=cpu",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")),
])
def test_options_that_failed_late_or_were_misread_fail_first(override, message, synthetic_root, tmp_path, monkeypatch):
    """Each failed only after the first validation or step, or trained on a misread value; now before any epoch."""
    import timesformer.pipeline as pipeline

    def no_fit(*args, **kwargs):
        raise AssertionError("fit started")

    monkeypatch.setattr(pipeline.L.Trainer, "fit", no_fit)
    with pytest.raises((ValueError, InstantiationException), match=message):  # Hydra wraps the data module's
        train(compose_config("train", [*tiny_overrides(synthetic_root), *override.split(" ")], tmp_path))


def test_a_checkpoints_saved_settings_are_not_judged_when_it_is_evaluated(tmp_path):
    """evaluate.py builds the module from a checkpoint's optimizer and scheduler settings, which it does not use:
    settings train.py now refuses (an adamw key left under sgd) must not stop it."""
    from timesformer import TimeSformer, TimeSformerConfig
    from timesformer.module import VideoClassifier

    model = TimeSformer(TimeSformerConfig(image_size=32, patch_size=8, num_frames=4, hidden_size=32, num_classes=3,
                                         num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    VideoClassifier(model, optimizer={"name": "sgd", "lr": 0.1, "weight_decay": 0.0, "betas": [0.9, 0.999]},
                    scheduler={"name": "multistep", "min_lr_ratio": 0.01})
    with pytest.raises(ValueError, match="module.view_aggregation='mean' is not supported; valid values: softmax"):
        VideoClassifier(model, optimizer={"name": "sgd", "lr": 0.1, "weight_decay": 0.0},
                        scheduler={"name": "constant"}, view_aggregation="mean")


def test_evaluate_refuses_keys_it_does_not_read(tmp_path):
    """evaluate.py +model.num_frames=16 did nothing (the model is the checkpoint's; data.num_frames sets the clips)."""
    from timesformer.pipeline import evaluate

    with pytest.raises(ValueError, match="evaluate.py does not read model.num_frames"):
        evaluate(compose_config("eval", ["ckpt=any.ckpt", "+model.num_frames=16"], tmp_path))


def test_evaluate_does_not_overwrite_another_evaluations_results(tmp_path):
    """Two torchrun launches with one --rdzv-id share the run dir torchrun-<id>: the second evaluation overwrote the
    first's eval.json and predictions.csv. It stops before reading anything."""
    from timesformer.pipeline import evaluate

    (tmp_path / "eval.json").write_text("{}")
    (tmp_path / "model.ckpt").write_text("not read")
    with pytest.raises(FileExistsError, match="already holds the results of an evaluation"):
        evaluate(compose_config("eval", [f"ckpt={tmp_path / 'model.ckpt'}"], tmp_path))
    assert (tmp_path / "eval.json").read_text() == "{}"


@pytest.mark.parametrize(("override", "message"), [
    ("model.attention_type=divided", "model: attention_type='divided' is not supported; valid values: divided_space_t"),
    ("+model.num_frame=16", r"model: unknown TimeSformerConfig field\(s\) \['num_frame'\]; known fields: .*'num_fr"),
    ("model.image_size=200", "model: image_size=200 is not divisible by patch_size=16"),
])
def test_model_options_are_checked_before_the_dataset_is_read(override, message, tmp_path):
    """A model option was judged only once the dataset had been indexed (minutes for Kinetics): behind a wrong
    data.root, the user fixed that, waited, then met the model's error."""
    cfg = compose_config("train", ["data=kinetics400", f"data.root={tmp_path / 'not_there'}", override], tmp_path)
    with pytest.raises(ValueError, match=message):
        train(cfg)


def test_a_missing_ckpt_is_asked_for_with_the_newest_checkpoints(tmp_path):
    """evaluate.py / predict.py without ckpt= failed with Hydra's MissingMandatoryValue traceback."""
    import os

    from timesformer.inference import run
    from timesformer.pipeline import evaluate

    logs = tmp_path / "logs"
    written = [logs / "train/runs/2026-12-01_10-00-00/checkpoints/last.ckpt",
               logs / "train/multiruns/2026-12-02_10-00-00/3/checkpoints/epoch=004.ckpt",
               logs / "train/runs/2026-12-03_10-00-00/checkpoints/last.ckpt",
               logs / "train/runs/2026-12-04_10-00-00/checkpoints/last.ckpt"]
    for age, path in enumerate(reversed(written)):  # the last written is the newest
        path.parent.mkdir(parents=True)
        path.touch()
        os.utime(path, (1e9 - age * 60, 1e9 - age * 60))
    snapshot = written[-1].parent / "nonfinite-step7.ckpt"  # newer than all, but the weights before a NaN loss
    snapshot.touch()
    os.utime(snapshot, (1e9 + 60, 1e9 + 60))
    with pytest.raises(ValueError, match="evaluate.py needs ckpt=PATH, a checkpoint written by train.py") as error:
        evaluate(compose_config("eval", [f"paths.log_dir={logs}"], tmp_path / "eval"))
    named = str(error.value).split("; the newest under ")[1]
    assert [named.index(str(path)) for path in written[:0:-1]] == sorted(named.index(str(path)) for path in written[1:])
    assert str(written[0]) not in named and snapshot.name not in named  # three at most, newest first
    with pytest.raises(ValueError, match=r"predict.py needs ckpt=PATH, a train.py checkpoint, a Hugging Face folder"):
        run(compose_config("predict", ["input=clip.mp4", f"paths.log_dir={tmp_path / 'no_logs'}"], tmp_path / "p"))


def test_a_run_records_its_real_batch_and_a_finished_run_restarted_keeps_its_results(synthetic_root, tmp_path):
    overrides = [*tiny_overrides(synthetic_root), "trainer.max_epochs=1", "test=false", "global_batch_size=8",
                 "trainer.enable_progress_bar=false"]
    metrics = train(compose_config("train", overrides, tmp_path / "run"))
    # The loggers and checkpoints had accumulate_grad_batches: 1 (the config's), no process count, no global batch.
    run_config = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)[
        "hyper_parameters"]["run_config"]
    assert (run_config["trainer"]["accumulate_grad_batches"], run_config["world_size"],
            run_config["global_batch_size"]) == (2, 1, 8)
    logged = (tmp_path / "run" / "csv" / "hparams.yaml").read_text()
    assert "accumulate_grad_batches: 2" in logged and "world_size: 1" in logged
    # resume=auto on the finished run (a restarted sweep): metrics.json was overwritten with {}, no objective left.
    results = (tmp_path / "run" / "metrics.json").read_text()
    again = train(compose_config("train", [*overrides, "resume=auto", "+optimizer.fused=false"], tmp_path / "run"))
    assert again == metrics and "val/acc" in again  # (fused is no optimizer state: not a difference)
    assert (tmp_path / "run" / "metrics.json").read_text() == results
    # Not tested then (test=false, or a signal stopped the test): the test runs now, on the best checkpoint.
    overrides[overrides.index("test=false")] = "test=true"
    tested = train(compose_config("train", [*overrides, "resume=auto"], tmp_path / "run"))
    assert tested["val/acc"] == metrics["val/acc"] and "test/video_acc" in tested
    assert "test/video_acc" in json.loads((tmp_path / "run" / "metrics.json").read_text())


def test_a_failed_run_closes_its_wandb_run(synthetic_root, tmp_path, monkeypatch):
    """Under -m the next job logged into the failed job's still open W&B run."""
    import timesformer.pipeline as pipeline

    closed = []
    monkeypatch.setattr(pipeline, "_finish_wandb", lambda loggers, exit_code=0: closed.append(exit_code))

    def diverging_fit(*args, **kwargs):
        raise FloatingPointError("non-finite training loss")

    monkeypatch.setattr(pipeline.L.Trainer, "fit", diverging_fit)
    with pytest.raises(FloatingPointError):
        train(compose_config("train", [*tiny_overrides(synthetic_root), "trainer.enable_progress_bar=false"], tmp_path))
    assert closed == [1]  # finished, marked failed


def test_a_fine_tuning_run_resumes_without_its_pretrained_file_and_only_on_its_own_classes(synthetic_root, tmp_path,
                                                                                          monkeypatch):
    """Resuming rebuilt the model from model.pretrained, so a requeued fine-tuning job whose starting checkpoint was
    gone (a scratch disk) could never continue; and a checkpoint of another dataset with as many classes resumed
    silently, its head rows renamed by position."""
    from timesformer.data import VideoDataModule

    overrides = [*tiny_overrides(synthetic_root), "trainer.max_epochs=1", "test=false",
                 "trainer.enable_progress_bar=false"]
    train(compose_config("train", overrides, tmp_path / "first"))
    start = tmp_path / "start.ckpt"
    start.write_bytes((tmp_path / "first" / "checkpoints" / "last.ckpt").read_bytes())
    finetune = [*overrides, f"model.pretrained={start}"]
    train(compose_config("train", finetune, tmp_path / "finetune"))
    last = tmp_path / "finetune" / "checkpoints" / "last.ckpt"
    start.unlink()
    with pytest.raises(FileNotFoundError, match=f"model.pretrained={start}: no such file"):  # a new run needs it
        train(compose_config("train", finetune, tmp_path / "again"))
    resumed = train(compose_config("train", [*finetune, "trainer.max_epochs=2", f"ckpt_path={last}"],
                                   tmp_path / "finetune"))
    assert torch.load(last, weights_only=False)["epoch"] == 1 and "val/acc" in resumed

    classes = VideoDataModule.class_names.fget  # the same videos under other class names
    monkeypatch.setattr(VideoDataModule, "class_names", property(lambda self: [f"other {name}" for name in
                                                                               classes(self)]))
    with pytest.raises(ValueError, match="continues a run on 2 classes .* 'other .* is new.*model.pretrained="):
        train(compose_config("train", [*overrides, "trainer.max_epochs=2", f"ckpt_path={last}"], tmp_path / "x"))


def test_checkpoints_of_the_wrong_kind_are_named(synthetic_root, tmp_path):
    """Pickle errors, KeyError('global_step') and pages of size mismatches named no file or option."""
    from timesformer.pipeline import evaluate

    overrides = [*tiny_overrides(synthetic_root), "trainer.max_epochs=1", "test=false",
                 "trainer.enable_progress_bar=false"]
    train(compose_config("train", overrides, tmp_path / "run"))
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    (tmp_path / "notes.ckpt").write_text("hello")
    torch.save(torch.load(last, weights_only=False)["state_dict"], tmp_path / "weights.pth")
    for ckpt_path, message in [
        (tmp_path / "notes.ckpt", "notes.ckpt cannot be read as a PyTorch checkpoint"),
        (tmp_path / "weights.pth", "is not a checkpoint of a train.py run.*use model.pretrained="),
        (tmp_path / "run" / "checkpoints", "no such checkpoint file \\(a folder: pass one of its .ckpt files\\)"),
    ]:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            train(compose_config("train", [*overrides, f"ckpt_path={ckpt_path}"], tmp_path / "resumed"))
    with pytest.raises(ValueError, match="continues a run with other settings: model.hidden_size=64 \\(it has"):
        train(compose_config("train", [*overrides, f"ckpt_path={last}", "model.hidden_size=64"], tmp_path / "other"))
    # The optimizer's restored state holds the learning rate: a new one was logged and never used.
    with pytest.raises(ValueError, match="ckpt_path: .* other settings: optimizer.lr=0.5 \\(it has 0.001\\)"):
        train(compose_config("train", [*overrides, f"ckpt_path={last}", "optimizer.lr=0.5"], tmp_path / "other"))
    # Another global batch (here by accumulation; another process count alike): the schedule's restored step counts
    # optimizer steps of the run's size, and the rest of training ran at the minimum learning rate
    with pytest.raises(ValueError, match="a global batch of 4 clips per optimizer step; this one's is 8 .* "
                                         "global_batch_size=4"):
        train(compose_config("train", [*overrides, f"ckpt_path={last}", "trainer.accumulate_grad_batches=2"],
                             tmp_path / "other"))
    # resume=auto finds the run dir's checkpoint
    with pytest.raises(ValueError, match="resume=auto: .* other settings: optimizer.lr=0.5"):
        train(compose_config("train", [*overrides, "resume=auto", "optimizer.lr=0.5"], tmp_path / "run"))
    # The schedule, and how clips are drawn and batched: a restarted Optuna sweep's job N, say, continued the other
    # settings' job N (the data position is a count of batches: another batch size resumed elsewhere)
    with pytest.raises(ValueError, match=r"other settings: scheduler.warmup_epochs=3 \(it has 1\), "
                                         r"data.batch_size=2 \(it has 4\)"):
        train(compose_config("train", [*overrides, "resume=auto", "data.batch_size=2", "scheduler.warmup_epochs=3"],
                             tmp_path / "run"))
    # The sweep's other searched option, and the loss: the regularisation of one trial went on in another's weights
    saved = torch.load(last, map_location="cpu", weights_only=False)["timesformer_config"]["drop_path_rate"]
    with pytest.raises(ValueError, match=rf"other settings: model.drop_path_rate=0.25 \(it has {saved}\), "
                                         r"module.label_smoothing=0.2 \(it has 0.0\)"):
        train(compose_config("train", [*overrides, "resume=auto", "model.drop_path_rate=0.25",
                                       "module.label_smoothing=0.2"], tmp_path / "run"))
    with pytest.raises(FileNotFoundError, match="is a folder: pass a train.py checkpoint file"):
        evaluate(compose_config("eval", [f"ckpt={tmp_path / 'run' / 'checkpoints'}"], tmp_path / "eval"))
    with pytest.raises(ValueError, match="notes.ckpt cannot be read as a PyTorch checkpoint"):
        evaluate(compose_config("eval", [f"ckpt={tmp_path / 'notes.ckpt'}"], tmp_path / "eval"))


def test_last_checkpoint_every_epoch_even_without_validation(synthetic_root, tmp_path):
    overrides = [*tiny_overrides(synthetic_root), "trainer.max_epochs=3", "trainer.check_val_every_n_epoch=2",
                 "test=false", "trainer.enable_progress_bar=false"]
    train(compose_config("train", overrides, tmp_path))
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["epoch"] == 2 and last["global_step"] == 3 * 2  # the final epoch, which ran no validation


def test_checkpointing_can_be_turned_off(synthetic_root, tmp_path):
    overrides = [*tiny_overrides(synthetic_root), "trainer.max_epochs=1", "+trainer.enable_checkpointing=false",
                 "trainer.enable_progress_bar=false"]
    metrics = train(compose_config("train", overrides, tmp_path))
    assert "test/acc" in metrics and not (tmp_path / "checkpoints").exists()


def test_evaluation_report_names_the_views_it_used(synthetic_root, tmp_path):
    from timesformer.pipeline import evaluate

    overrides = [*tiny_overrides(synthetic_root), "trainer.max_epochs=1", "test=false",
                 "trainer.enable_progress_bar=false"]
    metrics = train(compose_config("train", overrides, tmp_path / "run"))
    checkpoint = next((tmp_path / "run" / "checkpoints").glob("epoch*.ckpt"))
    assert "val/acc" in metrics
    evaluate(compose_config("eval", [f"ckpt={checkpoint}", "++data.test_spatial_crops=2",
                                     "trainer.enable_progress_bar=false"], tmp_path / "eval"))
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["views"] == {"test_temporal_clips": 1, "test_spatial_crops": 2}  # what ran, not the saved keys


def test_sweep_objective_names_what_is_missing():
    from timesformer.pipeline import sweep_objective

    assert sweep_objective({"val/acc": 0.5}, "val/acc") == 0.5 and sweep_objective({}, None) is None
    assert sweep_objective({"preempted": 1.0}, "val/acc") is None  # a single run: nothing optimises it
    with pytest.raises(KeyError, match=r"optimized_metric=val/acc has no value: the run's results are train/loss"):
        sweep_objective({"train/loss": 1.0}, "val/acc", required=True)
    with pytest.raises(KeyError, match="preempted"):
        sweep_objective({"preempted": 1.0}, "val/acc", required=True)


def test_trainer_options_are_set_without_a_plus(synthetic_root, tmp_path):
    overrides = [*tiny_overrides(synthetic_root), "trainer.max_steps=1", "trainer.val_check_interval=1",
                 "trainer.limit_val_batches=1", "trainer.num_sanity_val_steps=0", "test=false",
                 "trainer.enable_progress_bar=false"]
    train(compose_config("train", overrides, tmp_path))
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 1


def test_overfit_batches(synthetic_root, tmp_path):
    overrides = [*tiny_overrides(synthetic_root), "trainer.max_epochs=2", "+trainer.overfit_batches=1", "test=false",
                 "trainer.enable_progress_bar=false"]
    metrics = train(compose_config("train", overrides, tmp_path))
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))


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
    module = tiny_classifier()
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


def test_metrics_json_is_strict_json_with_null_test_results_when_no_test_video_decodes(tmp_path, caplog):
    """No test video decodes: torchmetrics' 0.0 accuracy (no sample seen) and NaN loss were written as results, the
    NaN as a bare token that strict JSON parsers refuse. They are null, as in evaluate.py's eval.json, with a
    warning; any other non-finite value is null too."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from timesformer.evaluation import VideoResults
    from timesformer.pipeline import _fit_and_test

    none = torch.zeros(0, dtype=torch.int64)
    module = SimpleNamespace(test_results=VideoResults(none, none, torch.zeros(0, 0), none, failed=[0, 1]))
    test_metrics = {"test/acc": 0.0, "test/loss": float("nan"), "test/video_acc": float("nan"),
                    "test/failed_views": 6.0}
    trainer = SimpleNamespace(fit=lambda *args, **kwargs: None, global_step=2, fast_dev_run=False,
                              callback_metrics={"val/acc": torch.tensor(0.5), "val/loss": torch.tensor(float("inf"))},
                              checkpoint_callback=None, is_global_zero=True, test=lambda *a, **k: [test_metrics])
    _fit_and_test(OmegaConf.create({"test": True}), trainer, module, None, None, None, tmp_path)

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    saved = json.loads((tmp_path / "metrics.json").read_text(), parse_constant=refuse)
    assert saved["test/acc"] is saved["test/loss"] is saved["test/video_acc"] is saved["val/loss"] is None
    assert saved["test/failed_views"] == 6.0 and saved["val/acc"] == 0.5
    assert "None of the 2 test videos could be decoded" in caplog.text


@pytest.mark.parametrize("bound", ["max_epochs", "max_steps"])
def test_the_final_train_loss_is_the_mean_over_the_processes(monkeypatch, bound, tmp_path):
    """train/loss was reduced over the processes at logging steps only: metrics.json (and a sweep optimising
    train/loss) got rank 0's own last batch whenever the run's last step was not a logging step. A stand-in reduce
    marks the reduced values."""
    from tests.test_tracking import _SlowClips

    bounds = {"max_epochs": 1} if bound == "max_epochs" else {"max_epochs": -1, "max_steps": 5}
    trainer = L.Trainer(accelerator="cpu", log_every_n_steps=50, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, default_root_dir=tmp_path, **bounds)
    monkeypatch.setattr(type(trainer.strategy), "reduce",  # (the non-finite check's sum left as it is)
                        lambda self, tensor, reduce_op="mean": tensor + 1000 if reduce_op == "mean" else tensor)
    trainer.fit(tiny_classifier(), DataLoader(_SlowClips(0.0), batch_size=1))  # 7 steps an epoch
    assert trainer.callback_metrics["train/loss"] > 1000


def test_the_training_loss_is_label_smoothed_cross_entropy():
    """module.label_smoothing reaches the training loss: on a fixed batch, training_step's loss is the smoothed
    cross-entropy of the model's logits (and not the plain one, a clear margin away with confident logits)."""
    import torch.nn.functional as F

    module = tiny_classifier(label_smoothing=0.1)
    with torch.no_grad():
        module.model.head.weight.mul_(200)  # confident logits: smoothing changes the loss visibly
    module.trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False)
    torch.manual_seed(0)
    batch = {"video": torch.randn(4, 4, 3, 32, 32), "label": torch.tensor([0, 1, 1, 0])}
    loss = module.training_step(batch, 0)
    with torch.no_grad():
        logits = module.model(batch["video"])
    smoothed = F.cross_entropy(logits, batch["label"], label_smoothing=0.1)
    plain = F.cross_entropy(logits, batch["label"])
    # (1 - eps) * CE + eps * the mean over classes of -log p: the smoothed loss, by its definition
    log_p = logits.log_softmax(-1)
    by_hand = (0.9 * -log_p[torch.arange(4), batch["label"]] + 0.1 * -log_p.mean(-1)).mean()
    torch.testing.assert_close(smoothed, by_hand)
    assert loss.item() == pytest.approx(smoothed.item(), rel=1e-5)
    assert abs(smoothed.item() - plain.item()) > 0.05


def test_the_test_after_training_loads_the_best_checkpoint(synthetic_root, tmp_path, monkeypatch):
    """train.py tests the checkpoint that callbacks.model_checkpoint chose (the one metrics.json names), not the
    weights at the end of training."""
    import timesformer.pipeline as pipeline

    tested = []
    test = pipeline.L.Trainer.test

    def spy(self, *args, **kwargs):
        tested.append(kwargs.get("ckpt_path"))
        return test(self, *args, **kwargs)

    monkeypatch.setattr(pipeline.L.Trainer, "test", spy)
    metrics = train(compose_config("train", [*tiny_overrides(synthetic_root), "trainer.max_epochs=2", "test=true",
                                             "trainer.enable_progress_bar=false", "logger=none"], tmp_path))
    best = json.loads((tmp_path / "metrics.json").read_text())["best_checkpoint"]
    assert best == metrics["best_checkpoint"]
    assert best.startswith(str(tmp_path / "checkpoints" / "epoch")) and best.endswith(".ckpt")
    assert tested == [best]
    assert "test/video_acc" in metrics

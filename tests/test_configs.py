"""Every config composes, and the values that must agree do."""

from pathlib import Path

import hydra
import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import CONFIG_DIR, compose_config, run_script
from timesformer.module import check_settings, lr_multiplier

GROUPS = {group.name: sorted(p.stem for p in group.glob("*.yaml")) for group in CONFIG_DIR.iterdir()
          if group.is_dir() and group.name != "hydra"}
TRAIN_CHOICES = [(group, option) for group, options in GROUPS.items() for option in options]


def test_every_group_has_options():
    for group in ("model", "data", "trainer", "logger", "callbacks", "optimizer", "scheduler", "experiment"):
        assert GROUPS.get(group), f"configs/{group}/ is empty"


@pytest.mark.parametrize(("group", "option"), TRAIN_CHOICES, ids=[f"{g}={o}" for g, o in TRAIN_CHOICES])
def test_train_config_composes_and_resolves(group, option, tmp_path):
    cfg = compose_config("train", [f"{group}={option}"], tmp_path)
    resolved = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    assert resolved["paths"]["output_dir"] == str(tmp_path)
    # model.num_frames / image_size are the single source of truth: the data config follows them
    assert resolved["data"]["num_frames"] == resolved["model"]["num_frames"]
    assert resolved["data"]["image_size"] == resolved["model"]["image_size"]
    if group == "trainer" and (cfg.trainer.accelerator in ("cpu", "auto") or torch.cuda.is_available()):
        hydra.utils.instantiate(cfg.trainer, logger=False, enable_progress_bar=False)


def test_eval_config_composes(tmp_path):
    cfg = compose_config("eval", ["ckpt=some.ckpt"], tmp_path)
    assert cfg.ckpt == "some.ckpt" and cfg.get("data") is None


def test_model_overrides_flow_into_the_data(tmp_path):
    cfg = compose_config("train", ["model=tiny", "model.num_frames=16", "model.image_size=48"], tmp_path)
    assert cfg.data.num_frames == 16 and cfg.data.image_size == 48
    assert list(cfg.data.train_short_side_range) == [48, 60]


def test_demo_experiment_is_tiny_on_cpu(tmp_path):
    cfg = compose_config("train", ["experiment=demo"], tmp_path)
    assert cfg.model.hidden_size < 256 and cfg.trainer.accelerator == "cpu"
    assert cfg.data.horizontal_flip is False  # flips would swap the left/right labels
    assert Path(cfg.data.source.root).name == "synthetic"


@pytest.mark.parametrize("data", ["synthetic", "kinetics400", "csv", "folder"])
def test_every_dataset_takes_the_common_data_options(data, tmp_path):
    """The options data/README.md documents for all datasets exist in each data config (the generated data's
    config lacked them: data.max_failed_fraction=... was an error there)."""
    root = [] if data == "synthetic" else ["data.root=/datasets/x"]
    cfg = compose_config("train", [f"data={data}", *root, "data.max_failed_fraction=0.1", "data.val_views_full=true",
                                   "data.test_temporal_clips=2", "data.pin_memory=false", "data.decode_retries=0",
                                   "data.mean=[0.5,0.5,0.5]"], tmp_path)
    assert cfg.data.max_failed_fraction == 0.1 and cfg.data.test_temporal_clips == 2


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
    # (8 clips per GPU, base's, held ~54 and ~79 GiB of fp32 activations: out of memory for L on an 80 GB GPU)
    assert hr.data.batch_size == large.data.batch_size == 2
    paper = compose_config("train", ["experiment=k400_paper"], tmp_path)
    assert (paper.optimizer.name, paper.optimizer.lr, paper.optimizer.nesterov) == ("sgd", 0.005, True)
    # momentum 0.9, weight decay 1e-4 on every parameter: the original decays embeddings, norms and biases too
    assert (paper.optimizer.momentum, paper.optimizer.weight_decay, paper.optimizer.decay_norm_bias_embed) == (
        0.9, 1e-4, True)
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


@pytest.mark.parametrize(("overrides", "message"), [
    # (torch refused these only in configure_optimizers, after the dataset was indexed; nesterov's naming no option)
    (["scheduler=multistep", "scheduler.milestones=[11,14]"], r"scheduler.milestones=\[11, 14\]: .* in \(0, 1\)"),
    (["optimizer=sgd", "optimizer.momentum=0"], "optimizer.nesterov=true needs optimizer.momentum > 0"),
    # (the data's clip followed its own frame count and the model interpolated its embeddings at every step)
    (["data.num_frames=16"], "data.num_frames=16 differs from model.num_frames=8: .* set model.num_frames=16"),
    (["data.image_size=24"], "data.image_size=24 differs from model.image_size=32"),
])
def test_train_options_that_would_fail_or_mislead_late_are_refused_first(overrides, message, tmp_path):
    from timesformer.pipeline import check_run_options

    cfg = compose_config("train", ["experiment=demo", *overrides], tmp_path)
    with pytest.raises(ValueError, match=message):
        check_run_options(cfg)


def test_evaluating_on_the_same_numbered_dataset_keeps_the_checkpoints_split(tmp_path):
    """evaluate.py data=ucf101 on a split-2 checkpoint tested split 1 (ucf101.yaml's), whose test groups 1-7 are in
    split 2's training list: an accuracy measured on training videos, without a word."""
    from timesformer.pipeline import swap_dataset

    saved = {"source": {"_target_": "timesformer.data.UCF101Source"}, "split": 2, "num_frames": 4}
    cfg = compose_config("eval", ["ckpt=x.ckpt", "data=ucf101", "data.root=/ucf"], tmp_path)
    assert swap_dataset(saved, cfg.data).split == 2
    cfg = compose_config("eval", ["ckpt=x.ckpt", "data=ucf101", "data.root=/ucf", "data.split=3"], tmp_path)
    assert swap_dataset(saved, cfg.data).split == 3  # the command line's
    cfg = compose_config("eval", ["ckpt=x.ckpt", "data=folder", "data.root=/f"], tmp_path)
    assert swap_dataset(saved, cfg.data).get("split") is None  # another dataset: its own


@pytest.mark.parametrize("script", ["evaluate.py", "predict.py"])
def test_help_names_what_the_script_takes(script):
    """Hydra's help listed every config group (model=, optimizer=, experiment=, ...) for evaluate.py and predict.py,
    which take none of them: `predict.py ckpt=... model=tiny` failed with "Could not override 'model'"."""
    result = run_script(script, "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith(f"python {script} ckpt=PATH")
    assert "== Configuration groups ==" not in result.stdout and "optimizer:" not in result.stdout
    assert "\nckpt: ???" in result.stdout  # the config, to override anything in it

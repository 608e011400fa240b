"""Where a trained TimeSformer looks (issue #6): on the synthetic motion videos, the attention rollout of a model
that learned the task puts more of its mass on the moving objects than on the background; the same
architecture untrained spreads it evenly, so the check can fail and what it sees is learned.

The object masks are the generator's ground truth (`SyntheticMotionSource.object_masks`), taken through the
same frame sampling, resize and crop as the clip the model sees, and pooled to the patch grid.

The measure, per clip: attention per unit of object area over attention per unit of background area,
    ratio = (sum(a·f) / sum(f)) / (sum(a·(1 - f)) / sum(1 - f)),
with `a` the (T, h, w) rollout and `f` the fraction of each patch the objects cover. A uniform map gives 1
whatever the objects' size.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import hydra
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import ROOT, compose_config, once_per_session
from timesformer import TimeSformer
from timesformer.attention_maps import attention_rollout
from timesformer.data import EvalViewTransform, SyntheticMotionSource, VideoClipDataset, decode_frames, normalize
from timesformer.data.sampling import dense_clip_indices
from timesformer.pipeline import build_model, train

# The demo's data and tiny model (4 divided blocks, width 96, 8 frames x 32 px), pinned here so that a change to
# the demo does not silently change this test. The demo's own recipe (lr 1e-3, no clipping) learns the task too
# late and too unevenly for a test: 0.89-0.97 after 15 epochs over 3 seeds, near chance after 10. With the lr
# doubled and the gradient norm clipped at 1 it learned in 22 of 23 runs (seeds 1-8 and 42, worker and thread
# counts, validation schedules: all change the random draws or the rounding): final val acc 0.875-1.0, one 0.77.
# Training is a jump after a plateau of about 100 steps whose length varies from run to run. Shorter runs
# (12 epochs: 0.86 for one of 4 seeds) and every cheaper variant tried (4 frames, 2 or 3 blocks, joint attention,
# batch 8 or 32, lr 3e-3, constant lr; no scale jitter: 2 of 8 seeds below 0.8) stayed near chance more often.
# On one machine the run is deterministic (the same numbers every time); another CPU's rounding would re-draw it.
TRAIN_OVERRIDES = [
    "experiment=demo",
    "model=tiny",
    "model.attention_type=divided_space_time",
    "data.source.classes=axis",  # "direction" is not learnable by this model in minutes (README, demo notes)
    "data.source.num_classes=2",
    "data.source.videos_per_class_train=96",
    "data.source.videos_per_class_val=32",
    "trainer.max_epochs=15",
    "optimizer.lr=2e-3",
    "trainer.gradient_clip_val=1.0",
    # Validate once, at the end: every epoch costs ~15% more.
    "trainer.check_val_every_n_epoch=15",
    # Decoding in the main process: on 2 cores as fast as workers, and the run cannot depend on the worker count
    # (which changes the random draws).
    "data.num_workers=0",
    "test=false",
    "trainer.enable_progress_bar=false",
    "seed=42",
]

MIN_VAL_ACCURACY = 0.85


@dataclass
class AttentionOnObjects:
    """What the module's one training run measured, per validation clip."""

    val_accuracy: float
    trained_ratios: torch.Tensor  # (clips,) object/background attention ratio of the trained model
    untrained_ratios: torch.Tensor  # (clips,) the same for the untrained model
    brightness_gaps: torch.Tensor  # (clips,) mean normalised intensity on object pixels minus on the background


def object_fraction(source: SyntheticMotionSource, dataset: VideoClipDataset, path: str,
                    patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fraction of each pixel (T, S, S) and of each patch (T, S/p, S/p) that the objects cover in the centre
    validation clip of the video at ``path``: its ground-truth masks through the dataset's own frame choice,
    resize and crop."""
    transform = dataset.transform
    assert isinstance(transform, EvalViewTransform) and dataset.views_per_video == 1, "expects the centre view only"
    masks = torch.from_numpy(source.object_masks(path))  # (video frames, H, W)
    # The frames VideoClipDataset decodes for temporal clip 0 of 1 (it reads the frame count and fps from the
    # file; the generator wrote exactly these).
    indices = dense_clip_indices(source.num_video_frames, dataset.num_frames, dataset.sampling_rate, source.fps,
                                 target_fps=dataset.target_fps, clip_index=0, num_clips=1)
    frames = (masks[indices].to(torch.uint8) * 255)[:, None].expand(-1, 3, -1, -1)  # as a (T, 3, H, W) video
    view = transform.crop(transform.resize(frames), 0)  # resized and cropped like the clip
    pixels = view[:, 0].float() / 255
    return pixels, F.avg_pool2d(pixels[:, None], patch_size)[:, 0]


def object_background_ratio(heatmap: torch.Tensor, fraction: torch.Tensor) -> float:
    """Attention per unit of object area over attention per unit of background area (1: no preference)."""
    on_object = (heatmap * fraction).sum() / fraction.sum()
    on_background = (heatmap * (1 - fraction)).sum() / (1 - fraction).sum()
    return float(on_object / on_background)


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> AttentionOnObjects:
    """Trains once through the real path (train.py's `pipeline.train`), then measures every validation clip."""
    # One thread: on this project's 2-core machine two threads took 28 s when it was idle but 285 s next to another
    # 2-thread process (each OpenMP thread waits for the one whose core was taken); one thread took 40 s and 65 s.
    # (The thread count changes float rounding, so the numbers below are for one thread.)
    def make(folder: Path) -> None:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            torch.save(asdict(train_and_measure(tmp_path_factory)), folder / "measured.pt")
        finally:
            torch.set_num_threads(threads)

    return AttentionOnObjects(**torch.load(once_per_session(tmp_path_factory, "attention_on_objects", make)
                                           / "measured.pt"))


def train_and_measure(tmp_path_factory: pytest.TempPathFactory) -> AttentionOnObjects:
    """`measured`'s work: generate the data, train, then roll out both models on every validation clip."""
    # Its own data folder: the session's `synthetic_root` holds a smaller dataset that this one would replace.
    data_root = tmp_path_factory.mktemp("attention_data")
    run_dir = tmp_path_factory.mktemp("attention_run")
    cfg = compose_config("train", [*TRAIN_OVERRIDES, f"data.source.root={data_root}"], run_dir)
    metrics = train(cfg)
    # The weights validated at the end (validation runs once, after the last epoch).
    trained = TimeSformer.from_pretrained(run_dir / "checkpoints" / "last.ckpt").eval()
    # The same architecture, initialised from the run's seed as train() initialises it before training.
    torch.manual_seed(cfg.seed)
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    datamodule.prepare_data()  # already generated: only checks
    untrained = build_model(cfg.model, datamodule.class_names).eval()
    datamodule.setup("validate")
    dataset, source = datamodule.datasets["val"], datamodule.source

    trained_ratios, untrained_ratios, gaps = [], [], []
    for item_index in range(len(dataset)):
        item = dataset[item_index]
        clip = normalize(item["video"], datamodule.mean, datamodule.std)  # (T, C, S, S), the model's input
        pixels, fraction = object_fraction(source, dataset, dataset.entries[item["index"]][0],
                                           trained.config.patch_size)
        intensity = clip.mean(dim=1)
        gaps.append(float(intensity[pixels > 0.5].mean() - intensity[pixels <= 0.5].mean()))
        trained_ratios.append(object_background_ratio(attention_rollout(trained, clip), fraction))
        untrained_ratios.append(object_background_ratio(attention_rollout(untrained, clip), fraction))
    return AttentionOnObjects(float(metrics["val/acc"]), torch.tensor(trained_ratios),
                              torch.tensor(untrained_ratios), torch.tensor(gaps))


@pytest.mark.slow
def test_the_model_learned_the_task(measured):
    # Measured: 0.9375 (60 of the 64 validation clips; chance is 0.5). The attention check means something only
    # for a model that learned to tell the motion apart. If this fails after a change elsewhere (anything that
    # changes the random draws re-runs the lottery described above TRAIN_OVERRIDES), the recipe needs more
    # epochs, not a lower bar.
    assert measured.val_accuracy >= MIN_VAL_ACCURACY, (
        f"val acc {measured.val_accuracy:.3f}: the model did not learn the task, so its attention says nothing")


@pytest.mark.slow
def test_the_object_masks_line_up_with_the_clips(measured):
    # The objects are bright (colours 150-255) on a dark background (base colours 0-110): if the masks were
    # shifted in time or space against the decoded clips, the gap would shrink. Measured: at least 1.69
    # (normalised units, where 1 = 0.225 of the full range) in every clip.
    assert measured.brightness_gaps.min() > 1.0, measured.brightness_gaps


@pytest.mark.slow
def test_trained_attention_is_on_the_moving_objects(measured):
    # Measured: mean ratio 1.93 over the 64 validation clips (median 1.84), 63 of them above 1 (lowest 0.83).
    # Over 16 runs of this recipe (seeds 1-8 and 42, two data generations; all learned) the mean was 1.53-2.43,
    # with 95-100% of the clips above 1. Runs that did not learn (a variant without scale jitter) stayed lower:
    # 1.41 at val acc 0.77, 1.08 at 0.50 (chance).
    ratios = measured.trained_ratios
    assert ratios.mean() >= 1.4, ratios
    assert (ratios > 1).float().mean() >= 0.9, ratios


@pytest.mark.slow
def test_untrained_attention_is_spread_evenly(measured):
    # The control: the same network before training looks nowhere in particular, so the ratio above is learned,
    # not an artefact of the measure (bright patches, object sizes, the rollout's residual term). Measured:
    # mean 1.003 (0.989-1.015 per clip); 0.997-1.009 over 6 initialisation seeds.
    assert abs(measured.untrained_ratios.mean() - 1) < 0.1, measured.untrained_ratios
    assert measured.trained_ratios.mean() - measured.untrained_ratios.mean() > 0.3


def test_object_masks_are_where_the_bright_objects_are(tmp_path):
    """`SyntheticMotionSource.object_masks` on its own: decoded pixels inside the masks are the bright objects,
    outside the dark background, and the masks move rigidly (same area, different place)."""
    source = SyntheticMotionSource(tmp_path, num_classes=2, classes="axis", videos_per_class_train=1,
                                   videos_per_class_val=1, num_video_frames=12)
    source.prepare()
    for path, _ in source.load().split("train") + source.load().split("val"):
        masks = source.object_masks(path)
        assert masks.shape == (12, source.height, source.width) and masks.dtype == bool
        frames = decode_frames(path, list(range(12))).float().mean(dim=-1).numpy()  # (T, H, W) intensity
        assert frames[masks].mean() > 150 and frames[~masks].mean() < 120
        assert len(set(masks.sum(axis=(1, 2)).tolist())) == 1 and not np.array_equal(masks[0], masks[-1])
    with pytest.raises(ValueError, match="not a video of this synthetic dataset"):
        source.object_masks(Path("train") / "moving_diagonally_up" / "00000.mp4")


def test_generated_videos_are_the_same_bytes_in_another_process(tmp_path):
    """The training run above is reproducible only if its data is: x264 gave different bytes (and pixels) from
    one process to the next until its CPU-independent mode was set (synthetic.write_mp4); without it this test
    failed 3 times out of 3."""
    settings = dict(num_classes=2, classes="axis", videos_per_class_train=15, videos_per_class_val=1)
    SyntheticMotionSource(tmp_path / "here", **settings).prepare()
    script = ("import sys; from timesformer.data.synthetic import SyntheticMotionSource; "
              f"SyntheticMotionSource(sys.argv[1], **{settings!r}).prepare()")
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "there")], cwd=ROOT, check=True, timeout=120,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    videos = sorted(path.relative_to(tmp_path / "here") for path in (tmp_path / "here").rglob("*.mp4"))
    assert len(videos) == 32
    differing = [str(video) for video in videos
                 if (tmp_path / "here" / video).read_bytes() != (tmp_path / "there" / video).read_bytes()]
    assert differing == []

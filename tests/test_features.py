"""Features of a dataset split (predict.py data=... split=... features=...): the same numbers as predict.py on the
same files, the split's rows, both file formats, broken videos reported, clear errors on bad options."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import ROOT, compose_config
from tests.test_inference import tiny_model
from timesformer import TimeSformer, TimeSformerConfig
from timesformer.data import SyntheticMotionSource
from timesformer.data.sources import FolderSource
from timesformer.inference import dataset_config, embed, features_sidecar, run

# Two temporal clips x three crops: a video's six views span batches of four, so the per-video mean has to
# gather views across batches (and across the two workers).
VIEWS = ["data.test_temporal_clips=2", "data.test_spatial_crops=3"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A folder dataset (root/<split>/<class>/<video>.mp4) of real h264 videos, 4 classes, 2 val videos each, and
    one corrupt file in val."""
    root = tmp_path_factory.mktemp("features_data")
    SyntheticMotionSource(root, videos_per_class_train=1, videos_per_class_val=2, num_video_frames=128).prepare()
    classes = sorted(p.name for p in (root / "val").iterdir())
    (root / "val" / classes[-1] / "broken.mp4").write_text("not a video")
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("features_model") / "model"
    tiny_model("divided_space_time").save_pretrained(path)
    return path


def split_cfg(ckpt: Path, output: Path, overrides: list[str]):
    return compose_config("predict", [f"ckpt={ckpt}", f"features={output}", *overrides], output.parent / "run")


@pytest.fixture(scope="module")
def val_features(dataset, checkpoint, tmp_path_factory) -> dict:
    """The val split's features through the DataLoader with two workers, read back from the .pt file."""
    output = tmp_path_factory.mktemp("val_features") / "val.pt"
    run(split_cfg(checkpoint, output, ["data=folder", f"data.root={dataset}", "split=val", "data.num_workers=2",
                                       "data.batch_size=4", *VIEWS]))
    return torch.load(output)


def test_split_features_equal_predict_on_the_same_files(val_features, dataset, checkpoint, tmp_path):
    """predict.py input=<val folder> with the same views (folder.yaml samples 8 frames apart) gives the same vectors."""
    output = tmp_path / "files.pt"
    run(split_cfg(checkpoint, output, [f"input={dataset / 'val'}", "num_clips=2", "num_crops=3", "sampling_rate=8"]))
    files = torch.load(output)
    by_path = dict(zip(files["videos"], files["features"], strict=True))
    assert sorted(by_path) == sorted(val_features["videos"])
    expected = torch.stack([by_path[video] for video in val_features["videos"]])
    torch.testing.assert_close(val_features["features"], expected, rtol=1e-5, atol=1e-5)
    assert val_features["features"].dtype == torch.float32 and val_features["features"].shape == (8, 32)
    # The rows are distinct videos, not one vector repeated.
    assert torch.cdist(expected, expected).fill_diagonal_(1.0).min() > 1e-3
    # The corrupt file is left out of both, and listed in both.
    assert [f["video"] for f in files["failed"]] == [f["video"] for f in val_features["failed"]]


def test_batches_hold_whole_clips(dataset, checkpoint, tmp_path, monkeypatch):
    """data.batch_size=4 with 3 crops a clip: batches of 3 views, as evaluate.py's, so that a clip's crops go to one
    DataLoader worker, which decodes the clip once (batches of 4 split every other clip over two workers)."""
    import timesformer.inference as inference

    sizes = []
    monkeypatch.setattr(inference, "embed", lambda model, video, precision: sizes.append(len(video)) or
                        embed(model, video, precision))
    run(split_cfg(checkpoint, tmp_path / "val.pt", ["data=folder", f"data.root={dataset}", "split=val",
                                                      "data.num_workers=0", "data.batch_size=4", *VIEWS]))
    assert sum(sizes) == 9 * 6 and set(sizes) == {3}


def test_rows_follow_the_split_with_its_labels_and_the_corrupt_video_listed(val_features, dataset, checkpoint):
    entries = FolderSource(dataset).load().split("val")
    decoded = [(path, label) for path, label in entries if not path.endswith("broken.mp4")]
    assert len(entries) == 9 and len(decoded) == 8  # 4 classes x 2 videos, + the corrupt one
    assert val_features["videos"] == [path for path, _ in decoded]  # the split's order
    assert val_features["labels"].tolist() == [label for _, label in decoded]
    assert val_features["num_views"].tolist() == [6] * 8
    assert val_features["class_names"] == sorted(p.name for p in (dataset / "val").iterdir())
    assert val_features["split"] == "val" and val_features["checkpoint"] == str(checkpoint)
    [broken] = [(path, label) for path, label in entries if path.endswith("broken.mp4")]
    [failed] = val_features["failed"]
    assert (failed["video"], failed["label"]) == broken and failed["error"]


def test_npy_with_sidecar_holds_the_same_rows_and_the_corrupt_video_is_logged(val_features, dataset, checkpoint,
                                                                               tmp_path, caplog):
    """No workers and another batch size: the same numbers; the .npy rows and the sidecar's ids line up."""
    output = tmp_path / "val.npy"
    with caplog.at_level(logging.ERROR, logger="timesformer.inference"):
        run(split_cfg(checkpoint, output, ["data=folder", f"data.root={dataset}", "split=val", "data.num_workers=0",
                                           "data.batch_size=5", *VIEWS]))
    array = np.load(output)
    sidecar = json.loads(features_sidecar(output).read_text())
    assert features_sidecar(output).name == "val.videos.json"
    assert array.dtype == np.float32 and list(array.shape) == sidecar["shape"] == [8, 32]
    assert sidecar["videos"] == val_features["videos"] and sidecar["labels"] == val_features["labels"].tolist()
    np.testing.assert_allclose(array, val_features["features"].numpy(), rtol=1e-5, atol=1e-5)
    broken = str(dataset / "val" / val_features["class_names"][-1] / "broken.mp4")
    assert [f["video"] for f in sidecar["failed"]] == [broken]
    assert any(record.levelno == logging.ERROR and broken in record.getMessage() for record in caplog.records)


def test_a_train_checkpoint_brings_its_own_data_config(val_features, dataset, checkpoint, tmp_path):
    """Without data=<name> the checkpoint's saved data config is used, with data.<key>=<value> merged over it."""
    model = tiny_model("divided_space_time")
    saved = compose_config("predict", ["ckpt=x", "data=folder", "data.root=/moved/away", *VIEWS], tmp_path / "run")
    ckpt = tmp_path / "last.ckpt"  # what train.py writes, less the optimizer and loop states
    torch.save({"timesformer_config": model.config.to_dict(),
                "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": {"run_config": {"data": OmegaConf.to_container(
                    dataset_config(saved, model), resolve=True)}}}, ckpt)
    output = tmp_path / "val.pt"
    run(split_cfg(ckpt, output, ["split=val", f"++data.root={dataset}", "++data.num_workers=0"]))
    features = torch.load(output)
    assert features["videos"] == val_features["videos"]
    torch.testing.assert_close(features["features"], val_features["features"], rtol=1e-5, atol=1e-5)
    run(split_cfg(ckpt, output, ["split=val", f"++data.root={dataset}", "++data.num_workers=0",
                                 "++data.test_temporal_clips=1"]))
    assert torch.load(output)["num_views"].tolist() == [3] * 8  # the override reached the views


def test_an_exported_folder_keeps_its_clips_on_another_dataset(tmp_path):
    """predict.py data=<name> on an export_pretrained folder: the dataset's files, the export's clip settings."""
    model = tiny_model("divided_space_time")
    model.save_pretrained(tmp_path / "export", clip={"num_frames": 4, "image_size": 32, "sampling_rate": 3,
                                                     "mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2]})
    cfg = compose_config("predict", [f"ckpt={tmp_path / 'export'}", "data=folder", "data.root=/d", "split=val",
                                     "features=f.pt"], tmp_path / "run")
    data = dataset_config(cfg, model)
    assert data.sampling_rate == 3 and list(data.mean) == [0.5, 0.5, 0.5]  # folder.yaml's: 8 and 0.45


def test_split_mode_samples_a_checkpoint_without_clip_settings_at_the_papers_rate(tmp_path):
    """An original HR .pyth or a plain Hugging Face folder: input= sampled 16 frames 16 apart, data=<name> split= at
    the data config's 32 (base's), so HR features came from clips spanning 512 frames."""
    model = TimeSformer(TimeSformerConfig(image_size=16, patch_size=8, num_frames=16, hidden_size=16,
                                          num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                                          num_classes=2))
    model.save_pretrained(tmp_path / "hf")  # weights only, no clip settings
    chosen = ["data=kinetics400", "data.root=/k400", "split=val", "features=f.pt"]
    cfg = compose_config("predict", [f"ckpt={tmp_path / 'hf'}", *chosen], tmp_path / "run")
    assert dataset_config(cfg, model).sampling_rate == 16
    cfg = compose_config("predict", [f"ckpt={tmp_path / 'hf'}", *chosen, "data.sampling_rate=8"], tmp_path / "run")
    assert dataset_config(cfg, model).sampling_rate == 8  # the command line's


def test_data_config_is_sized_from_the_loaded_model(tmp_path):
    model = tiny_model("divided_space_time")
    cfg = compose_config("predict", ["ckpt=x", "data=ucf101", "data.root=/ucf", "split=train", "features=f.pt"],
                         tmp_path)
    data = OmegaConf.to_container(dataset_config(cfg, model), resolve=True)
    assert (data["num_frames"], data["image_size"]) == (model.config.num_frames, model.config.image_size) == (4, 32)
    assert data["root"] == "/ucf" and data["split"] == 1  # data.split: UCF101's official split, not split=


@pytest.mark.parametrize(("overrides", "message"), [
    (["input=videos/", "data=folder", "data.root=/x", "split=val"], "exclusive"),
    (["input=videos/", "split=val"], "exclusive"),
    (["data=folder", "data.root=/x", "split=validation"], "valid choices: train, val, test"),
    (["data=ucf101", "split=1"], "data.split=N"),
    (["data=folder", "data.root=/x"], "valid choices: train, val, test"),
    (["split=val", "features=f.csv"], "one of .pt, .npy"),
    (["input=videos/", "features=f.h5"], "one of .pt, .npy"),
    (["split=val", "features=null"], "set features=PATH"),
    (["split=val", "num_clips=2"], "data.test_temporal_clips"),
    (["split=val", "json=p.json"], "evaluate.py"),
    (["split=val", "precision=fp16"], "valid values: fp32, bf16"),
    ([], "set input=VIDEO_OR_FOLDER"),
], ids=["input+data", "input+split", "unknown split", "split number", "no split", "format", "format files",
        "no features", "num_clips", "json", "precision", "nothing"])
def test_bad_options_are_rejected_before_anything_is_loaded(overrides, message, tmp_path):
    # ckpt does not exist: the options must be judged before the model is read
    cfg = compose_config("predict", ["ckpt=/no/such/model", "features=f.pt", *overrides], tmp_path)
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        run(cfg)


def test_a_checkpoint_without_data_config_needs_data_name(checkpoint, tmp_path):
    cfg = compose_config("predict", [f"ckpt={checkpoint}", "split=val", "features=f.pt"], tmp_path)
    with pytest.raises(ValueError, match="carries no data config.*data=<name>"):
        run(cfg)


def test_bf16_features_are_float32_and_close_to_fp32():
    model = tiny_model("divided_space_time").eval()
    video = torch.randn(3, 4, 3, 32, 32)
    full, half = embed(model, video, "fp32"), embed(model, video, "bf16")
    assert half.dtype == torch.float32 and not torch.equal(full, half)  # autocast did run in bfloat16
    torch.testing.assert_close(half, full, rtol=0.05, atol=0.05)


@pytest.mark.slow
def test_predict_cli_writes_split_features(dataset, checkpoint, tmp_path):
    """The entry point: `data.x=y` reaches the data config, and the default run dir resolves (TIMESFORMER_ROOT
    puts it under tmp_path; before, predict.py without hydra.run.dir failed on the unregistered ${run_name:...})."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TIMESFORMER_ROOT": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "predict.py", f"ckpt={checkpoint}", "data=folder", f"data.root={dataset}",
         "data.num_workers=0", "split=train", f"features={tmp_path / 'train.npy'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    sidecar = json.loads((tmp_path / "train.videos.json").read_text())
    assert sidecar["split"] == "train" and sidecar["videos"] == [p for p, _ in FolderSource(dataset).load().split(
        "train")]
    assert np.load(tmp_path / "train.npy").shape == (len(sidecar["videos"]), 32)
    # The train split gets the evaluation views (folder.yaml: 1 clip x 3 crops), not one random training clip.
    assert sidecar["num_views"] == [3] * len(sidecar["videos"])
    assert list((tmp_path / "logs" / "predict" / "runs").iterdir())  # the run dir, named by ${run_name:...}

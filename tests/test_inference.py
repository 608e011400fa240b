"""predict.py and attention maps."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, compose_config
from timesformer import TimeSformer, TimeSformerConfig
from timesformer.attention_maps import attention_rollout, overlay_frames
from timesformer.data import SyntheticMotionSource
from timesformer.inference import find_videos


def tiny_model(attention_type: str) -> TimeSformer:
    torch.manual_seed(0)
    return TimeSformer(TimeSformerConfig(image_size=32, patch_size=8, num_frames=4, hidden_size=32,
                                         num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                         num_classes=4, attention_type=attention_type,
                                         class_names=["left", "right", "up", "down"]))


@pytest.mark.parametrize("attention_type", ["divided_space_time", "joint_space_time", "space_only"])
def test_rollout_is_a_distribution_and_uniform_when_attention_is(attention_type):
    model = tiny_model(attention_type)
    video = torch.randn(4, 3, 32, 32)
    heatmap = attention_rollout(model, video)
    assert heatmap.shape == (4, 4, 4) and torch.all(heatmap >= 0)
    assert heatmap.sum().item() == pytest.approx(1.0, abs=1e-5)
    with torch.no_grad():  # q = k = 0: every attention is uniform, so is the rolled-out map
        for block in model.blocks:
            for name in ("attn", "temporal_attn"):
                if hasattr(block, name):
                    getattr(block, name).qkv.weight.zero_()
                    getattr(block, name).qkv.bias.zero_()
    uniform = attention_rollout(model, video)
    torch.testing.assert_close(uniform, torch.full_like(uniform, 1 / 64))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_rollout_of_a_model_in_another_dtype_keeps_its_mode_and_matches_float32(dtype):
    """A bf16 or float64 model gave an index_put dtype error; and the rollout left a training model in eval mode
    (stochastic depth and dropout off for the rest of a notebook's training)."""
    reference_model = tiny_model("divided_space_time")
    video = torch.randn(4, 3, 32, 32)
    expected = attention_rollout(reference_model, video)
    model = tiny_model("divided_space_time").to(dtype).train()
    heatmap = attention_rollout(model, video)  # a float32 clip: moved to the model's dtype
    assert model.training
    assert heatmap.dtype == torch.float32 and heatmap.device.type == "cpu"
    torch.testing.assert_close(heatmap, expected, atol=0.02 if dtype == torch.bfloat16 else 1e-6, rtol=0)


def test_rollout_follows_a_token_that_everyone_attends_to():
    """Every query attends to the one bright patch (frame 2, row 1, col 3): the map must peak there."""
    model = tiny_model("joint_space_time")
    video = torch.zeros(4, 3, 32, 32)
    video[2, :, 8:16, 24:32] = 5.0
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
        for module in model.modules():  # LayerNorms back to identity scale
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.fill_(1.0)
        model.patch_embed.proj.weight[0] = 1.0 / 192  # feature 0: the patch's brightness
        model.patch_embed.proj.weight[1] = -1.0 / 192  # (and its negative, so LayerNorm keeps it)
        for block in model.blocks:
            dim = block.attn.qkv.in_features
            block.attn.qkv.bias[0] = 1.0  # every query looks along feature 0 ...
            block.attn.qkv.weight[dim, 0] = 20.0  # ... and a key's feature 0 is its brightness
    heatmap = attention_rollout(model, video)
    assert heatmap.flatten().argmax().item() == 2 * 16 + 1 * 4 + 3
    assert heatmap.flatten().max() > 0.2  # far above the uniform 1/64


def test_overlay_keeps_the_frame_size():
    frames = overlay_frames(torch.zeros(4, 3, 32, 48), torch.rand(4, 4, 6), (0.45,) * 3, (0.225,) * 3)
    assert frames.shape == (4, 32, 48, 3) and frames.dtype == torch.uint8


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict_videos")
    source = SyntheticMotionSource(root, videos_per_class_train=1, videos_per_class_val=1, num_video_frames=24)
    source.prepare()
    (root / "val" / "broken.mp4").write_text("not a video")
    return root / "val"


@pytest.mark.slow
def test_predict_prints_top5_writes_json_features_and_attention_maps(videos, tmp_path):
    model = tiny_model("divided_space_time")
    model.save_pretrained(tmp_path / "model")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "predict.py", f"ckpt={tmp_path / 'model'}", f"input={videos}", "sampling_rate=4",
         f"json={tmp_path / 'preds.json'}", f"features={tmp_path / 'feats.pt'}", "attention_maps=true",
         "num_clips=2", "num_crops=3", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    predictions = json.loads((tmp_path / "preds.json").read_text())
    assert len(predictions) == 5  # 4 videos + the broken one, reported, not dropped
    broken = [p for p in predictions if "error" in p]
    assert len(broken) == 1 and broken[0]["video"].endswith("broken.mp4")
    for prediction in (p for p in predictions if "error" not in p):
        probabilities = [entry["probability"] for entry in prediction["top_k"]]
        assert len(probabilities) == 4 and probabilities == sorted(probabilities, reverse=True)
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-4)  # 4 classes: the top-4 is everything
        assert prediction["views"] == 2 * 3
        assert all(os.path.getsize(path) > 500 for path in prediction["attention_maps"])
        assert prediction["top_k"][0]["label"] in result.stdout
    # one PNG and one GIF per video, though the class folders hold the same file names (<class>/00000.mp4)
    maps = {path for prediction in predictions for path in prediction.get("attention_maps", [])}
    assert len(maps) == 2 * 4 and len({Path(path).name for path in maps}) == 2 * 4
    features = torch.load(tmp_path / "feats.pt")
    assert features["features"].shape == (4, 32) and len(features["videos"]) == 4
    assert features["class_names"] == ["left", "right", "up", "down"] and features["labels"] is None  # the model's


def test_a_folder_input_is_its_videos_without_hidden_files(tmp_path):
    """As the datasets list them: macOS's `._a.mp4` stubs (AppleDouble, on drives the videos were copied with) and
    hidden folders were predicted, as failed videos."""
    for name in ("a.mp4", "._a.mp4", ".cache/b.mp4", "sub/c.MP4", "sub/notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert find_videos(tmp_path) == [tmp_path / "a.mp4", tmp_path / "sub" / "c.MP4"]
    assert find_videos(tmp_path / "._a.mp4") == [tmp_path / "._a.mp4"]  # named: the user means it


@pytest.mark.parametrize(("override", "message"), [
    ("num_clips=0", "num_clips=0 must be a positive integer"),  # was: stack expects a non-empty TensorList
    ("top_k=0", "top_k=0 must be a positive integer"),  # was: an empty table
    ("attention_maps=no", "attention_maps must be true or false"),
    ("+data.test_spatial_crops=3", "for files, num_clips=, num_crops= and sampling_rate= set the views"),
    ("+num_frames=16", "predict.py has no option num_frames"),  # was ignored
])
def test_predict_options_are_checked_before_the_model_is_read(override, message, tmp_path):
    from timesformer.inference import run

    cfg = compose_config("predict", ["ckpt=not/read/yet", "input=clip.mp4", override], tmp_path)
    with pytest.raises(ValueError, match=message):
        run(cfg)


def test_predict_fails_when_no_input_decodes_and_assumes_a_frame_rate_when_there_is_none(videos, tmp_path,
                                                                                          monkeypatch):
    import timesformer.inference as inference

    tiny_model("divided_space_time").save_pretrained(tmp_path / "model")
    cfg = compose_config("predict", [f"ckpt={tmp_path / 'model'}", f"input={videos / 'broken.mp4'}",
                                     f"json={tmp_path / 'p.json'}"], tmp_path / "run")
    with pytest.raises(RuntimeError, match="none of the 1 video"):
        inference.run(cfg)
    assert "error" in json.loads((tmp_path / "p.json").read_text())[0]  # written first
    # A container without a frame rate (PyAV reports 0): the usual 30 fps is assumed, as in training and evaluate.py
    chosen = []

    def no_frame_rate(path, choose, **kwargs):
        chosen.append(choose(300, 0.0))
        return torch.zeros(len(chosen[-1]), 32, 32, 3, dtype=torch.uint8), None

    monkeypatch.setattr(inference, "decode_clip", no_frame_rate)
    views = inference.load_views(videos / "broken.mp4", inference.ClipSettings(num_frames=4, sampling_rate=8,
                                                                               image_size=32))
    assert views.shape == (1, 4, 3, 32, 32) and chosen[0] == inference.dense_clip_indices(
        300, 4, 8, 30.0, target_fps=30.0, clip_index=0, num_clips=1)


def test_rollout_of_one_joint_block_is_its_normed_attention():
    """One joint block: the map is the cls row of 0.5·I + 0.5·softmax(q kᵀ/√d) over norm1(tokens)."""
    torch.manual_seed(0)
    model = TimeSformer(TimeSformerConfig(image_size=32, patch_size=8, num_frames=2, hidden_size=32,
                                          num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                          num_classes=3, attention_type="joint_space_time")).eval()
    with torch.no_grad():
        model.blocks[0].norm1.weight.uniform_(0.5, 2.0)  # a norm that matters
        model.blocks[0].norm1.bias.normal_()
        video = torch.randn(2, 3, 32, 32)
        cls, patches = model.embed(video[None])
        tokens = model.blocks[0].norm1(torch.cat([cls, patches.reshape(1, -1, 32)], dim=1))[0]  # (1 + T·N, D)
        q, k, _ = model.blocks[0].attn.qkv(tokens).reshape(-1, 3, 2, 16).permute(1, 2, 0, 3)
        attention = (q @ k.transpose(-2, -1) / 4).softmax(-1).mean(0)
        expected = (0.5 * attention + 0.5 * torch.eye(len(tokens)))[0, 1:]
    torch.testing.assert_close(attention_rollout(model, video).flatten(), expected / expected.sum())


def test_an_exported_checkpoint_keeps_how_its_clips_are_cut(tmp_path):
    """save_pretrained kept only the weights: predict.py on the export fell back to 8x32 sampling and the default
    mean/std (the demo checkpoint: 0.94 video accuracy, its export 0.81). export_pretrained keeps them, in a folder
    transformers still loads (its image processor reads the same mean and std)."""
    transformers = pytest.importorskip("transformers")
    from timesformer.inference import clip_settings, export_pretrained

    model = tiny_model("divided_space_time")
    # (clips of 8 frames at 48 px for a model built for 4 at 32: fine-tuned from weights of another size)
    data = {"num_frames": 8, "image_size": 48, "sampling_rate": 3, "target_fps": 25.0, "test_temporal_clips": 2,
            "test_spatial_crops": 3, "sampling": "dense", "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3],
            "train_short_side_range": [56, 64]}
    ckpt = tmp_path / "last.ckpt"  # what train.py writes, less the optimizer and loop states
    torch.save({"timesformer_config": model.config.to_dict(),
                "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": {"run_config": {"data": data, "module": {"view_aggregation": "logits"}}}}, ckpt)
    export_pretrained(ckpt, tmp_path / "export")
    exported = TimeSformer.from_pretrained(tmp_path / "export")
    assert clip_settings(tmp_path / "export", exported) == clip_settings(ckpt, model)
    settings = clip_settings(tmp_path / "export", exported)
    assert (settings.sampling_rate, settings.num_frames, settings.image_size) == (3, 8, 48)  # not the model's 4, 32
    assert settings.train_short_side_min == 56  # the scale of a single crop (num_crops=1)
    assert settings.view_aggregation == "logits"  # how predict.py combines the views, as evaluate.py
    processor = transformers.VideoMAEImageProcessor.from_pretrained(tmp_path / "export")
    assert list(processor.image_mean) == data["mean"] and list(processor.image_std) == data["std"]
    assert processor.crop_size == {"height": 48, "width": 48}
    assert processor.size == {"shortest_edge": 56}  # one centre crop, cut as evaluate.py's: at the smallest scale
    hf_model = transformers.TimesformerForVideoClassification.from_pretrained(tmp_path / "export").eval()
    video = torch.randn(1, 4, 3, 32, 32)
    with torch.no_grad():
        assert (hf_model(pixel_values=video).logits - exported.eval()(video)).abs().max() < 1e-4


def test_attention_maps_of_an_unsupported_model_fail_before_any_video(tmp_path):
    from omegaconf import OmegaConf

    from timesformer.inference import predict

    model = tiny_model("axial")
    torch.save({"timesformer_config": model.config.to_dict(),
                "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "axial.ckpt")
    cfg = OmegaConf.create({"ckpt": str(tmp_path / "axial.ckpt"), "device": "cpu", "input": str(tmp_path / "none"),
                            "top_k": 1, "attention_maps": True, "paths": {"output_dir": str(tmp_path / "out")}})
    with pytest.raises(ValueError, match="attention_maps=true supports attention_type in"):
        predict(cfg)


@pytest.mark.parametrize("num_frames, sampling_rate", [(8, 32), (16, 16), (96, 4), (4, 64)])
def test_a_checkpoint_without_clip_settings_gets_the_papers_sampling_for_its_frames(tmp_path, num_frames,
                                                                                    sampling_rate):
    """An original HR (16 frames) or L (96) .pyth, or a bare save_pretrained folder, says nothing of its sampling:
    base's rate of 32 made an L clip span 3072 frames, mostly the last frame of a 10 s video repeated."""
    from timesformer.inference import clip_settings

    model = TimeSformer(TimeSformerConfig(image_size=16, patch_size=8, num_frames=num_frames, hidden_size=16,
                                          num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                                          num_classes=2))
    model.save_pretrained(tmp_path / "folder")
    settings = clip_settings(tmp_path / "folder", TimeSformer.from_pretrained(tmp_path / "folder"))
    assert (settings.num_frames, settings.sampling_rate) == (num_frames, sampling_rate)
    assert clip_settings(tmp_path / "folder", model, sampling_rate=5).sampling_rate == 5

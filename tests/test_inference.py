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


def record_attention_probabilities(model: TimeSformer, video: torch.Tensor, monkeypatch) -> list[torch.Tensor]:
    """Run the model on one clip (T, C, H, W) and return the head-averaged softmax(q kᵀ/√d) of every attention call,
    in call order, each (sequences, L, L), taken from the q and k the model hands to SDPA (not from the rollout's
    own recomputation). The shortcuts are off, so the last block's patches ask too (full L × L matrices)."""
    import torch.nn.functional as F

    recorded = []
    sdpa = F.scaled_dot_product_attention

    def recording_sdpa(q, k, v, *args, **kwargs):
        scores = q.double() @ k.double().transpose(-2, -1) / q.shape[-1] ** 0.5
        recorded.append(scores.softmax(-1).mean(1))  # (S, L, L), heads averaged
        return sdpa(q, k, v, *args, **kwargs)

    model.use_shortcuts(False)
    with monkeypatch.context() as patch, torch.no_grad():
        patch.setattr(F, "scaled_dot_product_attention", recording_sdpa)
        model.eval()(video[None])
    return recorded


def randomised(model: TimeSformer) -> TimeSformer:
    """Every weight perturbed (peaked, position-dependent attention; temporal_fc and time_embed not zero)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.3)
    return model


def test_divided_rollout_equals_a_dense_reference(monkeypatch):
    """Two divided blocks against the rollout written out over the original's flat token order (cls, then patch n of
    frame t at 1 + n·T + t): per block, time then space, each attention as 0.5·A + 0.5·I; the T copies of the cls
    token in the spatial step are averaged. Token order, the residual term, the order of time and space, the cls
    average and a transposed temporal matrix each changed the map unnoticed (one block hides the cls average)."""
    model = randomised(tiny_model("divided_space_time"))
    torch.manual_seed(2)
    video = torch.randn(4, 3, 32, 32)
    T, N = 4, 16
    probabilities = record_attention_probabilities(model, video, monkeypatch)
    assert [tuple(p.shape) for p in probabilities] == [(N, T, T), (T, 1 + N, 1 + N)] * 2  # time, space per block

    def index(n, t):  # the original's flat order
        return 1 + n * T + t

    size = 1 + N * T
    rollout = torch.eye(size, dtype=torch.float64)
    for temporal, spatial in zip(probabilities[::2], probabilities[1::2], strict=True):
        time_mix = torch.zeros(size, size, dtype=torch.float64)
        time_mix[0, 0] = 1.0  # cls does not take part in the temporal attention
        for n in range(N):
            for t in range(T):
                time_mix[index(n, t), index(n, t)] += 0.5
                for s in range(T):
                    time_mix[index(n, t), index(n, s)] += 0.5 * temporal[n, t, s]
        space_mix = torch.zeros(size, size, dtype=torch.float64)
        for t in range(T):
            frame = [0] + [index(n, t) for n in range(N)]  # this frame's sequence: a cls copy, then its patches
            for i, row in enumerate(frame):
                weight = 1.0 / T if row == 0 else 1.0  # the T cls copies' outputs are averaged
                space_mix[row, row] += weight * 0.5
                for j, column in enumerate(frame):
                    space_mix[row, column] += weight * 0.5 * spatial[t, i, j]
        rollout = space_mix @ time_mix @ rollout
    expected = torch.tensor([[[rollout[0, index(y * 4 + x, t)] for x in range(4)] for y in range(4)]
                             for t in range(T)])
    expected = (expected / expected.sum()).float()
    assert expected.std() > 0.1 / 64  # far from uniform: the attention is peaked
    torch.testing.assert_close(attention_rollout(model, video), expected, atol=1e-6, rtol=1e-5)


def test_space_only_rollout_is_each_frames_own(monkeypatch):
    """space_only: frame t's map is the cls row of frame t's own product of (0.5·A + 0.5·I), the frames weighted
    equally (their cls tokens are averaged). Frame 0's rollout used for every frame went unnoticed."""
    model = randomised(tiny_model("space_only"))
    torch.manual_seed(2)
    video = torch.randn(4, 3, 32, 32)
    probabilities = record_attention_probabilities(model, video, monkeypatch)
    assert [tuple(p.shape) for p in probabilities] == [(4, 17, 17)] * 2
    expected = torch.zeros(4, 16, dtype=torch.float64)
    for t in range(4):
        rollout = torch.eye(17, dtype=torch.float64)
        for block in probabilities:
            rollout = (0.5 * block[t] + 0.5 * torch.eye(17, dtype=torch.float64)) @ rollout
        expected[t] = rollout[0, 1:] / 4
    expected = (expected / expected.sum()).reshape(4, 4, 4).float()
    assert (expected[1:] - expected[0]).abs().max() > 0.01  # the frames' maps differ
    torch.testing.assert_close(attention_rollout(model, video), expected, atol=1e-6, rtol=1e-5)


def test_divided_rollout_follows_the_frame_time_attention_looks_at():
    """Every patch's temporal attention looks at frame 2 (the bright one), space attention is uniform: the map must
    put most of its mass on frame 2 (transposed temporal matrices or frame-major/position-major confusion move it)."""
    model = tiny_model("divided_space_time")
    video = torch.zeros(4, 3, 32, 32)
    video[2] = 5.0
    with torch.no_grad():
        for param in model.parameters():  # every branch adds nothing: the tokens stay the embedded patches
            param.zero_()
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.fill_(1.0)
        model.patch_embed.proj.weight[0] = 1.0 / 192  # feature 0: the patch's brightness
        model.patch_embed.proj.weight[1] = -1.0 / 192  # (and its negative, so LayerNorm keeps it)
        for block in model.blocks:
            dim, head_dim = block.temporal_attn.qkv.in_features, block.temporal_attn.head_dim
            for head in range(block.temporal_attn.num_heads):  # every head's query looks along feature 0 ...
                block.temporal_attn.qkv.bias[head * head_dim] = 1.0
                block.temporal_attn.qkv.weight[dim + head * head_dim, 0] = 20.0  # ... a key's brightness
    heatmap = attention_rollout(model, video)
    per_frame = heatmap.sum((1, 2))
    # By hand, following the masses (cls c, each frame's patches F_t; uniform within a frame) through a block: space
    # (uniform over a frame's 17 tokens): c -> (9/17)c + (1/34)ΣF, F_t -> (2/17)c + (33/34)F_t; then time: a dark
    # frame keeps half of its mass and gives the other half to frame 2. From the cls token (c = 1): after one block
    # c = 9/17, dark 1/17, bright 5/17; after two, dark 69/1156 each and bright 609/1156, i.e. over the patches
    # [69, 69, 609, 69] / 816.
    torch.testing.assert_close(per_frame, torch.tensor([69, 69, 609, 69]) / 816, atol=1e-5, rtol=0)
    torch.testing.assert_close(heatmap[2], torch.full((4, 4), 609 / 816 / 16), atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def long_video(tmp_path_factory) -> Path:
    """A 128-frame video: two clips of 4 frames 8 apart (32 frames) start at different frames."""
    root = tmp_path_factory.mktemp("long_video")
    SyntheticMotionSource(root, videos_per_class_train=1, videos_per_class_val=1, num_video_frames=128).prepare()
    return sorted((root / "val").glob("*/*.mp4"))[0]


@pytest.mark.parametrize("sampling", ["dense", "segment"])
def test_predicts_temporal_clips_are_the_evaluation_clips_of_the_dataset(long_video, sampling):
    """predict.py's num_clips=2 cuts the two clips evaluate.py's dataset cuts from the same file (not clip 0 twice)."""
    from timesformer.data import EvalViewTransform
    from timesformer.data.dataset import VideoClipDataset
    from timesformer.inference import ClipSettings, load_views

    settings = ClipSettings(num_frames=4, sampling_rate=8, image_size=32, temporal_clips=2, sampling=sampling)
    views = load_views(long_video, settings)
    dataset = VideoClipDataset([(str(long_video), 0)], num_frames=4, sampling_rate=8,
                               transform=EvalViewTransform(32, 1, 32), training=False, sampling=sampling,
                               temporal_clips=2)
    assert views.shape == (2, 4, 3, 32, 32)
    for clip in range(2):
        item = dataset[clip]
        assert item["valid"] and item["view"] == clip
        assert torch.equal(views[clip], item["video"]), clip
    assert not torch.equal(views[0], views[1])  # other frames


@pytest.mark.parametrize(("aggregation", "top_k"), [("softmax", 2), ("logits", 3)])
def test_predict_combines_views_as_the_checkpoint_says_and_lists_top_k(tmp_path, monkeypatch, aggregation, top_k):
    """Two views of logits [4, 0, 0, 0] and [0, 1, 0, 0]: "softmax" averages their probabilities (evaluate.py's
    default), "logits" takes the softmax of their mean; top_k= entries, best first."""
    import math

    from omegaconf import OmegaConf

    import timesformer.inference as inference

    model = tiny_model("divided_space_time")
    with torch.no_grad():  # the head reads the first four features as they are: the embedding is the logits
        model.head.weight.zero_()
        model.head.weight[:, :4] = torch.eye(4)
        model.head.bias.zero_()
    torch.save({"timesformer_config": model.config.to_dict(),
                "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": {"run_config": {"data": {}, "module": {"view_aggregation": aggregation}}}},
               tmp_path / "model.ckpt")
    (tmp_path / "clip.mp4").write_bytes(b"")
    embedding = torch.zeros(2, 32)
    embedding[0, 0], embedding[1, 1] = 4.0, 1.0
    monkeypatch.setattr(inference, "load_views", lambda path, settings: torch.zeros(2, 4, 3, 32, 32,
                                                                                     dtype=torch.uint8))
    monkeypatch.setattr(inference, "embed", lambda model, video, precision="fp32": embedding)
    cfg = OmegaConf.create({"ckpt": str(tmp_path / "model.ckpt"), "device": "cpu", "input": str(tmp_path / "clip.mp4"),
                            "top_k": top_k, "paths": {"output_dir": str(tmp_path / "out")}})
    [result] = inference.predict(cfg)
    e = math.e
    if aggregation == "softmax":  # the mean of softmax([4, 0, 0, 0]) and softmax([0, 1, 0, 0])
        expected = [(e ** 4 / (e ** 4 + 3) + 1 / (e + 3)) / 2, (1 / (e ** 4 + 3) + e / (e + 3)) / 2,
                    (1 / (e ** 4 + 3) + 1 / (e + 3)) / 2]
    else:  # softmax([2, 0.5, 0, 0])
        total = e ** 2 + e ** 0.5 + 2
        expected = [e ** 2 / total, e ** 0.5 / total, 1 / total]
    assert result["views"] == 2
    assert [entry["label"] for entry in result["top_k"]] == ["left", "right", "up"][:top_k]
    assert [entry["probability"] for entry in result["top_k"]] == pytest.approx(expected[:top_k], abs=1e-6)

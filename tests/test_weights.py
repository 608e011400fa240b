"""Numerical parity with Hugging Face transformers and the original checkpoint layout (random weights)."""

from pathlib import Path

import pytest
import torch

from timesformer import TimeSformer, TimeSformerConfig
from timesformer.model import ATTENTION_TYPES

transformers = pytest.importorskip("transformers")

TINY = dict(image_size=32, patch_size=8, num_frames=4, hidden_size=48, num_hidden_layers=3,
            num_attention_heads=4, intermediate_size=96)


def random_hf_model(attention_type: str, num_labels: int = 7):
    torch.manual_seed(0)
    config = transformers.TimesformerConfig(**TINY, attention_type=attention_type, num_labels=num_labels,
                                            id2label={i: f"class {i}" for i in range(num_labels)})
    model = transformers.TimesformerForVideoClassification(config).eval()
    with torch.no_grad():  # HF leaves temporal_dense random already; make every tensor non-trivial
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    return model


@pytest.mark.parametrize("attention_type", ["divided_space_time", "joint_space_time"])
def test_hf_folder_loads_to_the_same_logits(attention_type, tmp_path):
    hf_model = random_hf_model(attention_type)
    hf_model.save_pretrained(tmp_path / "hf")
    ours = TimeSformer.from_pretrained(tmp_path / "hf").eval()
    assert ours.config.class_names == [f"class {i}" for i in range(7)]
    video = torch.randn(2, 4, 3, 32, 32)
    with torch.no_grad():
        expected = hf_model(pixel_values=video).logits
        actual = ours(video)
    assert (actual - expected).abs().max() < 1e-4


@pytest.mark.parametrize("attention_type", ["divided_space_time", "joint_space_time"])
def test_save_pretrained_is_loaded_by_transformers_with_the_same_logits(attention_type, tmp_path):
    torch.manual_seed(1)
    ours = TimeSformer(TimeSformerConfig(**TINY, attention_type=attention_type, num_classes=3,
                                         class_names=["a", "b", "c"])).eval()
    with torch.no_grad():
        for param in ours.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    ours.save_pretrained(tmp_path / "export")
    hf_model = transformers.TimesformerForVideoClassification.from_pretrained(tmp_path / "export").eval()
    assert hf_model.config.id2label == {0: "a", 1: "b", 2: "c"}
    video = torch.randn(2, 4, 3, 32, 32)
    with torch.no_grad():
        assert (hf_model(pixel_values=video).logits - ours(video)).abs().max() < 1e-4


def test_original_checkpoint_layout_loads_to_the_same_logits(tmp_path):
    """A *.pyth as the original repository writes it: model_state with 'model.' keys, cfg as YAML text."""
    hf_model = random_hf_model("divided_space_time")
    hf_model.save_pretrained(tmp_path / "hf")
    reference = TimeSformer.from_pretrained(tmp_path / "hf").eval()
    original = {"model." + k: v for k, v in reference.state_dict().items()}
    torch.save({"epoch": 15, "model_state": original, "optimizer_state": {}, "cfg": "TRAIN:\n  ENABLE: True\n"},
               tmp_path / "TimeSformer_divST_8x32_224_K400.pyth")
    loaded = TimeSformer.from_pretrained(tmp_path / "TimeSformer_divST_8x32_224_K400.pyth",
                                         num_attention_heads=4).eval()
    assert loaded.config.attention_type == "divided_space_time" and loaded.config.num_frames == 4
    video = torch.randn(1, 4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(video), hf_model(pixel_values=video).logits, atol=1e-4, rtol=0)
    # Saved under DataParallel / DDP ("module." in front), or as the bare state dict of the original's model.
    # And in torch's legacy (pre-1.6, not zip) format, which cannot be memory-mapped: read whole.
    for name, state in [("ddp", {"model_state": {"module." + k: v for k, v in original.items()}}),
                        ("bare", original), ("bare_ddp", {"module." + k: v for k, v in original.items()}),
                        ("legacy_format", {"model_state": original})]:
        torch.save(state, tmp_path / f"{name}.pyth", _use_new_zipfile_serialization=name != "legacy_format")
        with torch.no_grad():
            other = TimeSformer.from_pretrained(tmp_path / f"{name}.pyth", num_attention_heads=4).eval()
            torch.testing.assert_close(other(video), loaded(video), atol=0, rtol=0, msg=name)


@pytest.mark.parametrize("weights_format", ["safetensors", "bin"])
def test_a_sharded_hugging_face_folder_loads_to_the_same_logits(weights_format, tmp_path):
    """Large models are saved in shards named by ``*.index.json``; a shard missing is named."""
    import json

    from safetensors.torch import load_file

    hf_model = random_hf_model("divided_space_time")
    hf_model.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    index = tmp_path / "hf" / "model.safetensors.index.json"
    if weights_format == "bin":  # as older transformers wrote them (torch.save shards)
        weight_map = json.loads(index.read_text())["weight_map"]
        for shard in set(weight_map.values()):
            torch.save(load_file(tmp_path / "hf" / shard), tmp_path / "hf" / shard.replace(".safetensors", ".bin"))
            (tmp_path / "hf" / shard).unlink()
        index.unlink()
        index = tmp_path / "hf" / "pytorch_model.bin.index.json"
        index.write_text(json.dumps({"weight_map": {k: v.replace(".safetensors", ".bin")
                                                    for k, v in weight_map.items()}}))
    shards = sorted(p.name for p in (tmp_path / "hf").iterdir() if "-of-" in p.name)
    assert len(shards) > 1 and all(shard.endswith(weights_format) for shard in shards)
    ours = TimeSformer.from_pretrained(tmp_path / "hf").eval()
    video = torch.randn(2, 4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(video), hf_model(pixel_values=video).logits, atol=1e-4, rtol=0)
    (tmp_path / "hf" / shards[-1]).unlink()
    with pytest.raises(FileNotFoundError, match=shards[-1]):
        TimeSformer.from_pretrained(tmp_path / "hf")


def test_saving_over_an_export_warns_of_the_preprocessor_config_left(tmp_path, caplog):
    """save_pretrained without clip settings keeps a preprocessor_config.json found in the folder, whose mean and
    std predict.py would then use: it says so."""
    model = TimeSformer(TimeSformerConfig(**TINY, num_classes=3))
    model.save_pretrained(tmp_path / "m", clip={"mean": [0.5] * 3, "std": [0.5] * 3})
    with caplog.at_level("WARNING"):
        model.save_pretrained(tmp_path / "fresh")
    assert "preprocessor_config" not in caplog.text
    with caplog.at_level("WARNING"):
        model.save_pretrained(tmp_path / "m")
    assert "keeps the preprocessor_config.json" in caplog.text


def test_another_clip_length_and_size_resize_the_stored_embeddings(tmp_path, caplog):
    """Fine-tuning at 8 frames x 48 px from a 4 x 32 checkpoint: the embeddings are stored at the new size (the
    run's config is the model's), resized as the run-time interpolation does: the same logits."""
    hf_model = random_hf_model("divided_space_time")
    hf_model.save_pretrained(tmp_path / "hf")
    source = TimeSformer.from_pretrained(tmp_path / "hf").eval()
    with caplog.at_level("INFO"):
        resized = TimeSformer.from_pretrained(tmp_path / "hf", num_frames=8, image_size=48).eval()
    assert "time embedding resized from 4 to 8 frames" in caplog.text and "from 4x4 to 6x6 patches" in caplog.text
    assert (resized.config.num_frames, resized.config.image_size) == (8, 48)
    assert resized.time_embed.shape[1] == 8 and resized.pos_embed.shape[1] == 37
    video = torch.randn(1, 8, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(resized(video), source(video), atol=1e-5, rtol=0)


def test_architecture_other_than_the_checkpoints_is_an_error(tmp_path):
    """model.pretrained with model.attention_type=... (or width, depth, heads) of another model was ignored: the run
    config and every log described a model that was not trained."""
    from omegaconf import OmegaConf

    from timesformer.pipeline import build_model

    hf_model = random_hf_model("divided_space_time")
    hf_model.save_pretrained(tmp_path / "hf")
    with pytest.raises(ValueError, match=r"attention_type='joint_space_time' \(it has 'divided_space_time'\)"):
        TimeSformer.from_pretrained(tmp_path / "hf", attention_type="joint_space_time")
    model_cfg = OmegaConf.create({**TINY, "attention_type": "divided_space_time", "pretrained": str(tmp_path / "hf"),
                                  "num_classes": None, "drop_path_rate": 0.2})
    model = build_model(model_cfg, [f"class {i}" for i in range(7)])
    assert model.config.drop_path_rate == 0.2  # fine-tuning options are free
    model_cfg.hidden_size, model_cfg.num_attention_heads = 64, 4
    with pytest.raises(ValueError, match="hidden_size=64 \\(it has 48\\)"):
        build_model(model_cfg, [f"class {i}" for i in range(7)])
    # A *.pyth does not store its head count: that one is taken from the config
    original = {"model." + k: v for k, v in TimeSformer.from_pretrained(tmp_path / "hf").state_dict().items()}
    torch.save({"model_state": original}, tmp_path / "original.pyth")
    heads = TimeSformer.from_pretrained(tmp_path / "original.pyth", num_attention_heads=2).config.num_attention_heads
    assert heads == 2
    with pytest.raises(ValueError, match="num_hidden_layers=2 \\(it has 3\\)"):
        TimeSformer.from_pretrained(tmp_path / "original.pyth", num_hidden_layers=2, num_attention_heads=2)
    # 48 wide is no released ViT's width: a guessed head count (48 // 64 -> 1) built another model without a word
    with pytest.raises(ValueError, match="48 wide, not a released ViT's width .* pass num_attention_heads"):
        TimeSformer.from_pretrained(tmp_path / "original.pyth")
    # nor its activation and norm epsilon
    other = TimeSformer.from_pretrained(tmp_path / "original.pyth", num_attention_heads=4, hidden_act="gelu_tanh",
                                        layer_norm_eps=1e-5)
    assert (other.config.hidden_act, other.config.layer_norm_eps) == ("gelu_tanh", 1e-5)


def test_a_file_that_is_not_a_checkpoint_is_named(tmp_path):
    (tmp_path / "notes.ckpt").write_text("hello")
    with pytest.raises(ValueError, match="notes.ckpt cannot be read as a PyTorch checkpoint"):
        TimeSformer.from_pretrained(tmp_path / "notes.ckpt")
    # a failed download: torch's weights-only unpickler refuses it as an "Unsupported operand", not as objects
    (tmp_path / "model.pyth").write_text("<!DOCTYPE html><html><body>Access denied</body></html>\n")
    with pytest.raises(ValueError, match="model.pyth cannot be read as a PyTorch checkpoint"):
        TimeSformer.from_pretrained(tmp_path / "model.pyth")


class _WritesAFileWhenUnpickled:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))  # any code a downloaded checkpoint wants to run


def test_a_checkpoint_holding_code_is_refused_not_run(tmp_path):
    """Checkpoints were unpickled with weights_only=False: a downloaded .pyth could run any code when loaded."""
    marker = tmp_path / "ran"
    torch.save({"model_state": {}, "payload": _WritesAFileWhenUnpickled(marker)}, tmp_path / "shared.pyth")
    with pytest.raises(ValueError, match=r"shared.pyth holds Python objects besides tensors and plain values \(e\.g\. "
                                         r"\S+\), which are not loaded.*weights_only=False"):
        TimeSformer.from_pretrained(tmp_path / "shared.pyth")
    assert not marker.exists()


def test_class_names_are_matched_by_name(tmp_path, caplog):
    """The dataset's classes in another order reorder the head's rows (they kept their positions and took the new
    names: every prediction mislabelled); other classes get a new head."""
    torch.manual_seed(0)
    TimeSformer(TimeSformerConfig(**TINY, num_classes=3, class_names=["cat", "dog", "eel"])).save_pretrained(
        tmp_path / "m")
    source = TimeSformer.from_pretrained(tmp_path / "m").eval()
    video = torch.randn(1, 4, 3, 32, 32)
    reordered = TimeSformer.from_pretrained(tmp_path / "m", num_classes=3, class_names=["eel", "cat", "dog"]).eval()
    with torch.no_grad():
        expected = dict(zip(source.config.class_names, source(video)[0].tolist(), strict=True))
        actual = dict(zip(reordered.config.class_names, reordered(video)[0].tolist(), strict=True))
    assert actual == pytest.approx(expected, abs=1e-6)
    with caplog.at_level("INFO"):
        other = TimeSformer.from_pretrained(tmp_path / "m", num_classes=3, class_names=["ant", "bee", "cat"])
    assert "the head is new" in caplog.text and not torch.equal(other.head.weight, source.head.weight)
    # ... whose rows for the classes both name are the trained ones (cat: the checkpoint's row 0, the new row 2),
    # as when another label set adds classes (Kinetics-400 -> 600)
    assert "1 of the 3 classes keep their trained head rows" in caplog.text
    assert torch.equal(other.head.weight[2], source.head.weight[0]) and other.head.bias[2] == source.head.bias[0]
    assert not torch.equal(other.head.weight[:2], source.head.weight[1:])
    more = TimeSformer.from_pretrained(tmp_path / "m", num_classes=5, class_names=["dog", "fox", "eel", "cat", "gnu"])
    torch.testing.assert_close(more.head.weight[[0, 2, 3]], source.head.weight[[1, 2, 0]], rtol=0, atol=0)
    unnamed = TimeSformer.from_pretrained(tmp_path / "m", num_classes=3, class_names=["0", "1", "2"])
    assert torch.equal(unnamed.head.weight, source.head.weight)  # classes named by their ids: kept in order


def test_something_something_templates_match_with_or_without_brackets(tmp_path, caplog):
    """Hugging Face's SSv2 checkpoints name their classes as templates with brackets ("[Something] falling like a
    rock"); data=ssv2 names them from labels.json, without: the released head was replaced by a random one."""
    torch.manual_seed(0)
    templates = ["Approaching [something] with your camera", "[Something] falling like a rock",
                 "Pushing [something] from right to left"]
    TimeSformer(TimeSformerConfig(**TINY, num_classes=3, class_names=templates)).save_pretrained(tmp_path / "ssv2")
    source = TimeSformer.from_pretrained(tmp_path / "ssv2")
    dataset = ["Something falling like a rock", "Approaching something with your camera",
               "Pushing something from right to left"]
    with caplog.at_level("WARNING"):
        loaded = TimeSformer.from_pretrained(tmp_path / "ssv2", num_classes=3, class_names=dataset)
    assert "the head is new" not in caplog.text and loaded.config.class_names == dataset  # the dataset's own names
    torch.testing.assert_close(loaded.head.weight, source.head.weight[[1, 0, 2]], rtol=0, atol=0)


def test_a_folder_saved_without_class_names_keeps_its_head_for_the_datasets_names(tmp_path):
    """transformers (and our export) write id2label LABEL_0..LABEL_{N-1} when a model has no class names: not
    names, so fine-tuning or evaluating on a dataset with as many classes keeps the trained head (the placeholders
    taken as names made it new and random, and evaluate.py failed to number the dataset's classes by them)."""
    torch.manual_seed(0)
    hf_config = transformers.TimesformerConfig(**TINY, num_labels=3)
    transformers.TimesformerForVideoClassification(hf_config).save_pretrained(tmp_path / "hf")
    TimeSformer(TimeSformerConfig(**TINY, num_classes=3)).save_pretrained(tmp_path / "ours")
    for folder in ("hf", "ours"):
        source = TimeSformer.from_pretrained(tmp_path / folder)
        assert source.config.class_names is None and source.config.num_classes == 3
        named = TimeSformer.from_pretrained(tmp_path / folder, num_classes=3, class_names=["cat", "dog", "eel"])
        assert torch.equal(named.head.weight, source.head.weight)
        assert named.config.class_names == ["cat", "dog", "eel"]


def test_new_head_for_another_class_count_keeps_the_backbone(tmp_path):
    hf_model = random_hf_model("divided_space_time")
    hf_model.save_pretrained(tmp_path / "hf")
    source = TimeSformer.from_pretrained(tmp_path / "hf").eval()
    finetune = TimeSformer.from_pretrained(tmp_path / "hf", num_classes=11).eval()
    assert finetune.head.out_features == 11 and finetune.config.num_classes == 11
    video = torch.randn(1, 4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(finetune.forward_features(video), source.forward_features(video))


def test_a_hugging_face_backbone_folder_loads_with_a_new_head(tmp_path, caplog):
    """TimesformerModel (no classifier; keys without the "timesformer." prefix) loads for feature extraction: the
    same normed cls token as Hugging Face's, and a new head, logged."""
    torch.manual_seed(0)
    backbone = transformers.TimesformerModel(transformers.TimesformerConfig(**TINY)).eval()
    with torch.no_grad():
        for param in backbone.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    backbone.save_pretrained(tmp_path / "backbone")
    with caplog.at_level("WARNING"):
        ours = TimeSformer.from_pretrained(tmp_path / "backbone", num_classes=5).eval()
    assert "has no classifier" in caplog.text and ours.head.out_features == 5
    video = torch.randn(2, 4, 3, 32, 32)
    with torch.no_grad():
        expected = backbone(pixel_values=video).last_hidden_state[:, 0]
        torch.testing.assert_close(ours.forward_features(video), expected, rtol=1e-4, atol=1e-5)


def test_mismatched_weights_are_reported_by_name(tmp_path):
    state = TimeSformer(TimeSformerConfig(**TINY, num_classes=3)).state_dict()
    state["blocks.0.extra.weight"] = torch.zeros(1)
    del state["blocks.1.norm2.bias"]
    torch.save({"model_state": {"model." + k: v for k, v in state.items()}}, tmp_path / "broken.pyth")
    with pytest.raises(RuntimeError, match=r"blocks\.1\.norm2\.bias.*blocks\.0\.extra\.weight"):
        TimeSformer.from_pretrained(tmp_path / "broken.pyth", num_attention_heads=4)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pyth"):
        TimeSformer.from_pretrained(tmp_path / "nope.pyth")


def test_space_only_differs_from_hf_by_averaging_frames(tmp_path):
    """HF's space_only returns per-frame logits (B·T, classes); ours averages the frames' cls tokens.

    On T identical frames every HF per-frame row equals our single row.
    """
    hf_model = random_hf_model("space_only")
    state = hf_model.state_dict()
    hf_model.save_pretrained(tmp_path / "hf", state_dict={k: v for k, v in state.items() if "time_embed" not in k})
    ours = TimeSformer.from_pretrained(tmp_path / "hf").eval()
    frame = torch.randn(2, 1, 3, 32, 32)
    video = frame.expand(2, 4, 3, 32, 32).contiguous()
    with torch.no_grad():
        hf_logits = hf_model(pixel_values=video).logits
        ours_logits = ours(video)
    assert hf_logits.shape == (8, 7) and ours_logits.shape == (2, 7)
    torch.testing.assert_close(hf_logits.reshape(2, 4, 7), ours_logits[:, None].expand(2, 4, 7), atol=1e-4, rtol=0)


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
def test_every_attention_type_round_trips_through_a_state_dict(attention_type, tmp_path):
    """A bare state dict of ours is recognised by its keys (axial: width_attn, L+G: local_attn, divided:
    temporal_attn, joint: time_embed without those, space_only: neither); the new types cannot be exported to HF."""
    torch.manual_seed(0)
    model = TimeSformer(TimeSformerConfig(**TINY, attention_type=attention_type, num_classes=3)).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    torch.save(model.state_dict(), tmp_path / "model.pth")
    loaded = TimeSformer.from_pretrained(tmp_path / "model.pth", num_attention_heads=4).eval()
    assert loaded.config.attention_type == attention_type
    video = torch.randn(1, 4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(video), model(video), rtol=0, atol=0)
    if attention_type in ("sparse_local_global", "axial"):
        with pytest.raises(ValueError, match="cannot be exported"):
            model.save_pretrained(tmp_path / "hf")
        assert not (tmp_path / "hf").exists()  # nothing written


def test_a_bare_state_dict_says_what_it_assumes_and_refuses_to_guess_heads(tmp_path, caplog):
    """torch.save(model.state_dict()) keeps no head count, activation or epsilon: reloading a 96-wide, 4-head
    gelu_tanh model gave 1 head and gelu (logits 3.5 apart) with a line at INFO, which a notebook does not show."""
    import logging

    torch.manual_seed(0)
    model = TimeSformer(TimeSformerConfig(**{**TINY, "hidden_size": 96, "num_attention_heads": 4}, num_classes=3,
                                          hidden_act="gelu_tanh"))
    torch.save(model.state_dict(), tmp_path / "model.pth")
    with pytest.raises(ValueError, match="model.pth: the weights are 96 wide, not a released ViT's width"):
        TimeSformer.from_pretrained(tmp_path / "model.pth")
    with caplog.at_level(logging.WARNING):
        loaded = TimeSformer.from_pretrained(tmp_path / "model.pth", num_attention_heads=4)
    assert "holds weights alone: hidden_act='gelu', layer_norm_eps=1e-06 assumed" in caplog.text
    assert loaded.config.hidden_act == "gelu"  # the default: the warning is what tells the user
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        TimeSformer.from_pretrained(tmp_path / "model.pth", num_attention_heads=4, hidden_act="gelu_tanh",
                                    layer_norm_eps=1e-6)
    assert "assumed" not in caplog.text  # all given


def test_save_pretrained_keeps_the_activation_and_norm_epsilon(tmp_path):
    """A folder from save_pretrained is read back with its hidden_act and layer_norm_eps (not the defaults): the same
    config and the same logits; loaded with the defaults, these weights give other logits."""
    torch.manual_seed(0)
    config = TimeSformerConfig(**TINY, num_classes=3, class_names=["a", "b", "c"], hidden_act="relu",
                               layer_norm_eps=1e-2)
    model = TimeSformer(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    model.save_pretrained(tmp_path / "m")
    loaded = TimeSformer.from_pretrained(tmp_path / "m").eval()
    assert loaded.config == model.config
    video = torch.randn(2, 4, 3, 32, 32)
    defaults = TimeSformer(TimeSformerConfig(**TINY, num_classes=3)).eval()
    defaults.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(loaded(video), model(video), rtol=0, atol=0)
        assert (defaults(video) - model(video)).abs().max() > 1e-3  # (the two fields matter for these weights)


def test_id2label_is_read_by_id_not_in_file_order(tmp_path):
    """A config.json whose id2label keys are sorted as strings ("0", "1", "10", "11", "2", ...), as json.dumps with
    sort_keys writes them: class i is id2label[str(i)], wherever it stands in the file."""
    import json

    names = [f"class {i}" for i in range(12)]
    model = TimeSformer(TimeSformerConfig(**TINY, num_classes=12, class_names=names))
    model.save_pretrained(tmp_path / "m")
    config_file = tmp_path / "m" / "config.json"
    hf_config = json.loads(config_file.read_text())
    hf_config["id2label"] = {key: hf_config["id2label"][key] for key in sorted(hf_config["id2label"])}
    assert list(hf_config["id2label"])[:4] == ["0", "1", "10", "11"]  # the file order is not the numeric one
    config_file.write_text(json.dumps(hf_config, indent=2))
    loaded = TimeSformer.from_pretrained(tmp_path / "m")
    assert loaded.config.class_names == names
    assert torch.equal(loaded.head.weight, model.head.weight)  # row i is still class i

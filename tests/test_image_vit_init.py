"""TimeSformer.from_image_vit: the paper's initialisation from an image ViT (timm layout, random weights)."""

import logging

import pytest
import torch
import torch.nn.functional as F

from timesformer import TimeSformer

timm_vit = pytest.importorskip("timm.models.vision_transformer")

T = 4  # frames


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    model = timm_vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4, mlp_ratio=2,
                                       num_classes=10).eval()
    with torch.no_grad():  # timm starts biases at zero and LayerNorms at (1, 0): make every tensor non-trivial
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model


def vit_features(vit, frames: torch.Tensor) -> torch.Tensor:
    """The image ViT's pooled embedding (final-normed cls token): (B, C, H, W) -> (B, D)."""
    with torch.no_grad():
        return vit.forward_head(vit.forward_features(frames), pre_logits=True)


@pytest.mark.parametrize("file_format", ["pth", "safetensors", "wrapped"])
def test_divided_model_on_identical_frames_is_the_image_vit(vit, tmp_path, file_format):
    if file_format == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "vit.safetensors"
        save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    else:
        path = tmp_path / "vit.pth"
        torch.save({"model": vit.state_dict()} if file_format == "wrapped" else vit.state_dict(), path)
    model = TimeSformer.from_image_vit(path, num_frames=T, num_attention_heads=4).eval()
    assert model.config.attention_type == "divided_space_time"
    assert (model.config.hidden_size, model.config.num_hidden_layers, model.config.intermediate_size) == (48, 2, 96)
    assert model.config.num_classes == 10

    # The paper's init: temporal attention copied from the spatial one, temporal_fc and time_embed zero.
    block = model.blocks[1]
    torch.testing.assert_close(block.temporal_attn.qkv.weight, vit.blocks[1].attn.qkv.weight, rtol=0, atol=0)
    torch.testing.assert_close(block.temporal_norm1.bias, vit.blocks[1].norm1.bias, rtol=0, atol=0)
    assert torch.count_nonzero(block.temporal_fc.weight) == 0 and torch.count_nonzero(model.time_embed) == 0

    frame = torch.randn(2, 3, 32, 32)
    clip = frame[:, None].expand(2, T, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(clip), vit_features(vit, frame), atol=1e-5, rtol=0)
        torch.testing.assert_close(model(clip), vit(frame), atol=1e-5, rtol=0)


def test_resolution_change_resizes_pos_embed_in_2d(vit, tmp_path, caplog):
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    with caplog.at_level(logging.INFO, logger="timesformer.model.timesformer"):
        model = TimeSformer.from_image_vit(tmp_path / "vit.pth", num_frames=T, num_attention_heads=4, image_size=64)
    assert "resizing pos_embed from 4x4 to 8x8" in caplog.text
    assert model.pos_embed.shape == (1, 1 + 64, 48)
    torch.testing.assert_close(model.pos_embed[:, :1], vit.pos_embed[:, :1], rtol=0, atol=0)  # cls untouched
    grid = vit.pos_embed[:, 1:].reshape(1, 4, 4, 48).permute(0, 3, 1, 2)  # (1, D, rows, columns)
    expected = F.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(model.pos_embed[:, 1:], expected)
    flattened = F.interpolate(vit.pos_embed[:, 1:].transpose(1, 2), size=64, mode="linear").transpose(1, 2)
    assert not torch.allclose(model.pos_embed[:, 1:], flattened, atol=1e-3)  # not the original code's 1-D resize
    assert model(torch.randn(1, T, 3, 64, 64)).shape == (1, 10)


def test_class_count_change_drops_the_head(vit, tmp_path, caplog):
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    with caplog.at_level(logging.INFO, logger="timesformer.model.timesformer"):
        model = TimeSformer.from_image_vit(tmp_path / "vit.pth", num_frames=T, num_attention_heads=4,
                                           num_classes=7).eval()
    assert "dropping the 10-class head; new 7-class head" in caplog.text
    assert model.head.out_features == 7
    frame = torch.randn(1, 3, 32, 32)
    with torch.no_grad():  # the backbone is still the image ViT's
        torch.testing.assert_close(model.forward_features(frame[:, None].expand(1, T, 3, 32, 32)),
                                   vit_features(vit, frame), atol=1e-5, rtol=0)


def test_tensors_that_cannot_be_placed_are_reported_by_name(vit, tmp_path, caplog):
    state = dict(vit.state_dict())
    state["blocks.0.ls1.gamma"] = torch.ones(48)  # timm's layer scale: no place in a TimeSformer
    state["fc_norm.weight"] = torch.ones(48)
    torch.save(state, tmp_path / "vit.pth")
    with caplog.at_level(logging.WARNING, logger="timesformer.model.timesformer"):
        TimeSformer.from_image_vit(tmp_path / "vit.pth", num_frames=T, num_attention_heads=4)
    assert "blocks.0.ls1.gamma (48,)" in caplog.text and "fc_norm.weight (48,)" in caplog.text

    del state["blocks.1.norm2.bias"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(RuntimeError, match=r"does not provide 1 tensor\(s\).*blocks\.1\.norm2\.bias"):
        TimeSformer.from_image_vit(tmp_path / "broken.pth", num_frames=T, num_attention_heads=4)
    # A width the file does not have: named as the config field, with the file's (not the resized) shapes
    with pytest.raises(ValueError, match=r"vit.pth is an image ViT of width 48 .* hidden_size=64 \(it has 48\)"):
        TimeSformer.from_image_vit(tmp_path / "vit.pth", num_attention_heads=4, hidden_size=64)


def test_head_count_is_the_released_vits_for_its_width_or_must_be_given(tmp_path, caplog):
    """train.py passes model.num_attention_heads (base's 12) for every file: a ViT-S (384 = 6 heads of 64) then ran with
    12 heads of 32, silently, a function of the same weights other than the ViT's. A width no released ViT has got
    width // 64 heads, guessed."""
    small = timm_vit.VisionTransformer(img_size=32, patch_size=16, embed_dim=384, depth=1, num_heads=6, mlp_ratio=1,
                                       num_classes=0)
    torch.save(small.state_dict(), tmp_path / "small.pth")
    assert TimeSformer.from_image_vit(tmp_path / "small.pth", num_frames=T).config.num_attention_heads == 6
    with caplog.at_level(logging.WARNING):
        TimeSformer.from_image_vit(tmp_path / "small.pth", num_frames=T, num_attention_heads=12)
    assert "12 heads of 32 (num_attention_heads=12), where the released ViTs of width 384 have 6 heads" in caplog.text
    odd = timm_vit.VisionTransformer(img_size=32, patch_size=16, embed_dim=96, depth=1, num_heads=4, num_classes=0)
    torch.save(odd.state_dict(), tmp_path / "odd.pth")
    with pytest.raises(ValueError, match="odd.pth: the weights are 96 wide.*pass num_attention_heads"):
        TimeSformer.from_image_vit(tmp_path / "odd.pth", num_frames=T)
    assert TimeSformer.from_image_vit(tmp_path / "odd.pth", num_attention_heads=4).config.num_attention_heads == 4


def test_not_an_image_vit_is_a_clear_error(tmp_path):
    torch.save({"weight": torch.zeros(3)}, tmp_path / "resnet.pth")
    with pytest.raises(ValueError, match="not an image ViT state dict"):
        TimeSformer.from_image_vit(tmp_path / "resnet.pth")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        TimeSformer.from_image_vit(tmp_path / "nope.pth")
    # Hugging Face's ViTModel names, and a folder (timm's hub download: config.json + model.safetensors)
    torch.save({"embeddings.cls_token": torch.zeros(1, 1, 8)}, tmp_path / "hf_vit.bin")
    with pytest.raises(ValueError, match="in Hugging Face's ViTModel names: load it with timm"):
        TimeSformer.from_image_vit(tmp_path / "hf_vit.bin")
    torch.save({"timesformer.embeddings.cls_token": torch.zeros(1, 1, 8)}, tmp_path / "video.bin")
    with pytest.raises(ValueError, match="a video TimeSformer .* model.pretrained="):
        TimeSformer.from_image_vit(tmp_path / "video.bin")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="a folder without model.safetensors or pytorch_model.bin"):
        TimeSformer.from_image_vit(tmp_path / "empty")


def test_a_folder_holding_the_weights_file_loads_like_the_file(vit, tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "hub").mkdir()
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(tmp_path / "hub" / "model.safetensors"))
    (tmp_path / "hub" / "config.json").write_text("{}")
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    from_folder = TimeSformer.from_image_vit(tmp_path / "hub", num_frames=T, num_attention_heads=4).state_dict()
    from_file = TimeSformer.from_image_vit(tmp_path / "vit.pth", num_frames=T, num_attention_heads=4).state_dict()
    for name, tensor in from_file.items():
        if name != "head.weight" and name != "head.bias":  # (new heads: random)
            torch.testing.assert_close(from_folder[name], tensor, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize(("attention_type", "extra"), [("sparse_local_global", ["local"]),
                                                        ("axial", ["temporal", "width"]),
                                                        ("space_only", []), ("joint_space_time", [])])
def test_other_attention_types_copy_the_spatial_attention_into_each_extra_one(vit, tmp_path, attention_type, extra):
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    model = TimeSformer.from_image_vit(tmp_path / "vit.pth", num_frames=T, num_attention_heads=4,
                                       attention_type=attention_type).eval()
    for ours, theirs in zip(model.blocks, vit.blocks, strict=True):
        for name in extra:
            torch.testing.assert_close(getattr(ours, f"{name}_attn").proj.weight, theirs.attn.proj.weight)
            torch.testing.assert_close(getattr(ours, f"{name}_norm1").weight, theirs.norm1.weight)
            assert torch.count_nonzero(getattr(ours, f"{name}_fc").weight) == 0
    frame = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        features = model.forward_features(frame[:, None].expand(1, T, 3, 32, 32))
    assert features.shape == (1, 48)
    if attention_type == "space_only":  # the image ViT on each frame, averaged
        torch.testing.assert_close(features, vit_features(vit, frame), atol=1e-5, rtol=0)


@pytest.mark.parametrize("width, heads", [(768, 12), (1280, 16)])
def test_head_count_defaults_to_the_released_vits_of_that_width(tmp_path, width, heads):
    """Heads are not visible in the weights: ViT-B has 12 of 64, ViT-H 16 of 80 (not 1280 / 64 = 20, a different
    function of the same weights)."""
    torch.manual_seed(0)
    vit = timm_vit.VisionTransformer(img_size=28, patch_size=14, embed_dim=width, depth=1, num_heads=heads,
                                     mlp_ratio=1, num_classes=3).eval()
    with torch.no_grad():
        for param in vit.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    model = TimeSformer.from_image_vit(tmp_path / "vit.pth", num_frames=2).eval()
    assert model.config.num_attention_heads == heads
    frame = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model(frame[:, None].expand(1, 2, 3, 28, 28)), vit(frame), atol=1e-4, rtol=0)

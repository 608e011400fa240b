"""The backbone: shapes, resizing, gradients, initialisation, validation and parameter counts."""

import logging

import pytest
import torch
import torch.nn.functional as F

from timesformer import TimeSformer, TimeSformerConfig
from timesformer.model import ATTENTION_TYPES
from timesformer.model.timesformer import Block


def tiny_config(**overrides) -> TimeSformerConfig:
    values = dict(image_size=32, patch_size=8, num_frames=4, hidden_size=32, num_hidden_layers=2,
                  num_attention_heads=4, intermediate_size=64, num_classes=5)
    values.update(overrides)
    return TimeSformerConfig(**values)


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
def test_output_shapes(attention_type):
    model = TimeSformer(tiny_config(attention_type=attention_type)).eval()
    video = torch.randn(3, 4, 3, 32, 32)
    assert model(video).shape == (3, 5)
    assert model.forward_features(video).shape == (3, 32)


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
def test_other_frame_counts_and_resolutions_run_and_log_once(attention_type, caplog):
    torch.manual_seed(0)
    model = TimeSformer(tiny_config(attention_type=attention_type)).eval()
    with caplog.at_level(logging.INFO, logger="timesformer.model.timesformer"):
        for _ in range(2):
            assert model(torch.randn(2, 8, 3, 32, 32)).shape == (2, 5)
            assert model(torch.randn(2, 4, 3, 64, 48)).shape == (2, 5)
    messages = [r.getMessage() for r in caplog.records if "interpolating" in r.getMessage()]
    assert len(messages) == 2, messages  # once per new size, not once per call
    assert "8 frames at 32x32" in messages[0]


def test_position_embedding_is_resized_in_2d():
    """Interpolating to the same grid is the identity; a 2x grid keeps each row's embeddings in that row."""
    model = TimeSformer(tiny_config())
    _, same = model._position_embedding(4, 4)
    torch.testing.assert_close(same, model.pos_embed[:, 1:])
    with torch.no_grad():  # make every position's embedding encode its (row, column)
        rows = torch.arange(4).repeat_interleave(4).float()
        cols = torch.arange(4).repeat(4).float()
        model.pos_embed[0, 1:, 0] = rows
        model.pos_embed[0, 1:, 1] = cols
    _, doubled = model._position_embedding(8, 8)
    grid = doubled[0].reshape(8, 8, -1)
    # Row coordinate must grow down the rows and be constant along each row (1-D interpolation breaks this).
    assert torch.all(grid[1:, :, 0].mean(1) > grid[:-1, :, 0].mean(1))
    assert torch.allclose(grid[:, :, 0], grid[:, :1, 0].expand(8, 8), atol=1e-5)
    assert torch.allclose(grid[:, :, 1], grid[:1, :, 1].expand(8, 8), atol=1e-5)


def test_frame_count_is_read_from_the_input_not_the_config():
    """A 4-frame model on 8 frames differs from the same model on the first 4 frames (time is really used)."""
    torch.manual_seed(0)
    model = TimeSformer(tiny_config()).eval()
    with torch.no_grad():
        model.time_embed.normal_()
        for block in model.blocks:
            block.temporal_fc.weight.normal_(std=0.2)
    video = torch.randn(1, 8, 3, 32, 32)
    assert not torch.allclose(model(video), model(video[:, :4]), atol=1e-4)


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
def test_gradients_reach_every_parameter(attention_type):
    torch.manual_seed(0)
    model = TimeSformer(tiny_config(attention_type=attention_type))
    with torch.no_grad():  # a zero-initialised *_fc (temporal_fc, ...) blocks gradient to its attention
        for name, module in model.named_modules():
            if name.endswith("_fc"):
                module.weight.normal_(std=0.02)
        if hasattr(model, "time_embed"):
            model.time_embed.normal_(std=0.02)
    model(torch.randn(2, 4, 3, 32, 32)).logsumexp(-1).sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert no_grad == []


def test_temporal_fc_starts_at_zero_and_time_embed_at_zero():
    model = TimeSformer(tiny_config())
    for block in model.blocks:
        assert torch.count_nonzero(block.temporal_fc.weight) == 0
        assert torch.count_nonzero(block.temporal_fc.bias) == 0
    assert torch.count_nonzero(model.time_embed) == 0
    assert model.pos_embed.std() > 0.01 and model.blocks[0].attn.qkv.weight.std() > 0.01


def test_drop_path_rises_linearly_and_is_per_video():
    model = TimeSformer(tiny_config(num_hidden_layers=5, drop_path_rate=0.4))
    rates = [block.drop_path.drop_prob for block in model.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    drop = model.blocks[-1].drop_path.train()
    torch.manual_seed(0)
    out = drop(torch.ones(64, 4, 16, 8))
    per_video = out.flatten(1)
    # every video is either entirely dropped or entirely kept (scaled by 1/keep)
    assert torch.all((per_video == 0).all(1) | torch.isclose(per_video, torch.tensor(1 / 0.6)).all(1))
    assert 0 < (per_video == 0).all(1).sum() < 64


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
def test_drop_path_drops_a_videos_whole_mlp_branch(attention_type):
    """Stochastic depth drops a residual branch for a whole video. Where a block keeps the cls token and the patches
    in separate tensors (divided, L+G, axial), its MLP runs on each: one draw must decide for both."""
    torch.manual_seed(0)
    block = Block(tiny_config(attention_type=attention_type), drop_path=0.5).train()
    with torch.no_grad():  # the attention branches add nothing, so a block's output is x + drop_path(mlp(x))
        for name, module in block.named_modules():
            if name == "attn.proj" or name.endswith("_fc"):
                module.weight.zero_(), module.bias.zero_()
    B, T, N, D = 32, 4, 16, 32
    cls_shape = (B, T, 1, D) if attention_type == "space_only" else (B, 1, D)  # space_only: a cls token per frame
    cls, patches = torch.randn(cls_shape), torch.randn(B, T, N, D)
    new_cls, new_patches = block(cls, patches, grid=(4, 4))
    cls_kept = (new_cls != cls).flatten(1).any(1)
    patches_kept = (new_patches != patches).flatten(1).any(1)
    assert torch.equal(cls_kept, patches_kept)
    assert 0 < cls_kept.sum() < B  # some videos kept the branch, some lost it


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(attention_type="spacetime"), "divided_space_time, space_only, joint_space_time"),
        (dict(image_size=30), "image_size=30 is not divisible by patch_size=8"),
        (dict(hidden_size=30), "hidden_size=30 is not divisible by num_attention_heads=4"),
        (dict(drop_path_rate=1.5), "drop_path_rate"),
        (dict(drop_path_rate=1.0), r"drop_path_rate must be in \[0, 1\), got 1.0"),  # every block always dropped
        (dict(attention_probs_dropout_prob=-0.1), "attention_probs_dropout_prob must be in"),
        (dict(num_frames=0), "num_frames must be a positive integer, got 0"),
        (dict(num_classes=3, class_names=["a", "b"]), "class_names has 2 entries but num_classes=3"),
        (dict(qkv_bias="no"), "qkv_bias must be true or false, got 'no'"),  # a non-empty string is truthy
    ],
)
def test_invalid_configs_fail_at_construction(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_wrong_input_shape_is_a_clear_error():
    model = TimeSformer(tiny_config())
    with pytest.raises(ValueError, match=r"\(B, T, C, H, W\)"):
        model(torch.randn(4, 3, 32, 32))
    with pytest.raises(ValueError, match="divisible by patch_size=8"):
        model(torch.randn(1, 4, 3, 30, 32))
    # The datasets' uint8 clips, not normalised: a pointer to normalize, not a conv dtype error
    with pytest.raises(TypeError, match="timesformer.data.normalize"):
        model(torch.zeros(1, 4, 3, 32, 32, dtype=torch.uint8))


@pytest.mark.parametrize(
    ("attention_type", "expected"),
    [("divided_space_time", 121_566_352), ("joint_space_time", 86_112_400), ("space_only", 86_106_256),
     # paper Table 1: L+G 121.4M, axial 156.8M (Block's docstring explains the small differences)
     ("sparse_local_global", 121_566_352), ("axial", 157_020_304)],
)
def test_base_parameter_counts_match_the_reference(attention_type, expected):
    with torch.device("meta"):
        model = TimeSformer(TimeSformerConfig(attention_type=attention_type, num_classes=400))
    assert model.num_parameters() == expected


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
def test_gradient_checkpointing_leaves_gradients_unchanged(attention_type):
    torch.manual_seed(0)
    model = TimeSformer(tiny_config(drop_path_rate=0.0, attention_type=attention_type))
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("_fc"):
                module.weight.normal_(std=0.02)
    video = torch.randn(2, 4, 3, 32, 32)
    model(video).square().sum().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.config.gradient_checkpointing = True
    model(video).square().sum().backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_reset_head_leaves_other_models_built_from_the_same_config_alone():
    """reset_head wrote into the config object the caller passed: a second model built from it reported 10 classes
    with a 5-class head and saved a folder that could not be loaded."""
    config = tiny_config()
    first, second = TimeSformer(config), TimeSformer(config)
    first.reset_head(10)
    assert first.config.num_classes == 10 and first.head.out_features == 10
    assert second.config.num_classes == 5 and config.num_classes == 5 and TimeSformer(config).head.out_features == 5


def test_space_only_averages_frames_before_the_head():
    """On T identical frames space_only must give what it gives on one frame (per-frame cls averaged)."""
    torch.manual_seed(0)
    model = TimeSformer(tiny_config(attention_type="space_only")).eval()
    frame = torch.randn(2, 1, 3, 32, 32)
    torch.testing.assert_close(model(frame.expand(2, 4, 3, 32, 32)), model(frame), atol=1e-5, rtol=1e-5)
    video = torch.randn(2, 4, 3, 32, 32)
    assert model(video).shape == (2, 5)  # (B, classes), not (B·T, classes) as in Hugging Face


def test_embedding_dropout_is_applied_as_in_the_original():
    """Patch tokens are dropped after the position embedding and again after the time embedding (HF and the original:
    pos_drop, then time_drop): at p = 0.5, 75% of their elements are zero; the cls token is dropped once."""
    torch.manual_seed(0)
    model = TimeSformer(TimeSformerConfig(image_size=32, patch_size=8, num_frames=4, hidden_size=32,
                                          num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                          num_classes=3, hidden_dropout_prob=0.5)).train()
    with torch.no_grad():
        cls, patches = model.embed(torch.randn(64, 4, 3, 32, 32))
    assert (patches == 0).float().mean().item() == pytest.approx(0.75, abs=0.01)
    assert (cls == 0).float().mean().item() == pytest.approx(0.5, abs=0.05)


class LowRankAdapter(torch.nn.Module):
    """A LoRA-style wrapper as PEFT makes them: the base layer's weight and bias as attributes, and a forward that
    adds B·A·x. The model read such a layer's .weight directly: the adapter was silently ignored."""

    def __init__(self, base: torch.nn.Linear, rank: int = 2) -> None:
        super().__init__()
        self.base = base
        self.down = torch.nn.Parameter(torch.randn(rank, base.in_features) * 0.1)
        self.up = torch.nn.Parameter(torch.randn(base.out_features, rank) * 0.1)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + x @ (self.up @ self.down).T


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
def test_hooks_and_wrapped_layers_take_effect(attention_type):
    """Forward hooks fire on every Linear and LayerNorm, and a wrapped layer computes what its weights say: the
    fused paths run only for plain layers."""
    torch.manual_seed(0)
    model = TimeSformer(tiny_config(attention_type=attention_type)).train()
    layers = {name: module for name, module in model.named_modules()
              if isinstance(module, (torch.nn.Linear, torch.nn.LayerNorm))}
    fired = set()
    handles = [module.register_forward_hook(lambda m, i, o, name=name: fired.add(name))
               for name, module in layers.items()]
    video = torch.randn(2, 4, 3, 32, 32)
    model(video).sum().backward()
    assert fired == set(layers)
    for handle in handles:
        handle.remove()

    # Adapters on every linear layer of the blocks == the same model with W + B·A as its weights.
    reference = TimeSformer(model.config)
    reference.load_state_dict(model.state_dict())
    for name, module in list(model.blocks.named_modules()):
        if isinstance(module, torch.nn.Linear):
            parent_name, _, child = name.rpartition(".")
            adapter = LowRankAdapter(module)
            setattr(model.blocks.get_submodule(parent_name), child, adapter)
            with torch.no_grad():
                reference.blocks.get_submodule(name).weight += adapter.up @ adapter.down
    model.eval(), reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(video), reference(video), atol=1e-5, rtol=1e-5)


def test_space_only_averages_the_frames_cls_tokens_whatever_the_frames():
    """space_only's pooled cls is the mean over frames of each frame's own cls token (the existing test used identical
    frames, on which the cls token of frame 0 alone gives the same). Each frame's cls is taken from the model run
    on that frame alone (the frames never meet before the average), as the input of the final norm."""
    torch.manual_seed(0)
    model = TimeSformer(tiny_config(attention_type="space_only")).eval()
    video = torch.randn(2, 4, 3, 32, 32)
    pooled = []
    hook = model.norm.register_forward_pre_hook(lambda module, args: pooled.append(args[0]))
    with torch.no_grad():
        per_frame = []
        for t in range(4):
            model(video[:, t:t + 1])
            per_frame.append(pooled.pop())  # (B, D): frame t's cls after the last block
        hook.remove()
        expected = model.head(model.norm(torch.stack(per_frame).mean(0)))
        logits = model(video)
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(video.flip(1)), logits, atol=1e-6, rtol=1e-5)  # frame order is irrelevant
        other = video.clone()
        other[:, 1:] = torch.randn(2, 3, 3, 32, 32)  # the same first frame, other frames after it
        assert (model(other) - logits).abs().max() > 1e-3


def test_position_embedding_of_a_non_square_grid_is_the_2d_bicubic_resize():
    """A 4 x 6 patch grid (32 x 48 px): the stored 4 x 4 grid of position embeddings resized bicubically to 4 rows
    and 6 columns (resizing to 6 x 4 and flattening gives the right shape and the wrong positions)."""
    torch.manual_seed(0)
    model = TimeSformer(tiny_config())
    stored = model.pos_embed[0, 1:].detach().reshape(4, 4, 32).permute(2, 0, 1)[None]  # (1, D, rows, columns)
    expected = F.interpolate(stored, size=(4, 6), mode="bicubic", align_corners=False)[0]  # (D, 4, 6)
    cls_pos, patch_pos = model._position_embedding(4, 6)
    torch.testing.assert_close(cls_pos, model.pos_embed[:, :1])
    torch.testing.assert_close(patch_pos[0].detach(), expected.flatten(1).T)  # row-major: (y, x) at y·6 + x

    # The model's tokens for a 32 x 48 clip: patch (y, x) of frame t is the conv of that patch + position (y, x)
    # + time t.
    with torch.no_grad():
        model.time_embed.normal_()
        video = torch.randn(1, 4, 3, 32, 48)
        cls, patches = model.embed(video)
        weight, bias = model.patch_embed.proj.weight, model.patch_embed.proj.bias
        for t, y, x in [(0, 0, 5), (1, 3, 0), (3, 2, 4)]:
            pixels = video[0, t, :, 8 * y:8 * y + 8, 8 * x:8 * x + 8]
            token = (weight * pixels).sum((1, 2, 3)) + bias + expected[:, y, x] + model.time_embed[0, t]
            torch.testing.assert_close(patches[0, t, y * 6 + x], token, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cls[0, 0], (model.cls_token + model.pos_embed[:, :1])[0, 0])


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
def test_blocks_get_the_clips_grid_as_rows_then_columns(attention_type):
    """On a 32 x 48 clip (4 x 6 patches) every block is given grid (4, 6): axial's rows and columns and L+G's windows
    are cut by it (swapped, they cut the patches of a 4 x 6 frame as a 6 x 4 one)."""
    torch.manual_seed(0)
    model = TimeSformer(tiny_config(attention_type=attention_type)).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
        video = torch.randn(2, 4, 3, 32, 48)
        cls, patches = model.embed(video)
        for i, block in enumerate(model.blocks):
            cls, patches = block(cls, patches, (4, 6), cls_only=i == len(model.blocks) - 1)
        if attention_type == "space_only":
            cls = cls.mean(1)
        expected = model.norm(cls[:, 0])
        torch.testing.assert_close(model.forward_features(video), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("size", [(32, 36), (36, 32), (30, 32), (32, 30)], ids=["w36", "h36", "h30", "w30"])
def test_a_height_or_width_not_divisible_by_the_patch_size_is_an_error(size):
    """The patch convolution drops the remainder of either side silently: both are checked."""
    model = TimeSformer(tiny_config())
    with pytest.raises(ValueError, match="divisible by patch_size=8"):
        model(torch.randn(1, 4, 3, *size))


def test_drop_path_drops_the_given_fraction_and_keeps_the_mean():
    """At p = 0.1 a tenth of the samples are dropped, the rest scaled by 1/0.9, so the expected output is the input.
    (Keeping with probability p instead of 1 - p went unnoticed: the existing test's 0.4 and 0.6 are both "some".)"""
    from timesformer.model.timesformer import DropPath

    torch.manual_seed(0)
    out = DropPath(0.1).train()(torch.ones(20_000, 3))
    dropped = (out == 0).all(1)
    assert dropped.float().mean().item() == pytest.approx(0.1, abs=0.01)  # binomial std 0.002
    torch.testing.assert_close(out[~dropped], torch.full_like(out[~dropped], 1 / 0.9))
    assert out.mean().item() == pytest.approx(1.0, abs=0.02)


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
def test_eval_ignores_stochastic_depth_and_dropout(attention_type):
    """In eval mode drop_path_rate, attention dropout and hidden dropout do nothing: the output is deterministic and
    that of the same weights built with all rates 0."""
    torch.manual_seed(0)
    rates = dict(drop_path_rate=0.5, attention_probs_dropout_prob=0.5, hidden_dropout_prob=0.5)
    model = TimeSformer(tiny_config(attention_type=attention_type, **rates)).eval()
    with torch.no_grad():
        for param in model.parameters():  # *_fc not zero: every branch adds something
            param.add_(torch.randn_like(param) * 0.1)
    reference = TimeSformer(tiny_config(attention_type=attention_type)).eval()
    reference.load_state_dict(model.state_dict())
    video = torch.randn(2, 4, 3, 32, 32)
    with torch.no_grad():
        first = model(video)
        torch.testing.assert_close(model(video), first, rtol=0, atol=0)
        torch.testing.assert_close(first, reference(video), rtol=0, atol=1e-6)


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
def test_every_layer_norm_uses_the_configured_epsilon(attention_type):
    """layer_norm_eps reaches every LayerNorm (each block's norms, the extra attentions' <name>_norm1, the final
    norm); one built with nn.LayerNorm's default 1e-5 went unnoticed."""
    model = TimeSformer(tiny_config(attention_type=attention_type, layer_norm_eps=1e-2))
    norms = {name: module.eps for name, module in model.named_modules() if isinstance(module, torch.nn.LayerNorm)}
    extra = {"divided_space_time": 1, "sparse_local_global": 1, "axial": 2}.get(attention_type, 0)
    assert len(norms) == 2 * (2 + extra) + 1  # two blocks and the final norm
    assert norms == dict.fromkeys(norms, 1e-2)


@pytest.mark.parametrize("initializer_range", [0.02, 0.05])
def test_initialisation_follows_initializer_range(initializer_range):
    """Linear and patch-conv weights (but the zero-initialised *_fc) and the cls and position embeddings are drawn
    with std initializer_range, biases are zero. At width 768 a linear layer's default (Kaiming uniform) init has std
    0.021 where its fan-in is 768, so 0.05 is what tells them apart; the cls token left at zero went unnoticed."""
    torch.manual_seed(0)
    config = TimeSformerConfig(num_hidden_layers=1, num_classes=10, initializer_range=initializer_range)
    model = TimeSformer(config)
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and not name.endswith("_fc"):
            assert module.weight.std().item() == pytest.approx(initializer_range, rel=0.05), name
            assert module.weight.mean().abs().item() < 0.1 * initializer_range, name
            assert torch.count_nonzero(module.bias) == 0, name
    for name in ("cls_token", "pos_embed"):  # 768 and 197 x 768 values
        assert getattr(model, name).std().item() == pytest.approx(initializer_range, rel=0.15), name


def half_pixel_linear(values: list[float], size: int) -> list[float]:
    """Linear interpolation of samples taken at the centres of len(values) equal cells to the centres of ``size``
    cells spanning the same interval (align_corners=False; before the first centre or after the last, the end value)."""
    out = []
    for i in range(size):
        x = min(max((i + 0.5) * len(values) / size - 0.5, 0.0), len(values) - 1.0)
        left = min(int(x), len(values) - 2)
        out.append(values[left] + (x - left) * (values[left + 1] - values[left]))
    return out


@pytest.mark.parametrize(("stored", "frames"), [(4, 8), (8, 4), (4, 6), (8, 16)])
def test_time_embedding_is_resized_linearly_between_frame_centres(stored, frames):
    """The time embedding is interpolated linearly (README: not nearest neighbour, as the original and HF do at run
    time), each stored frame a sample at the centre of its stretch of the clip: 0..3 to 8 frames is
    [0, .25, .75, 1.25, 1.75, 2.25, 2.75, 3]. The existing tests compared the resize with itself (align_corners=True
    or nearest survived)."""
    model = TimeSformer(tiny_config(num_frames=stored))
    with torch.no_grad():  # channel 0: the frame index, channel 1: its square (each channel on its own)
        model.time_embed[0, :, 0] = torch.arange(stored, dtype=torch.float32)
        model.time_embed[0, :, 1] = torch.arange(stored, dtype=torch.float32) ** 2
    resized = model._time_embedding(frames)[0].detach()
    assert resized.shape == (frames, 32)
    indices = [float(t) for t in range(stored)]
    torch.testing.assert_close(resized[:, 0], torch.tensor(half_pixel_linear(indices, frames)))
    torch.testing.assert_close(resized[:, 1], torch.tensor(half_pixel_linear([t * t for t in indices], frames)))
    if (stored, frames) == (4, 8):
        assert resized[:, 0].tolist() == pytest.approx([0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3])

"""The paper's sparse local-global (L+G) and axial (T+W+H) attention: which tokens each attention step connects.

Shapes, gradients and other frame counts/resolutions of every attention type are in test_model.py (its tests
are parametrised over ATTENTION_TYPES). Here a single block is probed with one step switched on at a time
(the others' output projections and the MLP set to zero, so they add nothing): perturbing one patch token may
change exactly the tokens the step claims to connect it to.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F

from timesformer import TimeSformer, TimeSformerConfig
from timesformer.model import timesformer as tsf
from timesformer.model.timesformer import Block, group_tokens, ungroup_tokens


def block_for(attention_type: str) -> Block:
    torch.manual_seed(0)
    config = TimeSformerConfig(image_size=32, patch_size=8, num_frames=4, hidden_size=32, num_hidden_layers=1,
                               num_attention_heads=4, intermediate_size=64, attention_type=attention_type)
    block = Block(config, drop_path=0.0).eval()
    with torch.no_grad():
        for param in block.parameters():  # nothing zero, nothing trivially symmetric
            param.add_(torch.randn_like(param) * 0.1)
        switch_off(block, "mlp.fc2")
    return block


def switch_off(block: Block, *linears: str) -> None:
    """Zero the given output projections: their residual branch then adds nothing."""
    with torch.no_grad():
        for name in linears:
            block.get_submodule(name).weight.zero_()
            block.get_submodule(name).bias.zero_()


def changed_tokens(block: Block, T: int, grid: tuple[int, int], token: tuple[int, int, int]) -> torch.Tensor:
    """Which patch tokens (T, h, w) of the block's output change when the input token (t, y, x) is perturbed."""
    h, w = grid
    torch.manual_seed(1)
    cls, patches = torch.randn(1, 1, 32), torch.randn(1, T, h, w, 32)
    perturbed = patches.clone()
    perturbed[(0, *token)] += torch.randn(32)  # not a constant: LayerNorm would remove that
    with torch.no_grad():
        _, before = block(cls, patches.reshape(1, T, h * w, 32), grid)
        _, after = block(cls, perturbed.reshape(1, T, h * w, 32), grid)
    return ((after - before).abs().amax(-1) > 1e-6).reshape(T, h, w)


def coordinates(T: int, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """t, y, x of every patch token, each (T, h, w)."""
    return torch.meshgrid(torch.arange(T), torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")


GRIDS = [(4, (4, 6)), (3, (5, 3))]  # (frames, (h, w)); the second has odd sizes everywhere, so it is padded


@pytest.mark.parametrize(("T", "grid"), GRIDS)
def test_axial_steps_attend_along_time_then_width_then_height(T, grid):
    t, y, x = coordinates(T, grid)
    t0, y0, x0 = 1, 2, 1
    steps = {  # step -> (projections of the other two steps, the tokens it connects to (t0, y0, x0))
        "time": (("width_fc", "attn.proj"), (y == y0) & (x == x0)),
        "width": (("temporal_fc", "attn.proj"), (t == t0) & (y == y0)),
        "height": (("temporal_fc", "width_fc"), (t == t0) & (x == x0)),
    }
    for step, (others, connected) in steps.items():
        probe = block_for("axial")
        switch_off(probe, *others)
        assert torch.equal(changed_tokens(probe, T, grid, (t0, y0, x0)), connected), step
    # All three steps together: one block connects every token (time -> row -> column).
    assert changed_tokens(block_for("axial"), T, grid, (t0, y0, x0)).all()


@pytest.mark.parametrize(("T", "grid"), GRIDS)
def test_sparse_local_global_steps_attend_within_windows_then_strided(T, grid):
    h, w = grid
    t, y, x = coordinates(T, grid)
    window_h, window_w = -(-h // 2), -(-w // 2)  # an odd axis: the first window is the larger
    local = block_for("sparse_local_global")
    switch_off(local, "attn.proj")
    sparse = block_for("sparse_local_global")
    switch_off(sparse, "local_fc")
    for t0, y0, x0 in [(0, 0, 0), (T - 1, h - 1, w - 1), (1, 2, 1)]:
        same_window = (y // window_h == y0 // window_h) & (x // window_w == x0 // window_w)  # every frame
        assert torch.equal(changed_tokens(local, T, grid, (t0, y0, x0)), same_window)
        same_parity = (t % 2 == t0 % 2) & (y % 2 == y0 % 2) & (x % 2 == x0 % 2)
        assert torch.equal(changed_tokens(sparse, T, grid, (t0, y0, x0)), same_parity)
    # Both steps: every window holds every parity, so one block connects every pair of tokens.
    assert changed_tokens(block_for("sparse_local_global"), T, grid, (1, 2, 1)).all()


def test_sparse_local_global_equals_masked_full_attention():
    """Padding is invisible: on an odd grid each step equals attention over all T·N tokens with the claimed mask."""
    T, (h, w) = 3, (5, 3)
    block = block_for("sparse_local_global")
    switch_off(block, "attn.proj")  # the local step alone; the global one is checked through its own mask below
    positions = list(itertools.product(range(T), range(h), range(w)))
    same_window = torch.tensor([[(a[1] < 3) == (b[1] < 3) and (a[2] < 2) == (b[2] < 2) for b in positions]
                                for a in positions])
    same_parity = torch.tensor([[all(i % 2 == j % 2 for i, j in zip(a, b, strict=True)) for b in positions]
                                for a in positions])

    def masked_attention(attn, x, mask):  # x (1, L, D), mask (L, L): the attention as one masked joint sequence
        q, k, v = attn.qkv(x).reshape(1, -1, 3, 4, 8).permute(2, 0, 3, 1, 4)
        return attn.proj(F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(1, -1, 32))

    torch.manual_seed(2)
    cls, patches = torch.randn(1, 1, 32), torch.randn(1, T, h * w, 32)
    with torch.no_grad():
        _, actual = block(cls, patches, (h, w))
        flat = patches.reshape(1, T * h * w, 32)
        expected = flat + block.local_fc(masked_attention(block.local_attn, block.local_norm1(flat), same_window))
    torch.testing.assert_close(actual.reshape(1, -1, 32), expected, atol=1e-5, rtol=1e-5)

    # Global step, patches' outputs: each patch attends to cls and to the patches of its parity group.
    block = block_for("sparse_local_global")
    switch_off(block, "local_fc")
    with torch.no_grad():
        _, actual = block(cls, patches, (h, w))
        tokens = torch.cat([cls, flat], dim=1)
        mask = torch.ones(1 + T * h * w, 1 + T * h * w, dtype=torch.bool)
        mask[1:, 1:] = same_parity
        expected = flat + masked_attention(block.attn, block.norm1(tokens), mask)[:, 1:]
    torch.testing.assert_close(actual.reshape(1, -1, 32), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("sizes", [(4, 4, 6), (3, 5, 1), (1, 2, 7)])
def test_grouping_round_trips_and_masks_only_the_padding(sizes, strided):
    grid = torch.randn(2, *sizes, 3)
    splits = tuple(min(n, 2) for n in sizes)
    groups, key_mask = group_tokens(grid, splits, strided)
    assert groups.shape[:2] == (2, splits[0] * splits[1] * splits[2])
    torch.testing.assert_close(ungroup_tokens(groups, sizes, splits, strided), grid, rtol=0, atol=0)
    padded_tokens = groups.shape[1] * groups.shape[2] - sizes[0] * sizes[1] * sizes[2]
    if padded_tokens == 0:
        assert key_mask is None
    else:
        assert (~key_mask).sum() == padded_tokens and key_mask.any(-1).all()  # no group is padding only


@pytest.mark.parametrize("attention_type", ["sparse_local_global", "axial"])
@pytest.mark.parametrize(("frames", "height", "width"), [(1, 32, 32), (3, 40, 56), (6, 16, 8)])
def test_odd_and_tiny_clips_run(attention_type, frames, height, width):
    torch.manual_seed(0)
    model = TimeSformer(TimeSformerConfig(image_size=32, patch_size=8, num_frames=4, hidden_size=32,
                                          num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                          num_classes=5, attention_type=attention_type))
    logits = model(torch.randn(2, frames, 3, height, width))
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()
    logits.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize(("attention_type", "extra"), [("sparse_local_global", ["local"]),
                                                        ("axial", ["temporal", "width"])])
def test_new_schemes_start_with_zero_output_projections(attention_type, extra):
    model = TimeSformer(TimeSformerConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                          num_attention_heads=4, intermediate_size=64,
                                          attention_type=attention_type))
    for block in model.blocks:
        assert sorted(n[: -len("_attn")] for n, _ in block.named_children() if n.endswith("_attn")) == sorted(extra)
        for name in extra:
            assert torch.count_nonzero(getattr(block, f"{name}_fc").weight) == 0
            assert getattr(block, f"{name}_attn").qkv.weight.std() > 0.01


@pytest.mark.parametrize("masked", [False, True])
def test_short_sequence_attention_equals_sdpa(masked):
    """The GPU's path for short sequences computes what SDPA computes: outputs and gradients, with padding masks."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(5, 3, 7, 16, dtype=torch.double, requires_grad=True) for _ in range(3))
    key_mask = torch.rand(5, 1, 1, 7) > 0.3 if masked else None
    if key_mask is not None:
        key_mask[..., 0] = True  # no sequence without a key
    grad = torch.randn(5, 3, 7, 16, dtype=torch.double)
    ours = tsf.short_sequence_attention(q, k, v, key_mask)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(ours, (q, k, v), grad), torch.autograd.grad(expected, (q, k, v), grad),
                    strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)

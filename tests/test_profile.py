"""timesformer.profile: parameter and FLOP counts of the paper's models, on the meta device (nothing is run)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from timesformer import TimeSformer, TimeSformerConfig
from timesformer.profile import compose_model_config, count_flops, main, profile

REPO = Path(__file__).resolve().parents[1]


def divided_multiply_adds(c: TimeSformerConfig) -> int:
    """Multiply-adds of a divided TimeSformer, layer by layer (the count fvcore and the paper make)."""
    T, N, D, I = c.num_frames, c.num_patches, c.hidden_size, c.intermediate_size  # noqa: E741
    patch_embed = T * N * D * c.num_channels * c.patch_size**2
    temporal = T * N * 5 * D * D + N * 2 * T * T * D  # qkv, proj, temporal_fc; N sequences of T: Q·Kᵀ, A·V
    spatial = T * (N + 1) * 4 * D * D + T * 2 * (N + 1) ** 2 * D  # qkv, proj; T sequences of 1 + N (cls joins)
    mlp = (T * N + 1) * 2 * D * I
    return patch_embed + c.num_hidden_layers * (temporal + spatial + mlp) + D * c.num_classes


@pytest.mark.parametrize("attention_type, training_saving, forward_saving",
                         [("divided_space_time", 0.087, 0.105), ("axial", 0.116, 0.125)])
def test_the_shortcuts_save_what_the_readme_says(attention_type, training_saving, forward_saving):
    """Base 8x224, batch 32, on the meta device: the multiply-adds the shortcuts (folded projections, class-token-only
    last block) save in a training step and in a forward pass (README, "Less work for the same function")."""
    def multiply_adds(shortcuts: bool, train: bool) -> int:
        with torch.device("meta"):
            model = TimeSformer(TimeSformerConfig(attention_type=attention_type)).use_shortcuts(shortcuts)
            video = torch.empty(32, 8, 3, 224, 224)
        with FlopCounterMode(display=False) as counter, torch.set_grad_enabled(train):
            logits = model.train(train)(video)
            if train:
                logits.sum().backward()
        return counter.get_total_flops()

    for train, saving in ((True, training_saving), (False, forward_saving)):
        assert 1 - multiply_adds(True, train) / multiply_adds(False, train) == pytest.approx(saving, abs=0.001)


def test_meta_device_count_includes_attention_and_matches_the_layer_by_layer_count():
    small = TimeSformerConfig(image_size=32, patch_size=8, num_frames=4, hidden_size=32, num_hidden_layers=2,
                              num_attention_heads=4, intermediate_size=64, num_classes=5)
    assert count_flops(small) == divided_multiply_adds(small)
    base = TimeSformerConfig(num_classes=400)
    assert count_flops(base) == divided_multiply_adds(base)


@pytest.mark.parametrize(
    ("overrides", "frames", "size", "gflops"),
    [(["model=base"], 8, 224, 196), (["model=hr"], 16, 448, 1703), (["model=large"], 96, 224, 2380)],
)
def test_paper_models_cost_what_the_paper_reports(overrides, frames, size, gflops):
    name, config = compose_model_config(overrides)
    result = profile(name, config)
    assert (result.num_frames, result.image_size, result.attention_type) == (frames, size, "divided_space_time")
    assert result.gflops == pytest.approx(gflops, abs=5 if name == "base" else gflops * 0.005)
    if name == "base":
        assert result.parameters == pytest.approx(121.4e6, abs=0.2e6)


def test_overrides_reach_the_model_config():
    name, config = compose_model_config(["model=base", "model.num_frames=16", "model.attention_type=axial"])
    assert (name, config.num_frames, config.attention_type, config.num_classes) == ("base", 16, "axial", 400)
    _, tiny = compose_model_config(["model=tiny"])
    assert (tiny.image_size, tiny.hidden_size) == (32, 96)


def test_main_prints_a_table(capsys):
    main(["model=base", "model.attention_type=sparse_local_global"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["model", "attention", "frames", "resolution", "parameters", "GFLOPs/view"]
    assert lines[2].split()[:5] == ["base", "sparse_local_global", "8", "224x224", "121.57M"]


def test_all_refuses_a_model_choice_it_would_ignore(capsys):
    with pytest.raises(SystemExit):
        main(["--all", "model=hr"])
    assert "--all profiles every model" in capsys.readouterr().err


def test_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "timesformer.profile", "model=tiny", "model.num_frames=4"],
                            cwd=REPO, capture_output=True, text=True, timeout=120, check=True)
    assert "divided_space_time" in result.stdout and "32x32" in result.stdout



@pytest.mark.parametrize("device, tflops", [("NVIDIA H200", 989.4), ("NVIDIA H200 NVL", 835.5),
                                            ("NVIDIA GH200 480GB", 989.4), ("NVIDIA L40", 181.0),
                                            ("NVIDIA L40S", 362.1), ("NVIDIA L4", 121.0),
                                            ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA GeForce GTX 1080", None)])
def test_mfu_peak_is_the_devices_own_not_a_namesakes(device, tflops):
    """The first table name the device's contains: an H200 NVL was taken for an H200 SXM and an L40 for an L4 (its
    MFU 16% low, 1.5x high)."""
    from timesformer.profile import datasheet_bf16_tflops

    assert datasheet_bf16_tflops(device) == tflops

"""The fused short-sequence attention kernel (``fused_short_attention``), run through Triton's interpreter on the
CPU: the same kernels a GPU compiles, checked against float64 SDPA and against the model without them.
tests/test_cuda.py runs them compiled on a GPU."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, once_per_session
from timesformer import TimeSformer, TimeSformerConfig


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict:
    pytest.importorskip("triton")

    def make(folder: Path) -> None:
        proc = subprocess.run([sys.executable, str(ROOT / "tests" / "triton_interpreted.py")], cwd=ROOT,
                              capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""})
        assert proc.returncode == 0, proc.stderr[-3000:]
        (folder / "results.json").write_text(proc.stdout.strip().splitlines()[-1])

    return json.loads((once_per_session(tmp_path_factory, "triton_interpreted", make) / "results.json").read_text())


def test_the_kernel_matches_float64_sdpa_forward_and_backward(interpreted):
    """Output, dq, dk and dv for L = 3..16 (padded to a power of two inside), head sizes 32..64 (48: padded), inputs
    that are strided views of one qkv projection, in float32, bfloat16 and float16."""
    bounds = {"torch.float32": 1e-6, "torch.float16": 1e-3, "torch.bfloat16": 1e-2}
    assert {case["dtype"] for case in interpreted["kernels"]} == set(bounds)
    for case in interpreted["kernels"]:
        assert case["out_dtype"] == case["dtype"]
        assert case["largest_reference_gradient"] > 0.1  # the gradients checked are not all ~0
        assert max(case["errors"]) < bounds[case["dtype"]], case
        # laid out as SDPA's outputs are, so that the model's reshape after attention is a view
        assert case["sdpa_layout"], case


def test_the_model_with_the_kernel_matches_the_model_without(interpreted):
    """Logits and every parameter gradient of a small model, with fused_short_attention on (the kernel, wherever
    a sequence has at most 16 tokens) and off (SDPA), against the model in float32 without the kernel."""
    models = {(m["attention_type"], m["autocast"], tuple(m["changes"])): m for m in interpreted["models"]}
    for attention_type in ("divided_space_time", "axial", "sparse_local_global"):
        case = models[(attention_type, False, ())]
        assert case["kernel_calls"] > 0 and case["kernel_dtypes"] == ["torch.float32"], case
        assert max(case["fused_errors"]) < 1e-5, case
    assert models[("joint_space_time", False, ())]["kernel_calls"] == 0  # one long sequence: nothing short
    plain = models[("divided_space_time", False, ("memory_saving_backward",))]
    assert plain["kernel_calls"] > 0 and max(plain["fused_errors"]) < 1e-5
    # Gradient checkpointing recomputes each block's forward in the backward pass, through the kernel again.
    checkpointed = models[("divided_space_time", False, ("gradient_checkpointing",))]
    assert checkpointed["kernel_calls"] == 2 * models[("divided_space_time", False, ())]["kernel_calls"]
    assert max(checkpointed["fused_errors"]) < 1e-5
    # Under bf16 autocast the kernel gets bf16 q, k and v; the result is within bf16 rounding of float32, as the
    # model without the kernel is.
    bf16 = models[("divided_space_time", True, ("bf16_residual_stream",))]
    assert bf16["kernel_dtypes"] == ["torch.bfloat16"]
    for fused, unfused in zip(bf16["fused_errors"], bf16["unfused_errors"], strict=True):
        assert 0 < fused < 2 * unfused, bf16


def test_every_launch_the_gpu_benchmark_tries_gives_the_default_launchs_results(interpreted):
    """benchmarks/gpu.py times the kernels at each of ``launch_candidates`` (rows per program, warps) so that a GPU
    run can choose the fastest: each must compute the same output and gradients, also where the rows do not fill
    the last program (15 and 21 rows; up to 16 rows per program) and for padded lengths and head sizes."""
    for case in interpreted["launches"]:
        assert case["default_is_a_candidate"], case
        assert len(case["max_differences"]) >= 3 and max(case["rows_per_program"]) >= 4, case
        assert case["largest_reference"] > 0.1, case
        assert max(case["max_differences"]) < 1e-6 * case["largest_reference"], case


def test_the_gpu_benchmarks_launch_sweep_runs_each_launch_and_marks_the_default(interpreted):
    """benchmarks/gpu.py's fused_launch section, run through the interpreter at its --quick sizes: the script a
    lent GPU runs (minutes of device time) must not fail there first."""
    rows = interpreted["benchmark"]
    for length in (8, 16):
        mine = [r for r in rows if r["length"] == length]
        assert len(mine) > 1 and sum(r["default"] for r in mine) == 1, mine
        for r in mine:
            assert r["forward_ms"] > 0 and r["backward_ms"] > 0 and r["backward_gb_per_s"] > 0, r
            assert r["max_diff_from_default"] < 1e-2, r  # bf16 outputs: the same, up to rounding


def test_fused_short_attention_without_triton_says_what_to_do(monkeypatch):
    import timesformer.model

    monkeypatch.setitem(sys.modules, "timesformer.model.triton_short_attention", None)  # import fails
    # ... also where another test imported it before: `from package import module` reads the package's attribute
    monkeypatch.delattr(timesformer.model, "triton_short_attention", raising=False)
    config = TimeSformerConfig(image_size=32, patch_size=16, num_frames=2, hidden_size=32, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=64, num_classes=3)
    TimeSformer(config)  # off by default: Triton not needed
    fused = dataclasses.replace(config, fused_short_attention=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ImportError, match="fused_short_attention=True needs Triton"):
        TimeSformer(fused)  # where the kernel would run, its absence is an error
    # Without CUDA it never runs: a checkpoint saved with it on loads and runs where Triton is missing.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with torch.no_grad():
        assert TimeSformer(fused).eval()(torch.randn(1, 2, 3, 32, 32)).shape == (1, 3)

"""The model on a CUDA GPU: bf16 autocast gradients, the SDPA kernels it reaches, torch.compile. Skipped without one.

Self-contained (no Hydra fixtures), so that a GPU machine without the data/config dependencies can run it:
``pytest --noconftest tests/test_cuda.py``.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from tests.test_benchmarks import _gradients, _reference, _unfold
from timesformer import TimeSformer, TimeSformerConfig
from timesformer.model import ATTENTION_TYPES
from timesformer.model import timesformer as tsf

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def model_and_video(attention_type: str, frames: int = 4, size: int = 64,
                    batch: int = 2) -> tuple[TimeSformer, torch.Tensor]:
    """A 2-block width-128 model; at batch 4 or more its extra attentions fold proj and <name>_fc (Block)."""
    torch.manual_seed(0)
    config = TimeSformerConfig(image_size=size, patch_size=16, num_frames=frames, hidden_size=128,
                               num_hidden_layers=2, num_attention_heads=2, intermediate_size=256, num_classes=5,
                               attention_type=attention_type)
    model = TimeSformer(config).cuda().train()
    with torch.no_grad():  # nothing zero (the *_fc projections start at zero)
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model, torch.randn(batch, frames, 3, size, size, device="cuda")


def relative_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return float((sum((a[n] - b[n]).float().square().sum() for n in b) / sum(b[n].square().sum() for n in b)).sqrt())


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
def test_bf16_autocast_gradients_match_autograd_on_cuda(attention_type, monkeypatch):
    model, video = model_and_video(attention_type, batch=4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ours = _gradients(model, video)
    exact = _gradients(model, video)  # float32
    _reference(monkeypatch)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        expected = _gradients(model, video)
    _unfold(monkeypatch, model)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        two_layers = _gradients(model, video)  # proj and <name>_fc as the two layers they are
    rounding = relative_error(two_layers, exact)
    assert all(g.dtype == torch.float32 for g in ours.values())
    assert 1e-4 < rounding < 3e-2
    assert relative_error(ours, expected) < 0.3 * rounding
    assert relative_error(ours, exact) < 1.5 * rounding


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
def test_bf16_residual_stream_trains_eagerly_on_cuda(attention_type):
    # CUDA's LayerNorm kernels refuse a bf16 input with float32 weights, which the memory-saving backward met with
    # bf16 tokens (eager only: torch.compile's kernels took it); the gradients stay within bf16 rounding.
    model, video = model_and_video(attention_type)
    stream = TimeSformer(dataclasses.replace(model.config, bf16_residual_stream=True)).cuda().train()
    stream.load_state_dict(model.state_dict())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ours = _gradients(stream, video)
        expected = _gradients(model, video)
    exact = _gradients(model, video)  # float32
    assert all(g.dtype == torch.float32 for g in ours.values())
    assert relative_error(ours, exact) < 2 * relative_error(expected, exact)


@pytest.mark.parametrize("attention_type", ["divided_space_time", "joint_space_time", "space_only"])
def test_unmasked_attention_runs_on_the_flash_kernel(attention_type):
    # sdpa_kernel(FLASH_ATTENTION) makes SDPA raise where flash cannot take the inputs (layout, dtype, mask): the
    # q, k, v views of the model must be ones it takes, forward and backward.
    model, video = model_and_video(attention_type)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autocast("cuda", dtype=torch.bfloat16):
        flash = _gradients(model, video)
    with sdpa_kernel(SDPBackend.MATH), torch.autocast("cuda", dtype=torch.bfloat16):
        math = _gradients(model, video)
    assert relative_error(flash, math) < 2e-2


def assert_compiled_training_step_matches_eager(model: TimeSformer, video: torch.Tensor) -> None:
    """bf16 autocast, cross-entropy: the same parameter gradients from torch.compile(model) as from model."""
    labels = torch.arange(len(video), device="cuda") % model.config.num_classes

    def gradients(run) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            F.cross_entropy(run(video), labels).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    eager = gradients(model)
    compiled = gradients(torch.compile(model))
    assert compiled.keys() == eager.keys()
    assert relative_error(compiled, eager) < 2e-2


@pytest.mark.parametrize("attention_type", ["divided_space_time", "joint_space_time"])
def test_torch_compile_training_step_matches_eager_on_cuda(attention_type):
    assert_compiled_training_step_matches_eager(*model_and_video(attention_type))


@pytest.mark.parametrize("attention_type", ["divided_space_time", "axial"])
def test_short_sequences_match_sdpa_on_cuda(attention_type, monkeypatch):
    # Divided's time and axial's time, width and height attentions are short: they run as matmuls and softmax.
    model, video = model_and_video(attention_type)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        short = _gradients(model, video)
    monkeypatch.setattr(tsf, "SHORT_SEQUENCE", 0)  # every attention through SDPA
    with torch.autocast("cuda", dtype=torch.bfloat16):
        sdpa = _gradients(model, video)
    assert relative_error(short, sdpa) < 2e-2


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
def test_the_shortcuts_match_the_model_as_written_on_cuda(attention_type, monkeypatch):
    # Folded projections and the class-token-only last block (its attention has one query per sequence, which
    # reaches other SDPA kernels than L queries do): same logits and gradients in float32 as without them.
    model, video = model_and_video(attention_type, batch=4)
    flops = []

    def logits() -> torch.Tensor:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            out = model(video)
        flops.append(counter.get_total_flops())
        return out

    ours, ours_grads = logits(), _gradients(model, video)
    _unfold(monkeypatch, model)
    torch.testing.assert_close(logits(), ours, rtol=1e-4, atol=1e-5)
    monkeypatch.setattr(model, "last_block_cls_only", False)
    torch.testing.assert_close(logits(), ours, rtol=1e-4, atol=1e-5)
    assert relative_error(ours_grads, _gradients(model, video)) < 1e-4
    if tsf.EXTRA_ATTENTIONS[attention_type]:
        assert flops[0] < flops[1]  # folded at this size
    assert flops[1] < flops[2]


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_the_optimizer_is_fused_on_cuda_and_steps_as_on_the_cpu(name):
    from timesformer.module import build_optimizer

    model, video = model_and_video("divided_space_time")
    on_cpu = TimeSformer(model.config)
    on_cpu.load_state_dict(model.state_dict())
    fused = build_optimizer(model, name, lr=0.01, weight_decay=0.05)
    plain = build_optimizer(on_cpu, name, lr=0.01, weight_decay=0.05)
    assert all(group["fused"] for group in fused.param_groups)
    assert not any(group["fused"] for group in plain.param_groups)  # PyTorch's default off the GPU
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(video), torch.tensor([1, 3], device="cuda")).backward()
        for param, twin in zip(model.parameters(), on_cpu.parameters(), strict=True):
            twin.grad = param.grad.cpu()
        fused.step()
        plain.step()
    for (name_, param), twin in zip(model.named_parameters(), on_cpu.parameters(), strict=True):
        torch.testing.assert_close(param.cpu(), twin, rtol=1e-5, atol=1e-6, msg=name_)


def with_fused_short_attention(model: TimeSformer) -> TimeSformer:
    fused = TimeSformer(dataclasses.replace(model.config, fused_short_attention=True)).cuda().train()
    fused.load_state_dict(model.state_dict())
    return fused


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("length", [8, 15, 16])
def test_the_fused_short_attention_kernel_matches_float64_sdpa_on_cuda(length, dtype):
    from timesformer.model.triton_short_attention import short_attention

    torch.manual_seed(0)
    S, H, d = 6272 // length, 12, 64  # many programs, the last one partly outside the rows
    qkv = torch.randn(S, length, 3 * H * d, device="cuda", dtype=dtype)
    q, k, v = (t.reshape(S, length, H, d).transpose(1, 2).detach().requires_grad_() for t in qkv.chunk(3, dim=-1))
    out = short_attention(q, k, v, d ** -0.5)
    grad = torch.randn_like(out)
    ours = dict(zip("oqkv", [out, *torch.autograd.grad(out, (q, k, v), grad)], strict=True))
    exact_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    exact_out = F.scaled_dot_product_attention(*exact_inputs)
    exact = dict(zip("oqkv", [exact_out, *torch.autograd.grad(exact_out, exact_inputs, grad.double())], strict=True))
    assert out.dtype == dtype and out.transpose(1, 2).is_contiguous()
    for name in "oqkv":
        error = relative_error({name: ours[name].double()}, {name: exact[name]})
        assert error < (1e-5 if dtype == torch.float32 else 1e-2), (name, error)


@pytest.mark.parametrize("attention_type", ["divided_space_time", "axial", "sparse_local_global"])
def test_fused_short_attention_matches_the_matmul_path_on_cuda(attention_type):
    # The model with the kernel against the model without (matmuls and softmax) in float32, and under bf16
    # autocast within bf16 rounding of float32; the kernel really ran (its op in the profile).
    model, video = model_and_video(attention_type, batch=4)
    fused = with_fused_short_attention(model)
    exact = _gradients(model, video)  # float32, the matmul path
    torch.testing.assert_close(fused(video), model(video), rtol=1e-4, atol=1e-5)
    assert relative_error(_gradients(fused, video), exact) < 1e-4
    with torch.autocast("cuda", dtype=torch.bfloat16):
        unfused_bf16 = _gradients(model, video)
        with torch.profiler.profile() as profile:
            fused_bf16 = _gradients(fused, video)
    assert any("short_attention" in event.name for event in profile.events())
    assert relative_error(fused_bf16, exact) < 2 * relative_error(unfused_bf16, exact)


def test_fused_short_attention_compiles_in_one_graph_and_matches_eager_on_cuda():
    model, video = model_and_video("divided_space_time")
    fused = with_fused_short_attention(model)
    explained = torch._dynamo.explain(fused)(video)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    assert_compiled_training_step_matches_eager(fused, video)

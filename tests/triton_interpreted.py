"""Runs the fused short-sequence attention kernel through Triton's interpreter on the CPU and prints what
tests/test_triton_short_attention.py asserts, as JSON. A script, not a test module: TRITON_INTERPRET must be set
before Triton is imported, so it runs in a process of its own."""

import os

os.environ["TRITON_INTERPRET"] = "1"

import dataclasses  # noqa: E402
import json  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.gpu import fused_launch_section  # noqa: E402
from timesformer import TimeSformer, TimeSformerConfig  # noqa: E402
from timesformer.model import triton_short_attention as fused  # noqa: E402


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours.double() - reference).norm() / reference.norm().clamp_min(1e-30)).item()


def kernel_against_float64_sdpa(S: int, H: int, L: int, d: int, dtype: torch.dtype) -> dict:
    """q, k, v as the model makes them: (S, H, L, d) views of one (S, L, 3·H·d) projection output."""
    qkv = torch.randn(S, L, 3 * H * d, dtype=dtype)
    q, k, v = (t.reshape(S, L, H, d).transpose(1, 2).detach().requires_grad_() for t in qkv.chunk(3, dim=-1))
    out = fused.short_attention(q, k, v, d ** -0.5)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    reference_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    reference = F.scaled_dot_product_attention(*reference_inputs)
    reference_grads = torch.autograd.grad(reference, reference_inputs, grad.double())
    return {"shape": [S, H, L, d], "dtype": str(dtype), "out_dtype": str(out.dtype),
            "sdpa_layout": out.transpose(1, 2).is_contiguous() and all(g.transpose(1, 2).is_contiguous()
                                                                        for g in grads),
            "errors": [relative_error(out, reference)] + [relative_error(g, r) for g, r in
                                                           zip(grads, reference_grads, strict=True)],
            "largest_reference_gradient": max(r.abs().max().item() for r in reference_grads)}


def launches_against_default(S: int, H: int, L: int, d: int) -> dict:
    """Forward and backward at every launch of ``launch_candidates`` (rows per program, warps; benchmarks/gpu.py
    times them to choose one), against the default launch: float32 (S, H, L, d) views of one qkv projection."""
    qkv = torch.randn(S, L, 3 * H * d)
    q, k, v = (t.reshape(S, L, H, d).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    grad = torch.randn(S, L, H, d).transpose(1, 2)

    def run(launch: dict) -> list[torch.Tensor]:
        return [fused.attention_forward(q, k, v, d ** -0.5, launch), *fused.attention_backward(grad, q, k, v,
                                                                                                d ** -0.5, launch)]

    default = fused.default_launch(L, d)
    reference = run(default)
    candidates = fused.launch_candidates(L, d)
    return {"shape": [S, H, L, d], "default_is_a_candidate": default in candidates,
            "rows_per_program": sorted({launch["ROWS"] for launch in candidates}),
            "largest_reference": max(r.abs().max().item() for r in reference),
            "max_differences": [max((r - ref).abs().max().item() for r, ref in zip(run(launch), reference,
                                                                                    strict=True))
                                for launch in candidates]}


def model_fused_against_unfused(attention_type: str, autocast: bool, **changes) -> dict:
    """Logits and parameter gradients of a small model with fused_short_attention on and off (off, on the CPU, the
    attention runs on SDPA), every parameter random (the zero-initialised <name>_fc too, so that the extra
    attentions reach the output)."""
    config = TimeSformerConfig(image_size=32, patch_size=8, num_frames=4, hidden_size=64, num_hidden_layers=2,
                               num_attention_heads=4, intermediate_size=128, num_classes=5,
                               attention_type=attention_type, **changes)
    unfused = TimeSformer(config).train()
    with torch.no_grad():
        for parameter in unfused.parameters():
            parameter.normal_(0, 0.1)
    fused_model = TimeSformer(dataclasses.replace(config, fused_short_attention=True)).train()
    fused_model.load_state_dict(unfused.state_dict())
    video = torch.randn(2, 4, 3, 32, 32)
    calls = []
    kernel = fused.short_attention

    def counted(*args):
        calls.append(args[0].dtype)
        return kernel(*args)

    def run(model: TimeSformer, autocast: bool) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(video)
        grads = torch.autograd.grad(logits.float().square().sum(), list(model.parameters()))
        return logits.detach(), torch.cat([g.flatten() for g in grads])

    reference = run(unfused, autocast=False)  # float32, SDPA
    unfused_result = run(unfused, autocast)
    fused.short_attention = counted
    try:
        fused_result = run(fused_model, autocast)
    finally:
        fused.short_attention = kernel

    def errors(result: tuple[torch.Tensor, torch.Tensor]) -> list[float]:  # logits, gradients against float32
        return [relative_error(ours, theirs.double()) for ours, theirs in zip(result, reference, strict=True)]

    return {"attention_type": attention_type, "autocast": autocast, "changes": {k: str(v) for k, v in changes.items()},
            "kernel_calls": len(calls), "kernel_dtypes": sorted({str(d) for d in calls}),
            "fused_errors": errors(fused_result), "unfused_errors": errors(unfused_result)}


def main() -> None:
    torch.manual_seed(0)
    kernels = [kernel_against_float64_sdpa(*case) for case in [
        (5, 3, 8, 64, torch.float32), (4, 2, 15, 32, torch.float32), (3, 2, 16, 64, torch.float32),
        (7, 3, 3, 48, torch.float32), (3, 2, 8, 64, torch.bfloat16), (3, 2, 16, 64, torch.float16)]]
    models = [model_fused_against_unfused(attention_type, autocast=False)
              for attention_type in ("divided_space_time", "axial", "sparse_local_global", "joint_space_time")]
    models += [model_fused_against_unfused("divided_space_time", autocast=False, memory_saving_backward=False),
               model_fused_against_unfused("divided_space_time", autocast=False, gradient_checkpointing=True),
               model_fused_against_unfused("divided_space_time", autocast=True, bf16_residual_stream=True)]
    launches = [launches_against_default(*shape) for shape in [(5, 3, 8, 64), (7, 3, 3, 48), (4, 2, 15, 32)]]
    benchmark = fused_launch_section(torch.device("cpu"), quick=True, steps=1)
    print(json.dumps({"kernels": kernels, "models": models, "launches": launches, "benchmark": benchmark}))


if __name__ == "__main__":
    main()

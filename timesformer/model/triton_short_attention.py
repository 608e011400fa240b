"""Attention over short sequences (at most ``SHORT_SEQUENCE`` tokens) as one Triton kernel per pass.

Why: TimeSformer's time attention at 8 frames is 75,264 sequences of 8 tokens per head and batch of 32 clips. On
an H200 the model's matmul + softmax path (``short_sequence_attention``) runs it as cuBLAS batched GEMMs of 8 × 64
matrices: ≥ 13.9 ms of a 110 ms compiled training step (benchmarks/RESULTS.md, part 4, run 6), where its memory
traffic (q, k, v, the output and their gradients: ~0.85 GB a block) needs ~0.18 ms. Here each program loads
the q, k and v of a few (sequence, head) rows once, keeps the L × L scores in registers, and writes the output
(forward) or the three gradients (backward, which recomputes the softmax from q and k): nothing but q, k and v is
kept for the backward pass.

The arithmetic is float32 whatever the inputs' dtype (the L × L products are broadcasts and sums: no tensor cores
needed at L ≤ 16). With ``TRITON_INTERPRET=1`` set before this module is imported, the kernels run on CPU tensors
through Triton's interpreter (the tests check them that way when no GPU is present).

``triton_op`` makes the kernels one custom operator to autograd and torch.compile (no graph break).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# Elements of one (rows, L, L, head_dim) broadcast a program holds: ~64 float32 registers a thread at 4 warps.
_BROADCAST_ELEMENTS = 8192


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether ``short_attention`` takes these (S, H, L, d) tensors: on CUDA (or CPU under the interpreter), one
    dtype, as many queries as keys."""
    return ((q.is_cuda or INTERPRETED) and q.dtype == k.dtype == v.dtype and q.shape == k.shape == v.shape
            and q.dtype in (torch.float32, torch.bfloat16, torch.float16))


def default_launch(length: int, head_dim: int) -> dict[str, int]:
    """The launch the ops use: rows per program and warps such that a program's (rows, L, L, d) broadcast holds
    ~64 float32 registers a thread (``launch_candidates`` lists the others that fit; ``benchmarks/gpu.py`` times
    them all on a GPU)."""
    block_l, block_d = triton.next_power_of_2(length), triton.next_power_of_2(head_dim)
    rows = max(1, _BROADCAST_ELEMENTS // (block_l * block_l * block_d))
    return {"ROWS": rows, "BLOCK_L": block_l, "BLOCK_D": block_d,
            "num_warps": 4 if rows * block_l * block_l * block_d <= _BROADCAST_ELEMENTS else 8}


def launch_candidates(length: int, head_dim: int) -> list[dict[str, int]]:
    """Every launch (rows per program in 1..16, warps in 1..8) whose (rows, L, L, d) broadcast takes 16 to 128
    float32 registers a thread: past 128 they spill, below 16 most threads idle. Each gives the same results."""
    block_l, block_d = triton.next_power_of_2(length), triton.next_power_of_2(head_dim)
    return [{"ROWS": rows, "BLOCK_L": block_l, "BLOCK_D": block_d, "num_warps": warps}
            for rows in (1, 2, 4, 8, 16) for warps in (1, 2, 4, 8)
            if 16 <= rows * block_l * block_l * block_d // (32 * warps) <= 128]


@triton.jit
def _tile_offsets(row, heads, stride_s, stride_h, stride_l, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """(ROWS, BLOCK_L, BLOCK_D) element offsets of rows = flattened (sequence, head) indices; unit stride along d."""
    seq, head = (row // heads).to(tl.int64), (row % heads).to(tl.int64)
    token, dim = tl.arange(0, BLOCK_L), tl.arange(0, BLOCK_D)
    return ((seq * stride_s + head * stride_h)[:, None, None] + (token * stride_l)[None, :, None]
            + dim[None, None, :])


@triton.jit
def _softmax_scores(q, k, length, scale, BLOCK_L: tl.constexpr):
    """softmax(scale · q kᵀ) over the keys, (ROWS, L, d) × 2 -> (ROWS, L, L) float32; padded keys get 0."""
    scores = tl.sum(q[:, :, None, :] * k[:, None, :, :], axis=3) * scale  # (ROWS, L queries, L keys)
    is_key = (tl.arange(0, BLOCK_L) < length)[None, None, :]
    scores = tl.where(is_key, scores, float("-inf"))
    weights = tl.exp(scores - tl.max(scores, axis=2)[:, :, None])
    return weights / tl.sum(weights, axis=2)[:, :, None]


@triton.jit
def _forward_kernel(q_ptr, k_ptr, v_ptr, out_ptr, rows, heads, length, head_dim, scale,
                    q_s, q_h, q_l, k_s, k_h, k_l, v_s, v_h, v_l, o_s, o_h, o_l,
                    ROWS: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    mask = ((row < rows)[:, None, None] & (tl.arange(0, BLOCK_L) < length)[None, :, None]
            & (tl.arange(0, BLOCK_D) < head_dim)[None, None, :])  # (ROWS, L, d)
    q = tl.load(q_ptr + _tile_offsets(row, heads, q_s, q_h, q_l, BLOCK_L, BLOCK_D), mask=mask, other=0.0)
    k = tl.load(k_ptr + _tile_offsets(row, heads, k_s, k_h, k_l, BLOCK_L, BLOCK_D), mask=mask, other=0.0)
    v = tl.load(v_ptr + _tile_offsets(row, heads, v_s, v_h, v_l, BLOCK_L, BLOCK_D), mask=mask, other=0.0)
    weights = _softmax_scores(q.to(tl.float32), k.to(tl.float32), length, scale, BLOCK_L)
    out = tl.sum(weights[:, :, :, None] * v.to(tl.float32)[:, None, :, :], axis=2)  # (ROWS, L, d)
    out_offsets = _tile_offsets(row, heads, o_s, o_h, o_l, BLOCK_L, BLOCK_D)
    tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(grad_ptr, q_ptr, k_ptr, v_ptr, dq_ptr, dk_ptr, dv_ptr, rows, heads, length, head_dim, scale,
                     g_s, g_h, g_l, q_s, q_h, q_l, k_s, k_h, k_l, v_s, v_h, v_l, d_s, d_h, d_l,
                     ROWS: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    # dq, dk and dv share one layout (d_s, d_h, d_l).
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    mask = ((row < rows)[:, None, None] & (tl.arange(0, BLOCK_L) < length)[None, :, None]
            & (tl.arange(0, BLOCK_D) < head_dim)[None, None, :])
    grad = tl.load(grad_ptr + _tile_offsets(row, heads, g_s, g_h, g_l, BLOCK_L, BLOCK_D), mask=mask,
                   other=0.0).to(tl.float32)
    q = tl.load(q_ptr + _tile_offsets(row, heads, q_s, q_h, q_l, BLOCK_L, BLOCK_D), mask=mask, other=0.0)
    k = tl.load(k_ptr + _tile_offsets(row, heads, k_s, k_h, k_l, BLOCK_L, BLOCK_D), mask=mask, other=0.0)
    v = tl.load(v_ptr + _tile_offsets(row, heads, v_s, v_h, v_l, BLOCK_L, BLOCK_D), mask=mask, other=0.0)
    q, k, v = q.to(tl.float32), k.to(tl.float32), v.to(tl.float32)
    weights = _softmax_scores(q, k, length, scale, BLOCK_L)  # P, (ROWS, L queries, L keys)
    # Padded query rows have a zero gradient, so they add nothing to dv, and their dP, hence dS, is zero.
    dv = tl.sum(weights[:, :, :, None] * grad[:, :, None, :], axis=1)  # Pᵀ dO, (ROWS, L keys, d)
    d_weights = tl.sum(grad[:, :, None, :] * v[:, None, :, :], axis=3)  # dP = dO vᵀ, (ROWS, L, L)
    d_scores = weights * (d_weights - tl.sum(weights * d_weights, axis=2)[:, :, None])  # dS = P ∘ (dP - rowsum)
    dq = tl.sum(d_scores[:, :, :, None] * k[:, None, :, :], axis=2) * scale  # dS k, (ROWS, L queries, d)
    dk = tl.sum(d_scores[:, :, :, None] * q[:, :, None, :], axis=1) * scale  # dSᵀ q, (ROWS, L keys, d)
    offsets = _tile_offsets(row, heads, d_s, d_h, d_l, BLOCK_L, BLOCK_D)
    tl.store(dq_ptr + offsets, dq.to(dq_ptr.dtype.element_ty), mask=mask)
    tl.store(dk_ptr + offsets, dk.to(dk_ptr.dtype.element_ty), mask=mask)
    tl.store(dv_ptr + offsets, dv.to(dv_ptr.dtype.element_ty), mask=mask)


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _like_sdpa_output(q: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """An empty contiguous (S, L, H, d) tensor, the layout SDPA's outputs have (the model's ``transpose(1, 2)
    .reshape(..., L, D)`` after attention is then a view), and its (sequence, head, token) strides for the
    kernels, which write it as (S, H, L, d)."""
    S, H, L, d = q.shape
    out = q.new_empty(S, L, H, d)
    return out, (out.stride(0), out.stride(2), out.stride(1))


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      launch: dict[str, int]) -> torch.Tensor:
    """The forward kernel with a given launch (``default_launch`` or one of ``launch_candidates``): (S, H, L, d)
    tensors in, (S, H, L, d) out, laid out as (S, L, H, d)."""
    q, k, v = (_unit_stride(t) for t in (q, k, v))
    S, H, L, d = q.shape
    out, out_strides = _like_sdpa_output(q)
    grid = (triton.cdiv(S * H, launch["ROWS"]),)
    wrap_triton(_forward_kernel)[grid](q, k, v, out, S * H, H, L, d, scale, *q.stride()[:3], *k.stride()[:3],
                                       *v.stride()[:3], *out_strides, **launch)
    return out.transpose(1, 2)  # (S, H, L, d)


def attention_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                       launch: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward kernel with a given launch: (dq, dk, dv), each (S, H, L, d) laid out as (S, L, H, d)."""
    grad, q, k, v = (_unit_stride(t) for t in (grad, q, k, v))
    S, H, L, d = q.shape
    (dq, strides), (dk, _), (dv, _) = _like_sdpa_output(q), _like_sdpa_output(q), _like_sdpa_output(q)
    grid = (triton.cdiv(S * H, launch["ROWS"]),)
    wrap_triton(_backward_kernel)[grid](grad, q, k, v, dq, dk, dv, S * H, H, L, d, scale, *grad.stride()[:3],
                                        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *strides, **launch)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


@triton_op("timesformer::short_attention", mutates_args=())
def short_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(scale · q kᵀ) v for (S, H, L, d) tensors of one dtype: ``F.scaled_dot_product_attention(q, k, v,
    scale=scale)`` for L ≤ 16 (any L runs; past 16 the registers spill). Returns (S, H, L, d) laid out as
    (S, L, H, d)."""
    return attention_forward(q, k, v, scale, default_launch(q.shape[2], q.shape[3]))


@triton_op("timesformer::short_attention_backward", mutates_args=())
def short_attention_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients (dq, dk, dv) of ``short_attention`` for the output's gradient ``grad``, each laid out as
    SDPA's gradients are ((S, H, L, d) as (S, L, H, d))."""
    return attention_backward(grad, q, k, v, scale, default_launch(q.shape[2], q.shape[3]))


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    q, k, v, scale = inputs
    ctx.save_for_backward(q, k, v)
    ctx.scale = scale


def _backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    q, k, v = ctx.saved_tensors
    return (*short_attention_backward(grad, q, k, v, ctx.scale), None)


short_attention.register_autograd(_backward, setup_context=_setup_context)

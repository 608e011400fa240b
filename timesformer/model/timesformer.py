"""TimeSformer (Bertasius et al., ICML 2021) in plain PyTorch.

Shape legend: B batch, T frames, N patches per frame (h·w), D hidden size, H heads.

Internally the patch tokens live as a (B, T, N, D) tensor and the class token as (B, 1, D). The original
code and Hugging Face keep one flat (B, 1 + N·T, D) sequence; attention is permutation-equivariant and
the embeddings are added with explicit shapes, so the outputs are the same (the parity tests check it),
while each attention type picks its sequences with a reshape (sparse local-global: ``group_tokens``).
The five attention schemes of the paper are described in ``Block``.
"""

from __future__ import annotations

import copy
import logging
import re
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from timesformer.model import weights
from timesformer.model.config import TimeSformerConfig

log = logging.getLogger(__name__)

# hidden_act -> (activation, its backward (grad of the output, the input) -> grad of the input, written into the
# gradient it is given)
_ACTIVATIONS = {
    "gelu": (F.gelu, lambda grad, x: torch.ops.aten.gelu_backward.grad_input(grad, x, grad_input=grad)),
    "gelu_tanh": (partial(F.gelu, approximate="tanh"), lambda grad, x: torch.ops.aten.gelu_backward.grad_input(
        grad, x, approximate="tanh", grad_input=grad)),
    "relu": (F.relu, lambda grad, x: torch.ops.aten.threshold_backward.grad_input(grad, x, 0, grad_input=grad)),
    "silu": (F.silu, lambda grad, x: torch.ops.aten.silu_backward.grad_input(grad, x, grad_input=grad)),
}


# -- memory: linear layers that recompute their input in the backward pass ------------------------------------
# A linear layer keeps its input for its weight gradient. Where that input is cheap to recompute from a tensor that
# is kept anyway, keeping only the latter saves a whole activation: a LayerNorm's output (recomputed from the
# norm's input) and the MLP's activation (4·D wide; recomputed from fc1's output). (The extra attentions' proj
# output is not kept either: proj and <name>_fc run as one linear map, ``Block.fold_projections``.) A divided block
# keeps 15 token-sized (T·N × D) tensors for its backward pass instead of 23 (Hugging Face's keeps ~26). The forward
# pass runs the same ops as the plain layers (same numbers); the backward computes the weight gradients first,
# so that the recomputed tensor is freed before the input gradient is allocated.
#
# Under autocast the forward's matmuls run in the autocast dtype (bfloat16), and autograd hands the backward
# gradients in that dtype; backward runs outside autocast, so it casts what it multiplies to the gradient's dtype
# itself and returns each parameter's gradient in the parameter's dtype, as autograd's own casts would.

def _cast(tensor: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return tensor.to(dtype) if tensor is not None else None


def _linear_param_grads(ctx: Any, grad_out: torch.Tensor, x: torch.Tensor, first: int,
                        param_dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Weight and bias gradients of F.linear(x, weight, bias), inputs ``first`` and ``first + 1`` of ``ctx``,
    computed in grad_out's dtype (x must have it) and returned in ``param_dtype``."""
    grad_out = grad_out.reshape(-1, grad_out.shape[-1])
    grad_weight = grad_out.t() @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[first] else None
    grad_bias = grad_out.sum(0) if ctx.needs_input_grad[first + 1] else None
    return _cast(grad_weight, param_dtype), _cast(grad_bias, param_dtype)


def _norm_input(x: torch.Tensor, norm_weight: torch.Tensor | None) -> torch.Tensor:
    """x in the dtype a LayerNorm of x with these weights computes in: the wider of the two."""
    return x.to(torch.promote_types(x.dtype, norm_weight.dtype)) if norm_weight is not None else x


class _LayerNormLinear(torch.autograd.Function):
    """linear(layer_norm(x)) keeping x, the per-token mean and 1/std: the norm is recomputed in the backward.

    The output comes as ``chunks`` tensors, the linear's output features cut in equal parts (attention's q, k and
    v), each computed by its own matmul: as separate tensors, their gradients come back from attention as they
    are, where the three parts of one tensor would have their gradients stacked (a copy).
    """

    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, weight, bias, eps, chunks):
        # The norm runs in float32 for a bf16 x and float32 weights, as nn.LayerNorm under autocast (CUDA's kernels
        # take one dtype); x is kept in its own dtype.
        y, mean, rstd = torch.native_layer_norm(_norm_input(x, norm_weight), (x.shape[-1],), norm_weight, norm_bias,
                                                eps)
        ctx.save_for_backward(x, norm_weight, norm_bias, weight, mean, rstd)
        ctx.eps, ctx.chunks = eps, chunks
        biases = bias.chunk(chunks) if bias is not None else (None,) * chunks
        return tuple(F.linear(y, w, b) for w, b in zip(weight.chunk(chunks), biases, strict=True))

    @staticmethod
    def backward(ctx, *grad_outs):
        x, norm_weight, norm_bias, weight, mean, rstd = ctx.saved_tensors
        grad_outs = [g.reshape(-1, g.shape[-1]) for g in grad_outs]
        dtype = grad_outs[0].dtype  # the forward matmuls' dtype (bfloat16 under autocast)
        norm_input = _norm_input(x, norm_weight)
        y = torch.native_layer_norm(norm_input, (x.shape[-1],), norm_weight, norm_bias, ctx.eps)[0]  # as in forward
        y = y.reshape(-1, y.shape[-1]).to(dtype)
        grad_weight = grad_bias = None
        if ctx.needs_input_grad[3]:
            grad_weight = weight.new_empty(weight.shape, dtype=dtype)
            for grad_out, part in zip(grad_outs, grad_weight.chunk(ctx.chunks), strict=True):
                torch.mm(grad_out.t(), y, out=part)
            grad_weight = grad_weight.to(weight.dtype)
        if ctx.needs_input_grad[4]:
            grad_bias = torch.cat([grad_out.sum(0) for grad_out in grad_outs]).to(weight.dtype)
        del y
        weights = weight.to(dtype).chunk(ctx.chunks)
        grad_y = grad_outs[0] @ weights[0]
        for grad_out, w in zip(grad_outs[1:], weights[1:], strict=True):
            grad_y.addmm_(grad_out, w)
        grad_x, grad_norm_weight, grad_norm_bias = torch.ops.aten.native_layer_norm_backward(
            grad_y.view(x.shape).to(norm_input.dtype), norm_input, (x.shape[-1],), mean, rstd, norm_weight,
            norm_bias, list(ctx.needs_input_grad[:3]))
        grad_x = grad_x.to(x.dtype) if grad_x is not None else None
        return grad_x, grad_norm_weight, grad_norm_bias, grad_weight, grad_bias, None, None


class _ActivationLinear(torch.autograd.Function):
    """linear(act(x)) keeping x: the activation is recomputed in the backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, act):
        ctx.save_for_backward(x, weight)
        ctx.act = act
        return F.linear(_ACTIVATIONS[act][0](x), weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        activation, activation_backward = _ACTIVATIONS[ctx.act]
        dtype = grad_out.dtype
        grad_weight, grad_bias = _linear_param_grads(ctx, grad_out, activation(x).to(dtype), 1, weight.dtype)
        return activation_backward((grad_out @ weight.to(dtype)).to(x.dtype), x), grad_weight, grad_bias, None


def _folded_linear(x: torch.Tensor, weight1: torch.Tensor, bias1: torch.Tensor, weight2: torch.Tensor,
                   bias2: torch.Tensor | None) -> torch.Tensor:
    """linear2(linear1(x)) as one linear layer: x·(W2·W1)ᵀ + W2·b1 (+ b2). Autograd keeps x and W2·W1.

    W2·W1 and W2·b1 are computed in the parameters' dtype even under autocast: the folded weight is then rounded to
    bf16 once, by the linear layer, where a bf16 product would add the rounding of W1, W2 and the product, an error
    shared by every token (in one test draw, 1.5x the two layers' gradient error under autocast; now within the
    spread of bf16 rounding over draws, tests/test_benchmarks.py).
    """
    with nullcontext() if x.device.type == "meta" else torch.autocast(x.device.type, enabled=False):
        weight = weight2 @ weight1
        bias = weight2 @ bias1 if bias2 is None else torch.addmv(bias2, weight2, bias1)
    return F.linear(x, weight, bias)


class _FoldedLinear(torch.autograd.Function):
    """``_folded_linear`` keeping x and the two weights (parameters, kept anyway): W2·W1 (D × D) is recomputed in the
    backward (a D × D × D matmul), where autograd would keep it: at batch 1 that is 3% of a block's memory."""

    @staticmethod
    def forward(ctx, x, weight1, bias1, weight2, bias2):
        ctx.save_for_backward(x, weight1, bias1, weight2)
        ctx.has_bias2 = bias2 is not None
        return _folded_linear(x, weight1, bias1, weight2, bias2)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight1, bias1, weight2 = ctx.saved_tensors
        dtype, need = grad_out.dtype, ctx.needs_input_grad  # dtype: the forward matmul's (bfloat16 under autocast)
        grad_out = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = (grad_out @ (weight2 @ weight1).to(dtype)).view(x.shape).to(x.dtype) if need[0] else None
        # the gradients of W2·W1 and of W2·b1 + b2, then through the products in the parameters' dtype, as autograd
        grad_weight = grad_bias = None
        if need[1] or need[3]:
            grad_weight = (grad_out.t() @ x.reshape(-1, x.shape[-1]).to(dtype)).to(weight1.dtype)
        if any(need[2:]):
            grad_bias = grad_out.sum(0).to(weight1.dtype)
        grad_weight1 = weight2.t() @ grad_weight if need[1] else None
        grad_bias1 = weight2.t() @ grad_bias if need[2] else None
        grad_weight2 = (grad_weight @ weight1.t()).addr_(grad_bias, bias1) if need[3] else None
        grad_bias2 = grad_bias if ctx.has_bias2 and need[4] else None
        return grad_x, grad_weight1, grad_bias1, grad_weight2, grad_bias2


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous (one copy, where a strided gradient would otherwise
    travel on and cost a copy in every linear layer's backward that it reaches)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def plain(*modules: nn.Module) -> bool:
    """Whether the modules are exactly ``nn.Linear`` / ``nn.LayerNorm`` without hooks: only then do the fused paths
    below read their weights directly. Anything else (a forward hook, a LoRA/PEFT wrapper, ``torch.nn.utils.prune``,
    a parametrization, a quantised layer) is called as the module it is, so that it takes effect."""
    return all(type(module) in (nn.Linear, nn.LayerNorm) and not (
        module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks)
        for module in modules)


def layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)``, in float32 for a bf16 x and float32 weights, as ``norm_linear`` computes it: CUDA's autocast
    runs nn.LayerNorm in float32, the CPU's in x's dtype (with the bf16 residual stream, 7x the gradient error)."""
    if not plain(norm):
        return norm(x)
    return F.layer_norm(_norm_input(x, norm.weight), norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def norm_linear(norm: nn.LayerNorm, linear: nn.Linear, x: torch.Tensor,
                chunks: int = 1) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """``linear(norm(x))``, keeping x rather than norm(x) for the backward pass; ``chunks`` > 1: the output
    features cut into that many separate tensors (``linear(norm(x)).chunk(chunks, -1)``, not views)."""
    if not plain(norm, linear):
        out = linear(norm(x))
        return out.chunk(chunks, dim=-1) if chunks > 1 else out
    out = _LayerNormLinear.apply(x, norm.weight, norm.bias, linear.weight, linear.bias, norm.eps, chunks)
    return out if chunks > 1 else out[0]


def resize_patch_position_embedding(patch_pos: torch.Tensor, old_grid: tuple[int, int],
                                    new_grid: tuple[int, int]) -> torch.Tensor:
    """(1, h0·w0, D) patch position embeddings of an h0 × w0 grid -> (1, h·w, D) for an h × w grid.

    Bicubic in 2-D, so a row of patches stays a row (the original's checkpoint loader interpolates the flattened
    sequence in 1-D, which scrambles rows). Used at run time for other resolutions, when loading weights for
    another image size and when initialising from an image ViT.
    """
    if old_grid == new_grid:
        return patch_pos
    D = patch_pos.shape[-1]
    grid = patch_pos.reshape(1, *old_grid, D).permute(0, 3, 1, 2)  # (1, D, h0, w0)
    grid = F.interpolate(grid.float(), size=new_grid, mode="bicubic", align_corners=False)  # (1, D, h, w)
    return grid.to(patch_pos.dtype).permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], D)


def resize_time_embedding(time_embed: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(1, T0, D) time embeddings -> (1, num_frames, D), linearly interpolated."""
    if time_embed.shape[1] == num_frames:
        return time_embed
    resized = F.interpolate(time_embed.float().transpose(1, 2), size=num_frames, mode="linear", align_corners=False)
    return resized.transpose(1, 2).to(time_embed.dtype)


def fit_embeddings(state: dict[str, torch.Tensor], config: TimeSformerConfig, source: str | Path
                   ) -> dict[str, torch.Tensor]:
    """A checkpoint's time and position embeddings resized to ``config.num_frames`` and ``config.image_size`` (a model
    fine-tuned at another clip length or resolution stores them at its own size, as the original's loader does,
    with the positions resized in 2-D); each resize is logged."""
    state = dict(state)
    time_embed = state.get("time_embed")
    if time_embed is not None and time_embed.shape[1] != config.num_frames:
        log.info("%s: time embedding resized from %d to %d frames", source, time_embed.shape[1], config.num_frames)
        state["time_embed"] = resize_time_embedding(time_embed, config.num_frames)
    pos_embed, grid = state.get("pos_embed"), config.image_size // config.patch_size
    if pos_embed is not None and pos_embed.shape[1] != grid * grid + 1:
        stored = int(round((pos_embed.shape[1] - 1) ** 0.5))
        log.info("%s: position embedding resized from %dx%d to %dx%d patches (%d px)", source, stored, stored, grid,
                 grid, config.image_size)
        patches = resize_patch_position_embedding(pos_embed[:, 1:], (stored, stored), (grid, grid))
        state["pos_embed"] = torch.cat([pos_embed[:, :1], patches], dim=1)
    return state


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch for a whole sample (dimension 0 = the video).

    The original code applies it to (B·N, T, D) and (B·T, N+1, D) tensors, i.e. per spatial position or
    per frame; we drop per video, which is what stochastic depth means (Huang et al., 2016).
    """

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def draw(self, x: torch.Tensor) -> torch.Tensor | None:
        """One keep (1) or drop (0) per sample of x, (B,) in x's dtype; None when nothing is dropped (eval, rate 0)."""
        if self.drop_prob == 0.0 or not self.training:
            return None
        return x.new_empty(x.shape[0]).bernoulli_(1.0 - self.drop_prob)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, ...) with whole samples dropped, the others scaled by 1/keep_prob. ``keep``: a ``draw`` to apply
        (one residual branch computed as several tensors, e.g. the MLP on the cls token and on the patches, must
        drop a video from all of them or none); drawn here if not given."""
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = self.draw(x) if keep is None else keep
        return x * keep.view(-1, *(1,) * (x.ndim - 1)) / (1.0 - self.drop_prob)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


# On a GPU, sequences this short (divided attention's time at 8 or 16 frames, axial's width and height at 224 px)
# run as plain matmuls and softmax: the fused SDPA kernels compute whole 64- or 128-query tiles, which for a
# sequence of 8 is mostly padding. H200, bf16, forward + backward of 50,176 tokens: at L = 8, 1.98 ms against 3.42
# (SDPA's default, cuDNN) and 2.82 (its best, mem-efficient); at L = 32 SDPA wins (1.15 against 1.30). A compiled
# base 8x224 training step takes 12% less time for it, an eager one 6% (benchmarks/RESULTS.md, part 4).
SHORT_SEQUENCE = 16


def _triton_short_attention() -> Any:
    """The module of the fused short-sequence kernel (imports Triton, so only when a config asks for it)."""
    try:
        from timesformer.model import triton_short_attention
    except ImportError as error:
        raise ImportError(f"fused_short_attention=True needs Triton ({error}); it comes with PyTorch's CUDA builds "
                          f"on Linux (pip install triton), or set fused_short_attention=False") from error
    return triton_short_attention


def short_sequence_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None,
                             dropout: float = 0.0) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=dropout)`` as matmuls and softmax:
    (S, H, L, d) -> (S, H, L, d), the softmax in float32 at least. ``key_mask`` (bool) is False at keys to ignore."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (S, H, L, L)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask, float("-inf"))
    weights = scores.softmax(-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(v.dtype)
    return F.dropout(weights, dropout) @ v if dropout > 0 else weights @ v


class Attention(nn.Module):
    """Multi-head self-attention over the second-to-last axis: (..., L, D) -> (..., L, D).

    ``forward(x, norm=...)`` computes attention(norm(x)) with the norm folded into the qkv projection
    (``norm_linear``), so that norm(x) is not kept for the backward pass.
    """

    def __init__(self, config: TimeSformerConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.attn_drop = config.attention_probs_dropout_prob
        self.proj_drop = nn.Dropout(config.hidden_dropout_prob)
        self.memory_saving = config.memory_saving_backward
        self.fused_short = config.fused_short_attention
        if self.fused_short:
            try:
                _triton_short_attention()  # fails here, with what to do, where Triton is missing...
            except ImportError:
                if torch.cuda.is_available():
                    raise
                self.fused_short = False  # ...but without CUDA the kernel never runs: load and run without it

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None, norm: nn.LayerNorm | None = None,
                project: bool = True, queries: torch.Tensor | None = None) -> torch.Tensor:
        """``key_mask`` (bool, broadcastable to (..., L)) is False at keys no query may attend to (padding).
        ``project=False`` returns the heads' outputs before ``proj`` (and its dropout).
        ``queries`` (..., Q, D): only these tokens ask, and the output is theirs, (..., Q, D); x still gives all the
        keys and values (the model's last block needs the class token's output only)."""
        *batch, length, dim = x.shape
        if queries is None:
            if norm is not None and self.memory_saving:
                q, k, v = norm_linear(norm, self.qkv, x, chunks=3)
            else:
                q, k, v = self.qkv(layer_norm(norm, x) if norm is not None else x).chunk(3, dim=-1)
        elif not plain(self.qkv, *([norm] if norm is not None else [])):  # called as modules: whole qkv outputs
            q = self.qkv(layer_norm(norm, queries) if norm is not None else queries)[..., :dim]
            k, v = self.qkv(layer_norm(norm, x) if norm is not None else x)[..., dim:].chunk(2, dim=-1)
        else:  # q from the queries, k and v from x: qkv's weight cut in its q and kv parts
            q_weight, kv_weight = self.qkv.weight.split([dim, 2 * dim])
            q_bias, kv_bias = self.qkv.bias.split([dim, 2 * dim]) if self.qkv.bias is not None else (None, None)
            if norm is not None and self.memory_saving:
                (q,) = _LayerNormLinear.apply(queries, norm.weight, norm.bias, q_weight, q_bias, norm.eps, 1)
                k, v = _LayerNormLinear.apply(x, norm.weight, norm.bias, kv_weight, kv_bias, norm.eps, 2)
            else:
                q = F.linear(layer_norm(norm, queries) if norm is not None else queries, q_weight, q_bias)
                k, v = F.linear(layer_norm(norm, x) if norm is not None else x, kv_weight, kv_bias).chunk(2, dim=-1)
        num_queries = q.shape[-2]
        # Each (S, H, L, head_dim), S = all sequences: views of (S, L, D) tensors, which is the layout SDPA's
        # output and its gradients for q, k and v have (no copies either way).
        q = q.reshape(-1, num_queries, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = (t.reshape(-1, length, self.num_heads, self.head_dim).transpose(1, 2) for t in (k, v))
        if key_mask is not None:
            key_mask = key_mask.expand(*batch, length).reshape(-1, 1, 1, length)  # (S, 1, 1, L): every head, query
        # Scale is head_dim ** -0.5, SDPA's default.
        dropout = self.attn_drop if self.training else 0.0
        if (length <= SHORT_SEQUENCE and self.fused_short and key_mask is None and dropout == 0
                and _triton_short_attention().supports(q, k, v)):
            x = _triton_short_attention().short_attention(q, k, v, self.head_dim ** -0.5)
        elif length <= SHORT_SEQUENCE and q.is_cuda:
            x = short_sequence_attention(q, k, v, key_mask, dropout)
        else:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=dropout)
        # SDPA's kernels and the fused short-sequence kernel return (S, H, Q, head_dim) laid out as
        # (S, Q, H, head_dim): this is a view (a copy after short_sequence_attention).
        x = x.transpose(1, 2).reshape(*batch, num_queries, dim)  # (..., Q, D), Q = L without queries
        return self.proj_drop(self.proj(x)) if project else x


class Mlp(nn.Module):
    def __init__(self, config: TimeSformerConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.hidden_act = config.hidden_act
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.drop = nn.Dropout(config.hidden_dropout_prob)
        self.memory_saving = config.memory_saving_backward

    def forward(self, x: torch.Tensor, norm: nn.LayerNorm | None = None) -> torch.Tensor:
        """mlp(norm(x)) when ``norm`` is given; with memory_saving_backward, keeps x and fc1's output (not the
        norm's or activation's)."""
        if norm is not None and self.memory_saving:
            x = norm_linear(norm, self.fc1, x)
        else:
            x = self.fc1(layer_norm(norm, x) if norm is not None else x)
        if not self.memory_saving or (self.drop.p > 0 and self.training) or not plain(self.fc2):  # no recomputation
            return self.drop(self.fc2(self.drop(_ACTIVATIONS[self.hidden_act][0](x))))
        return self.drop(_ActivationLinear.apply(x, self.fc2.weight, self.fc2.bias, self.hidden_act))

    def extra_repr(self) -> str:
        return f"act={self.hidden_act}"


class PatchEmbed(nn.Module):
    """Split every frame into patch_size × patch_size patches and project them to D."""

    def __init__(self, config: TimeSformerConfig) -> None:
        super().__init__()
        p = config.patch_size
        self.proj = nn.Conv2d(config.num_channels, config.hidden_size, kernel_size=p, stride=p)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """(B·T, C, H, W) -> (B·T, D, H/p, W/p)."""
        return self.proj(frames)


def group_tokens(grid: torch.Tensor, splits: tuple[int, int, int],
                 strided: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cut a (B, T, h, w, D) token grid into G = s_t·s_h·s_w groups: returns (B, G, L, D) and a key mask.

    ``splits`` (s_t, s_h, s_w) is the number of groups along each axis. strided=False: contiguous blocks (the
    first group of an axis of n tokens holds indices 0 .. n/s - 1); strided=True: every s-th token (group g
    holds indices g, g + s, g + 2s, ...). An axis that s does not divide is padded at its end; the key mask
    (1, G, L) is then False at the padding (None when there is none).
    """
    T, h, w = grid.shape[1:4]
    padded = _padded_sizes((T, h, w), splits)
    if padded == (T, h, w):
        return _partition(grid, splits, strided), None
    padding = (0, 0, 0, padded[2] - w, 0, padded[1] - h, 0, padded[0] - T)
    is_token = F.pad(grid.new_ones(1, T, h, w, 1), padding)
    key_mask = _partition(is_token, splits, strided)[..., 0] > 0  # (1, G, L)
    return _partition(F.pad(grid, padding), splits, strided), key_mask


def ungroup_tokens(groups: torch.Tensor, sizes: tuple[int, int, int], splits: tuple[int, int, int],
                   strided: bool) -> torch.Tensor:
    """Inverse of ``group_tokens``: (B, G, L, D) -> the (B, T, h, w, D) grid of ``sizes`` (T, h, w)."""
    B, _, _, D = groups.shape
    (T, h, w), (st, sh, sw) = sizes, splits
    pt, ph, pw = _padded_sizes(sizes, splits)
    grid = groups.reshape(B, st, sh, sw, pt // st, ph // sh, pw // sw, D)
    if strided:  # index = i·s + g
        grid = grid.permute(0, 4, 1, 5, 2, 6, 3, 7)  # (B, pt/st, st, ph/sh, sh, pw/sw, sw, D)
    else:  # index = g·(n/s) + i
        grid = grid.permute(0, 1, 4, 2, 5, 3, 6, 7)  # (B, st, pt/st, sh, ph/sh, sw, pw/sw, D)
    return grid.reshape(B, pt, ph, pw, D)[:, :T, :h, :w]


def _padded_sizes(sizes: tuple[int, int, int], splits: tuple[int, int, int]) -> tuple[int, int, int]:
    """Each size rounded up to a multiple of its split."""
    return tuple(-(-n // s) * s for n, s in zip(sizes, splits, strict=True))


def _partition(grid: torch.Tensor, splits: tuple[int, int, int], strided: bool) -> torch.Tensor:
    """(B, T, h, w, D) with sizes divisible by ``splits`` -> (B, G, L, D); see ``group_tokens``."""
    B, T, h, w, D = grid.shape
    st, sh, sw = splits
    if strided:
        grid = grid.reshape(B, T // st, st, h // sh, sh, w // sw, sw, D).permute(0, 2, 4, 6, 1, 3, 5, 7)
    else:
        grid = grid.reshape(B, st, T // st, sh, h // sh, sw, w // sw, D).permute(0, 1, 3, 5, 2, 4, 6, 7)
    return grid.reshape(B, st * sh * sw, -1, D)  # from (B, st, sh, sw, T/st, h/sh, w/sw, D)


# The attentions a block has besides the image ViT's (norm1 -> attn), by attention type, in the order they run.
# Each is <name>_norm1 -> <name>_attn -> <name>_fc, the last a D -> D projection initialised to zero (the
# original's temporal_fc) so that a new block starts as the image ViT block.
EXTRA_ATTENTIONS: dict[str, tuple[str, ...]] = {
    "divided_space_time": ("temporal",),
    "space_only": (),
    "joint_space_time": (),
    "sparse_local_global": ("local",),
    "axial": ("temporal", "width"),
}


class Block(nn.Module):
    """One TimeSformer block: attention, then MLP, each pre-norm with a residual (paper §3, Fig. 1).

    Takes and returns cls (B, 1, D) and patches (B, T, N, D), the N = h·w patches of each frame on an h × w
    ``grid``. The attention, by ``attention_type``:

    - divided_space_time (T+S): time (each position's T tokens), then space (each frame's N tokens).
    - joint_space_time (ST): one attention over all 1 + T·N tokens.
    - space_only (S): every frame on its own with its own cls token (cls is (B, T, 1, D)); no time until the
      model averages the frames after the last block.
    - sparse_local_global (L+G): local attention within windows of T × h/2 × w/2 patches (the paper's
      "F × H/2 × W/2 neighbouring patches", taken as 2 × 2 non-overlapping spatial windows spanning all frames),
      then sparse global attention over the whole clip with stride 2 along time, height and width (the strided
      pattern of Child et al., 2019): the tokens whose (t, y, x) have the same parities form one of 8 groups of
      T·N/8 tokens. Every window holds tokens of every parity (on a grid of 4 × 4 patches or more), so the two
      steps connect every pair of tokens, as joint attention does in one. An axis of odd size is padded to
      even (the padding is masked out as keys); an axis of one token is not split.
    - axial (T+W+H): time (each position's T tokens, as in divided), then width (each row of each frame:
      sequences of w tokens), then height (each column of each frame: sequences of h tokens).

    The cls token takes part only in the block's last attention, the one that has the image ViT's norm1/attn
    (space, global or height): a copy joins every sequence and the copies' outputs are averaged back to one
    cls, the original code's rule for divided attention. The other attentions (``EXTRA_ATTENTIONS``) each have
    their own norm, attention and zero-initialised output projection ``<name>_fc``.

    Parameters of base with a 400-class head: divided and L+G 121,566,352 (paper Table 1: 121.4M), axial
    157,020,304 (156.8M: one more attention with its projection, 2.95M a block, than divided). Every count of
    Table 1 (S/ST 85.9M, T+S and L+G 121.4M, T+W+H 156.8M) is ours without the cls/pos/time embeddings
    (0.158M) truncated to 0.1M, so the paper most likely left the embeddings out.
    """

    def __init__(self, config: TimeSformerConfig, drop_path: float) -> None:
        super().__init__()
        self.attention_type = config.attention_type
        dim, eps = config.hidden_size, config.layer_norm_eps
        for name in EXTRA_ATTENTIONS[self.attention_type]:  # temporal_norm1, temporal_attn, temporal_fc, ...
            self.add_module(f"{name}_norm1", nn.LayerNorm(dim, eps=eps))
            self.add_module(f"{name}_attn", Attention(config))
            self.add_module(f"{name}_fc", nn.Linear(dim, dim))  # zero-initialised (see EXTRA_ATTENTIONS)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(config)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(config)
        # The extra attentions' proj and <name>_fc, two D × D linear layers in a row, run as one (``_folded_linear``):
        # their weights multiplied (D × D × D multiply-adds per call, in float32), then one token-sized matmul instead
        # of two in the forward and two instead of four in the backward (five with memory_saving_backward, which
        # recomputed proj's output). Same function and gradients up to rounding; the parameters stay the two layers.
        # A base 8x224 training step (batch 32) does 6% fewer multiply-adds with divided attention, 10% with axial;
        # on the CPU at batch 1 a divided block's training step takes 3.5-5% less time (benchmarks/run.py, "ours as
        # written"). False runs the two layers as the architecture writes them (``TimeSformer.use_shortcuts``):
        # count_flops counts those (the model's FLOPs, as Hugging Face's).
        self.fold_projections = True

    def forward(self, cls: torch.Tensor, patches: torch.Tensor, grid: tuple[int, int],
                cls_only: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``cls_only``: compute the class token's output only and return None for the patches (the model's last
        block, whose patch tokens reach nothing): the patches' attention queries, projection and MLP are skipped."""
        B, T, N, D = patches.shape
        if self.attention_type == "divided_space_time":
            # Position-major, (B, N, T, D): the temporal attention's sequences and the MLP's tokens are then
            # contiguous. TimeSformer.embed stores divided patches in this order, so the transposes are views.
            cls, per_position = self._divided_attention(cls, patches.transpose(1, 2), cls_only)
            if cls_only:
                return self._mlp(cls)[0], None
            cls, per_position = self._mlp(cls, per_position)
            return cls, per_position.transpose(1, 2)
        if self.attention_type in ("joint_space_time", "space_only"):
            if self.attention_type == "joint_space_time":  # one sequence of all tokens: (B, 1 + T·N, D)
                tokens = torch.cat([cls, patches.reshape(B, T * N, D)], dim=1)
            else:  # space_only: every frame is its own sequence with its own cls token: (B, T, 1 + N, D)
                tokens = torch.cat([cls, patches], dim=2)
            if cls_only:
                cls = cls + self.drop_path(self.attn(tokens, norm=self.norm1, queries=cls))
                return self._mlp(cls)[0], None
            (tokens,) = self._mlp(tokens + self.drop_path(self.attn(tokens, norm=self.norm1)))
            cls, patches = tokens.split([1, tokens.shape[-2] - 1], dim=-2)
            return cls, patches.reshape(B, T, N, D)
        if self.attention_type == "sparse_local_global":
            cls, patches = self._sparse_local_global_attention(cls, patches, grid, cls_only)
        else:
            cls, patches = self._axial_attention(cls, patches, grid, cls_only)
        if cls_only:
            return self._mlp(cls)[0], None
        cls, patches = self._mlp(cls, patches)
        return cls, patches

    def _mlp(self, *parts: torch.Tensor) -> list[torch.Tensor]:
        """The MLP half of the block, x + mlp(norm2(x)) (token-wise), on each part of the tokens: (B, ..., D) tensors,
        e.g. the cls token and the patches where they are kept apart. One residual branch, so one stochastic-depth
        draw per video for all parts (drawn apart, a video could keep its cls token's MLP and lose its patches')."""
        keep = self.drop_path.draw(parts[0])
        return [x + self.drop_path(self.mlp(x, norm=self.norm2), keep) for x in parts]

    def _extra_attention(self, name: str, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The residual branch <name>_fc(drop_path(<name>_attn(<name>_norm1(x)))) of an ``EXTRA_ATTENTIONS`` entry.

        As in the original, drop_path comes before the zero-initialised <name>_fc. Without the attention's output
        dropout, the attention's proj and <name>_fc are one linear map, run as one matmul (``fold_projections``).
        """
        attn, fc = getattr(self, f"{name}_attn"), getattr(self, f"{name}_fc")
        x = attn(x, key_mask, norm=getattr(self, f"{name}_norm1"), project=False)  # (..., L, D), before attn.proj
        proj = attn.proj
        # Folding costs 4 D³ multiply-adds (the product, its recomputation and two in the backward) and saves 3 M·D²
        # for M tokens: it pays from M > 4/3 D (1,024 tokens at base width; a base 8x224 clip has 1,568).
        tokens, dim = x.numel() // x.shape[-1], x.shape[-1]
        if (not self.fold_projections or 3 * tokens <= 4 * dim or (self.training and attn.proj_drop.p > 0)
                or not plain(proj, fc)):
            return fc(self.drop_path(attn.proj_drop(proj(x))))
        # drop_path scales whole samples, which commutes with fc's weight but not with its bias: when it drops, b_fc
        # is added after it.
        dropping = self.drop_path.drop_prob > 0 and self.training
        fold = _FoldedLinear.apply if attn.memory_saving else _folded_linear
        out = fold(x, proj.weight, proj.bias, fc.weight, None if dropping else fc.bias)
        return self.drop_path(out) + fc.bias.to(out.dtype) if dropping else out

    def _temporal_attention(self, patches: torch.Tensor) -> torch.Tensor:
        """One sequence of T tokens per spatial position, cls excluded: (B, T, N, D) -> (B, T, N, D)."""
        temporal = self._extra_attention("temporal", patches.transpose(1, 2))  # (B, N, T, D)
        return patches + temporal.transpose(1, 2)

    def _attention_with_cls(self, cls: torch.Tensor, sequences: torch.Tensor, key_mask: torch.Tensor | None = None,
                            cls_only: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """norm1 -> attn over sequences (B, *groups, L, D), a copy of cls (B, 1, D) prepended to each.

        Returns the new cls (B, 1, D), its copies' outputs averaged, and the sequences' residual branch
        (B, *groups, L, D); None with ``cls_only`` (only the cls copies ask). ``key_mask`` (1, *groups, L), if
        given, marks the real (not padding) tokens.
        """
        B, D = cls.shape[0], cls.shape[-1]
        num_group_dims = sequences.ndim - 3
        cls_copies = cls.reshape(B, *(1,) * num_group_dims, 1, D).expand(*sequences.shape[:-2], 1, D)
        tokens = torch.cat([cls_copies, sequences], dim=-2)  # (B, *groups, 1 + L, D)
        if key_mask is not None:
            key_mask = torch.cat([key_mask.new_ones(*key_mask.shape[:-1], 1), key_mask], dim=-1)
        if cls_only:
            cls_out = self.drop_path(self.attn(tokens, key_mask, norm=self.norm1, queries=cls_copies))
            out = None
        else:
            out = self.drop_path(self.attn(tokens, key_mask, norm=self.norm1))  # (B, *groups, 1 + L, D)
            # split (its backward is one concatenation), not out[..., 0, :] and out[..., 1:, :] (two zero-filled
            # full-size gradients, added)
            cls_out, out = out.split([1, out.shape[-2] - 1], dim=-2)
        cls = cls + cls_out.reshape(B, -1, D).mean(dim=1, keepdim=True)  # the copies averaged: (B, 1, D)
        return cls, out

    def _divided_attention(self, cls: torch.Tensor, per_position: torch.Tensor,
                           cls_only: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Time, then space, on position-major patches (B, N, T, D); returns cls and patches (B, N, T, D)."""
        per_position = per_position + self._extra_attention("temporal", per_position)  # sequences of T tokens
        # Space: one sequence per frame, the cls token prepended to each (the concatenation makes frames contiguous;
        # its gradient comes back frame-major: made position-major once, here).
        cls, spatial = self._attention_with_cls(cls, _ContiguousGrad.apply(per_position).transpose(1, 2),
                                                cls_only=cls_only)
        return cls, None if cls_only else per_position + spatial.transpose(1, 2)

    def _sparse_local_global_attention(self, cls: torch.Tensor, patches: torch.Tensor, grid: tuple[int, int],
                                       cls_only: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T, N, D = patches.shape
        h, w = grid
        # 1. Local: 2 × 2 windows of T × h/2 × w/2 patches, cls excluded.
        windows = (1, min(h, 2), min(w, 2))
        local, key_mask = group_tokens(patches.reshape(B, T, h, w, D), windows, strided=False)
        local = self._extra_attention("local", local, key_mask)  # (B, 4, T·N/4, D); padding: masked keys
        patches = patches + ungroup_tokens(local, (T, h, w), windows, strided=False).reshape(B, T, N, D)
        # 2. Global, stride 2 along t, y and x: 8 groups of T·N/8 tokens, cls joins each.
        strides = (min(T, 2), min(h, 2), min(w, 2))
        sparse, key_mask = group_tokens(patches.reshape(B, T, h, w, D), strides, strided=True)  # (B, 8, T·N/8, D)
        cls, sparse = self._attention_with_cls(cls, sparse, key_mask, cls_only)
        if cls_only:
            return cls, None
        patches = patches + ungroup_tokens(sparse, (T, h, w), strides, strided=True).reshape(B, T, N, D)
        return cls, patches

    def _axial_attention(self, cls: torch.Tensor, patches: torch.Tensor, grid: tuple[int, int],
                         cls_only: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T, N, D = patches.shape
        h, w = grid
        patches = self._temporal_attention(patches)
        # Width: one sequence per row of each frame, cls excluded.
        rows = patches.reshape(B, T, h, w, D)
        width = self._extra_attention("width", rows)  # (B, T, h, w, D)
        patches = patches + width.reshape(B, T, N, D)
        # Height: one sequence per column of each frame, the cls token prepended to each.
        columns = patches.reshape(B, T, h, w, D).transpose(2, 3)  # (B, T, w, h, D)
        cls, height = self._attention_with_cls(cls, columns, cls_only=cls_only)
        if cls_only:
            return cls, None
        patches = patches + height.transpose(2, 3).reshape(B, T, N, D)
        return cls, patches


def class_key(name: str) -> str:
    """A class name as checkpoints and datasets are matched by: without brackets, spaces collapsed, any case.
    Something-Something v2's classes are templates that Hugging Face's label files keep the brackets of
    ("Approaching [something] with your camera") and its labels.json does not: every name differed, and a released
    SSv2 model loaded for data=ssv2 lost its trained head."""
    return " ".join(str(name).replace("[", " ").replace("]", " ").split()).casefold()


class TimeSformer(nn.Module):
    """TimeSformer video classifier.

    ``forward(pixel_values)`` takes (B, T, C, H, W) and returns logits (B, num_classes). T, H and W are read
    from the input: when they differ from ``config.num_frames`` / ``config.image_size`` the time embedding is
    interpolated linearly and the position embedding bicubically in 2-D (the original code and Hugging Face resize
    by nearest neighbour at run time, and Hugging Face's layers reshape with the config's sizes: wrong results
    for another frame count).
    """

    def __init__(self, config: TimeSformerConfig) -> None:
        super().__init__()
        self.config = copy.deepcopy(config)  # reset_head changes it: a config shared with other models must not change
        D = config.hidden_size
        self.patch_embed = PatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches + 1, D))  # cls first, then the h×w grid
        if config.attention_type != "space_only":  # space_only has no notion of time until the final average
            self.time_embed = nn.Parameter(torch.zeros(1, config.num_frames, D))
        self.pos_drop = nn.Dropout(config.hidden_dropout_prob)
        self.time_drop = nn.Dropout(config.hidden_dropout_prob)
        depth = config.num_hidden_layers
        drop_path_rates = [config.drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # 0 -> rate
        self.blocks = nn.ModuleList(Block(config, rate) for rate in drop_path_rates)
        self.norm = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.head = nn.Linear(D, config.num_classes)
        self._logged_resizes: set[tuple[int, int, int]] = set()
        # Only the class token reaches the head, so the last block computes nothing else (its patches' attention
        # queries, projection and MLP): 5% of a base 8x224 forward pass, 2.5% of a training step, whose backward never
        # ran through them. False computes them, as the architecture is written: count_flops does (the model's
        # FLOPs, as Hugging Face's).
        self.last_block_cls_only = True
        self.init_weights()

    # ----------------------------------------------------------------------------------------------------
    def init_weights(self) -> None:
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.pos_embed, std=std)
        nn.init.trunc_normal_(self.cls_token, std=std)
        for block in self.blocks:
            for name in EXTRA_ATTENTIONS[self.config.attention_type]:
                nn.init.zeros_(getattr(block, f"{name}_fc").weight)
                nn.init.zeros_(getattr(block, f"{name}_fc").bias)

    def reset_head(self, num_classes: int, class_names: list[str] | None = None) -> None:
        """Replace the classifier with a freshly initialised one (fine-tuning on another label set)."""
        self.head = nn.Linear(self.config.hidden_size, num_classes).to(self.head.weight)
        nn.init.trunc_normal_(self.head.weight, std=self.config.initializer_range)
        nn.init.zeros_(self.head.bias)
        self.config.num_classes = num_classes
        self.config.class_names = class_names

    # ----------------------------------------------------------------------------------------------------
    def _position_embedding(self, grid_h: int, grid_w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (cls position (1, 1, D), patch positions (1, h·w, D)) for a grid_h × grid_w patch grid."""
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        stored = self.config.image_size // self.config.patch_size
        return cls_pos, resize_patch_position_embedding(patch_pos, (stored, stored), (grid_h, grid_w))

    def _time_embedding(self, num_frames: int) -> torch.Tensor:
        """(1, T, D) time embedding for T frames."""
        return resize_time_embedding(self.time_embed, num_frames)

    def _log_resize_once(self, T: int, H: int, W: int) -> None:
        if (T, H, W) == (self.config.num_frames, self.config.image_size, self.config.image_size):
            return
        if (T, H, W) not in self._logged_resizes:
            self._logged_resizes.add((T, H, W))
            log.info(
                "TimeSformer built for %d frames at %d px got %d frames at %dx%d px: interpolating the %s",
                self.config.num_frames, self.config.image_size, T, H, W,
                "time and 2-D position embeddings" if self.config.attention_type != "space_only"
                else "2-D position embedding",
            )

    def embed(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, C, H, W) -> cls (B, 1, D) and patch tokens (B, T, N, D), embeddings added."""
        if pixel_values.ndim != 5:
            raise ValueError(f"expected pixel_values of shape (B, T, C, H, W), got {tuple(pixel_values.shape)}")
        if not pixel_values.is_floating_point():
            raise TypeError(f"expected normalised float pixel_values, got {pixel_values.dtype}: clips from "
                            "timesformer.data are uint8 until timesformer.data.normalize (VideoDataModule runs it "
                            "after moving a batch to the device)")
        B, T, C, H, W = pixel_values.shape
        p = self.config.patch_size
        if C != self.config.num_channels or H % p or W % p:
            raise ValueError(
                f"input {tuple(pixel_values.shape)} does not fit the model: expected {self.config.num_channels} "
                f"channels and a height/width divisible by patch_size={p}"
            )
        self._log_resize_once(T, H, W)
        patches = self.patch_embed(pixel_values.reshape(B * T, C, H, W))  # (B·T, D, h, w)
        grid_h, grid_w = patches.shape[-2:]
        patches = patches.flatten(2).transpose(1, 2)  # (B·T, N, D)
        cls_pos, patch_pos = self._position_embedding(grid_h, grid_w)
        cls_token = self.cls_token
        time_embed = self._time_embedding(T) if self.config.attention_type != "space_only" else None
        if self.config.bf16_residual_stream and patches.dtype == torch.bfloat16:  # bf16 autocast ran the conv
            # float32 embeddings would promote the tokens, and with them every block's residual adds, to float32
            cls_pos, patch_pos, cls_token = cls_pos.bfloat16(), patch_pos.bfloat16(), cls_token.bfloat16()
            time_embed = time_embed.bfloat16() if time_embed is not None else None
        # Dropout as the original and HF: after the position embedding, and again after the time embedding.
        patches = self.pos_drop(patches + patch_pos).reshape(B, T, grid_h * grid_w, -1)  # (B, T, N, D)
        cls = self.pos_drop((cls_token + cls_pos).expand(B, -1, -1))  # (B, 1, D)
        if time_embed is None:  # space_only
            cls = cls.unsqueeze(1).expand(B, T, 1, -1)  # one cls per frame: (B, T, 1, D)
        else:
            patches = self.time_drop(patches + time_embed.unsqueeze(2))  # time embedding on patches only
        if self.config.attention_type == "divided_space_time":  # stored position-major: see Block.forward
            patches = patches.transpose(1, 2).contiguous().transpose(1, 2)
        return cls, patches

    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, T, C, H, W) -> pooled embedding (B, D): the final-normed cls token."""
        cls, patches = self.embed(pixel_values)
        p = self.config.patch_size
        grid = (pixel_values.shape[-2] // p, pixel_values.shape[-1] // p)  # (h, w) patches per frame
        for i, block in enumerate(self.blocks):
            cls_only = self.last_block_cls_only and i == len(self.blocks) - 1
            if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
                cls, patches = checkpoint(block, cls, patches, grid, cls_only, use_reentrant=False)
            else:
                cls, patches = block(cls, patches, grid, cls_only)
        if self.config.attention_type == "space_only":
            # (B, T, 1, D) -> (B, 1, D): average the per-frame cls tokens, then the final norm (as the original;
            # HF returns per-frame logits instead).
            cls = cls.mean(dim=1)
        return layer_norm(self.norm, cls[:, 0])

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, T, C, H, W) -> logits (B, num_classes)."""
        return self.head(self.forward_features(pixel_values))

    def use_shortcuts(self, enabled: bool = True) -> TimeSformer:
        """Turn on or off the two ways the model skips work without changing its function: the extra attentions'
        folded projections (``Block.fold_projections``) and the class-token-only last block
        (``last_block_cls_only``). Off, the model computes what the architecture writes (FLOP counts, A/B runs)."""
        self.last_block_cls_only = enabled
        for block in self.blocks:
            block.fold_projections = enabled
        return self

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- loading and saving (local files only) -------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, num_classes: int | None = None,
                        class_names: list[str] | None = None, **overrides: Any) -> TimeSformer:
        """Load a Hugging Face folder, an original ``*.pyth`` or a Lightning checkpoint from ``train.py``.

        The format is detected; weights load strictly (any tensor that cannot be placed is an error).
        ``num_classes`` different from the checkpoint's replaces the head with a new one (logged). ``class_names``
        (the classes the model is for, in order) are matched by name with the checkpoint's when it has names: the
        same classes in another order reorder the head's rows; other classes get a new head (logged), in which the
        classes both name keep their trained rows. Other
        keyword arguments set config fields: ``num_frames`` and ``image_size`` resize the stored embeddings (logged),
        architecture fields must be the checkpoint's (an error names those that are not), except
        ``num_attention_heads`` for formats that do not store it (a ``*.pyth``); dropout, stochastic depth and
        memory options are free.
        """
        config, state = weights.read_checkpoint(Path(path), **overrides)
        state = fit_embeddings(state, config, path)
        replace_head = num_classes is not None and num_classes != config.num_classes
        if class_names is not None and not replace_head and config.class_names and "head.weight" in state:
            saved, wanted = [class_key(name) for name in config.class_names], [class_key(name) for name in class_names]
            if sorted(saved) == sorted(wanted) and len(set(saved)) == len(saved):
                if saved != wanted:  # the same classes, numbered otherwise: the head's rows follow the names
                    order = torch.tensor([saved.index(name) for name in wanted])
                    state = {**state, "head.weight": state["head.weight"][order],
                             "head.bias": state["head.bias"][order]}
                    log.info("%s: head rows reordered to the given class order", path)
            elif wanted != [str(i) for i in range(len(wanted))]:  # (unnamed classes, "0".."N-1", keep the order)
                new_name = next((class_names[row] for row, name in enumerate(wanted) if name not in saved), None)
                log.warning("%s: its %d classes are not the %d given (e.g. %r): the head is new", path, len(saved),
                            len(wanted), new_name or class_names[0])
                replace_head, num_classes = True, len(wanted)
        if "head.weight" not in state:  # a backbone (Hugging Face's TimesformerModel): the head is new
            log.warning("%s has no classifier: the %d-class head is new and random (features are unaffected; "
                        "train the head before predicting classes)", path, num_classes or config.num_classes)
            replace_head, num_classes = True, num_classes or config.num_classes
        elif replace_head:
            log.info("%s: replacing the %d-class head by a new %d-class head", path, config.num_classes, num_classes)
        # A new head for another label set keeps the trained rows of the classes both name (Kinetics-400 -> 600: 400
        # of its 600 rows), the others start random: new head row -> the checkpoint's
        kept_rows: dict[int, int] = {}
        if replace_head and class_names is not None and config.class_names and "head.weight" in state:
            saved = [class_key(name) for name in config.class_names]
            kept_rows = {row: saved.index(class_key(name)) for row, name in enumerate(class_names)
                         if class_key(name) in saved}
        trained_head = (state["head.weight"], state["head.bias"]) if kept_rows else None
        if replace_head:
            state = {k: v for k, v in state.items() if not k.startswith("head.")}
            config.num_classes, config.class_names = num_classes, class_names
        elif class_names is not None:
            config.class_names = class_names
        config.validate()
        model = cls(config)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if replace_head:
            missing = [k for k in missing if not k.startswith("head.")]
        if missing or unexpected:
            raise RuntimeError(
                f"{path}: weights do not fit a {config.attention_type} TimeSformer of this size: "
                f"missing {missing[:10]}{' ...' if len(missing) > 10 else ''}, "
                f"unexpected {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}"
            )
        if trained_head is not None:
            rows, sources = torch.tensor(list(kept_rows)), torch.tensor(list(kept_rows.values()))
            with torch.no_grad():
                model.head.weight[rows] = trained_head[0][sources].to(model.head.weight)
                model.head.bias[rows] = trained_head[1][sources].to(model.head.bias)
            log.info("%s: %d of the %d classes keep their trained head rows (matched by name); %d are new", path,
                     len(kept_rows), config.num_classes, config.num_classes - len(kept_rows))
        return model

    @classmethod
    def from_image_vit(cls, path: str | Path, **config_fields: Any) -> TimeSformer:
        """Initialise from an image ViT's state dict in timm's ``VisionTransformer`` names (the paper's init).

        The architecture (width, depth, patch size, MLP size, qkv bias, resolution, classes) is read off the
        tensors; ``config_fields`` set the rest or override it: ``num_frames`` (default 8), ``attention_type``
        (default divided_space_time), ``num_attention_heads`` (default the released ViTs' for the width: heads of
        64, 16 heads from ViT-H's 1280 up; heads are not visible in the shapes, so other widths must give it, and
        another count for a released width is logged as a warning), ``image_size``, ``num_classes``,
        ``drop_path_rate``, ...

        - Spatial weights are copied: patch embedding, cls token, each block's norm1/attn/norm2/mlp, final norm.
        - Each extra attention of a block (e.g. the temporal one of divided attention) starts as a copy of the
          block's ``attn`` and ``norm1``; its ``*_fc`` projection stays zero and ``time_embed`` zero, so a divided
          model gives the image ViT's output on a clip of identical frames.
        - ``pos_embed`` is resized in 2-D when ``image_size`` differs from the ViT's.
        - The head is kept when the class count matches, otherwise a new one is initialised (logged).

        Tensors in the file with no place here (timm's layer scale, ``fc_norm``, extra blocks, wrong shapes) are
        logged by name; a parameter the file should provide but does not is an error.
        """
        vit = weights.read_image_vit(Path(path))
        heads = {k: v for k, v in config_fields.items() if k == "num_attention_heads"}  # not in the shapes
        weights._check_architecture(Path(path), weights.infer_config_from_state(vit, path, **heads), config_fields,
                                    unseen=(*weights.NOT_IN_THE_SHAPES, "attention_type"), kind="an image ViT")
        config = weights.infer_config_from_state(vit, path, **{"attention_type": "divided_space_time", **config_fields})
        model = cls(config)
        ours = model.state_dict()

        vit_grid = int(round((vit["pos_embed"].shape[1] - 1) ** 0.5))
        grid = config.image_size // config.patch_size
        if vit_grid != grid:
            log.info("%s: resizing pos_embed from %dx%d to %dx%d patches (2-D bicubic)", path, vit_grid, vit_grid,
                     grid, grid)
        keep_head = "head.weight" in vit and vit["head.weight"].shape[0] == config.num_classes
        if not keep_head:
            log.info("%s: %s; new %d-class head", path,
                     f"dropping the {vit['head.weight'].shape[0]}-class head" if "head.weight" in vit else "no head",
                     config.num_classes)

        state: dict[str, torch.Tensor] = {}
        unplaced: list[str] = []
        for name, tensor in vit.items():
            if name == "pos_embed":
                patch_pos = resize_patch_position_embedding(tensor[:, 1:], (vit_grid, vit_grid), (grid, grid))
                tensor = torch.cat([tensor[:, :1], patch_pos], dim=1)
            if name.startswith("head.") and not keep_head:
                continue
            if name not in ours or ours[name].shape != tensor.shape:
                unplaced.append(f"{name} {tuple(tensor.shape)}")
                continue
            state[name] = tensor
            block_attention = re.fullmatch(r"(blocks\.\d+\.)(norm1|attn)(\..+)", name)
            if block_attention:  # blocks.i.attn.qkv.weight -> also blocks.i.temporal_attn.qkv.weight, ...
                prefix, module, rest = block_attention.groups()
                for extra in EXTRA_ATTENTIONS[config.attention_type]:
                    state[f"{prefix}{extra}_{module}{rest}"] = tensor

        if unplaced:
            log.warning("%s: %d tensor(s) have no place in a %s TimeSformer and were ignored: %s", path,
                        len(unplaced), config.attention_type, ", ".join(unplaced))
        starts_fresh = re.compile(r"time_embed|blocks\.\d+\.\w+_fc\..+|head\..+")  # zero or new, by design
        missing = [k for k in ours if k not in state and not starts_fresh.fullmatch(k)]
        if missing:
            raise RuntimeError(
                f"{path}: the image ViT does not provide {len(missing)} tensor(s) of this {config.attention_type} "
                f"TimeSformer: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}"
                + (f" (ignored from the file: {', '.join(unplaced[:10])})" if unplaced else "")
            )
        model.load_state_dict(state, strict=False)
        return model

    def save_pretrained(self, folder: str | Path, clip: dict[str, Any] | None = None) -> None:
        """Write a Hugging Face model folder (config.json + model.safetensors); ``clip``: the data settings clips
        are cut with (``timesformer.inference.export_pretrained`` passes a train.py checkpoint's)."""
        weights.write_hf_folder(Path(folder), self.config, self.state_dict(), clip)


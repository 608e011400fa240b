"""TimeSformer (Bertasius et al., ICML 2021) in plain PyTorch.

Shape legend: B batch, T frames, N patches per frame (h·w), D hidden size, H heads.

Internally the patch tokens live as a (B, T, N, D) tensor and the class token as (B, 1, D). The original
code and Hugging Face keep one flat (B, 1 + N·T, D) sequence; attention is permutation-equivariant and
the embeddings are added with explicit shapes, so the outputs are the same (the parity tests check it),
while each attention type picks its sequences with one reshape.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from timesformer.model import weights
from timesformer.model.config import TimeSformerConfig

log = logging.getLogger(__name__)

_ACTIVATIONS = {
    "gelu": lambda: nn.GELU(),
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": lambda: nn.ReLU(),
    "silu": lambda: nn.SiLU(),
}


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch for a whole sample (dimension 0 = the video).

    The original code applies it to (B·N, T, D) and (B·T, N+1, D) tensors, i.e. per spatial position or
    per frame; we drop per video, which is what stochastic depth means (Huang et al., 2016).
    """

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
        return x * mask / keep_prob

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


class Attention(nn.Module):
    """Multi-head self-attention over the second-to-last axis: (..., L, D) -> (..., L, D)."""

    def __init__(self, config: TimeSformerConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.attn_drop = config.attention_probs_dropout_prob
        self.proj_drop = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *batch, length, dim = x.shape
        x = x.reshape(-1, length, dim)  # (S, L, D), S = all sequences
        qkv = self.qkv(x).reshape(x.shape[0], length, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (S, H, L, head_dim)
        # Scale is head_dim ** -0.5, SDPA's default.
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        x = x.transpose(1, 2).reshape(*batch, length, dim)  # (..., L, D)
        return self.proj_drop(self.proj(x))


class Mlp(nn.Module):
    def __init__(self, config: TimeSformerConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = _ACTIVATIONS[config.hidden_act]()
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.drop = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class PatchEmbed(nn.Module):
    """Split every frame into patch_size × patch_size patches and project them to D."""

    def __init__(self, config: TimeSformerConfig) -> None:
        super().__init__()
        p = config.patch_size
        self.proj = nn.Conv2d(config.num_channels, config.hidden_size, kernel_size=p, stride=p)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """(B·T, C, H, W) -> (B·T, D, H/p, W/p)."""
        return self.proj(frames)


class Block(nn.Module):
    """One TimeSformer block. Takes and returns cls (B, 1, D) and patches (B, T, N, D)."""

    def __init__(self, config: TimeSformerConfig, drop_path: float) -> None:
        super().__init__()
        self.attention_type = config.attention_type
        dim, eps = config.hidden_size, config.layer_norm_eps
        if self.attention_type == "divided_space_time":
            self.temporal_norm1 = nn.LayerNorm(dim, eps=eps)
            self.temporal_attn = Attention(config)
            self.temporal_fc = nn.Linear(dim, dim)  # zero-initialised: the block starts as an image ViT block
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(config)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(config)

    def forward(self, cls: torch.Tensor, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, N, D = patches.shape
        if self.attention_type == "divided_space_time":
            cls, patches = self._divided_attention(cls, patches)
        elif self.attention_type == "joint_space_time":
            tokens = torch.cat([cls, patches.reshape(B, T * N, D)], dim=1)  # (B, 1 + T·N, D)
            tokens = tokens + self.drop_path(self.attn(self.norm1(tokens)))
            cls, patches = tokens[:, :1], tokens[:, 1:].reshape(B, T, N, D)
        else:  # space_only: every frame is its own sequence with its own cls token, cls is (B, T, 1, D)
            tokens = torch.cat([cls, patches], dim=2)  # (B, T, 1 + N, D)
            tokens = tokens + self.drop_path(self.attn(self.norm1(tokens)))
            cls, patches = tokens[:, :, :1], tokens[:, :, 1:]
        # MLP, on cls and patches together (token-wise, so no concatenation is needed)
        cls = cls + self.drop_path(self.mlp(self.norm2(cls)))
        patches = patches + self.drop_path(self.mlp(self.norm2(patches)))
        return cls, patches

    def _divided_attention(self, cls: torch.Tensor, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, N, D = patches.shape
        # 1. Temporal attention: one sequence of T tokens per spatial position, cls excluded.
        per_position = patches.transpose(1, 2)  # (B, N, T, D)
        temporal = self.temporal_attn(self.temporal_norm1(per_position))  # (B, N, T, D)
        # As in the original, drop_path comes before temporal_fc.
        temporal = self.temporal_fc(self.drop_path(temporal)).transpose(1, 2)  # (B, T, N, D)
        patches = patches + temporal

        # 2. Spatial attention: one sequence per frame, the cls token prepended to each frame.
        tokens = torch.cat([cls.unsqueeze(1).expand(B, T, 1, D), patches], dim=2)  # (B, T, 1 + N, D)
        spatial = self.drop_path(self.attn(self.norm1(tokens)))  # (B, T, 1 + N, D)
        cls = cls + spatial[:, :, 0].mean(dim=1, keepdim=True)  # the T cls outputs averaged: (B, 1, D)
        patches = patches + spatial[:, :, 1:]
        return cls, patches


class TimeSformer(nn.Module):
    """TimeSformer video classifier.

    ``forward(pixel_values)`` takes (B, T, C, H, W) and returns logits (B, num_classes). T, H and W are read
    from the input: when they differ from ``config.num_frames`` / ``config.image_size`` the time embedding is
    interpolated linearly and the position embedding bicubically in 2-D (the original code interpolates it
    in 1-D over the flattened grid, which scrambles rows; Hugging Face silently misbehaves).
    """

    def __init__(self, config: TimeSformerConfig) -> None:
        super().__init__()
        self.config = config
        D = config.hidden_size
        self.patch_embed = PatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches + 1, D))  # cls first, then the h×w grid
        if config.attention_type != "space_only":  # space_only has no notion of time until the final average
            self.time_embed = nn.Parameter(torch.zeros(1, config.num_frames, D))
        self.pos_drop = nn.Dropout(config.hidden_dropout_prob)
        depth = config.num_hidden_layers
        drop_path_rates = [config.drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # 0 -> rate
        self.blocks = nn.ModuleList(Block(config, rate) for rate in drop_path_rates)
        self.norm = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.head = nn.Linear(D, config.num_classes)
        self._logged_resizes: set[tuple[int, int, int]] = set()
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
            if hasattr(block, "temporal_fc"):
                nn.init.zeros_(block.temporal_fc.weight)
                nn.init.zeros_(block.temporal_fc.bias)

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
        if (grid_h, grid_w) != (stored, stored):
            D = patch_pos.shape[-1]
            grid = patch_pos.reshape(1, stored, stored, D).permute(0, 3, 1, 2)  # (1, D, h0, w0)
            grid = F.interpolate(grid.float(), size=(grid_h, grid_w), mode="bicubic", align_corners=False)
            patch_pos = grid.to(patch_pos.dtype).permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, D)
        return cls_pos, patch_pos

    def _time_embedding(self, num_frames: int) -> torch.Tensor:
        """(1, T, D) time embedding for T frames."""
        time_embed = self.time_embed
        if num_frames != time_embed.shape[1]:
            resized = F.interpolate(time_embed.float().transpose(1, 2), size=num_frames, mode="linear",
                                    align_corners=False)
            time_embed = resized.transpose(1, 2).to(time_embed.dtype)
        return time_embed

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
        patches = (patches + patch_pos).reshape(B, T, grid_h * grid_w, -1)  # (B, T, N, D)
        cls = (self.cls_token + cls_pos).expand(B, -1, -1)  # (B, 1, D)
        if self.config.attention_type == "space_only":
            cls = cls.unsqueeze(1).expand(B, T, 1, -1)  # one cls per frame: (B, T, 1, D)
        else:
            patches = patches + self._time_embedding(T).unsqueeze(2)  # time embedding on patches only
        return self.pos_drop(cls), self.pos_drop(patches)

    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, T, C, H, W) -> pooled embedding (B, D): the final-normed cls token."""
        cls, patches = self.embed(pixel_values)
        for block in self.blocks:
            if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
                cls, patches = checkpoint(block, cls, patches, use_reentrant=False)
            else:
                cls, patches = block(cls, patches)
        if self.config.attention_type == "space_only":
            # (B, T, 1, D) -> (B, 1, D): average the per-frame cls tokens, then the final norm (as the original;
            # HF returns per-frame logits instead).
            cls = cls.mean(dim=1)
        return self.norm(cls[:, 0])

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, T, C, H, W) -> logits (B, num_classes)."""
        return self.head(self.forward_features(pixel_values))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- loading and saving (local files only) -------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, num_classes: int | None = None,
                        class_names: list[str] | None = None, **overrides: Any) -> TimeSformer:
        """Load a Hugging Face folder, an original ``*.pyth`` or a Lightning checkpoint from ``train.py``.

        The format is detected; weights load strictly (any tensor that cannot be placed is an error).
        ``num_classes`` different from the checkpoint's replaces the head with a new one (logged). Other
        keyword arguments override config fields, e.g. ``num_attention_heads`` for a ``*.pyth``.
        """
        config, state = weights.read_checkpoint(Path(path), **overrides)
        replace_head = num_classes is not None and num_classes != config.num_classes
        if replace_head:
            log.info("%s: replacing the %d-class head by a new %d-class head", path, config.num_classes, num_classes)
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
        return model

    def save_pretrained(self, folder: str | Path) -> None:
        """Write a Hugging Face model folder (config.json + model.safetensors)."""
        weights.write_hf_folder(Path(folder), self.config, self.state_dict())


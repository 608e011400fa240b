"""TimeSformer configuration.

Field names mirror Hugging Face's ``TimesformerConfig`` so that a ``config.json`` from the hub maps onto
this class field for field; ``num_classes`` replaces HF's ``id2label``-derived label count.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# The paper's five attention schemes (§3, Fig. 1); the first three are the original code's and Hugging Face's.
ATTENTION_TYPES = ("divided_space_time", "space_only", "joint_space_time", "sparse_local_global", "axial")
HIDDEN_ACTS = ("gelu", "gelu_tanh", "relu", "silu")
# What a checkpoint's weights fix: loading them into a model built otherwise is an error (``num_frames`` and
# ``image_size`` may differ: the time and position embeddings are resized).
ARCHITECTURE_FIELDS = ("patch_size", "num_channels", "hidden_size", "num_hidden_layers", "num_attention_heads",
                       "intermediate_size", "hidden_act", "layer_norm_eps", "qkv_bias", "attention_type")
BOOL_FIELDS = ("qkv_bias", "gradient_checkpointing", "memory_saving_backward", "bf16_residual_stream",
               "fused_short_attention")


@dataclass
class TimeSformerConfig:
    """Hyper-parameters of a TimeSformer. Defaults are TimeSformer-base (ViT-B/16, 8 frames × 224 px).

    ``num_frames`` and ``image_size`` are the sizes the embeddings are stored at; the model accepts other
    frame counts and resolutions at run time by interpolating the embeddings (see ``TimeSformer``).
    """

    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    num_frames: int = 8
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    attention_type: str = "divided_space_time"  # one of ATTENTION_TYPES, described in model.timesformer.Block
    drop_path_rate: float = 0.0
    num_classes: int = 400
    # Recompute each block's activations in the backward pass: less memory for long clips, ~30% slower.
    gradient_checkpointing: bool = False
    # Keep a block's inputs rather than its normed/activated tensors for the backward pass and recompute those
    # (model.timesformer's autograd functions): ~30% less training memory in eager mode. False: PyTorch's own
    # autograd, a little faster (configs/model/base.yaml has the figures).
    memory_saving_backward: bool = True
    # Under bf16 autocast, keep the residual stream (the tokens between blocks) in bf16 instead of float32: half
    # the bytes for every residual add and LayerNorm input (H200, compiled training: 4-5% faster, 12% less memory).
    # Off, the float32 embeddings promote the stream to float32, as in HF and the original code. No effect without
    # autocast, nor under float16 autocast (whose range is too small for a residual stream).
    bf16_residual_stream: bool = False
    # On a CUDA GPU, attention over sequences of at most 16 tokens (the time attention at 8 and 16 frames, axial's
    # rows and columns) as one Triton kernel per pass (model.triton_short_attention) instead of batched matmuls and
    # a softmax. Off by default until it has been timed on a GPU (benchmarks/RESULTS.md, part 4). Needs Triton.
    fused_short_attention: bool = False
    # Optional class names (index -> name); travel with checkpoints and exported HF folders.
    class_names: list[str] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.attention_type not in ATTENTION_TYPES:
            raise ValueError(
                f"attention_type={self.attention_type!r} is not supported; valid values: {', '.join(ATTENTION_TYPES)}"
            )
        if self.hidden_act not in HIDDEN_ACTS:
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; valid values: {', '.join(HIDDEN_ACTS)}")
        for name in ("image_size", "patch_size", "num_channels", "num_frames", "hidden_size", "num_hidden_layers",
                     "num_attention_heads", "intermediate_size", "num_classes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.image_size % self.patch_size != 0:
            raise ValueError(
                f"image_size={self.image_size} is not divisible by patch_size={self.patch_size}; "
                f"choose an image_size that is a multiple of {self.patch_size}"
            )
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}"
            )
        for name in BOOL_FIELDS:  # a string such as "no" would count as true
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "drop_path_rate"):
            value = getattr(self, name)
            if not 0.0 <= float(value) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(
                f"class_names has {len(self.class_names)} entries but num_classes={self.num_classes}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TimeSformerConfig:
        """Build from a dict, rejecting unknown keys with the list of known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown TimeSformerConfig field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**values)

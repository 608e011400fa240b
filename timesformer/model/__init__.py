"""The TimeSformer backbone and classifier in plain PyTorch (no Lightning here)."""

from timesformer.model.config import ATTENTION_TYPES, TimeSformerConfig
from timesformer.model.timesformer import TimeSformer

__all__ = ["ATTENTION_TYPES", "TimeSformer", "TimeSformerConfig"]

"""TimeSformer video transformers: model, data and Lightning training."""

from timesformer.model import TimeSformer, TimeSformerConfig

__all__ = ["TimeSformer", "TimeSformerConfig"]
__version__ = "0.1.0"

"""Video data: decoding, clip sampling, transforms, datasets and the Lightning DataModule.

Knows nothing of the model: batches are {"video": float32 (B, T, C, H, W), "label": (B,), "index": (B,)}.
"""

from timesformer.data.datamodule import VideoDataModule
from timesformer.data.dataset import VideoClipDataset, VideoIndex, VideoSource
from timesformer.data.sampling import dense_clip_indices
from timesformer.data.synthetic import SyntheticMotionSource
from timesformer.data.transforms import DEFAULT_MEAN, DEFAULT_STD, eval_transform, train_transform
from timesformer.data.video import VideoDecodeError, VideoInfo, decode_clip, decode_frames, read_video_info

__all__ = [
    "DEFAULT_MEAN",
    "DEFAULT_STD",
    "SyntheticMotionSource",
    "VideoClipDataset",
    "VideoDataModule",
    "VideoDecodeError",
    "VideoIndex",
    "VideoInfo",
    "VideoSource",
    "decode_clip",
    "decode_frames",
    "dense_clip_indices",
    "eval_transform",
    "read_video_info",
    "train_transform",
]

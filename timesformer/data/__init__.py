"""Video data: decoding, clip sampling, transforms, datasets (generated and real) and the Lightning DataModule.

Knows nothing of the model: batches are {"video": (B, T, C, H, W), "label": (B,), "index": (B,), "view": (B,),
"valid": (B,), "replaced": (B,)} (see VideoDataModule); "video" is uint8 until `normalize` makes it float32
on the device.
"""

from timesformer.data.datamodule import VideoDataModule
from timesformer.data.dataset import VideoClipDataset, VideoIndex, VideoSource
from timesformer.data.diving48 import Diving48Source
from timesformer.data.kinetics import KineticsSource
from timesformer.data.sampling import dense_clip_indices, segment_clip_indices
from timesformer.data.sources import CsvSource, FolderSource
from timesformer.data.ssv2 import SomethingSomethingV2Source
from timesformer.data.synthetic import SyntheticMotionSource
from timesformer.data.transforms import (
    DEFAULT_MEAN,
    DEFAULT_STD,
    EvalViewTransform,
    eval_short_side,
    eval_transform,
    normalize,
    train_transform,
)
from timesformer.data.ucf101 import UCF101Source
from timesformer.data.video import VideoDecodeError, VideoInfo, decode_clip, decode_frames, read_video_info

__all__ = [
    "DEFAULT_MEAN",
    "DEFAULT_STD",
    "CsvSource",
    "Diving48Source",
    "EvalViewTransform",
    "FolderSource",
    "KineticsSource",
    "SomethingSomethingV2Source",
    "SyntheticMotionSource",
    "UCF101Source",
    "VideoClipDataset",
    "VideoDataModule",
    "VideoDecodeError",
    "VideoIndex",
    "VideoInfo",
    "VideoSource",
    "decode_clip",
    "decode_frames",
    "dense_clip_indices",
    "eval_short_side",
    "eval_transform",
    "normalize",
    "read_video_info",
    "segment_clip_indices",
    "train_transform",
]

"""Tests of timesformer.data: clip sampling, transforms, decoding, the synthetic dataset and the DataModule."""

from __future__ import annotations

import fractions
import json
import logging
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torchvision.transforms import v2

from timesformer.data import (
    EvalViewTransform,
    SyntheticMotionSource,
    VideoClipDataset,
    VideoDataModule,
    VideoDecodeError,
    decode_clip,
    decode_frames,
    dense_clip_indices,
    eval_transform,
    normalize,
    read_video_info,
    train_transform,
)
from timesformer.data.resumable import ResumableSampler
from timesformer.data.synthetic import CLASS_SCHEMES, DIRECTIONS
from timesformer.data.video import DECODERS, VideoInfo, check_whole, decord_misreads, open_video

# A tiny synthetic dataset: 4 classes x (2 train + 1 val) videos of 24 frames, 48x32 px.
TINY = dict(
    num_classes=4,
    videos_per_class_train=2,
    videos_per_class_val=1,
    num_video_frames=24,
    fps=30,
    height=32,
    width=48,
    seed=0,
)


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory) -> SyntheticMotionSource:
    source = SyntheticMotionSource(tmp_path_factory.mktemp("synthetic"), **TINY)
    source.prepare()
    return source


# -- sampling ----------------------------------------------------------------------------------------------


def test_span_scales_with_fps():
    # 8 frames, sampling_rate 4 at 30 fps: a step of 4 frames at 30 fps, 8 at 60 fps, 2 at 15 fps.
    for video_fps, step in ((30.0, 4), (60.0, 8), (15.0, 2)):
        indices = dense_clip_indices(1000, 8, 4, video_fps, target_fps=30.0, clip_index=0)
        assert np.diff(indices).tolist() == [step] * 7


def test_eval_clip_is_centred_and_deterministic():
    indices = dense_clip_indices(100, 8, 2, 30.0, clip_index=0, num_clips=1)
    assert indices == dense_clip_indices(100, 8, 2, 30.0, clip_index=0, num_clips=1)
    # Span 16 frames, 84 possible starts: the centred clip starts at 42.
    assert indices == list(range(42, 58, 2))


def test_eval_clips_spread_over_the_video():
    clips = [dense_clip_indices(300, 8, 4, 30.0, clip_index=i, num_clips=3) for i in range(3)]
    starts = [clip[0] for clip in clips]
    assert starts == sorted(starts) and len(set(starts)) == 3
    # Each clip centred in its third of the 268 possible starts.
    assert starts == [268 // 6, 268 // 2, 268 * 5 // 6]


def test_short_video_is_padded_by_repeating_frames():
    for clip_index in (None, 0):
        indices = dense_clip_indices(5, 8, 4, 30.0, clip_index=clip_index, rng=random.Random(0))
        assert len(indices) == 8
        assert indices == sorted(indices)
        assert min(indices) >= 0 and max(indices) == 4  # clamped to the last frame
    assert dense_clip_indices(1, 4, 2, 30.0, clip_index=0) == [0, 0, 0, 0]


def test_indices_always_in_range():
    rng = random.Random(0)
    for _ in range(500):
        video_num_frames = rng.randint(1, 400)
        num_clips = rng.randint(1, 5)
        clip_index = rng.choice([None, rng.randrange(num_clips)])
        indices = dense_clip_indices(
            video_num_frames,
            num_frames=rng.randint(1, 32),
            sampling_rate=rng.randint(1, 32),
            video_fps=rng.choice([12.0, 15.0, 24.0, 25.0, 29.97, 30.0, 50.0, 60.0]),
            clip_index=clip_index,
            num_clips=num_clips,
            rng=rng,
        )
        assert all(0 <= index < video_num_frames for index in indices)
        assert indices == sorted(indices)


def test_training_start_is_random_and_reproducible():
    starts = {dense_clip_indices(300, 8, 4, 30.0, rng=random.Random(seed))[0] for seed in range(20)}
    assert len(starts) > 5
    assert dense_clip_indices(300, 8, 4, 30.0, rng=random.Random(3)) == dense_clip_indices(
        300, 8, 4, 30.0, rng=random.Random(3)
    )


def test_training_start_covers_every_possible_start_both_ends_included():
    """A training clip starts anywhere from frame 0 to the last start that fits the clip (inclusive), uniformly: a
    range cut short (e.g. to its first half) would never train on the videos' ends."""
    # 300 frames, 8 x 4 at 30 fps: a span of 32 frames, starts 0 ... 268
    max_start = 300 - 8 * 4
    rng = random.Random(0)
    starts = [dense_clip_indices(300, 8, 4, 30.0, rng=rng)[0] for _ in range(2000)]
    assert min(starts) == 0 and max(starts) == max_start
    assert abs(np.mean(starts) - max_start / 2) < 0.05 * max_start  # uniform: centred on the middle start
    assert sum(start > max_start / 2 for start in starts) > 800  # ~half of them in the second half


def test_sampling_rejects_bad_arguments():
    with pytest.raises(ValueError, match="video_num_frames"):
        dense_clip_indices(0, 8, 4, 30.0)
    with pytest.raises(ValueError, match="clip_index"):
        dense_clip_indices(100, 8, 4, 30.0, clip_index=3, num_clips=3)
    with pytest.raises(ValueError, match="video_fps"):
        dense_clip_indices(100, 8, 4, 0.0, clip_index=0)


# -- transforms --------------------------------------------------------------------------------------------


def test_transforms_keep_uint8_and_normalize_makes_the_model_input():
    gray = torch.full((4, 3, 40, 50), round(0.45 * 255), dtype=torch.uint8)  # (T, C, H, W) at the mean
    white = torch.full((4, 3, 40, 50), 255, dtype=torch.uint8)
    for transform in (train_transform(32, short_side_range=(32, 40)), eval_transform(32)):
        out = transform(gray)
        assert out.shape == (4, 3, 32, 32) and out.dtype == torch.uint8
        assert normalize(out).dtype == torch.float32
        assert normalize(out).abs().max() < 0.01  # (0.45 - 0.45) / 0.225
        assert torch.allclose(normalize(transform(white)), torch.full(out.shape, (1 - 0.45) / 0.225), atol=1e-3)


def test_normalize_is_what_the_transforms_did_before_and_takes_a_batch():
    clips = torch.randint(0, 256, (2, 4, 3, 8, 8), dtype=torch.uint8)  # (B, T, C, H, W)
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
    expected = torch.stack([v2.Normalize(mean, std)(v2.ToDtype(torch.float32, scale=True)(clip)) for clip in clips])
    assert torch.equal(normalize(clips, mean, std), expected)  # bit for bit: the numerics did not move
    channel = (clips[:, :, 1].float() / 255 - 0.5) / 0.3
    torch.testing.assert_close(normalize(clips, mean, std)[:, :, 1], channel)  # per channel, any leading dims
    with pytest.raises(TypeError, match="uint8"):
        normalize(clips.float())  # normalising twice would be silent otherwise
    with pytest.raises(ValueError, match="3 values"):
        normalize(clips, mean=(0.5, 0.5))


def test_normalize_builds_no_tensor_from_python_numbers_after_its_first_call():
    # On a GPU each such tensor is a blocking host-to-device copy: a host sync in every training step.
    class TensorsFromNumbers(TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            TensorsFromNumbers.calls += getattr(func, "__name__", "") in ("tensor", "as_tensor")
            return func(*args, **(kwargs or {}))

    clips = torch.randint(0, 256, (2, 4, 3, 8, 8), dtype=torch.uint8)
    normalize(clips, (0.3, 0.4, 0.5), (0.2, 0.2, 0.2))
    with TensorsFromNumbers():
        normalize(clips, (0.3, 0.4, 0.5), (0.2, 0.2, 0.2))
        normalize(clips[:1], [0.3, 0.4, 0.5], [0.2, 0.2, 0.2])  # lists, as Hydra passes them
    assert TensorsFromNumbers.calls == 0


def test_train_transform_applies_the_same_params_to_every_frame():
    frame = torch.randint(0, 256, (1, 3, 48, 64), dtype=torch.uint8)
    video = frame.expand(6, -1, -1, -1).clone()  # six identical frames
    transform = train_transform(32, short_side_range=(32, 48), horizontal_flip=True)
    outputs = []
    for seed in range(8):
        torch.manual_seed(seed)
        out = transform(video)
        assert all(torch.equal(out[0], out[t]) for t in range(1, 6)), "frames got different crops/flips"
        outputs.append(out[0])
    # The transform is random (different scale/crop/flip across calls), just not across frames.
    assert any(not torch.equal(outputs[0], other) for other in outputs[1:])


def test_horizontal_flip_happens_and_can_be_turned_off():
    # A left-dark / right-bright frame at the crop size (no scale or crop freedom left): flipping is visible.
    video = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    video[..., 16:] = 255
    flipped = []
    for seed in range(10):
        torch.manual_seed(seed)
        out = train_transform(32, short_side_range=(32, 32), horizontal_flip=True)(video)
        flipped.append(bool(out[0, 0, 0, 0] > out[0, 0, 0, -1]))
        assert torch.equal(out[0], out[1])
    assert any(flipped) and not all(flipped)
    for seed in range(5):
        torch.manual_seed(seed)
        out = train_transform(32, short_side_range=(32, 32), horizontal_flip=False)(video)
        assert out[0, 0, 0, 0] < out[0, 0, 0, -1]


def test_eval_transform_is_a_deterministic_centre_crop():
    video = torch.randint(0, 256, (3, 3, 32, 48), dtype=torch.uint8)
    out = eval_transform(32)(video)
    assert torch.equal(out, eval_transform(32)(video))
    assert torch.equal(out, video[..., 8:40])  # short side already 32: crop the middle


@pytest.mark.parametrize("height, width", [(98, 130), (196, 262), (130, 98), (318, 424)])
def test_train_transform_scales_the_short_side_exactly_so_the_smallest_scale_fits_the_crop(height, width):
    # Scaling 98 x 130 to a short side of 32 by a factor 32 / 98 gives 31.99...: truncated, the crop did not fit
    # (torchvision's RandomShortestSize) and the DataLoader worker raised in the middle of training.
    video = torch.randint(0, 256, (2, 3, height, width), dtype=torch.uint8)
    for seed in range(4):
        torch.manual_seed(seed)
        assert train_transform(32, short_side_range=(32, 33))(video).shape == (2, 3, 32, 32)
    scaled = train_transform(32, short_side_range=(32, 32)).transforms[0](video)
    assert min(scaled.shape[-2:]) == 32 and max(scaled.shape[-2:]) == max(height, width) * 32 // min(height, width)


def test_transform_rejects_a_crop_larger_than_the_short_side():
    with pytest.raises(ValueError, match="crop_size"):
        train_transform(224, short_side_range=(128, 160))


def test_train_transform_draws_every_short_side_of_its_range_both_ends_included():
    """short_side_range is inclusive: over 200 draws the scaled clip's short side takes every value from 32 to 40, and
    no other (a range without its upper end, or a scale stuck at the lower one, would pass the shape checks)."""
    video = torch.zeros(1, 3, 45, 60, dtype=torch.uint8)
    scale = train_transform(32, short_side_range=(32, 40)).transforms[0]
    torch.manual_seed(0)
    sides = [min(scale(video).shape[-2:]) for _ in range(200)]
    assert set(sides) == set(range(32, 41))
    assert max(sides.count(side) for side in range(32, 41)) < 200 / 9 * 2  # roughly uniform (~22 each)


# -- decoding and the synthetic dataset --------------------------------------------------------------------


def test_decode_generated_video(tiny_source):
    path, _ = tiny_source.load().splits["train"][0]
    info = read_video_info(path)
    assert (info.num_frames, info.fps, info.height, info.width) == (24, 30.0, 32, 48)
    frames = decode_frames(path, [0, 5, 5, 23])
    assert frames.shape == (4, 32, 48, 3) and frames.dtype == torch.uint8
    assert torch.equal(frames[1], frames[2])
    assert torch.equal(frames[0], decode_frames(path, [0])[0])  # seeking back gives the same frame


@pytest.mark.parametrize("width", [48, 64])
def test_decoded_frames_match_pyav(tmp_path, width):
    # decord2 3.4 returns rows padded into extra channels at some widths (48 is one, 64 is not); video.py
    # works around it. PyAV, decoding the whole file in order, is the reference.
    import av

    from timesformer.data.synthetic import render_video, write_mp4

    path = tmp_path / f"clip{width}.mp4"
    write_mp4(path, render_video((1.0, 0.0), 12, 32, width, np.random.default_rng(0)), fps=30)
    with av.open(str(path)) as container:
        reference = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])
    indices = [11, 0, 3, 3, 7]
    assert np.array_equal(decode_frames(path, indices).numpy(), reference[indices])


def _write_gop_video(path, codec: str = "libx264", num_frames: int = 40, gop: int = 8, seed: int = 0,
                     title: str | None = None):
    """A moving-texture clip with a keyframe every `gop` frames; for h264, up to 3 B-frames in a row (x264's
    default pyramid: some B-frames are references, the others not): every path of the PyAV decoder is used."""
    import av

    rng = np.random.default_rng(seed)
    texture = rng.integers(0, 255, size=(48, 128, 3), dtype=np.uint8)
    with av.open(str(path), mode="w") as container:
        if title is not None:
            container.metadata["title"] = title
        stream = container.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.gop_size = gop
        if codec == "libx264":
            stream.options = {"threads": "1", "bf": "3", "keyint_min": str(gop), "sc_threshold": "0"}
        for t in range(num_frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(texture[:, t : t + 64]), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.mark.parametrize("name, codec", [("bframes.mp4", "libx264"), ("bframes.mkv", "libx264"),
                                         ("vp9.webm", "libvpx-vp9"), ("mpeg4.mp4", "mpeg4")])
def test_pyav_decoder_gives_the_frames_decord_gives(tmp_path, name, codec):
    path = _write_gop_video(tmp_path / name, codec)
    rng = random.Random(0)
    index_sets = [[0], [39], [5, 29], [3, 3, 17, 16, 0], list(range(40)), [39, 0, 20]]
    index_sets += [sorted(rng.sample(range(40), 8)) for _ in range(4)]
    for indices in index_sets:
        expected = decode_frames(path, indices)
        assert torch.equal(decode_frames(path, indices, decoder="pyav"), expected), indices
        assert torch.equal(decode_frames(path, indices, num_threads=2, decoder="pyav"), expected), indices
    _, decord_info = decode_clip(path, lambda num_frames, fps: [0])
    _, pyav_info = decode_clip(path, lambda num_frames, fps: [0], decoder="pyav")
    assert pyav_info == decord_info == VideoInfo(num_frames=40, fps=25.0, height=48, width=64)


def _pattern(t: int) -> np.ndarray:
    """Frame t of a smooth 64x48 pattern that changes with t: any two frames are far apart."""
    y, x = np.mgrid[0:48, 0:64].astype(np.float32)
    rgb = np.stack([128 + 100 * np.sin((x - 1.5 * t) / 9), 128 + 100 * np.cos(y / 7 + t / 5),
                    128 + 60 * np.sin(t / 3 + y / 11)], axis=-1)
    return rgb.astype(np.uint8)


def _write_pattern_video(path: Path, codec: str = "libx264", codec_options: dict | None = None, num_frames: int = 60,
                         first_pts: int = 0, **container_options) -> Path:
    """`_pattern` frames 0..num_frames-1 at 25 fps, 64x48 (``first_pts``: the first frame's time, in frames;
    ``container_options``: av.open's, e.g. format="avi")."""
    import av

    with av.open(str(path), mode="w", **container_options) as container:
        stream = container.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt, stream.options = 64, 48, "yuv420p", codec_options or {}
        for t in range(num_frames):
            frame = av.VideoFrame.from_ndarray(_pattern(t), format="rgb24")
            frame.pts, frame.time_base = first_pts + t, fractions.Fraction(1, 25)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.mark.parametrize("name, codec, options", [
    ("h264_bframes.mp4", "libx264", {}),
    ("h264_bframes.avi", "libx264", {}),  # AVI has no presentation timestamps: they follow the decode order
    ("h264.avi", "libx264", {"bf": "0"}),
    ("mpeg4_bframes.avi", "mpeg4", {"bf": "2"}),  # XviD-style
    ("mpeg4_bframes.mp4", "mpeg4", {"bf": "2"}),
    # open GOP: the leading B-frames after a keyframe (decode order) are shown before it
    ("h264_open_gop.mp4", "libx264", {"x264-params": "open-gop=1:keyint=10"}),
    ("h264_open_gop.mkv", "libx264", {"x264-params": "open-gop=1:keyint=30"}),
    ("hevc_open_gop.mp4", "libx265", {"x265-params": "log-level=none:keyint=20:open-gop=1"}),
    ("hevc_closed_gop.mp4", "libx265", {"x265-params": "log-level=none:keyint=20:open-gop=0"}),
    ("mpeg2.mpg", "mpeg2video", {"b": "4M"}),  # MPEG program stream (a high bit rate: neighbours stay apart)
    ("h264_bframes.ts", "libx264", {}),  # MPEG transport stream
])
def test_decoders_return_the_frames_that_were_encoded(tmp_path, name, codec, options):
    import av

    from timesformer.data.check import VideoCheck, check_video

    path = _write_pattern_video(tmp_path / name, codec, options)
    encoded = np.stack([_pattern(t) for t in range(60)]).astype(np.float32)

    def frame_numbers(frames: torch.Tensor) -> list[int]:  # the encoded frame each decoded one is closest to
        return [int(np.abs(encoded - frame.numpy()).mean(axis=(1, 2, 3)).argmin()) for frame in frames]

    # The readers open files without FFmpeg's probe decoding frames (open_video): what they read from the container
    # is what a plain av.open gives
    def container_facts(container: av.container.InputContainer) -> tuple:
        stream = container.streams.video[0]
        return (container.format.name, stream.codec_context.name, stream.codec_context.has_b_frames,
                stream.average_rate, stream.guessed_rate, stream.frames, stream.time_base,
                [(packet.pts, packet.is_keyframe, packet.is_discard) for packet in container.demux(stream)])

    with av.open(str(path)) as plain, open_video(path) as unprobed:
        assert container_facts(unprobed) == container_facts(plain)
    # decord alone misreads all but the closed-GOP mp4/mkv h264 after a seek (or, HEVC, cannot decode it); the
    # decord path reads those files with PyAV
    assert decord_misreads(path) == (name not in ("h264_bframes.mp4", "hevc_closed_gop.mp4"))
    for indices in ([0, 13, 29, 41, 59], [7, 8, 50], list(range(60))):
        assert frame_numbers(decode_frames(path, indices, decoder="pyav")) == indices
        assert frame_numbers(decode_frames(path, indices)) == indices
    # AVI's B-frames (timestamps in decode order) and MPEG-PS (some packets without one) are decoded from the start
    slow = name in ("h264_bframes.avi", "mpeg2.mpg")
    assert check_video(str(path), 0) == VideoCheck(str(path), 0, num_frames=60, fps=25.0, read_from_start=slow)


def test_an_mp4_allowing_b_frames_but_holding_none_is_still_read_by_seeking(tmp_path):
    """x264 told not to use them (b-bias=-100; or on noise, often) places no B-frame although the stream allows them,
    so the mp4's timestamps never go back: the PyAV path took that for AVI's decode-order timestamps and decoded
    every clip from the first frame."""
    import av

    from timesformer.data.video import read_from_start

    path = tmp_path / "noise.mp4"
    noise = np.random.default_rng(0).integers(0, 255, (60, 48, 64, 3), dtype=np.uint8)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.options = {"x264-params": "bframes=3:b-bias=-100"}
        for frame in noise:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with av.open(str(path)) as container:
        timestamps = [packet.pts for packet in container.demux(video=0) if packet.size]
        assert container.streams.video[0].codec_context.has_b_frames and timestamps == sorted(timestamps)
    assert not read_from_start(path, decoder="pyav")
    decoded = decode_frames(path, [3, 41, 59], decoder="pyav").float()
    errors = [[(decoded[i] - torch.from_numpy(frame).float()).abs().mean() for frame in noise] for i in range(3)]
    assert [int(np.argmin(row)) for row in errors] == [3, 41, 59]


@pytest.mark.parametrize("decoder", DECODERS)
def test_check_reports_an_mp4_cut_short(tmp_path, decoder):
    """A download that stopped: the MP4's index (at the front) lists 60 frames, the file holds 30, whole (cut where a
    packet ends: one cut mid-packet fails to decode, and check said so), and both decoders read it as a shorter
    video: check passed it."""
    import av

    from timesformer.data.check import check_video

    whole = _write_pattern_video(tmp_path / "whole.mp4", options={"movflags": "faststart"})
    cut = tmp_path / "cut.mp4"
    with av.open(str(whole)) as container:
        ends = [packet.pos + packet.size for packet in container.demux(container.streams.video[0]) if packet.size]
    cut.write_bytes(whole.read_bytes()[: ends[29]])
    result = check_video(str(cut), 0, decoder)
    assert result.error == "cut short: it holds 30 of the 60 frames its index lists"
    assert result.num_frames == 30  # what the decoder saw: a shorter video
    assert check_video(str(whole), 0, decoder).error is None


@pytest.mark.parametrize("decoder", DECODERS)
def test_check_reports_a_video_broken_after_its_first_frames(tmp_path, decoder):
    """A file whose second half is damaged (its packets zeroed; the index, its size and its first frames intact)
    decodes from frame 0 but fails where training reads later clips: check decodes the middle and last frames too,
    and reports it."""
    import av

    from timesformer.data.check import check_video

    whole = _write_pattern_video(tmp_path / "whole.mp4")
    with av.open(str(whole)) as container:
        packets = [(packet.pos, packet.size) for packet in container.demux(container.streams.video[0]) if packet.size]
    assert len(packets) == 60
    data = bytearray(whole.read_bytes())
    for position, size in packets[30:]:  # the second half in decode order: roughly frames 30 ... 59, never frame 0
        data[position:position + size] = bytes(size)
    damaged = tmp_path / "damaged.mp4"
    damaged.write_bytes(bytes(data))
    assert decode_frames(damaged, [0], decoder=decoder).shape == (1, 48, 64, 3)  # the start reads
    assert check_whole(damaged) is None  # nothing is missing: only decoding finds it
    result = check_video(str(damaged), 0, decoder)
    assert result.error is not None and "Could not decode" in result.error and "damaged.mp4" in result.error
    assert result.num_frames == 60
    assert check_video(str(whole), 0, decoder).error is None


class _CountingCodec:
    """Wraps a PyAV codec context and counts the pictures it decodes."""

    def __init__(self, codec) -> None:
        self.codec, self.pictures = codec, 0

    def __getattr__(self, name):
        return getattr(self.codec, name)

    def __setattr__(self, name, value) -> None:
        if name in ("codec", "pictures"):
            object.__setattr__(self, name, value)
        else:
            setattr(self.codec, name, value)

    def decode(self, packet):
        pictures = self.codec.decode(packet)
        self.pictures += len(pictures)
        return pictures

    def flush_buffers(self) -> None:
        self.codec.flush_buffers()


def test_pyav_decoder_skips_what_no_wanted_frame_needs(tmp_path):
    import av

    from timesformer.data.video import _decode_wanted

    path = _write_gop_video(tmp_path / "bframes.mp4")
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "NONE"
        packets = [packet for packet in container.demux(stream) if packet.size]
        counting = _CountingCodec(stream.codec_context)
        frames = _decode_wanted(counting, packets, [5, 29], container.format.name)
    assert sorted(frames) == [5, 29]
    # Sequentially that is 30 pictures. With a keyframe every 8 frames, frame 5 needs at most frames 0-5 and
    # frame 29 at most 24-29: 12 pictures, fewer once unreferenced B-frames are skipped (10 for this file).
    assert counting.pictures < 12


def test_pyav_decoder_reports_bad_files_and_indices(tmp_path, tiny_source):
    good = tiny_source.load().splits["train"][0][0]
    empty, text = tmp_path / "empty.mp4", tmp_path / "text.mp4"
    empty.write_bytes(b"")
    text.write_text("this is not a video\n" * 20)
    for path in (empty, text):
        with pytest.raises(VideoDecodeError, match=path.name):
            decode_frames(path, [0], decoder="pyav")
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        decode_frames(tmp_path / "missing.mp4", [0], decoder="pyav")
    with pytest.raises(IndexError, match="24 frames"):
        decode_frames(good, [0, 24], decoder="pyav")
    with pytest.raises(ValueError, match="decord, pyav"):
        decode_frames(good, [0], decoder="opencv")


def _estimated_shift(frames: np.ndarray, gap: int) -> np.ndarray:
    """The (dy, dx) in pixels that best maps the moving content of frame t onto frame t + gap, over all t.

    Moving content is what differs from the per-pixel temporal median (the static background), kept signed
    so that the objects' texture makes the correlation peak sharp. Shifts wrap around, like the generator.
    """
    gray = frames.astype(np.float32).mean(axis=-1)  # (T, H, W)
    moving = gray - np.median(gray, axis=0)
    best_score, best_shift = -np.inf, None
    for dy in range(-8, 9):
        for dx in range(-8, 9):
            score = (np.roll(moving[:-gap], (dy, dx), axis=(1, 2)) * moving[gap:]).sum()
            if score > best_score:
                best_score, best_shift = score, np.array([dy, dx])
    return best_shift


def test_generated_videos_move_the_way_their_label_says(tiny_source):
    index = tiny_source.load()
    assert index.class_names == ["moving_left", "moving_right", "moving_up", "moving_down"]
    gap = 4
    for path, label in index.splits["train"] + index.splits["val"]:
        frames = decode_frames(path, range(TINY["num_video_frames"])).numpy()
        dx, dy = DIRECTIONS[index.class_names[label]]
        shift = _estimated_shift(frames, gap)  # (dy, dx)
        along = shift @ np.array([dy, dx])
        across = shift @ np.array([dx, -dy])
        # Speed is 0.02-0.04 x 32 px per frame: 2.6-5.1 px over 4 frames, in the labelled direction.
        assert 2 <= along <= 6 and abs(across) <= 1, f"{path}: shift {shift} for {index.class_names[label]}"


def test_axis_classes_move_either_way_along_their_axis(tmp_path):
    source = SyntheticMotionSource(tmp_path, **dict(TINY, classes="axis", videos_per_class_train=3))
    source.prepare()
    index = source.load()
    assert index.class_names == ["moving_horizontally", "moving_vertically", "moving_diagonally_down",
                                 "moving_diagonally_up"]
    signs = set()
    for path, label in index.splits["train"]:
        frames = decode_frames(path, range(TINY["num_video_frames"])).numpy()
        dx, dy = CLASS_SCHEMES["axis"][index.class_names[label]][0]
        shift = _estimated_shift(frames, 4)  # (dy, dx)
        along = shift @ np.array([dy, dx])
        across = shift @ np.array([dx, -dy])
        assert 2 <= abs(along) <= 6 and abs(across) <= 1, f"{path}: shift {shift} for {index.class_names[label]}"
        signs.add(bool(along > 0))
    assert signs == {True, False}  # both ways along the axes occur: a single direction is no cue


def test_unknown_class_scheme_names_the_choices(tmp_path):
    with pytest.raises(ValueError, match="direction, axis"):
        SyntheticMotionSource(tmp_path, classes="colour")


def test_generation_is_deterministic(tmp_path):
    settings = dict(TINY, num_classes=2, videos_per_class_train=1)
    first, second = SyntheticMotionSource(tmp_path / "a", **settings), SyntheticMotionSource(tmp_path / "b", **settings)
    first.prepare()
    second.prepare()
    path_a, path_b = first.load().splits["train"][1][0], second.load().splits["train"][1][0]
    assert torch.equal(decode_frames(path_a, range(24)), decode_frames(path_b, range(24)))


def test_prepare_is_cached_and_regenerates_when_parameters_change(tmp_path):
    settings = dict(TINY, num_classes=2, videos_per_class_train=1)
    source = SyntheticMotionSource(tmp_path, **settings)
    source.prepare()
    files = sorted(tmp_path.rglob("*.mp4"))
    assert len(files) == 4
    mtimes = {path: path.stat().st_mtime_ns for path in files + [source.index_path]}

    SyntheticMotionSource(tmp_path, **settings).prepare()  # same parameters: nothing rewritten
    assert {path: path.stat().st_mtime_ns for path in mtimes} == mtimes

    bigger = SyntheticMotionSource(tmp_path, **dict(settings, videos_per_class_train=2))
    with pytest.raises(ValueError, match="other parameters"):
        bigger.load()  # the files on disk were made with other parameters
    bigger.prepare()
    assert len(bigger.load().splits["train"]) == 4
    assert json.loads(source.index_path.read_text())["parameters"]["videos_per_class_train"] == 2
    assert len(sorted(tmp_path.rglob("*.mp4"))) == 6


def test_processes_preparing_together_take_turns(tmp_path):
    """Under torchrun or srun every rank prepares the data at once; each removed the files the other was writing."""
    import fcntl
    import threading

    source = SyntheticMotionSource(tmp_path, **dict(TINY, num_classes=2, videos_per_class_train=1))
    tmp_path.mkdir(exist_ok=True)
    with open(tmp_path / ".prepare.lock", "w") as other_process:
        fcntl.flock(other_process, fcntl.LOCK_EX)  # another rank is generating
        waiting = threading.Thread(target=source.prepare)
        waiting.start()
        waiting.join(timeout=1.0)
        assert waiting.is_alive() and not list(tmp_path.rglob("*.mp4"))  # it waits, and writes nothing meanwhile
    waiting.join(timeout=60)
    assert not waiting.is_alive() and len(source.load().splits["train"]) == 2


def test_load_without_prepare_names_the_root(tmp_path):
    root = tmp_path / "not_generated"
    with pytest.raises(FileNotFoundError, match="not_generated") as error:
        SyntheticMotionSource(root).load()
    assert "prepare()" in str(error.value)


def test_source_rejects_odd_frame_sizes(tmp_path):
    with pytest.raises(ValueError, match="even"):
        SyntheticMotionSource(tmp_path, height=33)


def test_missing_video_raises_file_not_found(tmp_path):
    missing = tmp_path / "missing.mp4"
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        decode_frames(missing, [0])
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        read_video_info(missing)


def test_broken_videos_raise_decode_error_naming_the_file(tmp_path, tiny_source):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    text = tmp_path / "text.mp4"
    text.write_text("this is not a video\n" * 20)
    good = tiny_source.load().splits["train"][0][0]
    truncated = tmp_path / "truncated.mp4"
    data = open(good, "rb").read()
    truncated.write_bytes(data[: len(data) // 2])  # ffmpeg's mp4 index (moov) is at the end: now lost
    for path in (empty, text, truncated):
        with pytest.raises(VideoDecodeError, match=path.name):
            decode_frames(path, [0])


# -- dataset and DataModule --------------------------------------------------------------------------------


def test_dataset_items(tiny_source):
    entries = tiny_source.load().splits["val"]
    dataset = VideoClipDataset(entries, num_frames=4, sampling_rate=2, transform=eval_transform(16), training=False)
    assert len(dataset) == 4
    item = dataset[2]
    assert item["video"].shape == (4, 3, 16, 16) and item["video"].dtype == torch.uint8
    assert item["label"] == entries[2][1] and item["index"] == 2
    assert torch.equal(item["video"], dataset[2]["video"])  # evaluation is deterministic


def test_training_clips_follow_the_torch_seed(tiny_source):
    entries = tiny_source.load().splits["train"]
    dataset = VideoClipDataset(
        entries, num_frames=4, sampling_rate=1, transform=train_transform(16, (16, 24)), training=True
    )

    def draw(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return dataset[0]["video"]

    assert torch.equal(draw(0), draw(0))
    assert any(not torch.equal(draw(0), draw(seed)) for seed in range(1, 5))


def test_resumable_sampler_order_seeds_and_shares():
    dataset = list(range(10))
    single = ResumableSampler(dataset, seed=3)
    epoch0 = list(single)
    assert sorted(index for index, _ in epoch0) == dataset  # a permutation, every video once
    assert len({seed for _, seed in epoch0}) == 10  # every item its own seed
    assert epoch0 == list(ResumableSampler(dataset, seed=3))  # a function of the seed...
    single.set_epoch(1)
    epoch1 = list(single)
    assert [i for i, _ in epoch1] != [i for i, _ in epoch0] and not {s for _, s in epoch1} & {s for _, s in epoch0}
    single.skip_next(4)
    assert list(single) == epoch1[4:]  # resuming: the rest of the epoch, same seeds
    assert list(single) == epoch1  # ...once
    # Two processes: disjoint shares of the same order, each item with the seed it has in one process.
    shares = [list(ResumableSampler(dataset, seed=3, num_replicas=2, rank=rank)) for rank in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == 5
    assert sorted(shares[0] + shares[1]) == sorted(epoch0)


def test_every_video_is_trained_on_when_processes_do_not_divide_the_split():
    """9 videos on 2 processes: the shares are padded to 5 each (one video twice), never cut to 4 (a video left out of
    every epoch, the same one for a given seed and epoch)."""
    for epoch in range(3):
        shares = []
        for rank in (0, 1):
            sampler = ResumableSampler(list(range(9)), seed=7, num_replicas=2, rank=rank)
            sampler.set_epoch(epoch)
            shares.append([index for index, _ in sampler])
        assert len(shares[0]) == len(shares[1]) == 5
        assert set(shares[0]) | set(shares[1]) == set(range(9))


def test_seeded_training_items_follow_their_seed_only(tiny_source):
    entries = tiny_source.load().splits["train"]
    dataset = VideoClipDataset(entries, num_frames=4, sampling_rate=1, transform=train_transform(16, (16, 24)),
                               training=True)
    torch.manual_seed(0)
    first = dataset[(1, 1234)]["video"]
    state = torch.get_rng_state()
    torch.manual_seed(99)
    torch.rand(5)
    again = dataset[(1, 1234)]["video"]
    assert torch.equal(first, again)  # whatever the process's RNG has drawn before
    assert not torch.equal(torch.get_rng_state(), state)  # (the draws above did move it)
    state = torch.get_rng_state()
    dataset[(1, 1234)]
    assert torch.equal(torch.get_rng_state(), state)  # and the item leaves it as it was
    assert any(not torch.equal(first, dataset[(1, seed)]["video"]) for seed in range(5))


def _datamodule(source, **overrides) -> VideoDataModule:
    settings = dict(
        source=source,
        num_frames=4,
        sampling_rate=2,
        image_size=16,
        batch_size=3,
        num_workers=0,
        train_short_side_range=(16, 20),
        horizontal_flip=False,
    )
    return VideoDataModule(**(settings | overrides))


def test_datamodule_batches(tiny_source):
    datamodule = _datamodule(tiny_source)
    assert datamodule.class_names == ["moving_left", "moving_right", "moving_up", "moving_down"]  # before setup
    datamodule.prepare_data()
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["video"].shape == (3, 4, 3, 16, 16)  # (B, T, C, H, W)
    assert batch["video"].dtype == torch.uint8  # a quarter of float32's bytes to the device...
    moved = datamodule.on_after_batch_transfer(dict(batch), 0)  # ...normalised there (what Lightning calls)
    assert torch.equal(moved["video"], normalize(batch["video"], datamodule.mean, datamodule.std))
    assert batch["label"].shape == (3,) and batch["label"].dtype == torch.int64
    assert batch["index"].shape == (3,)
    datamodule.setup("test")
    batches = list(datamodule.val_dataloader())
    assert sum(len(b["label"]) for b in batches) == 4
    assert torch.equal(torch.cat([b["index"] for b in batches]), torch.arange(4))
    test_batches = list(datamodule.test_dataloader())  # the defaults' views: 3 crops of each video's clip
    assert sorted(torch.cat([b["index"] for b in test_batches]).tolist()) == sorted(list(range(4)) * 3)


@pytest.mark.parametrize("stage", ["train", "val", "sanity_check"])
def test_too_many_decode_failures_stop_training_and_validation_epochs(stage):
    """More than max_failed_fraction of the videos (training: each failed read counts as a read) or views (validation,
    its sanity check) failing in an epoch stops the run; up to it, the run goes on. Test epochs are never stopped:
    every failed test video is reported instead."""
    from timesformer.data.datamodule import DecodeFailureMonitor

    def errors(failed: int, items: int) -> list[str]:
        return [f"/d/{i}.mp4\tbroken" for i in range(failed)] + [""] * (items - failed)

    monitor = DecodeFailureMonitor(max_failed_fraction=0.05)
    # exactly at the limit, 5 = 0.05 x 100 failed: training's 95 items read 95 + 5 videos, validation's 100 views
    items = 95 if stage == "train" else 100
    monitor.update(stage, 0, errors(5, items), num_items=items, split_size=1000)
    # one failure more (the next epoch): 6 > 0.05 x 101 (training) or 0.05 x 100 (validation)
    with pytest.raises(RuntimeError, match=f"6 of the {101 if stage == 'train' else 100} .* {stage} epoch"):
        monitor.update(stage, 1, errors(6, items), num_items=items, split_size=1000)
    monitor.update("test", 0, errors(50, 100), num_items=100, split_size=100)  # half the test views: reported only


def test_batches_are_normalised_with_the_configured_mean_and_std(tiny_source):
    """on_after_batch_transfer normalises with data.mean / data.std, not the defaults (0.45 / 0.225): a model
    fine-tuned from weights trained with 0.5 / 0.5 (the Hub's HF checkpoints) must see their statistics."""
    datamodule = _datamodule(tiny_source, mean=[0.5] * 3, std=[0.5] * 3)
    video = torch.tensor([0, 51, 128, 255], dtype=torch.uint8).view(1, 1, 1, 2, 2).expand(2, 4, 3, 2, 2)
    out = datamodule.on_after_batch_transfer({"video": video.clone(), "label": torch.zeros(2)}, 0)["video"]
    expected = torch.tensor([-1.0, 51 / 255 / 0.5 - 1, 128 / 255 / 0.5 - 1, 1.0]).view(1, 1, 1, 2, 2)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected.expand(2, 4, 3, 2, 2))


def test_training_clips_flip_only_when_horizontal_flip_is_on(tiny_source):
    """data.horizontal_flip=false reaches the training transform: a clip whose left half is dark never comes out
    mirrored (a flip turns the synthetic "moving_left" into "moving_right"); with it on, about half the clips are."""
    video = torch.zeros(2, 3, 16, 20, dtype=torch.uint8)
    video[..., 10:] = 255  # left half dark, right half bright; every scale and crop keeps a dark left column

    def flipped(horizontal_flip: bool) -> list[bool]:
        datamodule = _datamodule(tiny_source, horizontal_flip=horizontal_flip)  # short sides 16 ... 20, 16 crops
        datamodule.setup("fit")
        transform = datamodule.datasets["train"].transform
        results = []
        for seed in range(20):
            torch.manual_seed(seed)
            out = transform(video)
            assert out.shape == (2, 3, 16, 16)
            left, right = int(out[0, 0, 0, 0]), int(out[0, 0, 0, -1])
            assert {left, right} == {0, 255}  # one dark edge, one bright
            results.append(left > right)
        return results

    assert not any(flipped(False))
    assert 3 <= sum(flipped(True)) <= 17


def test_a_single_evaluation_crop_is_cut_at_the_smallest_training_scale(tiny_source):
    """As the original tests: one centre crop from the short side at train_short_side_range[0] (256 for 224 crops,
    the training crops' scale), several crops from the short side at the crop size (together they span the frame).
    predict.py cuts the same views as evaluate.py."""
    from timesformer.inference import ClipSettings, load_views

    datamodule = _datamodule(tiny_source, train_short_side_range=(20, 24), test_spatial_crops=3, val_views_full=False)
    datamodule.prepare_data()
    datamodule.setup("test")
    val, test = datamodule.datasets["val"], datamodule.datasets["test"]
    assert (val.views_per_video, test.views_per_video) == (1, 3)
    assert (val.transform.short_side, test.transform.short_side) == (20, 16)
    path = val.entries[0][0]
    for dataset, crops in ((val, 1), (test, 3)):
        settings = ClipSettings(num_frames=4, sampling_rate=2, image_size=16, spatial_crops=crops,
                                train_short_side_min=20)
        views = load_views(Path(path), settings)
        assert views.shape == (crops, 4, 3, 16, 16)
        for view in range(crops):
            assert torch.equal(views[view], dataset[view]["video"])
    frames = decode_frames(path, list(range(4)))  # the centre of the short side at 20, not the whole short side
    centre = v2.CenterCrop(16)(v2.Resize(20, antialias=True)(frames.permute(0, 3, 1, 2)))
    assert torch.equal(EvalViewTransform(16, 1, short_side=20)(frames.permute(0, 3, 1, 2)), centre)
    with pytest.raises(ValueError, match="smaller than the crop size"):
        EvalViewTransform(16, 1, short_side=12)


@pytest.mark.parametrize("default_start_method", ["fork", "spawn"])
def test_workers_outlive_sigterm_from_other_processes_but_not_from_the_main_one(default_start_method, tiny_source):
    """A cluster's SIGTERM reaches the DataLoader workers too: they keep serving the main process, which finishes
    its batch and checkpoints (PyTorch's own handler killed them and the main process raised); the main process's
    SIGTERM (its shutdown) still ends them."""
    import multiprocessing
    import signal
    import subprocess
    import time

    datamodule = _datamodule(tiny_source, num_workers=1, persistent_workers=True, batch_size=1)
    datamodule.setup("fit")
    loader = datamodule.val_dataloader()
    # Spawned workers (forkserver: Python 3.14's default) had library threads with SIGTERM unmasked: the loader forks
    previous = multiprocessing.get_start_method()
    multiprocessing.set_start_method(default_start_method, force=True)
    try:
        iterator = iter(loader)
    finally:
        multiprocessing.set_start_method(previous, force=True)
    next(iterator)
    worker = iterator._workers[0]
    subprocess.run(["kill", "-s", "TERM", str(worker.pid)], check=True)  # from a process that is not the main one
    time.sleep(0.5)
    assert worker.is_alive()
    os.kill(worker.pid, signal.SIGUSR1)  # SLURM's time-limit warning reaches every process; the main one handles it
    time.sleep(0.5)
    assert worker.is_alive()
    assert len([next(iterator) for _ in range(len(loader) - 1)]) == 3  # the rest of the split still comes
    os.kill(worker.pid, signal.SIGTERM)
    worker.join(timeout=10)
    assert worker.exitcode == 0
    iterator._shutdown_workers()


@pytest.mark.parametrize(("overrides", "message"), [
    (dict(sampling_rate=2.5), "data.sampling_rate must be an integer >= 1, got 2.5"),  # was truncated to 2
    (dict(num_frames="eight"), "data.num_frames must be an integer >= 1, got 'eight' \\(model.num_frames"),
    (dict(repeated_augmentation=2, batch_size=3), "data.repeated_augmentation=2 must be >= 1 and divide"),
])
def test_bad_data_values_name_the_option(overrides, message, tiny_source):
    with pytest.raises(ValueError, match=message):
        _datamodule(tiny_source, **overrides)


def test_clips_longer_than_their_videos_are_counted_and_warned_about(tiny_source, caplog):
    """A clip spanning more frames than its video repeats the last frame: said once per stage, with what to do
    (it went unnoticed, e.g. 8 x 32 clips of short UCF101 videos)."""

    for sampling_rate, padded in ((2, False), (20, True)):  # 4 frames spanning 8 or 80 of the videos' 24
        datamodule = _datamodule(tiny_source, sampling_rate=sampling_rate, val_views_full=False)
        datamodule.setup("fit")
        assert all(datamodule.datasets["val"][i]["padded"] is padded for i in range(4))
        assert datamodule.datasets["train"][0]["padded"] is padded
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            for _ in range(2):  # two epochs: warned once
                for batch in datamodule.val_dataloader():
                    assert "padded" not in datamodule.on_before_batch_transfer(batch, 0)
                datamodule.failures.finish_period()
        warnings = [r.getMessage() for r in caplog.records if "longer than their videos" in r.getMessage()]
        assert len(warnings) == (1 if padded else 0)
        if padded:
            assert "4 of 4 clips" in warnings[0] and "4 frames 20 apart at 30 fps" in warnings[0]


def test_datamodule_with_workers(tiny_source):
    datamodule = _datamodule(tiny_source, num_workers=2)
    assert datamodule.persistent_workers
    datamodule.setup("fit")
    labels = torch.cat([batch["label"] for batch in datamodule.train_dataloader()])
    assert sorted(labels.tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]


def test_training_batches_do_not_depend_on_workers_and_resume_mid_epoch(tiny_source):
    def epoch(num_workers: int, epoch: int, state: dict | None = None) -> list[dict]:
        datamodule = _datamodule(tiny_source, num_workers=num_workers, batch_size=2, horizontal_flip=True,
                                 train_short_side_range=(16, 24))
        datamodule.setup("fit")
        if state is not None:  # what Lightning restores from a checkpoint, before creating the loader
            datamodule.load_state_dict(state)
        loader = datamodule.train_dataloader()
        loader.sampler.set_epoch(epoch)
        batches = []
        for batch in loader:
            batches.append(batch)
            if len(batches) == 2:
                saved = datamodule.state_dict()
        return batches, saved

    def same(first: list[dict], second: list[dict]) -> bool:
        if len(first) != len(second):
            return False
        return all(torch.equal(a["video"], b["video"]) and torch.equal(a["index"], b["index"])
                   for a, b in zip(first, second, strict=True))

    without_workers, saved = epoch(0, epoch=1)
    assert saved == {"train_loader": {"epoch": 1, "batches_taken": 2, "batches": 4, "batch_size": 2,
                                      "num_replicas": 1}}
    assert len(without_workers) == 4
    assert same(epoch(2, epoch=1)[0], without_workers)  # the same clips, crops and flips from two workers
    assert not same(epoch(0, epoch=2)[0], without_workers)  # a new epoch draws anew
    assert same(epoch(2, epoch=1, state=saved)[0], without_workers[2:])  # resumed: the rest of that epoch
    assert same(epoch(0, epoch=2, state=saved)[0], epoch(0, epoch=2)[0])  # a checkpoint of another epoch: no skip
    # Lightning counts the rest of that epoch in batches of the checkpoint's size: another size is refused.
    datamodule = _datamodule(tiny_source, batch_size=4)
    datamodule.setup("fit")
    datamodule.load_state_dict(saved)
    loader = datamodule.train_dataloader()
    loader.sampler.set_epoch(1)
    with pytest.raises(ValueError, match="with batches of 2 videos per process and 1 processes; this run has 4"):
        next(iter(loader))


class _PrivateMemoryAfterCollecting(torch.utils.data.Dataset):
    """Each item: how many MB of this (worker) process's memory a full garbage collection made private."""

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> float:
        import gc

        def private_mb() -> float:
            with open("/proc/self/smaps_rollup") as smaps:
                return sum(int(line.split()[1]) for line in smaps if line.startswith("Private_")) / 1024

        before = private_mb()
        gc.collect()
        return private_mb() - before


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup"), reason="reads Linux's /proc")
def test_workers_do_not_copy_the_main_process_memory_when_they_collect_garbage(tiny_source):
    """A full garbage collection in a forked worker wrote to every object it inherited, and so copied their pages:
    ~127 MB more per worker in a train.py run. The workers freeze what they inherit."""
    datamodule = _datamodule(tiny_source, num_workers=1)
    datamodule.setup("fit")
    settings = datamodule._loader_settings(datamodule.datasets["train"])
    inherited = [{"item": i} for i in range(400_000)]  # ~90 MB of objects the collector examines
    copied = {}
    for name, worker_init_fn in (("frozen", settings["worker_init_fn"]), ("not frozen", None)):
        loader = torch.utils.data.DataLoader(_PrivateMemoryAfterCollecting(), num_workers=1,
                                             worker_init_fn=worker_init_fn,
                                             multiprocessing_context=settings["multiprocessing_context"] or "fork")
        copied[name] = float(next(iter(loader)))
    assert copied["not frozen"] > 40, copied  # (else this test cannot tell)
    assert copied["frozen"] < 10, copied
    assert len(inherited) == 400_000  # (alive in this process until the workers have run)


@pytest.mark.parametrize("decoder", ["decord", "pyav"])
def test_a_video_whose_metadata_is_not_utf8_is_a_decode_error(tmp_path, decoder):
    """A damaged file can make PyAV raise other errors than FFmpeg's (found by fuzzing: a UnicodeDecodeError from a
    title that is not UTF-8, a stream without a codec context, ...): training replaces only the videos that raise
    VideoDecodeError, and such a file stopped the run without naming it."""
    video = _write_gop_video(tmp_path / "damaged.mp4", title="TIMESFORMER-TITLE")
    video.write_bytes(video.read_bytes().replace(b"TIMESFORMER-TITLE", b"\xed\xa0\x80" * 5 + b"xy"))
    import av

    with pytest.raises(UnicodeDecodeError):  # (what PyAV makes of it)
        av.open(str(video)).close()
    try:
        frames = decode_frames(video, [0, 39], decoder=decoder)  # decord reads it without its metadata
    except VideoDecodeError as error:
        assert "damaged.mp4" in str(error) and "UnicodeDecodeError" in str(error)
    else:
        assert decoder == "decord" and frames.shape == (2, 48, 64, 3)
    # A caller's errors stay the caller's: an index past the end, or its own exception
    with pytest.raises(IndexError, match="good.mp4, which has 40 frames"):
        decode_frames(_write_gop_video(tmp_path / "good.mp4"), [40], decoder=decoder)
    def choose(num_frames: int, fps: float) -> list[int]:
        try:
            return [{}["no such key"]]
        except KeyError as error:
            raise ValueError("the caller's own") from error

    with pytest.raises(ValueError, match="the caller's own") as raised:
        decode_clip(tmp_path / "good.mp4", choose, decoder=decoder)
    assert isinstance(raised.value.__cause__, KeyError)  # as the caller raised it


def test_a_checkpoint_from_before_resumable_loading_is_warned_about(tiny_source, caplog):
    """Checkpoints before the resumable loader held the shuffling generator's state ("train_generator"): one written
    mid-epoch restarted that epoch from its first batch, without a word."""
    datamodule = _datamodule(tiny_source)
    with caplog.at_level(logging.WARNING):
        datamodule.load_state_dict({"train_loader": {"epoch": 0, "batches_taken": 1}})
    assert "before resumable data loading" not in caplog.text
    with caplog.at_level(logging.WARNING):
        datamodule.load_state_dict({"train_generator": torch.Generator().get_state()})
    assert "that epoch starts again from its first batch" in caplog.text


def test_datamodule_pyav_decoder_gives_the_same_batches(tiny_source):
    batches = {}
    for decoder in ("decord", "pyav"):
        datamodule = _datamodule(tiny_source, decoder=decoder, horizontal_flip=True)
        datamodule.setup("fit")
        # (the clip draws come from each item's seed: the same for both decoders)
        batches[decoder] = [datamodule.on_before_batch_transfer(batch, 0) for batch in datamodule.train_dataloader()]
    for decord_batch, pyav_batch in zip(batches["decord"], batches["pyav"], strict=True):
        assert torch.equal(decord_batch["video"], pyav_batch["video"])  # same clips, same crops and flips
        assert torch.equal(decord_batch["label"], pyav_batch["label"])


def test_repeated_augmentation_draws_several_clips_from_one_decode(tiny_source, monkeypatch):
    import timesformer.data.dataset as dataset_module

    decodes = []
    real_decode_clip = dataset_module.decode_clip
    monkeypatch.setattr(dataset_module, "decode_clip", lambda *a, **k: decodes.append(1) or real_decode_clip(*a, **k))
    datamodule = _datamodule(tiny_source, batch_size=4, repeated_augmentation=2, train_short_side_range=(16, 24),
                             horizontal_flip=True)
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    assert loader.batch_size == 2  # videos per batch: batch_size counts clips
    batch = datamodule.on_before_batch_transfer(next(iter(loader)), 0)
    assert len(decodes) == 2  # two videos decoded for four clips
    assert batch["video"].shape == (4, 4, 3, 16, 16)
    labels, indices = batch["label"].view(2, 2), batch["index"].view(2, 2)
    assert torch.equal(labels[:, 0], labels[:, 1]) and torch.equal(indices[:, 0], indices[:, 1])
    assert batch["replaced"].shape == (2,)  # counts videos, not clips
    clips = batch["video"].view(2, 2, 4, 3, 16, 16)
    assert not torch.equal(clips[0, 0], clips[0, 1])  # the two draws of a video differ (scale / crop / flip)
    # Evaluation is untouched: one clip per view.
    datamodule.setup("validate")
    assert next(iter(datamodule.val_dataloader()))["video"].shape == (4, 4, 3, 16, 16)


def test_datamodule_validates_arguments(tiny_source):
    with pytest.raises(ValueError, match="image_size.*train_short_side_range"):
        _datamodule(tiny_source, image_size=32, train_short_side_range=(16, 20))
    with pytest.raises(ValueError, match="num_frames"):
        _datamodule(tiny_source, num_frames=0)
    with pytest.raises(ValueError, match="mean and std"):
        _datamodule(tiny_source, mean=[0.5, 0.5])
    with pytest.raises(ValueError, match="decoder='opencv'.*decord, pyav"):
        _datamodule(tiny_source, decoder="opencv")
    with pytest.raises(ValueError, match="repeated_augmentation=2 must .* divide batch_size=3"):
        _datamodule(tiny_source, repeated_augmentation=2)


def test_datamodule_from_hydra_config(tiny_source):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    config = OmegaConf.create(
        {
            "_target_": "timesformer.data.VideoDataModule",
            "source": {"_target_": "timesformer.data.SyntheticMotionSource", "root": str(tiny_source.root), **TINY},
            "num_frames": 4,
            "sampling_rate": 2,
            "image_size": 16,
            "batch_size": 2,
            "num_workers": 0,
            "train_short_side_range": [16, 20],
            "mean": [0.5, 0.5, 0.5],
            "std": [0.5, 0.5, 0.5],
            "horizontal_flip": False,
        }
    )
    datamodule = instantiate(config)
    assert isinstance(datamodule.source, SyntheticMotionSource)
    datamodule.setup("validate")
    batch = next(iter(datamodule.val_dataloader()))
    assert batch["video"].shape == (2, 4, 3, 16, 16)


def test_a_frame_size_change_mid_stream_is_a_decode_error(tmp_path):
    """Two MPEG-PS files joined (cat a.mpg b.mpg): PyAV's frames change size mid-way. A clip across the change is
    reported as an undecodable video (replaced in training), not a ValueError that kills the DataLoader worker."""
    import av

    parts = []
    for name, (width, height) in (("a.mpg", (64, 48)), ("b.mpg", (96, 64))):
        with av.open(str(tmp_path / name), mode="w", format="mpeg") as container:
            stream = container.add_stream("mpeg2video", rate=25)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            for t in range(30):
                frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), 8 * t, np.uint8), format="rgb24")
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        parts.append((tmp_path / name).read_bytes())
    path = tmp_path / "joined.mpg"
    path.write_bytes(b"".join(parts))
    assert decode_frames(path, [0, 10], decoder="pyav").shape == (2, 48, 64, 3)  # within the first part: fine
    with pytest.raises(VideoDecodeError, match=r"joined.mpg: their sizes differ \[\(48, 64\), \(64, 96\)\]"):
        decode_frames(path, [0, 45], decoder="pyav")


def test_an_edit_list_hides_the_pre_roll_for_both_decoders(tmp_path):
    """An mp4 cut with stream copy (`ffmpeg -ss 0.4 -c copy`) keeps the frames from the keyframe before the cut,
    hidden by an edit list: frame 0 is the first frame shown, for both decoders. (decord counted the 10 hidden
    frames, inconsistently: index 0 gave the frame shown first, index 20 the one shown 30th; PyAV's path gave no
    picture for frame 0.)"""
    import av

    source, cut = tmp_path / "source.mp4", tmp_path / "cut.mp4"
    with av.open(str(source), mode="w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.options = {"x264-params": "keyint=30:min-keyint=30:scenecut=0", "bf": "0"}
        for t in range(60):
            for packet in stream.encode(av.VideoFrame.from_ndarray(_pattern(t), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with av.open(str(source)) as original, av.open(str(cut), mode="w") as copy:
        stream = original.streams.video[0]
        out = copy.add_stream_from_template(stream)
        shift = 10 * int(1 / (stream.time_base * 25))  # frames 0-9 get negative times: the muxer hides them
        for packet in original.demux(stream):
            if packet.size:
                packet.pts, packet.dts, packet.stream = packet.pts - shift, packet.dts - shift, out
                copy.mux(packet)
    encoded = np.stack([_pattern(t) for t in range(60)]).astype(np.float32)
    for decoder in DECODERS:
        frames, info = decode_clip(cut, lambda num_frames, fps: [0, 20, 49, 25], decoder=decoder)
        shown = [int(np.abs(encoded - frame.numpy()).mean(axis=(1, 2, 3)).argmin()) for frame in frames]
        assert (info.num_frames, shown) == (50, [10, 30, 59, 35]), decoder
    assert check_whole(cut) is None  # the hidden frames are in the file: not cut short


def test_a_phone_videos_display_matrix_turns_its_frames_for_every_reader(tmp_path):
    """A portrait phone video stores landscape frames and a display matrix saying "turn 90 degrees clockwise":
    both decoders return the frames as players show them (PyAV's path returned them sideways), and resizing
    writes them upright (it dropped the matrix, leaving them sideways for every decoder)."""
    import struct

    import av

    from timesformer.data.resize import resize_video

    path = tmp_path / "portrait.mp4"
    stored = np.zeros((48, 64, 3), np.uint8)
    stored[:, :16] = 255  # a white band on the left of the stored frame: on top once turned clockwise
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for _ in range(5):
            for packet in stream.encode(av.VideoFrame.from_ndarray(stored, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    data = bytearray(path.read_bytes())  # the track header's matrix: 90 degrees clockwise (as phones write it)
    track_header = data.find(b"tkhd") - 4
    matrix_at = track_header + 12 + (20 if data[track_header + 8] == 0 else 32) + 16
    struct.pack_into(">9i", data, matrix_at, 0, 0x10000, 0, -0x10000, 0, 0, 48 << 16, 0, 0x40000000)
    path.write_bytes(bytes(data))

    def white_band(video) -> tuple:
        frames = {decoder: decode_frames(video, [0, 4], decoder=decoder) for decoder in DECODERS}
        assert torch.equal(frames["pyav"], frames["decord"])
        rows, cols = np.where(frames["pyav"][0, :, :, 0].numpy() > 128)
        return tuple(frames["pyav"].shape[1:3]), (rows.min(), rows.max()), (cols.min(), cols.max())

    assert white_band(path) == ((64, 48), (0, 15), (0, 47))  # portrait, the band on top
    resize_video(path, tmp_path / "small.mp4", short_side=32)
    assert white_band(tmp_path / "small.mp4") == ((42, 32), (0, 10), (0, 31))  # 16 of 64 rows, x 2/3


def test_each_ddp_process_trains_on_its_own_share(tiny_source):
    """Under DDP the DataModule gives each process its share (Lightning leaves a DistributedSampler in place)."""
    from types import SimpleNamespace

    shares = []
    for rank in (0, 1):
        datamodule = _datamodule(tiny_source, batch_size=2)
        datamodule.trainer = SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 2, "rank": rank},
                                             overfit_batches=0, current_epoch=0, global_rank=rank)
        datamodule.setup("fit")
        shares.append([int(i) for batch in datamodule.train_dataloader() for i in batch["index"]])
    assert len(shares[0]) == len(shares[1]) == 4
    assert sorted(shares[0] + shares[1]) == list(range(8))


def test_lightning_keeps_the_evaluation_sampler_with_overfit_batches(tiny_source):
    """trainer.overfit_batches put a SequentialSampler in place of WholeVideoSampler, then Lightning's own
    DistributedSampler, whose padding had two processes evaluate the same views (an error at validation's end)."""
    from types import SimpleNamespace

    from lightning.pytorch.trainer.connectors.data_connector import _resolve_overfit_batches
    from lightning.pytorch.trainer.states import RunningStage
    from lightning.pytorch.utilities.combined_loader import CombinedLoader

    datamodule = _datamodule(tiny_source, batch_size=2)
    datamodule.trainer = SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 3, "rank": 1}, global_rank=1,
                                         world_size=3)
    datamodule.setup("validate")
    combined = CombinedLoader([datamodule.val_dataloader()])
    _resolve_overfit_batches(combined, RunningStage.VALIDATING)
    from timesformer.data.datamodule import WholeVideoSampler

    assert isinstance(combined.flattened[0].sampler, WholeVideoSampler)


def test_with_fewer_views_than_processes_each_view_counts_once_and_every_process_has_a_batch(tiny_source):
    """4 single-view test videos on 6 processes: every process needs a batch (Lightning skips the evaluation,
    epoch-end hooks and their metric gathering included, of a process without one, and the others hang), but
    Lightning's sampler filled it with a repeated view that the clip-level test/acc and test/loss counted twice. The
    views a process runs again are marked "repeated" (the evaluation steps skip them)."""
    from types import SimpleNamespace

    counted, repeated = [], []
    for rank in range(6):
        datamodule = _datamodule(tiny_source, batch_size=2, test_spatial_crops=1)
        datamodule.trainer = SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 6, "rank": rank},
                                             global_rank=rank, world_size=6, current_epoch=0, training=False,
                                             sanity_checking=False, validating=False, testing=True)
        datamodule.setup("test")
        batches = [datamodule.on_before_batch_transfer(batch, 0) for batch in datamodule.test_dataloader()]
        assert batches, f"rank {rank} has no batch"
        for batch in batches:
            (repeated if batch.get("repeated") else counted).extend(batch["index"].tolist())
    assert sorted(counted) == [0, 1, 2, 3] and len(repeated) == 2


@pytest.mark.parametrize("num_replicas", [1, 2, 3])
def test_evaluation_decodes_each_clip_once_for_all_its_crops_over_processes_and_batches(tiny_source, monkeypatch,
                                                                                         num_replicas):
    """Each process evaluates whole videos and each batch whole clips, so a clip's crops come from one decode.

    Dealt view by view (Lightning's samplers), the 3 crops of a clip went to 3 processes, each decoding it; batches
    of 8 views split every other clip's crops over two DataLoader workers."""
    from types import SimpleNamespace

    decodes = []
    decode = VideoClipDataset._decode
    monkeypatch.setattr(VideoClipDataset, "_decode",
                        lambda self, path, temporal_clip: decodes.append(path) or decode(self, path, temporal_clip))
    views, batches = [], []
    for rank in range(num_replicas):
        datamodule = _datamodule(tiny_source, batch_size=8, test_temporal_clips=2, test_spatial_crops=3)
        datamodule.trainer = SimpleNamespace(distributed_sampler_kwargs={"num_replicas": num_replicas, "rank": rank},
                                             global_rank=rank)
        datamodule.setup("test")
        for batch in datamodule.test_dataloader():
            batches.append([(int(i), int(v)) for i, v in zip(batch["index"], batch["view"], strict=True)])
            views += batches[-1]
    assert sorted(views) == [(video, view) for video in range(4) for view in range(6)]  # each view once
    assert len(decodes) == 4 * 2  # videos x temporal clips
    for batch in batches:  # a batch holds all 3 crops of each of its clips (views 0-2: clip 0, 3-5: clip 1)
        clips = {(video, view // 3) for video, view in batch}
        assert len(batch) == 3 * len(clips) <= 8


@pytest.mark.parametrize("name", ["avi_inside.mp4", "avi_inside"])
def test_an_avi_under_another_name_is_read_with_pyav(tmp_path, name):
    """decord seeks wrongly in AVI files (see DECORD_UNRELIABLE_SUFFIXES): one named .mp4, or with no extension, was
    read by decord, which returned frames 10 and 20 for 40 and 50, silently."""

    path = _write_pattern_video(tmp_path / name, codec_options={"x264-params": "keyint=30:min-keyint=30:scenecut=0"},
                                format="avi")
    encoded = np.stack([_pattern(t) for t in range(60)]).astype(np.float32)
    frames = decode_frames(path, [40, 50, 59, 13])
    assert [int(np.abs(encoded - frame.numpy()).mean(axis=(1, 2, 3)).argmin()) for frame in frames] == [40, 50, 59, 13]
    assert decord_misreads(path)


@pytest.mark.parametrize("suffix", ["mkv", "mp4"])
def test_a_file_starting_between_keyframes_is_read_from_its_first_keyframe(tmp_path, suffix):
    """A stream copy that starts 14 frames before a keyframe: FFmpeg gives no picture for those 14 and players start
    at the keyframe. decord counted them (54 frames) and returned every frame 14 late in the mkv, silently (check
    passed it); PyAV's path numbered them too, and gave no picture for frames 0-13 (in the mp4 decord's did too)."""
    import av

    from timesformer.data.check import VideoCheck, check_video

    source = _write_pattern_video(tmp_path / "source.mp4",
                                  codec_options={"x264-params": "keyint=20:min-keyint=20:scenecut=0", "bf": "0"})
    path = tmp_path / f"capture.{suffix}"
    with av.open(str(source)) as original, av.open(str(path), mode="w") as copy:
        stream = original.streams.video[0]
        out = copy.add_stream_from_template(stream)
        shift = 6 * int(1 / (stream.time_base * 25))
        for packet in list(original.demux(stream))[6:]:  # from source frame 6; the next keyframe is frame 20
            if packet.size:
                packet.pts, packet.dts, packet.stream = packet.pts - shift, packet.dts - shift, out
                copy.mux(packet)
    encoded = np.stack([_pattern(t) for t in range(60)]).astype(np.float32)
    for decoder in DECODERS:
        frames, info = decode_clip(path, lambda num_frames, fps: [0, 10, 39], decoder=decoder)
        shown = [int(np.abs(encoded - frame.numpy()).mean(axis=(1, 2, 3)).argmin()) for frame in frames]
        assert (info.num_frames, shown) == (40, [20, 30, 59]), decoder
        assert check_video(str(path), 0, decoder) == VideoCheck(str(path), 0, num_frames=40, fps=25.0)
    assert decord_misreads(path)


def test_pyav_decoder_reads_av1(tmp_path):
    """libdav1d reads skip_frame once, when it opens: opened while told to skip non-reference frames (frame 0 not
    wanted), it gave no picture for wanted ones either ("the decoder gave no picture" for frame 13)."""
    import av

    if not {"libsvtav1", "libdav1d"} <= av.codecs_available:
        pytest.skip("this PyAV build has no AV1 encoder (libsvtav1) or decoder (libdav1d)")
    path = _write_pattern_video(tmp_path / "av1.mp4", "libsvtav1", {"g": "60"}, num_frames=40)
    with open_video(path) as container:
        assert container.streams.video[0].codec_context.name == "libdav1d"
    for indices in ([13], [1, 9, 17, 25], [0, 13, 39]):
        assert torch.equal(decode_frames(path, indices, decoder="pyav"), decode_frames(path, indices)), indices


def test_a_matroska_video_without_a_frame_rate_gets_the_rate_its_timestamps_measure(tmp_path):
    """A Matroska track need not state its frame rate (DefaultDuration; a remux does not write one): both decoders
    reported 1000 fps, the 1 ms tick of its timestamps, and a dense 8 x 4 clip of this 90-frame video became frame 0
    and then the last frame 7 times."""
    from fractions import Fraction

    import av

    source, path = tmp_path / "phone.mp4", tmp_path / "remux.mkv"
    rng = random.Random(0)
    times = np.cumsum([0] + [rng.choice([25, 33, 34, 45]) for _ in range(89)])  # ms: ~30 fps, jittery
    with av.open(str(source), mode="w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt, stream.options = 64, 48, "yuv420p", {"bf": "0"}
        stream.time_base = stream.codec_context.time_base = Fraction(1, 1000)
        for t, time in enumerate(times):
            frame = av.VideoFrame.from_ndarray(_pattern(t), format="rgb24")
            frame.pts, frame.time_base = int(time), Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with av.open(str(source)) as original, av.open(str(path), mode="w") as copy:
        out = copy.add_stream_from_template(original.streams.video[0])
        for packet in original.demux(original.streams.video[0]):
            if packet.size:
                packet.stream = out
                copy.mux(packet)
    with av.open(str(path)) as container:
        assert container.streams.video[0].average_rate == 1000  # what FFmpeg (and decord) report
    measured = round(89 / (times[-1] / 1000), 3)

    def eval_clip(num_frames: int, fps: float) -> list[int]:
        return dense_clip_indices(num_frames, 8, 4, fps, clip_index=0)

    for decoder in DECODERS:
        frames, info = decode_clip(path, eval_clip, decoder=decoder)
        assert info.fps == measured, decoder
        assert len({frame.numpy().tobytes() for frame in frames}) == 8, decoder  # 8 different frames
    assert read_video_info(path).fps == measured


@pytest.mark.parametrize("name, codec, message", [
    ("cut.avi", "mpeg4", "cut short: it holds frames up to 25 of the 60 its header lists"),
    ("cut.mkv", "libx264", "cut short: its frames end at 1.0 s of the 2.4 s its header declares"),
    ("cut.webm", "libvpx-vp9", "cut short: its frames end at 1.0 s of the 2.4 s its header declares"),
])
def test_check_reports_an_avi_or_matroska_file_cut_short(tmp_path, name, codec, message):
    """A download that stopped: the AVI's header counts 60 frames, the Matroska file's declares 2.4 s; the file holds
    25 frames (cut where a packet ends) and reads as a shorter, whole video: check passed it (only an MP4's index was
    compared with what the file holds)."""
    import av

    from timesformer.data.check import check_video

    whole, cut = _write_pattern_video(tmp_path / f"whole{os.path.splitext(name)[1]}", codec), tmp_path / name
    with av.open(str(whole)) as container:
        ends = [packet.pos + packet.size for packet in container.demux(container.streams.video[0]) if packet.size]
    cut.write_bytes(whole.read_bytes()[: ends[24]])
    assert check_video(str(cut), 0).error == message
    assert check_video(str(whole), 0).error is None
    if name.endswith(".avi"):  # (AVI has no start time)
        return
    # A whole file whose video starts at 2 s (a capture): FFmpeg's DURATION tag is its end time, 4.4 s; compared with
    # the span of its frames (2.4 s), it was reported cut short
    later = _write_pattern_video(tmp_path / f"later{os.path.splitext(name)[1]}", codec, first_pts=50)
    assert check_video(str(later), 0).error is None


def test_check_passes_whole_files_with_skipped_frames_or_a_held_last_frame(tmp_path):
    """Whole files the cut-short rules flagged: an AVI whose muxer filled timestamp gaps with empty chunks the demuxer
    does not return (100 frames listed, 60 packets), and a Matroska file whose last frame is shown for 3 s (its
    packet's duration; the average frame length ended it 3 s early)."""
    import av

    from timesformer.data.video import check_whole

    gaps = tmp_path / "gaps.avi"
    with av.open(str(gaps), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for t in range(60):
            frame = av.VideoFrame.from_ndarray(_pattern(t), format="rgb24")
            frame.pts, frame.time_base = t + 2 * (t // 3), fractions.Fraction(1, 25)  # 2 frames dropped every 3
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    still = tmp_path / "still.mkv"
    with av.open(str(still), mode="w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.time_base = stream.codec_context.time_base = fractions.Fraction(1, 1000)
        for t in range(100):
            frame = av.VideoFrame.from_ndarray(_pattern(t), format="rgb24")
            frame.pts, frame.time_base = 40 * t, fractions.Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            if packet.pts == 40 * 99:
                packet.duration = 3000  # the still at the end
            container.mux(packet)
    assert check_whole(gaps) is None and check_whole(still) is None


def test_video_entries_read_as_the_list_they_were_built_from():
    """A split's entries are kept in arrays (forked DataLoader workers reading a list of tuples copied its pages, 57 MB
    per worker for Kinetics-400); they must read back as the list, names that are not UTF-8 included."""
    from timesformer.data.dataset import VideoEntries

    listed = [("/d/a.mp4", 3), (Path("/d/b c.mp4"), 0), (os.fsdecode(b"/d/caf\xe9.avi"), 7), ("", 1)]
    entries = VideoEntries(listed)
    expected = [(str(path), label) for path, label in listed]
    assert len(entries) == 4 and list(entries) == expected and entries[-1] == expected[-1]
    assert entries[1:3] == expected[1:3] and entries[::-2] == expected[::-2]
    assert [path for path, _ in VideoEntries([])] == []
    assert list(VideoEntries(iter(listed))) == expected  # read once: an iterator gave no entries
    with pytest.raises(IndexError):
        entries[4]

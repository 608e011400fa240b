"""Data pipeline benchmark: decode + augment clips/s per worker, ours against a plain PyAV decode, and the DataLoader.

    python benchmarks/data_pipeline.py            # ~3 minutes on 2 CPU cores (first run: +~1 min to encode videos)
    python benchmarks/data_pipeline.py --quick    # 2 s videos, a few clips: a smoke test (~20 s)

The training recipe 8 x 32 (8 frames, 32 apart at 30 fps, a random start) with the training augmentation
(short side jittered in [256, 320], random 224 crop, flip; the baseline then normalises, ours leaves that to
the GPU) on Kinetics-like videos generated here: 10 s, 30 fps, h264 (x264 preset medium, CRF 23, B-frames, a
keyframe every 60 frames = 2 s) at 340x256 and 640x360. Every video is cached under the output folder.

1. Per worker (one process, one thread, pinned to one core): for the same clips (same frames, same
   crop/scale/flip draws) the time to decode and to augment, for
   - the baseline: PyAV as the original code uses it: seek to the keyframe before the clip, decode every frame
     in order up to the clip's last frame, convert the 8 kept frames to RGB;
   - ours: `decode_clip` with decord (the default) and with PyAV (`data.decoder=pyav`).
   The three outputs are compared element by element (the "identical" column).
2. Repeated augmentation: clips/s of `VideoClipDataset` training items with k = 1, 2, 4 clips per decoded video.
3. The whole `DataLoader` (batch 8, persistent workers) at 1, 2 and all cores' workers; and what handing a
   batch from a worker to the main process costs, float32 clips against uint8.
4. What a GPU needs: the clips/s a GPU trains at 40% MFU (base 8x224, bf16), and what an H200 measured, per CPU
   core of a typical node.
Tables are printed and written to benchmarks/results/data_pipeline.md (and .json).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout, installed or not

from timesformer.data import VideoClipDataset, dense_clip_indices, normalize, train_transform  # noqa: E402
from timesformer.data.video import decode_clip, decord_misreads  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SIZES = ((340, 256), (640, 360))  # (width, height): Kinetics as commonly stored, and 360p
NUM_FRAMES, SAMPLING_RATE, CROP = 8, 32, 224
# A GPU node for the "what a GPU needs" estimate: 8 GPUs and 2 x 56 cores (e.g. a DGX H100); bf16 dense peak.
GPU_PEAK_TFLOPS = {"H100 / H200 SXM (bf16 dense)": 989.0}
CORES_PER_GPU = 14
TARGET_MFU = 0.40
# What benchmarks/gpu.py measured through train.py's loop (base 8x224, bf16, batch 32, torch.compile, train.py's
# model settings; benchmarks/RESULTS.md, part 4, run 6).
MEASURED_GPU_CLIPS_PER_S = {"H200, measured (train.py, torch.compile)": 283.2}


# -- videos ---------------------------------------------------------------------------------------------------
def write_kinetics_like_video(path: Path, width: int, height: int, seconds: float, seed: int) -> None:
    """Camera pan over a smooth texture, objects moving across it, sensor noise: h264 as YouTube-derived
    datasets store it (x264 medium, CRF 23, up to 3 B-frames, a keyframe every 2 s)."""
    rng = np.random.default_rng(seed)
    fps, frames = 30, int(round(seconds * 30))
    # A texture larger than the frame, smooth at the scale of ~8 px, panned by the "camera".
    coarse = torch.from_numpy(rng.random((1, 3, (height + 160) // 8, (width + 320) // 8), dtype=np.float32))
    texture = F.interpolate(coarse, scale_factor=8, mode="bicubic", align_corners=False)[0].permute(1, 2, 0)
    texture = (texture.clamp(0, 1) * 255).numpy()
    objects = [(rng.uniform(0, width), rng.uniform(0, height), rng.uniform(-4, 4), rng.uniform(-3, 3),
                rng.integers(20, 60), rng.integers(0, 255, 3)) for _ in range(3)]
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.mp4")
    with av.open(str(partial), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = 60
        stream.options = {"crf": "23", "preset": "medium", "keyint_min": "60", "sc_threshold": "0", "threads": "1"}
        for t in range(frames):
            x, y = int(t * 1.5) % 320, int(80 + 70 * np.sin(t / 45))
            frame = texture[y : y + height, x : x + width].copy()
            for x0, y0, vx, vy, size, colour in objects:
                cx, cy = int(x0 + vx * t) % width, int(y0 + vy * t) % height
                frame[max(cy - size // 2, 0) : cy + size // 2, max(cx - size // 2, 0) : cx + size // 2] = colour
            frame += rng.normal(0, 3, frame.shape)
            image = av.VideoFrame.from_ndarray(np.clip(frame, 0, 255).astype(np.uint8), format="rgb24")
            for packet in stream.encode(image):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    partial.rename(path)


def make_videos(folder: Path, count: int, seconds: float) -> dict[tuple[int, int], list[Path]]:
    videos = {}
    for width, height in SIZES:
        videos[(width, height)] = []
        for seed in range(count):
            path = folder / f"kinetics_like_{width}x{height}_{seconds:g}s_{seed}.mp4"
            if not path.is_file():
                print(f"  encoding {path.name} ...", flush=True)
                write_kinetics_like_video(path, width, height, seconds, seed)
            videos[(width, height)].append(path)
    return videos


# -- the baseline: a straightforward PyAV decode ------------------------------------------------------------------
def decode_pyav_sequential(path: Path, indices: list[int]) -> torch.Tensor:
    """What the original TimeSformer (PySlowFast) decoder does, converting only the kept frames: seek to the
    keyframe before the clip's first frame, decode in order until its last, frame number = time x fps."""
    wanted = set(indices)
    kept = {}
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "NONE"
        fps, base = float(stream.average_rate), stream.time_base
        start = stream.start_time or 0
        container.seek(start + int(min(indices) / fps / base), stream=stream, backward=True, any_frame=False)
        for frame in container.decode(stream):
            number = round(float((frame.pts - start) * base) * fps)
            if number in wanted:
                kept[number] = frame.to_ndarray(format="rgb24")
            if number >= max(indices):
                break
    return torch.from_numpy(np.stack([kept[i] for i in indices]))


# -- 1. per worker ------------------------------------------------------------------------------------------------
def decode_decord_first_visit(path: Path, indices: list[int]) -> torch.Tensor:
    """The decord path as a worker meets a file: with its packet check (`decord_misreads`), which is cached per
    process, but a large dataset's file rarely comes back to the same worker (shuffled over workers and GPUs)."""
    decord_misreads.cache_clear()
    return decode_clip(path, lambda n, fps: indices)[0]


BASELINE = "PyAV sequential (baseline)"
METHODS = {
    BASELINE: lambda path, indices: decode_pyav_sequential(path, indices),
    "decord (ours, default)": lambda path, indices: decode_decord_first_visit(path, indices),
    "PyAV sparse (ours, data.decoder=pyav)": lambda path, indices: decode_clip(path, lambda n, fps: indices,
                                                                               decoder="pyav")[0],
}


def per_worker(videos: list[Path], clips: int, repeats: int) -> dict:
    """ms per clip to decode and to augment, per method: medians over `repeats` of each clip, summed over clips."""
    transform = train_transform(CROP)
    rng = random.Random(0)
    draws = []
    for number in range(clips):
        path = videos[number % len(videos)]
        with av.open(str(path)) as container:
            total = container.streams.video[0].frames  # from the mp4 index
        draws.append((path, dense_clip_indices(total, NUM_FRAMES, SAMPLING_RATE, 30.0, rng=rng)))
    decode_ms = {name: [] for name in METHODS}
    augment_ms = {name: [] for name in METHODS}
    normalize_ms = {name: [] for name in METHODS}  # ours: what normalising in the worker would add (equal output)
    identical = True
    for number, (path, indices) in enumerate(draws):
        times = {name: ([], [], []) for name in METHODS}
        outputs = {}
        for repeat in range(repeats + 1):  # the first round warms caches and is not counted
            names = list(METHODS)
            names = names[repeat % len(names):] + names[: repeat % len(names)]  # take turns going first
            for name in names:
                begin = time.perf_counter()
                frames = METHODS[name](path, indices)
                decoded = time.perf_counter()
                torch.manual_seed(number)  # the same scale / crop / flip for every method
                clip = transform(frames.permute(0, 3, 1, 2))
                if name == BASELINE:  # the original normalises in the worker; ours, on the GPU after the copy
                    clip = normalize(clip)
                done = time.perf_counter()
                if name != BASELINE:
                    normalize(clip)  # timed apart: the same float clip as the baseline's, for the equal-output ratio
                normalized = time.perf_counter()
                if repeat:
                    times[name][0].append(decoded - begin)
                    times[name][1].append(done - decoded)
                    times[name][2].append(normalized - done)
                outputs[name] = clip
        reference = outputs[BASELINE]
        identical &= all(torch.equal(normalize(outputs[name]), reference) for name in METHODS if name != BASELINE)
        for name in METHODS:
            decode_ms[name].append(1000 * statistics.median(times[name][0]))
            augment_ms[name].append(1000 * statistics.median(times[name][1]))
            normalize_ms[name].append(1000 * statistics.median(times[name][2]))
    return {"clips": clips, "identical": identical,
            "decode_ms": {name: statistics.fmean(v) for name, v in decode_ms.items()},
            "augment_ms": {name: statistics.fmean(v) for name, v in augment_ms.items()},
            "normalize_ms": {name: statistics.fmean(v) for name, v in normalize_ms.items()}}


# -- 2. repeated augmentation ---------------------------------------------------------------------------------
def training_dataset(videos: list[Path], decoder: str, repeated_augmentation: int, items: int) -> VideoClipDataset:
    entries = [(str(videos[i % len(videos)]), 0) for i in range(items)]
    return VideoClipDataset(entries, NUM_FRAMES, SAMPLING_RATE, train_transform(CROP), training=True,
                            decoder=decoder, repeated_augmentation=repeated_augmentation)


def repeated_augmentation(videos: list[Path], items: int) -> list[dict]:
    """clips/s of training items with k clips per decode; the settings take turns item by item (a slow spell
    of a shared machine then hits them alike)."""
    settings = [(decoder, k) for decoder in ("decord", "pyav") for k in (1, 2, 4)]
    datasets = {setting: training_dataset(videos, *setting, items) for setting in settings}
    seconds = dict.fromkeys(settings, 0.0)
    for item in range(-1, items):  # item -1: warm-up, not counted
        for setting in settings[item % len(settings):] + settings[: item % len(settings)]:
            begin = time.perf_counter()
            datasets[setting][max(item, 0)]
            if item >= 0:
                seconds[setting] += time.perf_counter() - begin
    return [{"decoder": decoder, "k": k, "clips_per_s": k * items / seconds[(decoder, k)]} for decoder, k in settings]


# -- 3. the DataLoader ----------------------------------------------------------------------------------------
def dataloader(videos: list[Path], items: int, batch_size: int = 8) -> list[dict]:
    rows = []
    for decoder in ("decord", "pyav"):
        for workers in sorted({1, 2, os.cpu_count() or 1}):
            loader = torch.utils.data.DataLoader(training_dataset(videos, decoder, 1, items), batch_size=batch_size,
                                                 shuffle=True, num_workers=workers, persistent_workers=True,
                                                 generator=torch.Generator().manual_seed(0))
            for _ in loader:  # one epoch to start the workers (and fill the OS file cache)
                pass
            begin, clips = time.perf_counter(), 0
            for batch in loader:
                clips += len(batch["video"])
            rows.append({"decoder": decoder, "workers": workers,
                         "clips_per_s": clips / (time.perf_counter() - begin)})
            del loader
    return rows


# -- 3b. handing batches from a worker to the main process ----------------------------------------------------
class _ReadyClips(torch.utils.data.Dataset):
    """Augmented 8 x 224 clips, already made: what is left of a worker's job is collating and handing over."""

    def __init__(self, dtype: torch.dtype, items: int) -> None:
        clip = torch.randint(0, 256, (NUM_FRAMES, 3, CROP, CROP), dtype=torch.uint8)
        self.clip, self.items = (clip if dtype == torch.uint8 else normalize(clip)), items

    def __len__(self) -> int:
        return self.items

    def __getitem__(self, index: int) -> dict:
        return {"video": self.clip.clone(), "label": index % 2}  # a new tensor per item, as a transform makes


def transport(items: int, batch_size: int = 8) -> list[dict]:
    """ms per clip for one worker to collate batches (into shared memory) and the main process to receive them,
    float32 clips (normalised in the worker, as the original) against uint8 (ours); interleaved, best of 3."""
    times: dict[str, list[float]] = {"float32": [], "uint8": []}
    for _ in range(3):
        for name, dtype in (("float32", torch.float32), ("uint8", torch.uint8)):
            loader = torch.utils.data.DataLoader(_ReadyClips(dtype, items), batch_size=batch_size, num_workers=1,
                                                 persistent_workers=True)
            for _ in loader:  # start the worker
                pass
            begin = time.perf_counter()
            for _ in loader:
                pass
            times[name].append(1000 * (time.perf_counter() - begin) / items)
            del loader
    return [{"clips": name, "ms_per_clip": min(values)} for name, values in times.items()]


# -- 4. what a GPU needs ---------------------------------------------------------------------------------------
def gpu_needs() -> dict:
    from timesformer.model import TimeSformerConfig
    from timesformer.profile import count_flops

    macs = count_flops(TimeSformerConfig(num_frames=NUM_FRAMES, image_size=CROP, num_classes=400))  # fwd, MACs
    train_flops = 6 * macs  # forward 2 FLOPs per multiply-add; backward twice the forward
    needs = {}
    for gpu, peak in GPU_PEAK_TFLOPS.items():
        clips_per_s = TARGET_MFU * peak * 1e12 / train_flops
        needs[f"{gpu} at {TARGET_MFU:.0%} MFU"] = {"clips_per_s": clips_per_s, "per_core": clips_per_s / CORES_PER_GPU}
    for gpu, clips_per_s in MEASURED_GPU_CLIPS_PER_S.items():
        needs[gpu] = {"clips_per_s": clips_per_s, "per_core": clips_per_s / CORES_PER_GPU}
    return {"forward_gmacs": macs / 1e9, "train_tflop_per_clip": train_flops / 1e12, "gpus": needs}


# -- report -------------------------------------------------------------------------------------------------------
def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def report(results: dict) -> str:
    parts = []
    rows = []
    for size, worker in results["per_worker"].items():
        base = worker["decode_ms"][BASELINE] + worker["augment_ms"][BASELINE]
        base_decode = worker["decode_ms"][BASELINE]
        for name in METHODS:
            decode, augment = worker["decode_ms"][name], worker["augment_ms"][name]
            equal_output = decode + augment + worker["normalize_ms"][name]  # (the baseline's includes it)
            rows.append([size, name, f"{decode:.1f}", f"{augment:.1f}", f"{1000 / (decode + augment):.1f}",
                         f"{base_decode / decode:.2f}x", f"{base / (decode + augment):.2f}x",
                         f"{base / equal_output:.2f}x", "yes" if worker["identical"] else "NO"])
    parts.append("### 1. Decode + augment per worker (one process, one thread, one core), 8 x 32 clips, train "
                 "augmentation (the baseline normalises in the worker; ours hands uint8 clips on, normalised on the "
                 "GPU; the equal-output column times ours normalising in the worker too, the target's measure)\n\n"
                 + table(["video", "decoder", "decode ms", "augment ms", "clips/s", "decode speed vs baseline",
                          "clips/s vs baseline", "vs baseline, equal output", "identical"], rows))
    rows = [[size, row["decoder"], str(row["k"]), f"{row['clips_per_s']:.1f}"]
            for size, block in results["repeated_augmentation"].items() for row in block]
    parts.append("### 2. Repeated augmentation: k clips per decoded video (VideoClipDataset training items)\n\n"
                 + table(["video", "decoder", "k", "clips/s per worker"], rows))
    rows = [[size, row["decoder"], str(row["workers"]), f"{row['clips_per_s']:.1f}"]
            for size, block in results["dataloader"].items() for row in block]
    parts.append(f"### 3. DataLoader, batch 8, persistent workers ({os.cpu_count()} cores here)\n\n"
                 + table(["video", "decoder", "workers", "clips/s"], rows))
    rows = [[row["clips"], f"{row['ms_per_clip']:.2f}"] for row in results["transport"]]
    parts.append(f"### 3b. Handing clips from a worker to the main process: {NUM_FRAMES} x {CROP} clips, batch 8, "
                 "one worker, no decoding (collate into shared memory, receive)\n\n"
                 + table(["clips", "ms per clip"], rows))
    needs = results["gpu_needs"]
    rows = []
    for gpu, need in needs["gpus"].items():
        for size, worker in results["per_worker"].items():
            for name in list(METHODS)[1:]:
                per_core = 1000 / (worker["decode_ms"][name] + worker["augment_ms"][name])
                rows.append([gpu, f"{need['clips_per_s']:.0f}", f"{need['per_core']:.1f}", size, name,
                             f"{per_core:.1f}", f"{need['clips_per_s'] / per_core:.0f}"])
    parts.append(f"### 4. What a GPU needs: base 8x224 training at {TARGET_MFU:.0%} MFU "
                 f"({needs['train_tflop_per_clip']:.2f} TFLOP per clip = 6 x {needs['forward_gmacs']:.1f} GMACs), "
                 f"{CORES_PER_GPU} cores per GPU\n\n"
                 + table(["GPU", "clips/s per GPU", "needed per core", "video", "decoder", "clips/s per core here",
                          "cores needed per GPU"], rows))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 s videos and a few clips: a smoke test")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the tables, JSON and videos go")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # a DataLoader worker's setting
    start = time.perf_counter()
    seconds, count, clips, repeats, items = (2.0, 1, 4, 1, 8) if args.quick else (10.0, 4, 24, 3, 32)
    print("data pipeline: videos ...", flush=True)
    videos = make_videos(args.out / "videos", count, seconds)
    results: dict = {"quick": args.quick, "per_worker": {}, "repeated_augmentation": {}, "dataloader": {}}
    all_cores = os.sched_getaffinity(0)
    for (width, height), paths in videos.items():
        size = f"{width}x{height}"
        print(f"data pipeline: {size}: per worker, repeated augmentation, DataLoader ...", flush=True)
        os.sched_setaffinity(0, {max(all_cores)})  # a worker's lot: one core (and no migrations between cores)
        results["per_worker"][size] = per_worker(paths, clips, repeats)
        results["repeated_augmentation"][size] = repeated_augmentation(paths, items // 2)
        os.sched_setaffinity(0, all_cores)
        results["dataloader"][size] = dataloader(paths, items)
    print("data pipeline: handing batches over ...", flush=True)
    results["transport"] = transport(items * 4)
    results["gpu_needs"] = gpu_needs()
    text = report(results)
    args.out.mkdir(parents=True, exist_ok=True)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    (args.out / "data_pipeline.md").write_text(f"{os.cpu_count()} cores, load average {load}\n\n{text}\n")
    (args.out / "data_pipeline.json").write_text(json.dumps(results, indent=1))
    print(f"\n{text}\n\nwritten to {args.out} in {time.perf_counter() - start:.0f} s")
    return results


if __name__ == "__main__":
    main()

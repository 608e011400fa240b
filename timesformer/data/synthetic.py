"""A small generated video dataset whose classes differ only in motion.

Each video shows a few bright textured rectangles moving together in a straight line over a static, dark,
noisy background. The class is the motion: its direction (`classes="direction"`), or its axis, either way
along it (`classes="axis"`, what configs/data/synthetic.yaml and the demo use). Everything else is random per video and
independent of the class: background colour and texture, object count, colours, textures and sizes, speed
and starting positions. The objects wrap around the frame edges (toroidal), so their positions in any single
frame are uniform: no single frame tells the classes apart, only the change between frames does. A model
that learns it must use time.

Videos are real h264 mp4 files (yuv420p), decoded by the same code as real datasets.

Horizontal flip must be OFF when training on this dataset: a flip swaps "moving_left" and "moving_right"
(and the diagonals' left/right parts) without swapping their labels.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from timesformer.data.dataset import VideoIndex

# Bump when the rendering changes, so that cached datasets made by older code are regenerated.
GENERATOR_VERSION = 2  # 2: deterministic x264 encoding (cpu-independent)

# Direction of motion per class, as (dx, dy) unit steps in image coordinates (y points down).
# The first `num_classes` are used.
DIRECTIONS: dict[str, tuple[float, float]] = {
    "moving_left": (-1.0, 0.0),
    "moving_right": (1.0, 0.0),
    "moving_up": (0.0, -1.0),
    "moving_down": (0.0, 1.0),
    "moving_up_left": (-math.sqrt(0.5), -math.sqrt(0.5)),
    "moving_up_right": (math.sqrt(0.5), -math.sqrt(0.5)),
    "moving_down_left": (-math.sqrt(0.5), math.sqrt(0.5)),
    "moving_down_right": (math.sqrt(0.5), math.sqrt(0.5)),
}

# Class schemes. "direction": each class one direction of motion (left vs right: one class is the other
# played backwards). "axis": each class an axis of motion, a video moving either way along it, drawn at
# random. Tiny TimeSformers learn "axis" in a few minutes on a CPU but need far longer for "direction"
# (see the README's demo notes); both can only be told apart by motion.
CLASS_SCHEMES: dict[str, dict[str, list[tuple[float, float]]]] = {
    "direction": {name: [direction] for name, direction in DIRECTIONS.items()},
    "axis": {
        "moving_horizontally": [DIRECTIONS["moving_left"], DIRECTIONS["moving_right"]],
        "moving_vertically": [DIRECTIONS["moving_up"], DIRECTIONS["moving_down"]],
        "moving_diagonally_down": [DIRECTIONS["moving_up_left"], DIRECTIONS["moving_down_right"]],
        "moving_diagonally_up": [DIRECTIONS["moving_down_left"], DIRECTIONS["moving_up_right"]],
    },
}

# Objects per video; object size and speed as fractions of the frame's short side (speed per frame). At
# the default 64x48 / 30 fps: 10-14 px objects moving 1.0-1.9 px per frame, so an 8-frame clip with
# sampling_rate 3 sees 3-6 px of motion between its frames (2-4 px after the 32 px evaluation resize, a
# quarter to a half of an 8 px patch) and 20-40 px in all: clearly visible, yet far below the wrap-around
# period of 48-64 px (no aliasing: the nearest wrong match is 40+ px away).
OBJECTS_PER_VIDEO = (2, 4)
OBJECT_SIZE_RANGE = (0.2, 0.3)
SPEED_RANGE = (0.02, 0.04)

_SPLIT_IDS = {"train": 0, "val": 1}
INDEX_FILE = "index.json"


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int, amplitude: float) -> np.ndarray:
    """Low-frequency RGB noise (height, width, 3): a coarse random grid upsampled bilinearly."""
    grid_h, grid_w = cells + 1, cells + 1
    grid = rng.uniform(-amplitude, amplitude, size=(grid_h, grid_w, 3))
    ys = np.linspace(0, grid_h - 1, height)
    xs = np.linspace(0, grid_w - 1, width)
    y0 = np.minimum(ys.astype(int), grid_h - 2)
    x0 = np.minimum(xs.astype(int), grid_w - 2)
    wy = (ys - y0)[:, None, None]
    wx = (xs - x0)[None, :, None]
    top = grid[y0][:, x0] * (1 - wx) + grid[y0][:, x0 + 1] * wx
    bottom = grid[y0 + 1][:, x0] * (1 - wx) + grid[y0 + 1][:, x0 + 1] * wx
    return top * (1 - wy) + bottom * wy


def render_video(
    direction: tuple[float, float],
    num_frames: int,
    height: int,
    width: int,
    rng: np.random.Generator,
    num_objects: int | None = None,
) -> np.ndarray:
    """Frames of one video, uint8 (T, H, W, 3) RGB.

    The objects sit on one foreground layer that translates rigidly (all objects share the direction and
    speed) and wraps around the frame edges; the background stays still.
    """
    return render_video_and_masks(direction, num_frames, height, width, rng, num_objects)[0]


def render_video_and_masks(
    direction: tuple[float, float],
    num_frames: int,
    height: int,
    width: int,
    rng: np.random.Generator,
    num_objects: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """`render_video`'s frames, uint8 (T, H, W, 3), and where the objects are in each, bool (T, H, W).

    The masks are the ground truth for checks of what a model looks at (tests/test_attention_on_object.py);
    they draw nothing from `rng`, so the frames are the same bytes as `render_video`'s.
    """
    short_side = min(height, width)

    # Static background: a random dark base colour, smooth colour blotches and fine pixel noise.
    base = rng.uniform(0, 110, size=3)
    background = base + _smooth_noise(rng, height, width, cells=4, amplitude=25.0)
    background += rng.normal(0.0, 6.0, size=(height, width, 3))
    background = np.clip(background, 0, 255)

    # Foreground layer (H, W, 3) and its mask (H, W): bright rectangles (always brighter than the dark
    # background: one contrast polarity makes motion easier to see for small models), each with its own
    # texture, which moves with it (more than an edge to track).
    if num_objects is None:
        num_objects = int(rng.integers(OBJECTS_PER_VIDEO[0], OBJECTS_PER_VIDEO[1] + 1))
    layer = np.zeros((height, width, 3))
    mask = np.zeros((height, width), dtype=bool)
    for _ in range(num_objects):
        object_h, object_w = (max(2, round(short_side * rng.uniform(*OBJECT_SIZE_RANGE))) for _ in range(2))
        colour = rng.uniform(150, 255, size=3)
        patch = colour + rng.normal(0.0, 12.0, size=(object_h, object_w, 3))
        stripes = (np.add.outer(np.arange(object_h), np.arange(object_w)) // 3) % 2  # diagonal, 3 px wide
        patch += np.where(stripes == 0, 15.0, -15.0)[..., None]
        # A uniformly random place, wrapping around the edges like the motion does.
        rows = (int(rng.integers(height)) + np.arange(object_h)) % height
        cols = (int(rng.integers(width)) + np.arange(object_w)) % width
        layer[np.ix_(rows, cols)] = np.clip(patch, 0, 255)
        mask[np.ix_(rows, cols)] = True

    speed = short_side * rng.uniform(*SPEED_RANGE)  # pixels per frame
    dx, dy = direction[0] * speed, direction[1] * speed

    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    masks = np.empty((num_frames, height, width), dtype=bool)
    for t in range(num_frames):
        # np.roll is the toroidal wrap-around.
        shift = (round(t * dy), round(t * dx))
        masks[t] = np.roll(mask, shift, axis=(0, 1))
        moved_layer = np.roll(layer, shift, axis=(0, 1))
        frame = np.where(masks[t][..., None], moved_layer, background)
        frames[t] = np.round(frame).astype(np.uint8)
    return frames, masks


def write_mp4(path: str | os.PathLike, frames: np.ndarray, fps: float) -> None:
    """Encode uint8 (T, H, W, 3) RGB frames as an h264 mp4 (yuv420p, so H and W must be even)."""
    # PyAV's wheels bundle FFmpeg with libx264; builds without it fall back to MPEG-4 part 2, which decord
    # reads just as well (the files are only larger).
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(os.fspath(path), mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        # One thread for the encoder and for the RGB -> YUV conversion: with FFmpeg's default (automatic)
        # threading both gave different bytes from run to run, and a seed must always give the same videos.
        options = {"threads": "1"}
        if codec == "libx264":
            # Near-lossless: the moving objects must survive compression; the files stay a few KB.
            # cpu-independent: even single-threaded, x264's assembly for its lookahead rate control (mbtree) gave
            # different bytes, and frames up to 50 levels apart, from one process to the next (35 of the demo's
            # 256 videos between two generations); the portable code gives the same bytes every time.
            options |= {"crf": "18", "preset": "fast", "x264-params": "cpu-independent=1"}
        stream.options = options
        for frame in frames:
            yuv = av.VideoFrame.from_ndarray(frame, format="rgb24").reformat(format="yuv420p", threads=1)
            for packet in stream.encode(yuv):
                container.mux(packet)
        for packet in stream.encode():  # flush the encoder
            container.mux(packet)


class SyntheticMotionSource:
    """Generates (once, cached) and indexes the synthetic motion dataset under `root`.

    Layout: `root/<split>/<class_name>/<id>.mp4` for splits "train" and "val", and `root/index.json` (the
    class names, the entries of each split and the generation parameters), written last and atomically,
    so its presence means the dataset is complete. "test" is the "val" split.

    `classes`: "direction" (moving_left, moving_right, ...: horizontal flip must be OFF, it swaps left and
    right without swapping the labels) or "axis" (moving_horizontally, moving_vertically, ...: each video moves
    either way along its class's axis; see CLASS_SCHEMES).
    Suggested clip settings for the defaults: num_frames=8, sampling_rate=3, target_fps=30 (the video fps),
    image_size=32, train_short_side_range=(32, 40), horizontal_flip=False.
    Default size: 4 classes x (48 train + 16 val) videos of 32 frames, 64x48 px, 30 fps.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        num_classes: int = 4,
        videos_per_class_train: int = 48,
        videos_per_class_val: int = 16,
        num_video_frames: int = 32,
        fps: float = 30.0,
        height: int = 48,
        width: int = 64,
        seed: int = 0,
        classes: str = "direction",
    ) -> None:
        if classes not in CLASS_SCHEMES:
            raise ValueError(f"SyntheticMotionSource classes={classes!r} is not supported; valid values: "
                             f"{', '.join(CLASS_SCHEMES)}")
        scheme_size = len(CLASS_SCHEMES[classes])
        if not 2 <= num_classes <= scheme_size:
            raise ValueError(f"SyntheticMotionSource num_classes must be in [2, {scheme_size}] for "
                             f"classes={classes!r}, got {num_classes}")
        if videos_per_class_train < 1 or videos_per_class_val < 1:
            raise ValueError(
                "SyntheticMotionSource videos_per_class_train and videos_per_class_val must be >= 1, got "
                f"{videos_per_class_train} and {videos_per_class_val}"
            )
        if num_video_frames < 2:
            raise ValueError(f"SyntheticMotionSource num_video_frames must be >= 2, got {num_video_frames}")
        if height % 2 or width % 2 or min(height, width) < 16:
            raise ValueError(
                f"SyntheticMotionSource height and width must be even (yuv420p) and >= 16, got {height}x{width}"
            )
        if fps <= 0:
            raise ValueError(f"SyntheticMotionSource fps must be positive, got {fps}")
        self.root = Path(root).expanduser()
        self.num_classes = num_classes
        self.classes = classes
        self.videos_per_class = {"train": videos_per_class_train, "val": videos_per_class_val}
        self.num_video_frames = num_video_frames
        self.fps = float(fps)
        self.height = height
        self.width = width
        self.seed = seed

    @property
    def class_names(self) -> list[str]:
        return list(CLASS_SCHEMES[self.classes])[: self.num_classes]

    @property
    def index_path(self) -> Path:
        return self.root / INDEX_FILE

    def parameters(self) -> dict:
        """Everything the generated files depend on; a change means regenerating."""
        return {
            "generator": "synthetic_motion",
            "version": GENERATOR_VERSION,
            "num_classes": self.num_classes,
            "classes": self.classes,
            "videos_per_class_train": self.videos_per_class["train"],
            "videos_per_class_val": self.videos_per_class["val"],
            "num_video_frames": self.num_video_frames,
            "fps": self.fps,
            "height": self.height,
            "width": self.width,
            "seed": self.seed,
        }

    def _read_index(self) -> dict | None:
        try:
            with open(self.index_path) as f:
                return json.load(f)
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def _is_complete(self, index: dict | None) -> bool:
        if index is None or index.get("parameters") != self.parameters():
            return False
        return all((self.root / path).is_file() for entries in index["splits"].values() for path, _ in entries)

    def prepare(self) -> None:
        """Generate the videos unless an up-to-date, complete copy is already in `root`.

        Processes started together (torchrun, srun: every rank builds the data module) take turns on a lock file in
        `root`: the first generates, the others then find its complete copy (they removed each other's files)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".prepare.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            self._generate_unless_complete()

    def _generate_unless_complete(self) -> None:
        if self._is_complete(self._read_index()):
            return
        # Remove the old index first: until the new one is written the dataset is incomplete. Then remove
        # only what an earlier generation can have written (mp4s in our class folders).
        self.index_path.unlink(missing_ok=True)
        for split in self.videos_per_class:
            for class_name in {name for scheme in CLASS_SCHEMES.values() for name in scheme}:
                for old in (self.root / split / class_name).glob("*.mp4"):
                    old.unlink()

        splits: dict[str, list[tuple[str, int]]] = {}
        for split, videos_per_class in self.videos_per_class.items():
            splits[split] = []
            for label, class_name in enumerate(self.class_names):
                folder = self.root / split / class_name
                folder.mkdir(parents=True, exist_ok=True)
                for video_id in range(videos_per_class):
                    frames, _ = self._render(split, label, video_id)
                    relative_path = f"{split}/{class_name}/{video_id:05d}.mp4"
                    write_mp4(self.root / relative_path, frames, self.fps)
                    splits[split].append((relative_path, label))

        index = {"parameters": self.parameters(), "class_names": self.class_names, "splits": splits}
        temporary = self.index_path.with_name(INDEX_FILE + ".tmp")
        with open(temporary, "w") as f:
            json.dump(index, f, indent=1)
        os.replace(temporary, self.index_path)

    def _render(self, split: str, label: int, video_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Frames (T, H, W, 3) and object masks (T, H, W) of one video, all drawn from its own seed."""
        # One seed per video, so a video does not change when the number of videos does.
        rng = np.random.default_rng([self.seed, _SPLIT_IDS[split], label, video_id])
        options = CLASS_SCHEMES[self.classes][self.class_names[label]]
        direction = options[int(rng.integers(len(options)))] if len(options) > 1 else options[0]
        return render_video_and_masks(direction, self.num_video_frames, self.height, self.width, rng)

    def object_masks(self, path: str | os.PathLike) -> np.ndarray:
        """Where the moving objects are in every frame of the generated video at `path` (absolute, as `load()`
        lists it, or relative to `root`): bool (num_video_frames, height, width), re-rendered from its seed."""
        path = Path(path)
        relative = path.relative_to(self.root) if path.is_absolute() else path
        split, class_name, name = relative.parts
        if split not in _SPLIT_IDS or class_name not in self.class_names:
            raise ValueError(f"{path} is not a video of this synthetic dataset ({self.root})")
        return self._render(split, self.class_names.index(class_name), int(Path(name).stem))[1]

    def load(self) -> VideoIndex:
        """The index of the generated dataset (paths absolute). Needs `prepare()` to have run."""
        index = self._read_index()
        if index is None:
            raise FileNotFoundError(
                f"No synthetic dataset at {self.root} ({self.index_path} is missing or unreadable). "
                "Generate it with SyntheticMotionSource.prepare() (VideoDataModule.prepare_data() calls it)."
            )
        if index.get("parameters") != self.parameters():
            raise ValueError(
                f"The synthetic dataset in {self.root} was generated with other parameters "
                f"({index.get('parameters')}) than requested ({self.parameters()}). "
                "Run prepare() to regenerate it, or point root at another folder."
            )
        splits = {
            split: [(str(self.root / path), int(label)) for path, label in entries]
            for split, entries in index["splits"].items()
        }
        splits["test"] = splits["val"]  # no separate test split
        return VideoIndex(class_names=list(index["class_names"]), splits=splits)

"""What ``predict.py`` does: top-k classes, pooled features and attention maps for video files (``predict``), or
the pooled features of a dataset split as a data config defines it (``extract_features``)."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

import timesformer.pipeline
from timesformer.data import (
    DEFAULT_MEAN,
    DEFAULT_STD,
    EvalViewTransform,
    VideoDataModule,
    dense_clip_indices,
    eval_short_side,
    normalize,
    segment_clip_indices,
)
from timesformer.data.dataset import SPLITS
from timesformer.data.sources import VIDEO_EXTENSIONS, is_video_file
from timesformer.data.video import VideoDecodeError, decode_clip
from timesformer.evaluation import ViewAggregator, top_classes
from timesformer.model import TimeSformer
from timesformer.model.weights import load_checkpoint_file

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16")
FEATURE_FORMATS = (".pt", ".npy")
# Options of the file mode that have a data config equivalent (or none) when features come from a split.
_FILE_ONLY_OPTIONS = {
    "num_clips": "set data.test_temporal_clips instead",
    "num_crops": "set data.test_spatial_crops instead",
    "sampling_rate": "set data.sampling_rate instead",
    "json": "predictions over a dataset are evaluate.py's job",
    "attention_maps": "attention maps are for input= files",
}


@dataclass
class ClipSettings:
    """How clips are cut from a video for the model: the evaluation settings of the data it was trained on."""

    num_frames: int
    sampling_rate: int
    image_size: int
    target_fps: float = 30.0
    temporal_clips: int = 1
    spatial_crops: int = 1
    sampling: str = "dense"  # or "segment" (TSN-style, Something-Something)
    mean: tuple[float, ...] = DEFAULT_MEAN
    std: tuple[float, ...] = DEFAULT_STD
    view_aggregation: str = "softmax"  # how a video's views are combined (module.view_aggregation), as evaluate.py
    # The smallest training short side (data.train_short_side_range[0]): a single crop is cut at that scale, as in
    # evaluate.py. None (weights from elsewhere): image_size, as Hugging Face's image processor does.
    train_short_side_min: int | None = None


def saved_data_config(ckpt: str | Path, group: str = "data") -> dict[str, Any]:
    """The resolved data config (or another ``group`` of the run config) a train.py checkpoint was trained with;
    {} for other checkpoint formats."""
    path = Path(ckpt)
    if not path.is_file():
        return {}
    checkpoint = load_checkpoint_file(path, "ckpt", mmap=True)
    if not isinstance(checkpoint, dict):
        return {}
    return ((checkpoint.get("hyper_parameters") or {}).get("run_config") or {}).get(group) or {}


def exported_data_config(folder: str | Path) -> dict[str, Any]:
    """The data settings a Hugging Face folder was exported with (``export_pretrained``); else the mean and std of
    its ``preprocessor_config.json`` when it has one; {} otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    if config.get("timesformer_clip"):
        return dict(config["timesformer_clip"])
    processor = folder / "preprocessor_config.json"
    if processor.is_file():
        values = json.loads(processor.read_text())
        if "image_mean" in values and "image_std" in values:
            return {"mean": values["image_mean"], "std": values["image_std"]}
    return {}


def export_pretrained(ckpt: str | Path, folder: str | Path) -> None:
    """A train.py checkpoint as a Hugging Face folder that keeps how its clips are cut (frames, size, sampling,
    views, mean and std): predict.py on the folder then gives what it gives on the checkpoint."""
    model = TimeSformer.from_pretrained(ckpt)
    settings = clip_settings(ckpt, model)
    model.save_pretrained(folder, clip={
        "num_frames": settings.num_frames, "image_size": settings.image_size,
        "sampling": settings.sampling, "sampling_rate": settings.sampling_rate, "target_fps": settings.target_fps,
        "test_temporal_clips": settings.temporal_clips, "test_spatial_crops": settings.spatial_crops,
        "mean": list(settings.mean), "std": list(settings.std), "view_aggregation": settings.view_aggregation,
        **({"train_short_side_range": [settings.train_short_side_min]} if settings.train_short_side_min else {}),
        # the short side transformers' image processor resizes to before its centre crop, as evaluate.py's one crop
        "test_short_side": eval_short_side(settings.image_size, 1,
                                           settings.train_short_side_min or settings.image_size)})


# The paper's sampling rates (frames between sampled frames at 30 fps) for its clip lengths: base 8 x 32, HR 16 x 16,
# L 96 x 4. Other lengths get the rate of an 8 x 32 clip's span, 256 frames.
PAPER_SAMPLING_RATES = {8: 32, 16: 16, 96: 4}


def paper_sampling_rate(num_frames: int) -> int:
    return PAPER_SAMPLING_RATES.get(num_frames, max(256 // num_frames, 1))


def clip_settings(ckpt: str | Path, model: TimeSformer, **overrides: Any) -> ClipSettings:
    """The checkpoint's saved data settings when it has them (train.py checkpoints, folders written by
    ``export_pretrained``), else the model's sizes and the paper's sampling for its frame count
    (`paper_sampling_rate`: an original HR or L ``.pyth`` clip sampled at base's 32 spanned 512 or 3072 frames);
    non-None ``overrides`` win."""
    data = saved_data_config(ckpt) or exported_data_config(ckpt)
    aggregation = saved_data_config(ckpt, "module").get("view_aggregation") or data.get("view_aggregation")
    num_frames = int(data.get("num_frames", model.config.num_frames))
    settings = ClipSettings(
        num_frames=num_frames,
        sampling_rate=int(data.get("sampling_rate", paper_sampling_rate(num_frames))),
        image_size=int(data.get("image_size", model.config.image_size)),
        target_fps=float(data.get("target_fps", 30.0)),
        temporal_clips=int(data.get("test_temporal_clips", 1)),
        spatial_crops=int(data.get("test_spatial_crops", 1)),
        sampling=str(data.get("sampling", "dense")),
        mean=tuple(data.get("mean", DEFAULT_MEAN)),
        std=tuple(data.get("std", DEFAULT_STD)),
        view_aggregation=str(aggregation or "softmax"),
        train_short_side_min=int(data["train_short_side_range"][0]) if data.get("train_short_side_range") else None,
    )
    for name, value in overrides.items():
        if value is not None:
            setattr(settings, name, type(getattr(settings, name))(value))
    return settings


def find_videos(input_path: str | Path) -> list[Path]:
    """A video file, or every video under a folder (recursively, sorted; hidden files and folders left out, as the
    datasets leave them: macOS's `._name.mp4` stubs are not videos)."""
    path = Path(input_path)
    if path.is_file():
        return [path]
    if path.is_dir():
        videos = sorted(p for p in path.rglob("*") if is_video_file(p.name) and p.is_file()
                        and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not videos:
            raise FileNotFoundError(f"input={path} is a folder without videos ({', '.join(VIDEO_EXTENSIONS)})")
        return videos
    raise FileNotFoundError(f"input={path}: no such file or folder")


def load_views(path: Path, settings: ClipSettings) -> torch.Tensor:
    """The evaluation views of a video, as in evaluate.py: ``temporal_clips`` clips x ``spatial_crops`` crops
    (V, T, C, H, W) uint8 (``normalize`` them on the model's device)."""
    short_side = eval_short_side(settings.image_size, settings.spatial_crops,
                                 settings.train_short_side_min or settings.image_size)
    transform = EvalViewTransform(settings.image_size, settings.spatial_crops, short_side)
    views = []
    for clip in range(settings.temporal_clips):
        def choose(num_video_frames: int, fps: float, clip: int = clip) -> list[int]:
            if not (fps > 0 and math.isfinite(fps)):  # no rate in the container: the usual one, as the dataset
                fps = settings.target_fps
            if settings.sampling == "segment":
                return segment_clip_indices(num_video_frames, settings.num_frames, clip_index=clip,
                                            num_clips=settings.temporal_clips)
            return dense_clip_indices(num_video_frames, settings.num_frames, settings.sampling_rate, fps,
                                      target_fps=settings.target_fps, clip_index=clip,
                                      num_clips=settings.temporal_clips)

        frames, _ = decode_clip(path, choose)  # (T, H, W, C) uint8
        resized = transform.resize(frames.permute(0, 3, 1, 2))  # one resize for all crops of the clip
        views += [transform.crop(resized, crop) for crop in range(settings.spatial_crops)]
    return torch.stack(views)


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when present, else the CPU; anything else is a torch device name (``cuda:1``, ``cpu``)."""
    return torch.device(name if name != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))


def embed(model: TimeSformer, video: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    """The pooled ``forward_features`` of views (B, T, C, H, W) as float32 (B, D), without autograd; ``bf16`` runs
    the model under a bfloat16 autocast (the features are returned in float32 all the same)."""
    with torch.no_grad(), torch.autocast(video.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        return model.forward_features(video).float()


def run(cfg: DictConfig) -> list[dict[str, Any]] | dict[str, Any]:
    """What predict.py does: ``input=`` files -> ``predict``; ``data=`` / ``split=`` (a dataset split) ->
    ``extract_features``. The options are checked before any model or video is read."""
    check_options(cfg)
    if cfg.get("input") is not None:
        return predict(cfg)
    return extract_features(cfg)


def check_options(cfg: DictConfig) -> None:
    """Fail early, naming the valid choices, on options that contradict each other or are unknown."""
    timesformer.pipeline.require_ckpt(cfg, "predict.py", "a train.py checkpoint, a Hugging Face folder or an "
                                      "original *.pyth")
    precision = cfg.get("precision", "fp32")
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not supported; valid values: {', '.join(PRECISIONS)}")
    features = cfg.get("features")
    if features and Path(features).suffix.lower() not in FEATURE_FORMATS:
        raise ValueError(f"features={features}: the file name must end in one of {', '.join(FEATURE_FORMATS)} "
                         "(that is the format written)")
    unread = timesformer.pipeline.created_keys(cfg)
    if unread:
        raise ValueError(f"predict.py has no option {', '.join(unread)} (`python predict.py --help` lists them); the "
                         "clips are set by num_clips=, num_crops= and sampling_rate=, the rest by the checkpoint")
    for name in ("num_clips", "num_crops", "sampling_rate", "top_k"):
        value = cfg.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name}={value!r} must be a positive integer" + (" (or null)" if name != "top_k" else ""))
    if not isinstance(cfg.get("attention_maps", False), bool):
        raise ValueError(f"attention_maps must be true or false, got {cfg.get('attention_maps')!r}")
    from_dataset = bool(cfg.get("data")) or cfg.get("split") is not None
    if cfg.get("input") is not None and from_dataset:
        raise ValueError("input= (video files) and data= / split= (a dataset split) are exclusive: set one of them "
                         "(for files, num_clips=, num_crops= and sampling_rate= set the views)")
    if cfg.get("input") is None and not from_dataset:
        raise ValueError("set input=VIDEO_OR_FOLDER (predictions for files), or split=train|val|test with "
                         "data=<name> (the features of a dataset split)")
    if not from_dataset:
        return
    if not features:
        raise ValueError(f"data= / split= extract features: set features=PATH ending in {' or '.join(FEATURE_FORMATS)}"
                         " (predictions over a dataset: evaluate.py)")
    used = [f"{name} ({hint})" for name, hint in _FILE_ONLY_OPTIONS.items() if cfg.get(name)]
    if used:
        raise ValueError(f"with data= / split= the views and outputs come from the data config; unset "
                         f"{'; '.join(used)}")
    split = cfg.get("split")
    if split is None or str(split) not in SPLITS:
        hint = " (an official split number, as UCF101's 1-3, is data.split=N)" if str(split).isdigit() else ""
        raise ValueError(f"split={split}: valid choices: {', '.join(SPLITS)}{hint}")


def dataset_config(cfg: DictConfig, model: TimeSformer) -> DictConfig:
    """The data config of ``cfg``, as evaluate.py makes it: ``data=<name>`` (a group choice, with ``_target_``), with
    the clips cut as a train.py checkpoint's were (``pipeline.swap_dataset``); else the checkpoint's saved config with
    ``data.<key>=<value>`` merged over it.

    The data configs size their clips from ``${model.num_frames}`` / ``${model.image_size}``: here those are the
    loaded model's, whatever the checkpoint format."""
    chosen = cfg.get("data") or OmegaConf.create({})
    saved = saved_data_config(cfg.ckpt)
    if "_target_" in chosen:
        clips = saved or exported_data_config(cfg.ckpt)  # a train.py checkpoint's, or an export_pretrained folder's
        data = timesformer.pipeline.swap_dataset(clips, chosen) if clips else chosen.copy()
        if (not clips and data.get("sampling") == "dense" and data.get("sampling_rate") == paper_sampling_rate(8)
                and "sampling_rate" not in timesformer.pipeline.command_line_data_keys()):
            # No clip settings with the weights (an original HR/L *.pyth, a Hugging Face folder) and the Kinetics
            # configs' rate, base's for 8 frames (an HR clip spanned 512 frames): the paper's rate for the model's
            # frame count, as clip_settings (input=) takes
            data.sampling_rate = paper_sampling_rate(model.config.num_frames)
    else:
        if not saved:
            raise ValueError(f"ckpt={cfg.ckpt} carries no data config (only train.py checkpoints do): choose the "
                             "dataset with data=<name> (`python predict.py --help` lists them) and data.root=PATH")
        data = OmegaConf.merge(saved, chosen)
    # Evaluation views draw no random numbers; the seed only has to exist for the configs' ${seed}.
    root = OmegaConf.create({"model": {"num_frames": model.config.num_frames, "image_size": model.config.image_size},
                             "seed": 0, "paths": cfg.paths})
    root.data = data
    return root.data


def extract_features(cfg: DictConfig) -> dict[str, Any]:
    """The pooled ``forward_features`` embedding of every video of a dataset split, written to ``cfg.features``.

    Each video's views are its evaluation views (``data.test_temporal_clips`` x ``data.test_spatial_crops``, as in
    evaluate.py, for the train split too), read by a DataLoader (``data.batch_size`` views a batch, rounded down to
    whole clips as evaluate.py's are, ``data.num_workers`` workers) and averaged per video. Rows follow the split's
    order. A video none of whose views decodes is logged with its path, left out, and listed under "failed"; one
    that decodes in part averages the views that do (its "num_views" says how many). Returns what was written (see
    ``save_features``).
    """
    device = resolve_device(cfg.device)
    model = TimeSformer.from_pretrained(cfg.ckpt).to(device).eval()
    datamodule: VideoDataModule = hydra.utils.instantiate(dataset_config(cfg, model), _convert_="all")
    datamodule.prepare_data()
    class_names = datamodule.class_names  # reads the index
    dataset = datamodule.evaluation_dataset(str(cfg.split))  # an error naming the splits the dataset has
    entries = dataset.entries
    # The DataModule's evaluation loader settings: batches of whole clips (a clip's crops split over two batches
    # went to two workers, which decoded it twice) and workers that keep serving through a SIGTERM to the group
    settings = datamodule._loader_settings(dataset)
    settings["pin_memory"] = settings["pin_memory"] and device.type == "cuda"
    loader = DataLoader(dataset, shuffle=False, **settings)
    log.info("Features of %d %s videos, %d views each, on %s (%s)", len(entries), cfg.split, dataset.views_per_video,
             device, cfg.precision)

    # A plain mean over a video's decoded views (no softmax): what the embeddings need.
    aggregator = ViewAggregator("mean")
    errors: dict[str, str] = {}
    report_every = max(1, len(loader) // 10)
    for number, batch in enumerate(loader, 1):
        for line in filter(None, "\n".join(batch["decode_errors"]).splitlines()):
            path, _, reason = line.partition("\t")
            if path not in errors:  # the views of a clip fail alike: name the file once
                errors[path] = reason
                log.error("Could not decode %s (%s)", path, reason)
        video = normalize(batch["video"].to(device, non_blocking=True), datamodule.mean, datamodule.std)
        aggregator.update(embed(model, video, cfg.precision), batch["label"], batch["index"], batch["view"],
                          batch["valid"])
        if number % report_every == 0 or number == len(loader):
            log.info("%d/%d batches", number, len(loader))
    results = aggregator.compute()

    for video, views in zip(results.indices.tolist(), results.num_views.tolist(), strict=True):
        if views < dataset.views_per_video:
            log.warning("%s: %d of %d views decoded; its features average those", entries[video][0], views,
                        dataset.views_per_video)
    failed = [{"video": entries[i][0], "label": entries[i][1], "error": errors.get(entries[i][0], "not decoded")}
              for i in results.failed]
    output = {
        "videos": [entries[i][0] for i in results.indices.tolist()],
        "labels": results.labels,
        "features": results.scores if len(results.indices) else torch.zeros(0, model.config.hidden_size),
        "num_views": results.num_views,
        "class_names": class_names,
        "checkpoint": str(cfg.ckpt),
        "split": str(cfg.split),
        "failed": failed,
    }
    save_features(cfg.features, output)
    return output


def features_sidecar(path: str | Path) -> Path:
    """Where a ``.npy`` feature file's row metadata goes: ``feats.npy`` -> ``feats.videos.json``."""
    return Path(path).with_suffix(".videos.json")


def save_features(path: str | Path, output: dict[str, Any]) -> list[Path]:
    """Write pooled features: ``output`` holds "videos" (ids: paths), "labels" (int64 (V,), None for files),
    "features" float32 (V, D), "num_views" (V,), "class_names", "checkpoint", "split" (None for files) and "failed"
    ([{"video", "label", "error"}]: videos left out).

    ``.pt``: the dict as is (``torch.load``). ``.npy``: the (V, D) array, and everything else in
    ``features_sidecar(path)`` as JSON, rows in the array's order. Returns the files written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    features = output["features"].float().cpu()
    if path.suffix.lower() == ".pt":
        torch.save({**output, "features": features}, path)
        written = [path]
    else:
        with open(path, "wb") as file:  # np.save(path) would append ".npy" to a name ending in ".NPY"
            np.save(file, features.numpy())
        metadata = {key: value.tolist() if isinstance(value, torch.Tensor) else value
                    for key, value in output.items() if key != "features"}
        sidecar = features_sidecar(path)
        sidecar.write_text(json.dumps({"features": path.name, "shape": list(features.shape), **metadata}, indent=1)
                           + "\n")
        written = [path, sidecar]
    log.info("Wrote %d feature vectors of size %d to %s", *features.shape, " and ".join(map(str, written)))
    if output["failed"]:
        log.warning("%d videos could not be decoded and are left out; they are listed under \"failed\" in %s",
                    len(output["failed"]), written[-1])
    return written


def _output_stem(video: Path, input_path: Path) -> str:
    """A file name for a video's outputs, unique among the videos under ``input_path``: its path below the folder
    (class folders often repeat names: ``a/00000.mp4``, ``b/00000.mp4``), its suffix kept (``clip.mp4``,
    ``clip.avi``)."""
    relative = video.relative_to(input_path) if input_path.is_dir() else Path(video.name)
    return "__".join(relative.parts)


def predict(cfg: DictConfig) -> list[dict[str, Any]]:
    """Top-k predictions per video (views combined as evaluate.py does: the checkpoint's view aggregation);
    optionally features and attention maps."""
    device = resolve_device(cfg.device)
    model = TimeSformer.from_pretrained(cfg.ckpt).to(device).eval()
    if cfg.get("attention_maps"):
        from timesformer.attention_maps import SUPPORTED

        if model.config.attention_type not in SUPPORTED:
            raise ValueError(f"attention_maps=true supports attention_type in {SUPPORTED}; this model's is "
                             f"{model.config.attention_type!r} (set attention_maps=false)")
    names = model.config.class_names or [str(c) for c in range(model.config.num_classes)]
    settings = clip_settings(cfg.ckpt, model, temporal_clips=cfg.get("num_clips"),
                             spatial_crops=cfg.get("num_crops"), sampling_rate=cfg.get("sampling_rate"))
    output_dir = Path(cfg.paths.output_dir)
    results, features = [], {}
    for path in find_videos(cfg.input):
        try:
            views = load_views(path, settings)
        except (VideoDecodeError, FileNotFoundError) as error:
            log.error("%s", error)
            results.append({"video": str(path), "error": str(error)})
            continue
        views = normalize(views.to(device), settings.mean, settings.std)  # (V, T, C, H, W) float32
        embedding = embed(model, views, cfg.get("precision", "fp32"))  # (V, D)
        with torch.no_grad():
            logits = model.head(embedding).float()  # (V, classes)
            probabilities = (logits.softmax(-1).mean(0) if settings.view_aggregation == "softmax"
                             else logits.mean(0).softmax(-1)).cpu()
        top = top_classes(probabilities, min(cfg.top_k, len(names)))  # ties ranked as evaluate.py ranks them
        results.append({"video": str(path), "views": len(views),
                        "top_k": [{"label": names[int(c)], "probability": float(p)}
                                  for p, c in zip(*top, strict=True)]})
        if cfg.get("features"):
            features[str(path)] = embedding.mean(0).cpu()
        if cfg.get("attention_maps"):
            from timesformer.attention_maps import attention_rollout, overlay_frames, save_attention_figures

            first_view = views[0].cpu()
            heatmap = attention_rollout(model.cpu(), first_view)
            model.to(device)
            overlays = overlay_frames(first_view, heatmap, settings.mean, settings.std)
            title = f"{path.name}: {results[-1]['top_k'][0]['label']} ({results[-1]['top_k'][0]['probability']:.2f})"
            results[-1]["attention_maps"] = [str(p) for p in save_attention_figures(
                overlays, output_dir / "attention" / _output_stem(path, Path(cfg.input)), title)]

    _print_predictions(results)
    if cfg.get("json"):
        Path(cfg.json).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.json).write_text(json.dumps(results, indent=2) + "\n")
    if cfg.get("features"):
        decoded = [result for result in results if "error" not in result]
        save_features(cfg.features, {
            "videos": list(features),
            "labels": None,
            "features": torch.stack(list(features.values())) if features else torch.zeros(0, model.config.hidden_size),
            "num_views": torch.tensor([result["views"] for result in decoded], dtype=torch.int64),
            "class_names": names,  # the model's (there are no labels)
            "checkpoint": str(cfg.ckpt),
            "split": None,
            "failed": [{"video": r["video"], "label": None, "error": r["error"]} for r in results if "error" in r],
        })
    if all("error" in result for result in results):  # the outputs above list them
        raise RuntimeError(f"none of the {len(results)} video(s) under input={cfg.input} could be decoded")
    return results


def _print_predictions(results: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Predictions")
    for column in ("video", "rank", "label", "probability"):
        table.add_column(column)
    for result in results:
        if "error" in result:
            table.add_row(result["video"], "-", f"[red]{result['error']}[/red]", "")
            continue
        for rank, entry in enumerate(result["top_k"], 1):
            table.add_row(result["video"] if rank == 1 else "", str(rank), entry["label"],
                          f"{entry['probability']:.4f}")
    Console().print(table)

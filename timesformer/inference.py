"""Prediction on video files: top-k classes, pooled features and attention maps (what ``predict.py`` does)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from timesformer.data import DEFAULT_MEAN, DEFAULT_STD, EvalViewTransform, dense_clip_indices, segment_clip_indices
from timesformer.data.video import VideoDecodeError, decode_clip
from timesformer.model import TimeSformer

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg")


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


def clip_settings(ckpt: str | Path, model: TimeSformer, **overrides: Any) -> ClipSettings:
    """The checkpoint's saved data settings when it has them (train.py checkpoints), else the model's sizes
    and the paper's 8x32 sampling; non-None ``overrides`` win."""
    data: dict[str, Any] = {}
    path = Path(ckpt)
    if path.is_file():
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        data = ((checkpoint.get("hyper_parameters") or {}).get("run_config") or {}).get("data") or {}
    settings = ClipSettings(
        num_frames=int(data.get("num_frames", model.config.num_frames)),
        sampling_rate=int(data.get("sampling_rate", 32)),
        image_size=int(data.get("image_size", model.config.image_size)),
        target_fps=float(data.get("target_fps", 30.0)),
        temporal_clips=int(data.get("test_temporal_clips", 1)),
        spatial_crops=int(data.get("test_spatial_crops", 1)),
        sampling=str(data.get("sampling", "dense")),
        mean=tuple(data.get("mean", DEFAULT_MEAN)),
        std=tuple(data.get("std", DEFAULT_STD)),
    )
    for name, value in overrides.items():
        if value is not None:
            setattr(settings, name, type(getattr(settings, name))(value))
    return settings


def find_videos(input_path: str | Path) -> list[Path]:
    """A video file, or every video under a folder (recursively, sorted)."""
    path = Path(input_path)
    if path.is_file():
        return [path]
    if path.is_dir():
        videos = sorted(p for p in path.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file())
        if not videos:
            raise FileNotFoundError(f"input={path} is a folder without videos ({', '.join(VIDEO_SUFFIXES)})")
        return videos
    raise FileNotFoundError(f"input={path}: no such file or folder")


def load_views(path: Path, settings: ClipSettings) -> torch.Tensor:
    """The evaluation views of a video, as in evaluate.py: ``temporal_clips`` clips x ``spatial_crops`` crops
    (V, T, C, H, W) float."""
    transform = EvalViewTransform(settings.image_size, settings.spatial_crops, settings.mean, settings.std)
    views = []
    for clip in range(settings.temporal_clips):
        def choose(num_video_frames: int, fps: float, clip: int = clip) -> list[int]:
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


def predict(cfg: DictConfig) -> list[dict[str, Any]]:
    """Top-k predictions per video (views averaged in probability); optionally features and attention maps."""
    device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    model = TimeSformer.from_pretrained(cfg.ckpt).to(device).eval()
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
        with torch.no_grad():
            embedding = model.forward_features(views.to(device))  # (V, D)
            probabilities = model.head(embedding).softmax(-1).mean(0).cpu()  # views averaged
        top = probabilities.topk(min(cfg.top_k, len(names)))
        results.append({"video": str(path), "views": len(views),
                        "top_k": [{"label": names[int(c)], "probability": float(p)}
                                  for p, c in zip(top.values, top.indices, strict=True)]})
        if cfg.get("features"):
            features[str(path)] = embedding.mean(0).cpu()
        if cfg.get("attention_maps"):
            from timesformer.attention_maps import attention_rollout, overlay_frames, save_attention_figures

            heatmap = attention_rollout(model.cpu(), views[0])
            model.to(device)
            overlays = overlay_frames(views[0], heatmap, settings.mean, settings.std)
            title = f"{path.name}: {results[-1]['top_k'][0]['label']} ({results[-1]['top_k'][0]['probability']:.2f})"
            results[-1]["attention_maps"] = [str(p) for p in save_attention_figures(
                overlays, output_dir / "attention" / path.stem, title)]

    _print_predictions(results)
    if cfg.get("json"):
        Path(cfg.json).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.json).write_text(json.dumps(results, indent=2) + "\n")
    if cfg.get("features") and features:
        torch.save({"videos": list(features), "features": torch.stack(list(features.values())),
                    "checkpoint": str(cfg.ckpt)}, cfg.features)
        log.info("Wrote %d feature vectors of size %d to %s", len(features), model.config.hidden_size, cfg.features)
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

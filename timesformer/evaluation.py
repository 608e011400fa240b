"""Video-level evaluation: several views per video aggregated into one prediction, each video counted once.

A dataset yields views (temporal clips x spatial crops) of its videos; every sample carries the video's
``index`` in its split and, with several views, the ``view`` number. Under DDP each rank evaluates whole videos
(`datamodule.WholeVideoSampler`; the views it repeats for ranks left without a video are dropped before they get
here), so scores are gathered from every rank and averaged per video. A (video, view) that comes twice counts once
(another sampler's padding), except when two processes evaluated some but not all of the same views of a video.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

AGGREGATIONS = ("softmax", "logits")


def top_classes(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of each row's k best classes. Tied scores (common with bf16 logits) rank by class index,
    as argmax() and torchmetrics' top-1 accuracy pick them: topk() orders ties arbitrarily, and its first column
    then disagreed with the confusion matrix of the same evaluation."""
    values, indices = scores.sort(dim=-1, descending=True, stable=True)
    return values[..., :k], indices[..., :k]


@dataclass
class VideoResults:
    """One row per evaluated video: its index in the split, label, aggregated scores (V, C) and view count."""

    indices: torch.Tensor  # (V,) int64
    labels: torch.Tensor  # (V,) int64
    # (V, C) float32 probabilities: the mean softmax, or the softmax of the mean logits; with ViewAggregator("mean")
    # (predict.py's features) the mean of the views' rows, e.g. (V, D) embeddings
    scores: torch.Tensor
    num_views: torch.Tensor  # (V,) int64
    failed: list[int]  # indices of videos none of whose views could be decoded

    def metrics(self, num_classes: int) -> dict[str, float]:
        """Top-1/top-5 and mean per-class accuracy over the evaluated videos."""
        if len(self.indices) == 0:
            return {"top1": float("nan"), "top5": float("nan"), "mean_class_accuracy": float("nan")}
        top_k = min(5, num_classes)
        ranked = top_classes(self.scores, top_k)[1]  # (V, k)
        top1 = (ranked[:, 0] == self.labels).float()
        top5 = (ranked == self.labels[:, None]).any(dim=1).float()
        per_class = [top1[self.labels == c].mean() for c in range(num_classes) if (self.labels == c).any()]
        return {"top1": top1.mean().item(), "top5": top5.mean().item(),
                "mean_class_accuracy": torch.stack(per_class).mean().item()}

    def confusion_matrix(self, num_classes: int) -> torch.Tensor:
        """(C, C) counts, rows = true class, columns = predicted class."""
        matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)
        if len(self.labels) == 0:  # no video could be decoded: an empty matrix, not an argmax over nothing
            return matrix
        predicted = top_classes(self.scores, 1)[1][:, 0]
        matrix.index_put_((self.labels, predicted), torch.ones_like(self.labels), accumulate=True)
        return matrix


class ViewAggregator:
    """Sums per-view scores per video during an evaluation epoch; ``compute()`` returns one row per video.

    Memory grows with the videos, not the views: each process keeps a (videos, C) sum of the videos it evaluated
    (3 x 10 views of Kinetics-400's 20k validation videos: 32 MB, where keeping every view's row, and gathering them
    on every process, took 3.7 GB per process)."""

    def __init__(self, aggregation: str = "softmax") -> None:
        """``aggregation``: "softmax" or "logits" (``AGGREGATIONS``), or "mean" for any per-view vectors averaged as
        they are (features)."""
        if aggregation not in (*AGGREGATIONS, "mean"):
            raise ValueError(f"module.view_aggregation={aggregation!r} is not supported; valid values: "
                             f"{', '.join(AGGREGATIONS)}")
        self.aggregation = aggregation
        self.reset()

    def reset(self) -> None:
        self._row: dict[int, int] = {}  # video index -> its row below
        self._seen: dict[int, int] = {}  # video index -> a bit per view number received
        # (rows, C) float32 (whatever the default dtype: 64-true precision sets float64): the valid views' scores
        # summed; grown by doubling
        self._sums = torch.zeros(0, 0, dtype=torch.float32)
        self._counts = torch.zeros(0, dtype=torch.int64)  # (rows,) valid views
        self._labels = torch.zeros(0, dtype=torch.int64)  # (rows,)

    def _grow(self, rows: int, width: int) -> None:
        """Room for at least ``rows`` videos of ``width`` scores (capacity doubles: amortised O(1) per video)."""
        extra = max(rows, 2 * len(self._counts), 64) - len(self._counts)
        self._sums = torch.cat([self._sums.reshape(len(self._counts), width),
                                torch.zeros(extra, width, dtype=torch.float32)])
        self._counts = torch.cat([self._counts, torch.zeros(extra, dtype=torch.int64)])
        self._labels = torch.cat([self._labels, torch.zeros(extra, dtype=torch.int64)])

    def update(self, logits: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor,
               views: torch.Tensor | None = None, valid: torch.Tensor | None = None) -> None:
        """logits (B, C); labels, indices, views (B,) int; valid (B,) bool (False: the view failed to decode). A
        (video, view) received again (a sampler's padding) counts once."""
        scores = logits.detach().float()
        scores = (scores.softmax(dim=-1) if self.aggregation == "softmax" else scores).cpu()
        videos, label_values = indices.tolist(), labels.tolist()
        view_numbers = views.tolist() if views is not None else [0] * len(videos)
        valid_values = valid.tolist() if valid is not None else [True] * len(videos)
        kept, rows = [], []
        for position, (video, view) in enumerate(zip(videos, view_numbers, strict=True)):
            seen = self._seen.get(video, 0)
            if seen >> view & 1:
                continue
            self._seen[video] = seen | 1 << view
            row = self._row.get(video)
            if row is None:
                row = self._row[video] = len(self._row)
                if row >= len(self._counts):
                    self._grow(row + 1, scores.shape[1])
                self._labels[row] = label_values[position]
            if valid_values[position]:
                kept.append(position)
                rows.append(row)
        if kept:
            rows_tensor = torch.tensor(rows)
            self._sums.index_add_(0, rows_tensor, scores[kept])
            self._counts.index_add_(0, rows_tensor, torch.ones(len(rows), dtype=torch.int64))

    def _local(self) -> tuple[list[int], list[int], torch.Tensor, torch.Tensor, torch.Tensor]:
        """(videos, their view bits, sums, counts, labels) of this process, row for row."""
        rows = len(self._row)
        videos = list(self._row)  # (dicts keep insertion order: row order)
        # (clones: a slice would send the whole doubled capacity through the gather)
        return videos, [self._seen[video] for video in videos], self._sums[:rows].clone(), \
            self._counts[:rows].clone(), self._labels[:rows].clone()

    def _gathered(self) -> list[tuple]:
        # A process without views still joins the gather (returning early, it left the others waiting in it).
        local = self._local()
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return [local]
        everyone: list[tuple | None] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, local)
        return [part for part in everyone if part is not None]

    def compute(self) -> VideoResults:
        """Aggregate every process's videos (call it on every process: it gathers)."""
        sums: dict[int, torch.Tensor] = {}
        counts: dict[int, int] = {}
        labels: dict[int, int] = {}
        seen: dict[int, int] = {}
        for videos, bits, part_sums, part_counts, part_labels in self._gathered():
            for row, video in enumerate(videos):
                if video in seen:  # another process evaluated views of it too
                    if bits[row] == seen[video]:  # the same ones (a sampler's padding repeats whole videos): once
                        continue
                    if seen[video] & bits[row]:  # some of the same ones: the sums cannot take them out
                        raise RuntimeError(
                            f"video {video}: two processes evaluated some of the same views; evaluate with the "
                            "DataModule's loaders (WholeVideoSampler: each (video, view) in one process)")
                    seen[video] |= bits[row]
                    sums[video] = sums[video] + part_sums[row]
                    counts[video] += int(part_counts[row])
                    continue
                seen[video], sums[video] = bits[row], part_sums[row]
                counts[video], labels[video] = int(part_counts[row]), int(part_labels[row])
        evaluated = sorted(video for video in counts if counts[video] > 0)
        failed = sorted(video for video in counts if counts[video] == 0)
        if evaluated:
            scores = torch.stack([sums[v] for v in evaluated]) / torch.tensor([counts[v] for v in evaluated])[:, None]
            if self.aggregation == "logits":  # same ranking; probabilities in predictions.csv, as predict.py's
                scores = scores.softmax(dim=-1)
        else:
            scores = torch.zeros(0, 0)
        return VideoResults(
            indices=torch.tensor(evaluated, dtype=torch.int64),
            labels=torch.tensor([labels[v] for v in evaluated], dtype=torch.int64),
            scores=scores,
            num_views=torch.tensor([counts[v] for v in evaluated], dtype=torch.int64),
            failed=failed,
        )


def write_report_files(output_dir: Path, results: VideoResults, entries: list[tuple[str, int]],
                       class_names: list[str]) -> dict[str, Path]:
    """predictions.csv, per_class.csv and confusion_matrix.png in ``output_dir``; returns their paths."""
    output_dir.mkdir(parents=True, exist_ok=True)
    num_classes = len(class_names)
    top_k = min(5, num_classes)
    paths = {"predictions": output_dir / "predictions.csv", "per_class": output_dir / "per_class.csv",
             "confusion_matrix": output_dir / "confusion_matrix.png"}

    with paths["predictions"].open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["video", "true_label", "num_views",
                         *[f"{kind}_{k}" for k in range(1, top_k + 1) for kind in ("pred", "score")]])
        top_scores, top_indices = top_classes(results.scores, top_k) if len(results.indices) else (None, None)
        for row, video in enumerate(results.indices.tolist()):
            ranked = []
            for k in range(top_k):
                ranked += [class_names[int(top_indices[row, k])], f"{float(top_scores[row, k]):.6f}"]
            writer.writerow([entries[video][0], class_names[int(results.labels[row])],
                             int(results.num_views[row]), *ranked])

    matrix = results.confusion_matrix(num_classes)
    with paths["per_class"].open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["class", "videos", "correct", "accuracy"])
        for c, name in enumerate(class_names):
            support, correct = int(matrix[c].sum()), int(matrix[c, c])
            writer.writerow([name, support, correct, f"{correct / support:.6f}" if support else ""])

    plot_confusion_matrix(matrix, class_names, paths["confusion_matrix"])
    return paths


def plot_confusion_matrix(matrix: torch.Tensor, class_names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    num_classes = len(class_names)
    rows = matrix.sum(dim=1, keepdim=True).clamp(min=1)
    size = min(4 + num_classes * 0.35, 40)
    figure, axes = plt.subplots(figsize=(size, size))
    image = axes.imshow((matrix / rows).numpy(), cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=axes, fraction=0.046, label="fraction of the true class")
    if num_classes <= 60:  # beyond that the names are unreadable anyway
        axes.set_xticks(range(num_classes), class_names, rotation=90)
        axes.set_yticks(range(num_classes), class_names)
        if num_classes <= 20:
            for i in range(num_classes):
                for j in range(num_classes):
                    if matrix[i, j]:
                        axes.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=8)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title("Confusion matrix (video level)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)

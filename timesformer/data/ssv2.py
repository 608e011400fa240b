"""Something-Something v2 from its JSON annotation files.

- `labels.json`: {template: id string}, 174 templates such as "Pushing something from left to right".
- `train.json`, `validation.json`: lists of {"id", "label", "template", "placeholders"}; `template` has
  brackets around the placeholders ("Pushing [something] from left to right") that `labels.json` does not,
  so they are dropped to find the class.
- `test.json` has ids only; with the released answers (`test-answers.csv`, `<id>;<template>` lines) the test
  split is labelled too, otherwise evaluation uses validation.
- Videos: `<id>.webm` (VP9), in `20bn-something-something-v2/` (the official archive's folder), `videos/` or
  data.root itself. Other extensions (a transcoded copy) are found too.

The files may also carry the official archive's prefix (`something-something-v2-labels.json`, ...).
Class ids are the ids of labels.json. Motion direction is part of many labels, so the data config turns
horizontal flips off, and clips are TSN-style segment samples (the paper's recipe).
"""

from __future__ import annotations

import os
from pathlib import Path

from timesformer.data.sources import (
    AnnotatedVideoSource,
    DatasetScan,
    first_existing,
    list_videos,
    read_json,
    read_text_lines,
)

ANNOTATION_FOLDERS = ("annotations", "labels", "")
VIDEO_FOLDERS = ("20bn-something-something-v2", "videos", "")
SPLIT_FILES = {"train": "train.json", "val": "validation.json", "test": "test.json"}


def normalise_template(template: str) -> str:
    """'Pushing [something] from left to right' -> 'Pushing something from left to right' (the labels.json key)."""
    return " ".join(template.replace("[", "").replace("]", "").split())


class SomethingSomethingV2Source(AnnotatedVideoSource):
    """Something-Something v2 under `root` (see the module docstring).

    Args:
        root: the dataset folder.
        annotations: the folder of labels.json and the split files, when it is not one of the usual places.
    """

    title = "Something-Something v2"

    def __init__(self, root: str | os.PathLike, annotations: str | None = None) -> None:
        super().__init__(root)
        self.annotations = Path(annotations).expanduser() if annotations else None

    def _folders(self) -> list[Path]:
        if self.annotations is not None:
            return [self.annotations]
        return [self.root / name if name else self.root for name in ANNOTATION_FOLDERS]

    def annotation_file(self, name: str) -> Path | None:
        return first_existing([folder / prefix for folder in self._folders()
                               for prefix in (name, f"something-something-v2-{name}")])

    def video_folder(self) -> Path:
        return first_existing([self.root / name for name in VIDEO_FOLDERS if name]) or self.root

    def scan(self) -> DatasetScan:
        labels_file = self.annotation_file("labels.json")
        if labels_file is None:
            raise FileNotFoundError(
                f"No Something-Something v2 labels.json in {', '.join(str(f) for f in self._folders())}. "
                "Put the annotation files (labels.json, train.json, validation.json) there, or set "
                "data.source.annotations=FOLDER."
            )
        ids = read_json(labels_file)
        try:
            by_template = {normalise_template(template): int(class_id) for template, class_id in ids.items()}
        except (AttributeError, TypeError, ValueError):
            raise ValueError(f"{labels_file}: expected a JSON object of template -> integer id") from None
        if sorted(by_template.values()) != list(range(len(by_template))):
            raise ValueError(f"{labels_file}: expected the ids 0..{len(by_template) - 1}, once each")
        class_names = [""] * len(by_template)
        for template, class_id in by_template.items():
            class_names[class_id] = template

        folder = self.video_folder()
        by_id = {}
        for path in list_videos(folder, max_depth=0):
            by_id.setdefault(path.stem, str(path))

        splits: dict[str, list[tuple[str, int]]] = {}
        missing: dict[str, list[str]] = {}
        notes, warnings = [], []
        for split, name in SPLIT_FILES.items():
            path = self.annotation_file(name)
            if path is None:
                if split == "test":
                    continue
                raise FileNotFoundError(f"Something-Something v2: {name} is missing (looked beside {labels_file})")
            labelled = self._labelled_entries(split, path, labels_file.parent)
            if labelled is None:
                notes.append(f"{path.name} has no labels (no test-answers.csv): test uses the validation split")
                continue
            unanswered = [f"{video_id}.webm" for video_id, template in labelled if template is None]
            if unanswered:
                warnings.append(f"{path.name}: {len(unanswered)} videos have no answer in test-answers.csv and are "
                                f"left out ({', '.join(unanswered[:3])}{', ...' if len(unanswered) > 3 else ''})")
                labelled = [(video_id, template) for video_id, template in labelled if template is not None]
            unknown = [template for _, template in labelled if normalise_template(template) not in by_template]
            if unknown:
                message = f"{path}: {len(unknown)} videos have templates not in {labels_file}, e.g. {unknown[0]!r}"
                if split != "test":
                    raise ValueError(message)
                notes.append(message + "; test uses the validation split")
                continue
            splits[split], missing[split] = [], []
            for video_id, template in labelled:
                key = normalise_template(template)
                found = by_id.get(video_id)
                if found is None:
                    missing[split].append(f"{video_id}.webm")
                else:
                    splits[split].append((found, by_template[key]))
        searched = dict.fromkeys(splits, str(folder))
        return DatasetScan(class_names, splits, missing, searched, notes, warnings)

    def _labelled_entries(self, split: str, path: Path, folder: Path) -> list[tuple[str, str | None]] | None:
        """(video id, template) pairs of a split file; None for an unlabelled test file without answers, a None
        template for a test video that test-answers.csv does not answer."""
        items = read_json(path)
        if not isinstance(items, list) or not all(isinstance(item, dict) and "id" in item for item in items):
            raise ValueError(f"{path}: expected a JSON list of {{\"id\": ..., \"template\": ...}} entries")
        if all("template" in item for item in items):
            return [(str(item["id"]), item["template"]) for item in items]
        if split != "test":
            raise ValueError(f"{path}: entries without a template; is it the right file?")
        answers = first_existing([folder / "test-answers.csv", folder / "something-something-v2-test-answers.csv"])
        if answers is None:
            return None
        template_of = {}
        for number, line in enumerate(read_text_lines(answers), start=1):
            if ";" not in line:
                raise ValueError(f"{answers}, line {number}: expected `<video id>;<template>`, got {line!r}")
            video_id, template = line.split(";", 1)
            template_of[video_id] = template
        return [(str(item["id"]), template_of.get(str(item["id"]))) for item in items]  # None: no answer

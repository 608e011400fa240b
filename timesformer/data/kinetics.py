"""Kinetics-400/600/700 from the official annotation CSVs or PySlowFast-style lists.

Two annotation formats, told apart by their content (both are often called train.csv):

- the official CSVs: a header `label,youtube_id,time_start,time_end,split[,is_cc]` (test CSVs may lack
  `label`), labels quoted where they contain commas. The validation file is `validate.csv` (or `val.csv`).
  Clips are `<youtube_id>_<time_start:06d>_<time_end:06d>.<ext>`, found in the split's folder on disk
  (`train/`, `val/` or `validate/`, ...), flat or in per-class subfolders (whatever their names);
  a clip saved as just `<youtube_id>.<ext>` is found too. Rows with an empty label are left out (and counted);
  a file whose labels are all empty is treated as unlabelled, like one without a `label` column.
- PySlowFast lists: `train.csv`/`val.csv`/`test.csv`, one `<path> <label id>` per line, no header; paths are
  relative to data.root (or to the list's folder) or absolute. Class names come from a
  `classids.json`/`kinetics_classnames.json` ({"name": id}) or `classes.txt` (one per line) beside the lists
  when there is one, else they are the ids.

Class ids of the official CSVs are the sorted label names (the order of PySlowFast's and mmaction2's
Kinetics class lists).
"""

from __future__ import annotations

import csv
import io
import os
import re
from pathlib import Path

from timesformer.data.sources import (
    SPLIT_ALIASES,
    AnnotatedVideoSource,
    CsvSource,
    DatasetScan,
    existing_files,
    first_existing,
    list_videos,
    read_class_names,
    read_json,
    read_text,
)

# The official CSVs call the validation split "validate"; look for that name first.
ANNOTATION_NAMES = {"train": ("train",), "val": ("validate", "val", "validation"), "test": ("test",)}
CLASS_NAME_FILES = ("classids.json", "kinetics_classnames.json", "classnames.json", "classes.txt", "labels.txt")
CLIP_NAME = re.compile(r"^(?P<youtube_id>.{11})_(?P<start>\d+)_(?P<end>\d+)$")


def clip_stem(youtube_id: str, time_start: str, time_end: str) -> str:
    """The file name (without extension) the Kinetics downloaders give a clip."""
    return f"{youtube_id}_{int(float(time_start)):06d}_{int(float(time_end)):06d}"


def is_official_csv(path: Path) -> bool:
    """The official CSVs have a header naming youtube_id; PySlowFast lists have none."""
    try:  # (the first line only: the file itself is read once, by the scan)
        with open(path, encoding="utf-8-sig") as file:
            return "youtube_id" in file.readline()
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text ({error}): save it as UTF-8") from None


class KineticsSource(AnnotatedVideoSource):
    """Kinetics-400/600/700 under `root` (see the module docstring for the formats).

    Args:
        root: the dataset folder (videos in `root/<split>/...` or `root/videos/<split>/...`).
        annotations: the folder of the annotation files; default: `root/annotations`, then `root`.
        num_classes: the class count the release should have (400, 600, 700): a different count is reported
            (a wrong or partial annotation file), not fatal.
    """

    def __init__(self, root: str | os.PathLike, annotations: str | None = None, num_classes: int | None = None) -> None:
        self.expected_num_classes = num_classes
        self.title = f"Kinetics-{num_classes}" if num_classes else "Kinetics"
        super().__init__(root)
        self.annotations = Path(annotations).expanduser() if annotations else None

    def annotation_folders(self) -> list[Path]:
        if self.annotations is not None:
            if not self.annotations.is_dir():
                raise FileNotFoundError(f"data.source.annotations={self.annotations} is not a folder")
            return [self.annotations]
        return [folder for folder in (self.root / "annotations", self.root) if folder.is_dir()]

    def annotation_file(self, split: str) -> Path | None:
        folders = self.annotation_folders()
        for name in ANNOTATION_NAMES[split]:
            found = first_existing([folder / f"{name}.csv" for folder in folders])
            if found is not None:
                return found
        for folder in folders:  # e.g. kinetics_700_2020_validate.csv
            for name in ANNOTATION_NAMES[split]:
                matches = sorted(folder.glob(f"*_{name}.csv"))
                if matches:
                    return matches[0]
        return None

    def video_folder(self, split: str) -> Path | None:
        names = dict.fromkeys((*SPLIT_ALIASES[split], *ANNOTATION_NAMES[split]))  # ordered, no repeats
        return first_existing([base / name for base in (self.root, self.root / "videos") for name in names])

    def scan(self) -> DatasetScan:
        files = {split: self.annotation_file(split) for split in ANNOTATION_NAMES}
        files = {split: path for split, path in files.items() if path is not None}
        if "train" not in files and "val" not in files:
            looked_in = ", ".join(str(folder) for folder in self.annotation_folders()) or str(self.root)
            raise FileNotFoundError(
                f"No Kinetics annotation files (train.csv, validate.csv or val.csv) in {looked_in}. "
                "Put the official CSVs (or PySlowFast lists) there, or set data.source.annotations=FOLDER."
            )
        official = {split: is_official_csv(path) for split, path in files.items()}
        if any(official.values()):
            scan = self._scan_official({split: path for split, path in files.items() if official[split]})
            others = [str(path) for split, path in files.items() if not official[split]]
            if others:  # one format per dataset: a list in the other is not read, which must not go unnoticed
                scan.warnings.append(f"{', '.join(others)} not read: they are not official Kinetics CSVs (no "
                                     "youtube_id header) and the other lists are; convert them or put them in another "
                                     "folder")
            return scan
        return self._scan_slowfast(files)

    # -- the official CSVs -----------------------------------------------------------------------------------
    def _scan_official(self, files: dict[str, Path]) -> DatasetScan:
        rows: dict[str, list[tuple[str, str, str]]] = {}  # per split: (clip stem, youtube id, label)
        notes, warnings = [], []
        for split, path in files.items():
            reader = csv.DictReader(io.StringIO(read_text(path)))
            fields = [name.strip() for name in reader.fieldnames or []]
            reader.fieldnames = fields
            if not {"youtube_id", "time_start", "time_end"} <= set(fields):
                raise ValueError(f"{path}: expected the columns youtube_id,time_start,time_end, got {fields}")
            split_rows = [(reader.line_num, row) for row in reader]
            labelled = "label" in fields and any((row["label"] or "").strip() for _, row in split_rows)
            if not labelled:
                notes.append(f"{path.name} has no labels: it cannot be evaluated; test uses the val split")
                continue
            rows[split], unlabelled = [], 0
            for line, row in split_rows:
                label = (row["label"] or "").strip()
                if not label:
                    unlabelled += 1
                    continue
                try:
                    youtube_id = row["youtube_id"].strip()
                    rows[split].append((clip_stem(youtube_id, row["time_start"], row["time_end"]), youtube_id, label))
                except (AttributeError, TypeError, ValueError):
                    raise ValueError(f"{path}, line {line}: expected label,youtube_id,time_start,time_end,... with "
                                     f"numeric times, got {row}") from None
            if unlabelled:
                warnings.append(f"{path.name}: {unlabelled} rows have an empty label and are left out")

        class_names = sorted({label for split_rows in rows.values() for _, _, label in split_rows})
        if self.expected_num_classes and len(class_names) != self.expected_num_classes:
            warnings.append(
                f"the annotation files name {len(class_names)} classes, not {self.expected_num_classes}: "
                "a partial or different release? Class ids follow the sorted names found."
            )
        label_of = {name: label for label, name in enumerate(class_names)}

        splits: dict[str, list[tuple[str, int]]] = {}
        missing: dict[str, list[str]] = {}
        searched: dict[str, str] = {}
        for split, split_rows in rows.items():
            folder = self.video_folder(split)
            if folder is None:
                tried = ", ".join(str(self.root / name) for name in SPLIT_ALIASES[split])
                message = f"{files[split].name} is annotated but there is no video folder for it ({tried})"
                if split == "test":
                    notes.append(message + "; test uses the val split")
                    continue
                raise FileNotFoundError(f"Kinetics {split}: {message}. Check data.root={self.root}.")
            searched[split] = str(folder)
            # A clip file is found by its <id>_<start>_<end> stem (any zero padding), or by the bare <id> when it
            # is saved as just that: a file of another time span of the same video is another row's clip.
            by_stem: dict[str, str] = {}
            for path in list_videos(folder, max_depth=1):  # flat, or one folder per class
                match = CLIP_NAME.match(path.stem)
                stem = clip_stem(*match.group("youtube_id", "start", "end")) if match else path.stem
                by_stem.setdefault(stem, str(path))
            splits[split], missing[split] = [], []
            for stem, youtube_id, label in split_rows:
                path = by_stem.get(stem) or by_stem.get(youtube_id)
                if path is None:
                    missing[split].append(stem)
                else:
                    splits[split].append((path, label_of[label]))
        return DatasetScan(class_names, splits, missing, searched, notes, warnings)

    # -- PySlowFast lists ------------------------------------------------------------------------------------
    def _scan_slowfast(self, files: dict[str, Path]) -> DatasetScan:
        rows = {split: CsvSource.read_rows(path) for split, path in files.items()}
        for split, split_rows in rows.items():
            for path, label in split_rows:
                if not label.isdigit():
                    raise ValueError(f"{files[split]}: expected `<path> <label id>` lines, got label {label!r} "
                                     f"for {path}")
        num_ids = max(int(label) for split_rows in rows.values() for _, label in split_rows) + 1
        class_names, warnings = self._slowfast_class_names(num_ids)
        if self.expected_num_classes and len(class_names) != self.expected_num_classes:
            warnings.append(f"the lists use {len(class_names)} class ids, not {self.expected_num_classes}")

        splits: dict[str, list[tuple[str, int]]] = {}
        missing: dict[str, list[str]] = {}
        searched: dict[str, str] = {}
        for split, split_rows in rows.items():
            list_folder = files[split].parent
            candidates = []
            for path, _ in split_rows:
                path = os.path.expanduser(path)
                options = [path] if os.path.isabs(path) else [str(self.root / path), str(list_folder / path)]
                candidates.append(options)
            exists = existing_files(option for options in candidates for option in options)
            splits[split], missing[split] = [], []
            for (path, label), options in zip(split_rows, candidates, strict=True):
                found = next((option for option in options if option in exists), None)
                if found is None:
                    missing[split].append(path)
                else:
                    splits[split].append((found, int(label)))
            searched[split] = f"{self.root} (paths in {files[split]})"
        return DatasetScan(class_names, splits, missing, searched, warnings=warnings)

    def _slowfast_class_names(self, num_ids: int) -> tuple[list[str], list[str]]:
        for folder in self.annotation_folders():
            path = first_existing([folder / name for name in CLASS_NAME_FILES])
            if path is None:
                continue
            if path.suffix == ".json":
                try:
                    ids = {name: int(class_id) for name, class_id in read_json(path).items()}
                except (ValueError, TypeError, AttributeError) as error:
                    raise ValueError(f"{path}: expected a JSON object of class name -> integer id ({error})") from None
                names = [""] * max(max(ids.values(), default=-1) + 1, num_ids)
                for name, class_id in ids.items():
                    names[class_id] = name.strip().strip('"')
            else:
                names = read_class_names(path)
            if len(names) < num_ids:
                raise ValueError(f"{path} names {len(names)} classes but the lists use ids up to {num_ids - 1}")
            return names, []
        return [str(class_id) for class_id in range(num_ids)], [
            f"no class-name file ({', '.join(CLASS_NAME_FILES)}) beside the lists: classes are named by their ids"
        ]

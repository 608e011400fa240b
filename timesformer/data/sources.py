"""Real datasets on disk: what every annotation-file source shares, and the generic `folder` and `csv` sources.

A source reads a dataset's own annotation files where the user has them, finds each annotated video on disk
and returns a `VideoIndex`. Real datasets always have holes (Kinetics clips deleted from YouTube, a class
folder named differently, a partial download): an annotated video whose file is missing is counted and
reported once per split, and only a split left with no video at all is an error.

Finding files goes through directory listings (one `os.scandir` per folder) rather than one `stat` per
annotated video: Kinetics has ~250k clips, often on a network file system.

The layouts each source accepts are documented in data/README.md.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lightning.fabric.utilities.rank_zero import rank_zero_only

from timesformer.data.dataset import SPLITS, VideoIndex

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".ogv", ".3gp",
                    ".ts", ".mts", ".m2ts")
# How a split's folder may be called on disk (and in annotation file names), most common first.
SPLIT_ALIASES = {
    "train": ("train", "training"),
    "val": ("val", "validate", "validation", "valid"),
    "test": ("test", "testing"),
}
# How many missing videos a warning names before it only counts them.
MISSING_EXAMPLES = 3


@dataclass
class DatasetScan:
    """What a source found: class names, per split the (video path, label) entries whose files exist, the
    annotated videos whose files do not, where each split's videos were looked for, and notes for the log."""

    class_names: list[str]
    splits: dict[str, list[tuple[str, int]]]
    missing: dict[str, list[str]] = field(default_factory=dict)
    searched: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def is_video_file(name: str) -> bool:
    return name.lower().endswith(VIDEO_EXTENSIONS) and not name.startswith(".")


def list_videos(folder: Path, max_depth: int = 1) -> list[Path]:
    """Video files in `folder` and its subfolders down to `max_depth` levels (0: the folder only). Hidden
    files and folders are skipped; the order is sorted, so indices are the same on every machine."""
    found: list[Path] = []

    def walk(directory: str, depth: int) -> None:
        try:
            entries = list(os.scandir(directory))
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                if depth < max_depth:
                    walk(entry.path, depth + 1)
            elif is_video_file(entry.name):
                found.append(Path(entry.path))

    walk(os.fspath(folder), 0)
    return sorted(found)


def existing_files(paths: Iterable[str | os.PathLike]) -> set[str]:
    """The subset of `paths` (as given, `os.fspath`) that exist, listing each distinct folder only once."""
    by_folder: dict[str, list[str]] = {}
    for path in paths:
        path = os.fspath(path)
        by_folder.setdefault(os.path.dirname(path), []).append(path)
    found: set[str] = set()
    for folder, wanted in by_folder.items():
        try:
            names = set(os.listdir(folder or "."))
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
        found.update(path for path in wanted if os.path.basename(path) in names)
    return found


def first_existing(candidates: Sequence[Path]) -> Path | None:
    return next((path for path in candidates if path.exists()), None)


def read_text(path: Path) -> str:
    """An annotation file's text (UTF-8, with or without a BOM; CRLF read as LF); another encoding is an error
    naming the file."""
    try:
        with open(path, encoding="utf-8-sig", newline=None) as file:  # newline=None: universal newlines
            return file.read()
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text ({error}): save it as UTF-8") from None


def read_text_lines(path: Path) -> list[str]:
    """Non-empty lines without their line ends: handles CRLF (UCF101's lists), a UTF-8 BOM and blank lines."""
    return [line.strip() for line in read_text(path).splitlines() if line.strip()]


def read_class_names(path: Path) -> list[str]:
    """A class-names file: line i names class i (counted from 0). A blank line between names or a name given twice
    is an error, since either would shift or merge class ids."""
    lines = [line.strip() for line in read_text(path).splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    blank = [number for number, line in enumerate(lines, start=1) if not line]
    if blank:
        raise ValueError(f"{path}: blank line {blank[0]} (line i names class i-1; remove it or name the class)")
    repeated = sorted({name for name in lines if lines.count(name) > 1})
    if repeated:
        raise ValueError(f"{path}: {', '.join(repeated[:3])} named more than once (each line names one class)")
    return lines


def read_json(path: Path) -> object:
    """A JSON annotation file; a truncated or invalid one is an error naming the file."""
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}): a truncated download?") from None


class AnnotatedVideoSource:
    """Base of the real-dataset sources: `scan()` reads annotations and finds the files (subclasses), `load()`
    reports what is missing and checks that something is left, `prepare()` checks that `root` exists.

    Nothing is ever downloaded: `prepare()` only fails early, with the option to fix, when data.root is wrong.
    """

    #: How the dataset is called in messages.
    title = "dataset"

    def __init__(self, root: str | os.PathLike) -> None:
        if root is None or str(root) in ("", "???"):
            raise ValueError(f"The {self.title} source needs data.root=PATH (the dataset's folder; see data/README.md)")
        self.root = Path(root).expanduser()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r})"

    def check_root(self) -> None:
        if not self.root.is_dir():
            what = "is not a folder" if self.root.exists() else "does not exist"
            raise FileNotFoundError(
                f"data.root={self.root} {what}. Set data.root=PATH to your {self.title} folder "
                f"(the layouts it may have are in data/README.md)."
            )

    def prepare(self) -> None:
        self.check_root()

    def scan(self) -> DatasetScan:
        raise NotImplementedError

    def load(self) -> VideoIndex:
        self.check_root()
        return self.index_from_scan(self.scan())

    def index_from_scan(self, scan: DatasetScan) -> VideoIndex:
        """Report what `scan()` found missing or inconsistent, fail on a split without videos, use val for a
        missing test."""
        for note in scan.notes:
            _log_on_rank_zero(logging.INFO, "%s: %s", self.title, note)
        for warning in [*scan.warnings, *consistency_warnings(scan)]:
            _log_on_rank_zero(logging.WARNING, "%s: %s", self.title, warning)
        for split, missing in scan.missing.items():
            if not missing:
                continue
            found = len(scan.splits.get(split, []))
            examples = ", ".join(missing[:MISSING_EXAMPLES]) + (", ..." if len(missing) > MISSING_EXAMPLES else "")
            _log_on_rank_zero(
                logging.WARNING,
                "%s %s: %d of %d annotated videos are missing under %s and are left out (%s). "
                "`python -m timesformer.data.check data=... data.root=%s` lists them all.",
                self.title, split, len(missing), found + len(missing), scan.searched.get(split, self.root),
                examples, self.root,
            )
        for split, entries in scan.splits.items():
            if not entries:
                annotated = len(scan.missing.get(split, []))
                problem = f"none of the {annotated} annotated videos was found" if annotated else "no videos"
                raise FileNotFoundError(
                    f"{self.title} {split}: {problem} under {scan.searched.get(split, self.root)}. Check "
                    f"data.root={self.root} and the layout in data/README.md."
                )
        if not scan.splits:
            raise FileNotFoundError(f"{self.title}: no split found under data.root={self.root} (see data/README.md)")
        splits, missing = dict(scan.splits), dict(scan.missing)
        if "test" not in splits and "val" in splits:
            splits["test"] = splits["val"]  # evaluation on the validation set, as the papers report
            missing["test"] = missing.get("val", [])
        return VideoIndex(class_names=list(scan.class_names), splits=splits, missing=missing)


def consistency_warnings(scan: DatasetScan) -> list[str]:
    """What annotation lists get wrong without failing to read: a class that only val/test has (a typo, another
    case or Unicode form of a training class: those videos can never be classified right), a class with no video
    (ids counted from 1, a header row read as a label), a video listed twice (counted twice) or with two labels,
    and a video in two splits (validation on training data)."""
    warnings = []

    def named(items: Sequence[str]) -> str:
        return ", ".join(items[:MISSING_EXAMPLES]) + (", ..." if len(items) > MISSING_EXAMPLES else "")

    labels_in = {split: {label for _, label in entries} for split, entries in scan.splits.items()}
    for split in ("val", "test"):
        unseen = sorted(labels_in.get(split, set()) - labels_in.get("train", set()))
        if unseen and "train" in scan.splits:
            warnings.append(f"{split} has classes with no training video: "
                            + ", ".join(scan.class_names[label] for label in unseen))
    used = set().union(*labels_in.values())
    empty = [name for label, name in enumerate(scan.class_names) if label not in used]
    if empty:
        warnings.append(f"{len(empty)} of {len(scan.class_names)} classes have no video in any split ({named(empty)}): "
                        "class ids counted from 1, a header row read as a video, or a partial download?")
    labels_of: dict[str, dict[str, set[int]]] = {}  # split -> path -> its labels
    for split, entries in scan.splits.items():
        counts: dict[str, int] = {}
        for path, label in entries:
            path = os.path.normpath(path)
            labels_of.setdefault(split, {}).setdefault(path, set()).add(label)
            counts[path] = counts.get(path, 0) + 1
        repeated = [path for path, count in counts.items() if count > 1]
        conflicting = [f"{path} ({' / '.join(scan.class_names[label] for label in sorted(labels_of[split][path]))})"
                       for path in repeated if len(labels_of[split][path]) > 1]
        if repeated:
            warnings.append(f"{split}: {len(repeated)} videos are listed more than once and count that many times "
                            f"({named(repeated)})")
        if conflicting:
            warnings.append(f"{split}: {len(conflicting)} videos are listed with different labels, and count as "
                            f"each of them ({named(conflicting)})")
    for first, second in (("train", "val"), ("train", "test"), ("val", "test")):
        shared = sorted(set(labels_of.get(first, {})) & set(labels_of.get(second, {})))
        if shared:
            seen = "trained on" if first == "train" else "was chosen on (the best checkpoint by val)"
            warnings.append(f"{len(shared)} videos are in both {first} and {second} ({named(shared)}): {second} "
                            f"results would measure videos the model {seen}")
    return warnings


@rank_zero_only
def _log_on_rank_zero(level: int, message: str, *args: object) -> None:
    # Every DDP process loads the index; one report is enough.
    log.log(level, message, *args)


def _split_folder(root: Path, split: str) -> Path | None:
    return first_existing([root / name for name in SPLIT_ALIASES[split]])


class FolderSource(AnnotatedVideoSource):
    """Custom data as folders: `root/<split>/<class>/<video>` (split folders: train, val (or validate,
    validation, valid), optionally test; without test, evaluation uses val).

    The classes are the class folders of all splits together, sorted by name; a class folder with no video
    counts only if it has one in another split. Videos are the files with a video extension (any case).
    """

    title = "folder dataset"

    def scan(self) -> DatasetScan:
        videos: dict[str, list[Path]] = {}
        searched: dict[str, str] = {}
        strays: dict[str, str] = {}
        for split in SPLITS:
            folder = _split_folder(self.root, split)
            if folder is None:
                continue
            # One level deeper than the videos, to report (not silently drop) videos in subfolders of a class.
            everything = list_videos(folder, max_depth=2)
            found = [path for path in everything if path.parent.parent == folder]  # <split>/<class>/<video>
            if found or split != "test":  # an empty test/ folder: test uses val
                searched[split] = f"{folder}/<class>/"
                videos[split] = found
            if len(found) < len(everything):  # beside the class folders, or below them
                stray = [os.fspath(path.relative_to(folder)) for path in everything if path.parent.parent != folder]
                strays[split] = (f"{split}: {len(stray)} videos outside {folder}/<class>/ are left out: "
                                 + ", ".join(stray[:5]) + (" ..." if len(stray) > 5 else ""))
        if "train" not in videos and "val" not in videos:
            raise FileNotFoundError(
                f"data.root={self.root} has no train/ or val/ folder: a folder dataset is "
                "root/<split>/<class>/<video> (see data/README.md)"
            )
        class_names = sorted({path.parent.name for paths in videos.values() for path in paths})
        label_of = {name: label for label, name in enumerate(class_names)}
        splits = {split: [(str(path), label_of[path.parent.name]) for path in paths] for split, paths in videos.items()}
        return DatasetScan(class_names, splits, searched=searched, warnings=list(strays.values()))


class CsvSource(AnnotatedVideoSource):
    """Any list of videos: one CSV per split, one `path,label` row per video (an optional header row;
    space- or tab-separated `path label` lines are read too).

    `label` is a class name or an integer class id (all ids, or all names, in one dataset). Class names come
    from `class_names` (a file with one name per line, line i = class i) when given; otherwise they are the
    sorted label names, or "0".."N-1" for integer labels. Relative paths are resolved against the CSV's own
    folder first, then against `root`. `train_list`, `val_list`, `test_list` and `class_names` may be
    relative to `root`; a split whose list is null or missing is left out (test then uses val).
    """

    title = "csv dataset"
    HEADER_FIRST_FIELDS = ("path", "video", "file", "filename", "video_path", "name", "clip", "video_id", "id")
    HEADER_LABEL_FIELDS = ("label", "labels", "class", "class_name", "classname", "category", "action", "target")

    def __init__(
        self,
        root: str | os.PathLike,
        train_list: str | None = "train.csv",
        val_list: str | None = "val.csv",
        test_list: str | None = "test.csv",
        class_names: str | None = "classes.txt",
    ) -> None:
        super().__init__(root)
        self.lists = {"train": train_list, "val": val_list, "test": test_list}
        self.class_names_file = class_names

    def _resolve(self, path: str | None) -> Path | None:
        if not path:
            return None
        resolved = Path(path).expanduser()
        return resolved if resolved.is_absolute() else self.root / resolved

    @classmethod
    def read_rows(cls, path: Path) -> list[tuple[str, str]]:
        """(video path, label) rows of a list file, header and blank lines skipped.

        Comma-separated (CSV quoting), tab-separated (labels may hold spaces) or "path label" lines (PySlowFast's:
        the label is the last whitespace-separated field, the path may hold spaces and commas), decided per file:
        tabs when every line has one, space-separated when every line reads as a video path and a label that way
        and not as CSV (a comma inside a path), else CSV. The first line is a header when it names the columns or
        when it is no video path where all other lines are. A row with more fields than the header's (two without
        one) is an error: an unquoted comma in a label would otherwise cut it short."""
        # (spaces stripped, tabs kept: "b.mp4<TAB>" is a tab-separated row with an empty label)
        lines = [line.strip(" ") for line in read_text(path).splitlines() if line.strip()]

        def video_path_first(fields: list[str]) -> bool:
            return len(fields) >= 2 and is_video_file(os.path.basename(fields[0].strip()))

        def csv_fields(line: str) -> list[str]:
            return next(csv.reader([line], skipinitialspace=True))

        def space_fields(line: str) -> list[str]:
            return line.rsplit(maxsplit=1)

        def tab_fields(line: str) -> list[str]:
            return line.split("\t")

        data_lines = lines[1:] if len(lines) > 1 else lines  # the first may be a header
        as_space = [video_path_first(space_fields(line)) for line in data_lines]
        as_csv = [video_path_first(csv_fields(line)) for line in data_lines]
        if all("\t" in line for line in data_lines):
            split = tab_fields
        elif any(as_space) or any(as_csv):
            split = space_fields if all(as_space) and not all(as_csv) else csv_fields
        else:  # paths without a video extension: a comma means CSV
            split = csv_fields if any("," in line for line in data_lines) else space_fields
        others_are_videos = len(lines) > 1 and all(video_path_first(split(line)) for line in data_lines)
        rows, columns = [], 2
        for number, line in enumerate(lines, start=1):
            fields = [value.strip() for value in split(line)]
            named = fields[0].lower() in cls.HEADER_FIRST_FIELDS or (
                len(fields) > 1 and fields[1].lower() in cls.HEADER_LABEL_FIELDS)
            if number == 1 and not is_video_file(os.path.basename(fields[0])) and (named or others_are_videos):
                if not named:
                    log.info("%s: line 1 (%r) is read as a header: it names no video file, the other lines do",
                             path, line)
                columns = max(len(fields), 2)
                continue  # a header row, not a video whose class is called "class"
            if len(fields) < 2 or not fields[0] or not fields[1]:
                raise ValueError(f"{path}, line {number}: expected `path,label`, got {line!r}")
            if len(fields) > columns:
                raise ValueError(f"{path}, line {number}: {len(fields)} fields where the list has {columns} "
                                 f"({line!r}): quote a path or label that holds a comma (\"dancing, solo\")")
            rows.append((fields[0], fields[1]))
        return rows

    def scan(self) -> DatasetScan:
        rows: dict[str, list[tuple[str, str]]] = {}
        list_files: dict[str, Path] = {}
        for split, name in self.lists.items():
            path = self._resolve(name)
            if path is None:
                continue
            if not path.is_file():
                if name != f"{split}.csv":  # set explicitly: it must be there
                    raise FileNotFoundError(f"data.source.{split}_list={name}: no such file ({path})")
                continue
            rows[split] = self.read_rows(path)
            list_files[split] = path
        if not rows:
            raise FileNotFoundError(
                f"No video list found: set data.source.train_list / val_list (CSV files of `path,label` rows; "
                f"relative to data.root={self.root}). Looked for "
                + ", ".join(str(self._resolve(name)) for name in self.lists.values() if name)
            )

        class_names = self._class_names([label for split_rows in rows.values() for _, label in split_rows])
        label_of = {name: label for label, name in enumerate(class_names)}

        splits: dict[str, list[tuple[str, int]]] = {}
        missing: dict[str, list[str]] = {}
        searched: dict[str, str] = {}
        for split, split_rows in rows.items():
            list_folder = list_files[split].parent
            # Both candidates of every relative path, checked with one listing per folder.
            candidates = [self._candidates(path, list_folder) for path, _ in split_rows]
            exists = existing_files(path for options in candidates for path in options)
            splits[split], missing[split] = [], []
            for (path, label), options in zip(split_rows, candidates, strict=True):
                found = next((option for option in options if option in exists), None)
                if found is None:
                    missing[split].append(path)
                    continue
                class_id = label_of[label] if label in label_of else int(label)
                if not 0 <= class_id < len(class_names):
                    raise ValueError(
                        f"{list_files[split]}: label {label} of {path} is not a class id in [0, {len(class_names) - 1}]"
                    )
                splits[split].append((found, class_id))
            searched[split] = f"{list_folder} and {self.root} (paths in {list_files[split]})"
        return DatasetScan(class_names, splits, missing, searched)

    def _candidates(self, path: str, list_folder: Path) -> list[str]:
        expanded = Path(path).expanduser()
        if expanded.is_absolute():
            return [os.fspath(expanded)]
        return [os.fspath(list_folder / expanded), os.fspath(self.root / expanded)]

    def _class_names(self, labels: list[str]) -> list[str]:
        names_file = self._resolve(self.class_names_file)
        all_integers = all(label.lstrip("-").isdigit() for label in labels)
        if names_file is not None and names_file.is_file():
            names = read_class_names(names_file)
            unknown = sorted(set(labels) - set(names) if not all_integers else set())
            if unknown:
                raise ValueError(f"Labels not in {names_file}: {', '.join(unknown[:5])}")
            return names
        if self.class_names_file and self.class_names_file != "classes.txt":
            raise FileNotFoundError(f"data.source.class_names={self.class_names_file}: no such file ({names_file})")
        if all_integers:
            return [str(class_id) for class_id in range(max(int(label) for label in labels) + 1)]
        if any(label.lstrip("-").isdigit() for label in labels):
            raise ValueError(
                "The video lists mix integer labels and class names; use one kind, or give the class order in "
                "data.source.class_names (one name per line)"
            )
        return sorted(set(labels))

"""Diving-48 from its JSON annotation files.

- `Diving48_vocab.json`: 48 entries, each [takeoff, somersault, twist, flight] such as ["Back", "15som", "05Twis",
  "FREE"]; entry i is class i, named by its parts joined with "+" ("Back+15som+05Twis+FREE", the names of
  mmaction2's Diving-48 label map).
- `Diving48_V2_train.json`, `Diving48_V2_test.json`: lists of {"vid_name", "label", "start_frame", "end_frame"}
  with the cleaned (V2) labels that papers report on, the TimeSformer paper included. `data.source.version=1` reads
  the original, noisier labels (`Diving48_train.json`, `Diving48_test.json`) instead; they are never used in
  place of missing V2 files unasked.
- Videos: `<vid_name>.mp4`, in `rgb/` (what the official Diving48_rgb.tar.gz unpacks to), `videos/` (mmaction2's
  name for it) or data.root itself. Other extensions (a transcoded copy) are found too.

The videos are already trimmed to the dive: the official lists give every clip start_frame 0 and end_frame its
length, so frame ranges are not applied (mmaction2 ignores them too); an entry whose range starts later is reported,
and its whole video is used. Diving-48 has no validation split: val and test are both the test list (the paper
reports on it), as for UCF101.

The whole dive is the action, so the data config samples TSN-style segments, as for SSv2. Unlike SSv2 it keeps
horizontal flips: the labels count somersaults and twists and name the takeoff (back, forward, inward, reverse:
relative to the board, not to the camera), never a left or a right.
"""

from __future__ import annotations

import os
from pathlib import Path

from timesformer.data.sources import (
    MISSING_EXAMPLES,
    AnnotatedVideoSource,
    DatasetScan,
    first_existing,
    list_videos,
    read_json,
)

ANNOTATION_FOLDERS = ("annotations", "")
VIDEO_FOLDERS = ("rgb", "videos")
VOCAB_FILE = "Diving48_vocab.json"
# Per label version, the file of each split: val is the test list (there is no other held-out split).
SPLIT_FILES = {
    2: {"train": "Diving48_V2_train.json", "val": "Diving48_V2_test.json"},
    1: {"train": "Diving48_train.json", "val": "Diving48_test.json"},
}


def read_vocab(path: Path) -> list[str]:
    """The class names of a Diving48_vocab.json: entry i's parts joined with "+" name class i. A name given twice is
    an error, since it would merge two classes."""
    vocab = read_json(path)
    expected = f"{path}: expected a JSON list of [takeoff, somersault, twist, flight] lists of strings"
    if not isinstance(vocab, list) or not vocab:
        raise ValueError(expected)
    class_of: dict[str, int] = {}
    for class_id, parts in enumerate(vocab):
        if not isinstance(parts, list) or not parts or not all(isinstance(part, str) and part for part in parts):
            raise ValueError(f"{expected}; class {class_id} is {parts!r}")
        name = "+".join(parts)
        if name in class_of:
            raise ValueError(f"{path}: classes {class_of[name]} and {class_id} are both {name}")
        class_of[name] = class_id
    return list(class_of)


class Diving48Source(AnnotatedVideoSource):
    """Diving-48 under `root` (see the module docstring).

    Args:
        root: the dataset folder.
        annotations: the folder of Diving48_vocab.json and the split files, when it is not one of the usual places.
        version: 2 for the cleaned labels (Diving48_V2_*.json), 1 for the original ones (Diving48_*.json).
    """

    title = "Diving-48"

    def __init__(self, root: str | os.PathLike, annotations: str | None = None, version: int = 2) -> None:
        super().__init__(root)
        if version not in SPLIT_FILES:
            raise ValueError(f"data.source.version={version}: Diving-48's labels are version 2 (the cleaned ones, "
                             "the default) or 1 (the original ones)")
        self.version = int(version)
        self.annotations = Path(annotations).expanduser() if annotations else None

    def _folders(self) -> list[Path]:
        if self.annotations is not None:
            return [self.annotations]
        return [self.root / name if name else self.root for name in ANNOTATION_FOLDERS]

    def video_folder(self) -> Path:
        return first_existing([self.root / name for name in VIDEO_FOLDERS]) or self.root

    def scan(self) -> DatasetScan:
        split_files = SPLIT_FILES[self.version]
        vocab_file = first_existing([folder / VOCAB_FILE for folder in self._folders()])
        if vocab_file is None:
            raise FileNotFoundError(
                f"No {VOCAB_FILE} in {', '.join(str(folder) for folder in self._folders())}. Put the annotation "
                f"files ({VOCAB_FILE}, {', '.join(split_files.values())}) there, or set "
                "data.source.annotations=FOLDER."
            )
        class_names = read_vocab(vocab_file)

        folder = self.video_folder()
        by_name = {}
        for path in list_videos(folder, max_depth=0):
            by_name.setdefault(path.stem, str(path))

        splits: dict[str, list[tuple[str, int]]] = {}
        missing: dict[str, list[str]] = {}
        warnings = []
        for split, name in split_files.items():
            path = vocab_file.parent / name
            if not path.is_file():
                message = f"Diving-48: {name} is missing (looked in {vocab_file.parent}, beside {VOCAB_FILE})"
                v1_file = SPLIT_FILES[1][split]
                if self.version == 2 and (vocab_file.parent / v1_file).is_file():
                    message += f"; {v1_file} (V1 labels) is there: data.source.version=1 reads it"
                raise FileNotFoundError(message)
            entries = self._read_split(path, class_names, vocab_file)
            late = [(vid_name, start) for vid_name, _, start in entries if isinstance(start, int) and start > 0]
            if late:
                examples = ", ".join(f"{vid_name} at frame {start}" for vid_name, start in late[:MISSING_EXAMPLES])
                warnings.append(f"{name}: {len(late)} entries start after frame 0 ({examples}"
                                f"{', ...' if len(late) > MISSING_EXAMPLES else ''}): their whole videos are sampled, "
                                "not the annotated frame range")
            splits[split], missing[split] = [], []
            for vid_name, label, _ in entries:
                found = by_name.get(vid_name)
                if found is None:
                    missing[split].append(f"{vid_name}.mp4")
                else:
                    splits[split].append((found, label))
        searched = dict.fromkeys(splits, str(folder))
        return DatasetScan(class_names, splits, missing, searched, warnings=warnings)

    @staticmethod
    def _read_split(path: Path, class_names: list[str], vocab_file: Path) -> list[tuple[str, int, object]]:
        """(vid_name, label, start_frame) of each entry of a split file (start_frame as written, None if absent)."""
        items = read_json(path)
        if not isinstance(items, list):
            raise ValueError(f"{path}: expected a JSON list of {{\"vid_name\": ..., \"label\": ...}} entries")
        entries = []
        for number, item in enumerate(items, start=1):
            vid_name, label = (item.get("vid_name"), item.get("label")) if isinstance(item, dict) else (None, None)
            # (bool is an int subclass: `true` is no class id)
            if (not isinstance(vid_name, str) or not vid_name or not isinstance(label, int) or isinstance(label, bool)
                    or label < 0):
                raise ValueError(f"{path}, entry {number}: expected {{\"vid_name\": \"<video name>\", \"label\": "
                                 f"<class id>, ...}}, got {item!r}")
            if label >= len(class_names):
                raise ValueError(f"{path}: {vid_name} has label {label}, not a class of {vocab_file} "
                                 f"(0..{len(class_names) - 1})")
            entries.append((vid_name, label, item.get("start_frame")))
        return entries

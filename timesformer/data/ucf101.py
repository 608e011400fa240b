"""UCF101 from its official split lists.

`root/ucfTrainTestlist/` holds `classInd.txt` (`<id> <Class>`, ids 1-101), `trainlist0N.txt`
(`<Class>/v_<Class>_gXX_cYY.avi <id>`, 1-based ids) and `testlist0N.txt` (the path only: the label comes from
the class folder). The files have CRLF line ends. Videos are `root/UCF-101/<Class>/v_*.avi` (XviD / MPEG-4
part 2 in AVI).

Names are matched without regard to case: the official lists and folders disagree on it
(classInd says `HandstandPushups`, the files are `v_HandStandPushups_*.avi`).

UCF101 has no separate test set: val and test are both the split's test list.
"""

from __future__ import annotations

import os
from pathlib import Path

from timesformer.data.sources import AnnotatedVideoSource, DatasetScan, first_existing, list_videos, read_text_lines

LIST_FOLDERS = ("ucfTrainTestlist", "ucf101_splits", "splits", "annotations")
VIDEO_FOLDERS = ("UCF-101", "UCF101", "videos")


class UCF101Source(AnnotatedVideoSource):
    """UCF101 under `root`, official split `split` (1, 2 or 3).

    Args:
        root: the dataset folder, holding `ucfTrainTestlist/` and `UCF-101/` (or the list files and the class
            folders directly).
        split: which of the three official train/test splits.
        annotations: the folder of classInd.txt and the lists, when it is not one of the usual places.
    """

    title = "UCF101"

    def __init__(self, root: str | os.PathLike, split: int = 1, annotations: str | None = None) -> None:
        super().__init__(root)
        if int(split) not in (1, 2, 3):
            raise ValueError(f"data.split={split}: UCF101 has the official splits 1, 2 and 3")
        self.split = int(split)
        self.annotations = Path(annotations).expanduser() if annotations else None

    def list_folder(self) -> Path:
        candidates = [self.annotations] if self.annotations else [self.root / name for name in LIST_FOLDERS]
        candidates = [*candidates, self.root] if not self.annotations else candidates
        found = first_existing([folder / "classInd.txt" for folder in candidates])
        if found is None:
            raise FileNotFoundError(
                f"No UCF101 classInd.txt in {', '.join(str(folder) for folder in candidates)}. Unpack "
                "UCF101TrainTestSplits-RecognitionTask.zip into data.root (it makes ucfTrainTestlist/), or set "
                "data.source.annotations=FOLDER."
            )
        return found.parent

    def video_folder(self) -> Path:
        folder = first_existing([self.root / name for name in VIDEO_FOLDERS])
        return folder if folder is not None else self.root

    def scan(self) -> DatasetScan:
        lists = self.list_folder()
        class_names: list[str] = []
        for line in read_text_lines(lists / "classInd.txt"):
            fields = line.split(maxsplit=1)
            if len(fields) != 2 or not fields[0].isdigit() or int(fields[0]) != len(class_names) + 1:
                raise ValueError(f"{lists / 'classInd.txt'}: expected `<id> <class name>` lines with the ids 1, 2, "
                                 f"... in order, got {line!r}")
            class_names.append(fields[1].strip())
        label_of = {name.lower(): label for label, name in enumerate(class_names)}

        # Every video on disk, by lower-case "class/file" and by lower-case file name alone (class folders
        # that are named differently from the lists still match).
        videos = self.video_folder()
        by_relative_path: dict[str, str] = {}
        by_name: dict[str, str] = {}
        for path in list_videos(videos, max_depth=1):
            by_relative_path[f"{path.parent.name}/{path.name}".lower()] = str(path)
            by_name.setdefault(path.name.lower(), str(path))

        splits: dict[str, list[tuple[str, int]]] = {}
        missing: dict[str, list[str]] = {}
        for split, list_name in (("train", f"trainlist0{self.split}.txt"), ("val", f"testlist0{self.split}.txt")):
            list_path = lists / list_name
            if not list_path.is_file():
                raise FileNotFoundError(f"UCF101 split {self.split}: {list_path} is missing (data.split=1|2|3)")
            splits[split], missing[split] = [], []
            for line in read_text_lines(list_path):
                fields = line.split()
                relative = fields[0].replace("\\", "/")
                if len(fields) > 1:
                    if not fields[1].isdigit():
                        raise ValueError(f"{list_path}: expected `<class>/<video> <class id>` lines (ids as in "
                                         f"classInd.txt), got {line!r}")
                    label = int(fields[1]) - 1  # the lists count from 1
                    if not 0 <= label < len(class_names):
                        raise ValueError(f"{list_path}: class id {fields[1]} of {relative} is not in classInd.txt")
                else:
                    class_folder = relative.split("/")[0].lower()
                    if class_folder not in label_of:
                        raise ValueError(f"{list_path}: {relative} is in a folder that classInd.txt does not name")
                    label = label_of[class_folder]
                path = by_relative_path.get(relative.lower()) or by_name.get(relative.split("/")[-1].lower())
                if path is None:
                    missing[split].append(relative)
                else:
                    splits[split].append((path, label))
        searched = dict.fromkeys(splits, str(videos))
        return DatasetScan(class_names, splits, missing, searched)

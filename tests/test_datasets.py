"""Real dataset layouts (Kinetics, UCF101, Something-Something v2, Diving-48, folders, CSV lists), evaluation views
and broken videos, on tiny fixtures written here in each dataset's official layout."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from fractions import Fraction
from pathlib import Path

import av
import lightning as L
import numpy as np
import pytest
import torch

from tests.conftest import compose_config
from timesformer.data.diving48 import Diving48Source
from timesformer.data.kinetics import KineticsSource
from timesformer.data.sampling import dense_clip_indices, segment_clip_indices
from timesformer.data.sources import CsvSource, FolderSource, consistency_warnings
from timesformer.data.ssv2 import SomethingSomethingV2Source
from timesformer.data.ucf101 import UCF101Source
from timesformer.pipeline import train

WIDTH, HEIGHT = 64, 48

# Kinetics labels as the official CSVs write them: spaces, parentheses, a comma (quoted).
KINETICS_LABELS = ["abseiling", "passing American football (in game)", "dancing, solo (ballet)"]


def write_video(path: Path, num_frames: int = 16, fps: int = 25, codec: str = "libx264", seed: int = 0) -> Path:
    """A tiny real video: h264 mp4, MPEG-4 part 2 AVI or VP9 webm, chosen by `codec` and the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=(HEIGHT, WIDTH, 3), dtype=np.uint8)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        for t in range(num_frames):
            frame = av.VideoFrame.from_ndarray(np.roll(base, 2 * t, axis=1), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_lines(path: Path, lines: list[str], line_end: str = "\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((line_end.join(lines) + line_end).encode())
    return path


# -- fixtures in each official layout --------------------------------------------------------------------------
def make_kinetics(root: Path, per_class_train: bool = True) -> dict:
    """Official CSVs in root/annotations/ (train.csv, validate.csv, test.csv without labels); train clips in
    per-class folders, validation clips flat in val/ (named validate in the CSV); one validation clip missing."""
    header = "label,youtube_id,time_start,time_end,split,is_cc"
    train_rows, val_rows, test_rows = [header], [header], ["youtube_id,time_start,time_end,split"]
    for label_id, label in enumerate(KINETICS_LABELS):
        quoted = f'"{label}"' if ("," in label or " " in label) else label
        for i in range(2):
            youtube_id = f"tr{label_id}{i}abcdefg"[:11]
            train_rows.append(f"{quoted},{youtube_id},{10 * i},{10 * i + 10},train,0")
            folder = root / "train" / label if per_class_train else root / "train"
            write_video(folder / f"{youtube_id}_{10 * i:06d}_{10 * i + 10:06d}.mp4", seed=label_id * 10 + i)
        youtube_id = f"va{label_id}0abcdefg"[:11]
        val_rows.append(f"{quoted},{youtube_id},4,14,validate,0")
        write_video(root / "val" / f"{youtube_id}_000004_000014.mp4", seed=100 + label_id)
    val_rows.append('"dancing, solo (ballet)",gone0000000,0,10,validate,0')  # deleted from YouTube: no file
    test_rows.append("te00abcdefg,0,10,test")
    write_lines(root / "annotations" / "train.csv", train_rows)
    write_lines(root / "annotations" / "validate.csv", val_rows)
    write_lines(root / "annotations" / "test.csv", test_rows)
    return {"classes": 3, "train": 6, "val": 3, "missing_val": 1}


def make_slowfast_kinetics(root: Path) -> dict:
    """PySlowFast lists: `path label` lines, no header, paths relative to root."""
    for split, count in (("train", 4), ("val", 2)):
        lines = []
        for i in range(count):
            relative = f"videos/{split}_{i}.mp4"
            write_video(root / relative, seed=i)
            lines.append(f"{relative} {i % 2}")
        write_lines(root / f"{split}.csv", lines)
    (root / "classids.json").write_text(json.dumps({"zumba": 1, "abseiling": 0}))
    return {"classes": 2, "train": 4, "val": 2}


UCF_CLASSES = ["ApplyEyeMakeup", "HandstandPushups"]


def make_ucf101(root: Path, classes: list[str] = UCF_CLASSES, splits: tuple[int, ...] = (1,)) -> dict:
    """ucfTrainTestlist/ with CRLF lines and 1-based ids; UCF-101/<Class>/v_*.avi in MPEG-4 part 2. As in the real
    dataset, HandstandPushups' files are named v_HandStandPushups_* (another case than classInd.txt). Groups 1, 8
    and 9 of each class; the lists of `splits` (split 1 tests groups 1-7, split 2 groups 8-14)."""
    lists = root / "ucfTrainTestlist"
    write_lines(lists / "classInd.txt", [f"{i + 1} {name}" for i, name in enumerate(classes)], "\r\n")
    train_lines, test_lines = {split: [] for split in splits}, {split: [] for split in splits}
    for label, name in enumerate(classes):
        file_class = "HandStandPushups" if name == "HandstandPushups" else name
        for group in (1, 8, 9):
            relative = f"{name}/v_{file_class}_g{group:02d}_c01.avi"
            write_video(root / "UCF-101" / relative, codec="mpeg4", seed=label * 10 + group)
            for split in splits:
                if 7 * (split - 1) < group <= 7 * split:  # the split's test groups
                    test_lines[split].append(relative)
                else:
                    train_lines[split].append(f"{relative} {label + 1}")
    for split in splits:
        write_lines(lists / f"trainlist0{split}.txt", train_lines[split], "\r\n")
        write_lines(lists / f"testlist0{split}.txt", test_lines[split], "\r\n")
    return {"classes": len(classes), "train": len(train_lines[splits[0]]), "val": len(test_lines[splits[0]])}


SSV2_TEMPLATES = ["Pushing something from left to right", "Putting something into something"]


def make_ssv2(root: Path) -> dict:
    """labels.json (template -> id string), train/validation.json with bracketed templates, test.json without
    labels, <id>.webm VP9 videos in 20bn-something-something-v2/."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "labels.json").write_text(json.dumps({t: str(i) for i, t in enumerate(SSV2_TEMPLATES)}))
    bracketed = ["Pushing [something] from left to right", "Putting [something] into [something]"]
    video_id = 1
    for split, per_class in (("train", 2), ("validation", 1)):
        items = []
        for template in bracketed:
            for _ in range(per_class):
                write_video(root / "20bn-something-something-v2" / f"{video_id}.webm", codec="libvpx-vp9",
                            seed=video_id)
                items.append({"id": str(video_id), "label": template.replace("[", "").replace("]", ""),
                              "template": template, "placeholders": ["a pen"]})
                video_id += 1
        (root / f"{split}.json").write_text(json.dumps(items))
    (root / "test.json").write_text(json.dumps([{"id": "999"}]))
    return {"classes": 2, "train": 4, "val": 2}


# Not in alphabetical order: class ids are the vocab's positions, not the sorted names.
DIVING48_VOCAB = [["Reverse", "15som", "05Twis", "FREE"], ["Back", "Dive", "NoTwis", "PIKE"]]
DIVING48_CLASSES = ["Reverse+15som+05Twis+FREE", "Back+Dive+NoTwis+PIKE"]


def make_diving48(root: Path, videos: str = "rgb", annotations: str = "annotations") -> dict:
    """Diving48_vocab.json and the V2 lists in root/annotations/, <vid_name>.mp4 videos in rgb/ (the official
    archive's folder); names as the official ones (`<youtube id>_<NNNNN>`, a leading dash); one test video missing."""
    entries: dict[str, list[dict]] = {"train": [], "test": []}
    for split, per_class in (("train", 2), ("test", 1)):
        for label in range(len(DIVING48_VOCAB)):
            for i in range(per_class):
                vid_name = f"-{split[:2]}{label}abcdefg_{i:05d}"
                write_video(root / videos / f"{vid_name}.mp4", seed=len(entries[split]) + 10 * (split == "test"))
                entries[split].append({"vid_name": vid_name, "label": label, "start_frame": 0, "end_frame": 16})
    entries["test"].append({"vid_name": "gone0000000_00000", "label": 1, "start_frame": 0, "end_frame": 16})
    folder = root / annotations
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "Diving48_vocab.json").write_text(json.dumps(DIVING48_VOCAB))
    for split, split_entries in entries.items():
        (folder / f"Diving48_V2_{split}.json").write_text(json.dumps(split_entries))
    return {"classes": 2, "train": 4, "val": 2, "missing_val": 1}


def make_folder(root: Path) -> dict:
    for split, count in (("train", 2), ("val", 1)):
        for name in ("cat", "dog"):
            for i in range(count):
                write_video(root / split / name / f"{name}{i}.mp4", seed=i + (name == "dog"))
    (root / "train" / "cat" / "notes.txt").write_text("not a video")
    return {"classes": 2, "train": 4, "val": 2}


def make_csv(root: Path) -> dict:
    """A header, class names with a comma, paths relative to the CSV's folder (lists/) and to root (videos)."""
    rows = {"train": [], "val": []}
    for split, count in (("train", 2), ("val", 1)):
        for name in ("jumping, high", "running"):
            for i in range(count):
                relative = f"videos/{split}_{name[:4]}{i}.mp4"
                write_video(root / relative, seed=i)
                rows[split].append((relative, name))
    lists = root / "lists"
    lists.mkdir()
    for split, split_rows in rows.items():
        with open(lists / f"{split}.csv", "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["path", "label"])
            writer.writerows(split_rows)
    # One path relative to the list's own folder.
    write_video(lists / "local.mp4")
    with open(lists / "train.csv", "a", newline="") as file:
        csv.writer(file).writerow(["local.mp4", "running"])
    return {"classes": 2, "train": 5, "val": 2}


LAYOUTS = {
    "kinetics400": (make_kinetics, []),
    "kinetics600": (make_slowfast_kinetics, []),
    "ucf101": (make_ucf101, ["data.split=1"]),
    "ssv2": (make_ssv2, []),
    "diving48": (make_diving48, []),
    "folder": (make_folder, []),
    "csv": (make_csv, ["data.source.train_list=lists/train.csv", "data.source.val_list=lists/val.csv"]),
}


# -- sources: what they find on disk ---------------------------------------------------------------------------
def test_kinetics_official_csvs(tmp_path, caplog):
    expected = make_kinetics(tmp_path)
    with caplog.at_level(logging.WARNING):
        index = KineticsSource(tmp_path, num_classes=3).load()
    assert index.class_names == sorted(KINETICS_LABELS)  # the quoted labels parsed whole
    assert len(index.splits["train"]) == expected["train"] and len(index.splits["val"]) == expected["val"]
    assert index.splits["test"] is index.splits["val"]  # the test CSV has no labels
    # the missing clip is reported once, with its name, and is not fatal
    warnings = [r.getMessage() for r in caplog.records if "missing" in r.getMessage()]
    assert len(warnings) == 1 and "1 of 4" in warnings[0] and "gone0000000_000000_000010" in warnings[0]
    # ... and kept with the index, for eval.json (its test is val here): a part of the official list not evaluated
    assert len(index.missing["val"]) == 1 and "gone0000000_000000_000010" in index.missing["val"][0]
    assert index.missing["test"] == index.missing["val"] and not index.missing.get("train")
    # labels follow the sorted class names whatever the folder layout
    for path, label in index.splits["train"] + index.splits["val"]:
        youtube_id = Path(path).stem[:11]
        assert int(youtube_id[2]) == KINETICS_LABELS.index(index.class_names[label])


def test_kinetics_flat_train_folder_and_named_validate_folder(tmp_path):
    make_kinetics(tmp_path, per_class_train=False)
    (tmp_path / "val").rename(tmp_path / "validate")
    index = KineticsSource(tmp_path).load()
    assert len(index.splits["train"]) == 6 and len(index.splits["val"]) == 3


def test_kinetics_pyslowfast_lists(tmp_path):
    make_slowfast_kinetics(tmp_path)
    index = KineticsSource(tmp_path).load()
    assert index.class_names == ["abseiling", "zumba"]
    assert [label for _, label in index.splits["train"]] == [0, 1, 0, 1]
    assert all(Path(path).is_file() for path, _ in index.splits["train"])


def test_ucf101_lists_with_crlf_and_case_mismatch(tmp_path):
    make_ucf101(tmp_path)
    index = UCF101Source(tmp_path, split=1).load()
    assert index.class_names == UCF_CLASSES
    assert sorted(label for _, label in index.splits["train"]) == [0, 0, 1, 1]
    # test list has no labels: they come from the class folder (case-insensitively)
    assert sorted(label for _, label in index.splits["val"]) == [0, 1]
    assert index.splits["test"] is index.splits["val"]
    with pytest.raises(FileNotFoundError, match="trainlist02.txt"):
        UCF101Source(tmp_path, split=2).load()
    with pytest.raises(ValueError, match="data.split=4"):
        UCF101Source(tmp_path, split=4)


def test_ucf101_split_picks_its_own_train_and_test_lists(tmp_path):
    """data.split=2 trains on trainlist02 and evaluates exactly testlist02's videos (groups 8-14), not split 1's."""
    make_ucf101(tmp_path, splits=(1, 2))

    def groups(entries) -> list[tuple[str, int]]:  # (group, class) of each video, e.g. ("g08", 0)
        return sorted((Path(path).stem.split("_")[-2], label) for path, label in entries)

    for split, train_groups, test_groups in ((1, ["g08", "g09"], ["g01"]), (2, ["g01"], ["g08", "g09"])):
        index = UCF101Source(tmp_path, split=split).load()
        assert groups(index.splits["train"]) == sorted((g, label) for g in train_groups for label in (0, 1))
        assert groups(index.splits["val"]) == sorted((g, label) for g in test_groups for label in (0, 1))
        assert groups(index.splits["test"]) == groups(index.splits["val"])


def test_ssv2_templates_are_normalised(tmp_path):
    make_ssv2(tmp_path)
    index = SomethingSomethingV2Source(tmp_path).load()
    assert index.class_names == SSV2_TEMPLATES
    assert [label for _, label in index.splits["train"]] == [0, 0, 1, 1]
    assert all(path.endswith(".webm") for path, _ in index.splits["val"])


def test_diving48_classes_follow_the_vocab_and_val_and_test_are_the_test_list(tmp_path, caplog):
    make_diving48(tmp_path)
    with caplog.at_level(logging.WARNING):
        index = Diving48Source(tmp_path).load()
    assert index.class_names == DIVING48_CLASSES

    def named(entries: list[tuple[str, int]]) -> list[tuple[str, int]]:
        return [(Path(path).name, label) for path, label in entries]

    assert named(index.splits["train"]) == [("-tr0abcdefg_00000.mp4", 0), ("-tr0abcdefg_00001.mp4", 0),
                                            ("-tr1abcdefg_00000.mp4", 1), ("-tr1abcdefg_00001.mp4", 1)]
    assert named(index.splits["val"]) == [("-te0abcdefg_00000.mp4", 0), ("-te1abcdefg_00000.mp4", 1)]
    assert index.splits["test"] is index.splits["val"]  # no other test list
    assert index.missing["val"] == index.missing["test"] == ["gone0000000_00000.mp4"]
    assert "1 of 3 annotated videos are missing" in caplog.text and "gone0000000_00000.mp4" in caplog.text


@pytest.mark.parametrize(("videos", "annotations"), [("rgb", "annotations"), ("videos", "annotations"), ("", "")])
def test_diving48_videos_and_annotations_where_users_have_them(tmp_path, videos, annotations):
    """rgb/ (Diving48_rgb.tar.gz), videos/ (mmaction2's) or data.root itself; annotations in annotations/ or root."""
    make_diving48(tmp_path, videos=videos, annotations=annotations)
    index = Diving48Source(tmp_path).load()
    assert len(index.splits["train"]) == 4 and len(index.splits["val"]) == 2
    assert {Path(path).parent for path, _ in index.splits["train"] + index.splits["val"]} == {tmp_path / videos}


def test_diving48_annotations_elsewhere_need_the_option(tmp_path):
    make_diving48(tmp_path / "diving48")
    (tmp_path / "diving48" / "annotations").rename(tmp_path / "labels")
    with pytest.raises(FileNotFoundError, match=r"No Diving48_vocab.json in .*diving48/annotations, .*diving48\. "
                                                r".*data.source.annotations=FOLDER"):
        Diving48Source(tmp_path / "diving48").load()
    index = Diving48Source(tmp_path / "diving48", annotations=str(tmp_path / "labels")).load()
    assert index.class_names == DIVING48_CLASSES and len(index.splits["train"]) == 4


def test_diving48_bad_annotations_name_the_file_and_the_entry(tmp_path):
    make_diving48(tmp_path)
    folder = tmp_path / "annotations"
    train_file, vocab_file = folder / "Diving48_V2_train.json", folder / "Diving48_vocab.json"
    entries = json.loads(train_file.read_text())

    def load_with(path: Path, content: object) -> None:
        path.write_text(json.dumps(content))
        Diving48Source(tmp_path).load()

    with pytest.raises(ValueError, match=r"Diving48_V2_train.json: x_00001 has label 2, not a class of "
                                         r".*Diving48_vocab.json \(0..1\)"):
        load_with(train_file, [*entries, {"vid_name": "x_00001", "label": 2}])
    for entry in ({"label": 0}, {"vid_name": "x_00001", "label": "Back"}, {"vid_name": "x_00001", "label": -1},
                  "x_00001"):
        with pytest.raises(ValueError, match=r"Diving48_V2_train.json, entry 5: expected "):
            load_with(train_file, [*entries, entry])
    with pytest.raises(ValueError, match=r"Diving48_V2_train.json: expected a JSON list"):
        load_with(train_file, {"vid_name": "x_00001", "label": 0})
    train_file.write_text(json.dumps(entries))

    with pytest.raises(ValueError, match=r"Diving48_vocab.json: classes 1 and 2 are both Back\+Dive\+NoTwis\+PIKE"):
        load_with(vocab_file, [*DIVING48_VOCAB, DIVING48_VOCAB[1]])
    with pytest.raises(ValueError, match=r"Diving48_vocab.json: expected a JSON list of .*; "
                                         r"class 1 is 'Back\+Dive\+NoTwis\+PIKE'"):
        load_with(vocab_file, [DIVING48_VOCAB[0], "Back+Dive+NoTwis+PIKE"])
    vocab_file.write_text(json.dumps(DIVING48_VOCAB))

    (folder / "Diving48_V2_test.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"Diving48_V2_test.json is missing \(looked in .*annotations"):
        Diving48Source(tmp_path).load()


def test_diving48_v1_labels_only_when_asked_for(tmp_path):
    """The original labels (Diving48_train.json, ...) are noisier than V2's: never used in their place unasked."""
    make_diving48(tmp_path)
    folder = tmp_path / "annotations"
    for split in ("train", "test"):
        (folder / f"Diving48_V2_{split}.json").rename(folder / f"Diving48_{split}.json")
    with pytest.raises(FileNotFoundError, match=r"Diving48_V2_train.json is missing .*Diving48_train.json "
                                                r"\(V1 labels\) is there: data.source.version=1"):
        Diving48Source(tmp_path).load()
    index = Diving48Source(tmp_path, version=1).load()
    assert index.class_names == DIVING48_CLASSES and len(index.splits["train"]) == 4 and len(index.splits["val"]) == 2
    with pytest.raises(ValueError, match="data.source.version=3"):
        Diving48Source(tmp_path, version=3)


def test_diving48_frame_ranges_are_the_whole_video_or_reported(tmp_path):
    """The official clips are trimmed (start_frame 0, end_frame their length): a range that starts later is named,
    and its whole video is still used."""
    make_diving48(tmp_path)
    train_file = tmp_path / "annotations" / "Diving48_V2_train.json"
    assert not Diving48Source(tmp_path).scan().warnings
    entries = json.loads(train_file.read_text())
    entries[1]["start_frame"] = 8
    train_file.write_text(json.dumps(entries))
    scan = Diving48Source(tmp_path).scan()
    assert len(scan.splits["train"]) == 4
    assert scan.warnings == ["Diving48_V2_train.json: 1 entries start after frame 0 (-tr0abcdefg_00001 at frame 8): "
                             "their whole videos are sampled, not the annotated frame range"]


def test_folder_and_csv_sources(tmp_path):
    make_folder(tmp_path / "folder")
    index = FolderSource(tmp_path / "folder").load()
    assert index.class_names == ["cat", "dog"] and len(index.splits["train"]) == 4  # notes.txt is no video
    make_csv(tmp_path / "csv")
    index = CsvSource(tmp_path / "csv", train_list="lists/train.csv", val_list="lists/val.csv").load()
    assert index.class_names == ["jumping, high", "running"]
    assert len(index.splits["train"]) == 5 and Path(index.splits["train"][-1][0]).name == "local.mp4"


def test_csv_integer_labels_and_missing_root(tmp_path):
    write_video(tmp_path / "a.mp4")
    write_lines(tmp_path / "train.csv", ["a.mp4,2", "gone.mp4,0"])
    index = CsvSource(tmp_path, val_list=None).load()
    assert index.class_names == ["0", "1", "2"] and index.splits["train"] == [(str(tmp_path / "a.mp4"), 2)]
    with pytest.raises(FileNotFoundError, match=r"data.root=.*nowhere does not exist"):
        CsvSource(tmp_path / "nowhere").prepare()


def test_a_split_without_any_video_names_the_folder(tmp_path):
    make_kinetics(tmp_path)
    for video in (tmp_path / "val").iterdir():
        video.unlink()
    with pytest.raises(FileNotFoundError, match=r"none of the 4 annotated videos was found under .*val"):
        KineticsSource(tmp_path).load()


# -- sampling ---------------------------------------------------------------------------------------------------
def test_segment_sampling_indices():
    # evaluation: the middle frame of each of 8 segments of 80 frames
    assert segment_clip_indices(80, 8, clip_index=0, num_clips=1) == [5, 15, 25, 35, 45, 55, 65, 75]
    # two evaluation clips: at 1/4 and 3/4 of each segment
    assert segment_clip_indices(80, 4, clip_index=0, num_clips=2) == [5, 25, 45, 65]
    assert segment_clip_indices(80, 4, clip_index=1, num_clips=2) == [15, 35, 55, 75]
    # training: one random frame inside each segment
    import random

    rng = random.Random(0)
    for _ in range(50):
        indices = segment_clip_indices(80, 8, rng=rng)
        assert all(10 * i <= index < 10 * (i + 1) for i, index in enumerate(indices))
    # shorter than the clip: frames repeat, in order, never out of range
    short = segment_clip_indices(3, 8, rng=rng)
    assert len(short) == 8 and short == sorted(short) and set(short) <= {0, 1, 2}
    assert segment_clip_indices(1, 8, clip_index=0) == [0] * 8


def test_segment_training_frames_are_drawn_anywhere_in_their_segments():
    """TSN training: an independent uniform frame in each segment, so different draws give different clips and every
    frame of a segment is drawn (a fixed offset would train on the evaluation clip's frames only)."""
    import random

    clips = [segment_clip_indices(80, 8, rng=random.Random(seed)) for seed in range(200)]
    assert len({tuple(clip) for clip in clips}) > 100
    for segment in range(8):  # 10 frames each
        drawn = {clip[segment] for clip in clips}
        assert drawn == set(range(10 * segment, 10 * segment + 10)), segment
    # the segments are drawn independently: the offsets within the first two segments do not move together
    assert len({(clip[0], clip[1] - 10) for clip in clips}) > 50


# -- training on each dataset config ---------------------------------------------------------------------------
def tiny_overrides(dataset: str, root: Path) -> list[str]:
    """The tiny model on CPU; 8-frame clips 2 frames apart so that the 16-frame fixtures hold a whole clip."""
    return [f"data={dataset}", f"data.root={root}", "model=tiny", "trainer=cpu",
            "trainer.enable_progress_bar=false", "data.num_workers=0", "data.batch_size=2", "data.sampling_rate=2",
            "data.pin_memory=false", *LAYOUTS[dataset][1]]


@pytest.mark.parametrize("dataset", list(LAYOUTS))
def test_fast_dev_run_per_dataset_config(dataset, tmp_path):
    root = tmp_path / "data"
    expected = LAYOUTS[dataset][0](root)
    cfg = compose_config("train", [*tiny_overrides(dataset, root), "+trainer.fast_dev_run=true"], tmp_path / "run")
    metrics = train(cfg)
    assert np.isfinite(metrics["train/loss"]) and "val/acc" in metrics
    datamodule = hydra_datamodule(cfg)
    assert datamodule.num_classes == expected["classes"]


def hydra_datamodule(cfg):
    import hydra

    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    datamodule.prepare_data()
    datamodule.setup()
    return datamodule


def test_missing_data_root_names_the_path_and_the_option(tmp_path):
    cfg = compose_config("train", tiny_overrides("kinetics400", tmp_path / "nowhere"), tmp_path / "run")
    with pytest.raises(FileNotFoundError, match=r"data.root=.*nowhere does not exist.*data/README.md"):
        train(cfg)


# -- evaluation views -------------------------------------------------------------------------------------------
def test_test_views_aggregate_to_one_result_per_video(tmp_path):
    """2 temporal clips x 3 spatial crops: every view a distinct item, every video counted once at video level,
    and a video that cannot be decoded reported as failed (never dropped)."""
    from timesformer.module import VideoClassifier
    from timesformer.pipeline import build_model

    root = tmp_path / "data"
    make_folder(root)
    write_video(root / "test" / "cat" / "a.mp4", seed=1)
    write_video(root / "test" / "dog" / "b.mp4", seed=2)
    write_video(root / "test" / "dog" / "c.mp4", seed=3)
    (root / "test" / "cat" / "broken.mp4").write_bytes(b"")
    cfg = compose_config("train", [*tiny_overrides("folder", root), "data.test_temporal_clips=2",
                                   "data.test_spatial_crops=3", "data.batch_size=4"], tmp_path / "run")
    datamodule = hydra_datamodule(cfg)
    test_set, val_set = datamodule.datasets["test"], datamodule.datasets["val"]
    assert len(test_set) == 4 * 6 and len(val_set) == 2  # val_views_full=false: the centre clip only
    broken = [i for i, (path, _) in enumerate(test_set.entries) if path.endswith("broken.mp4")][0]
    items = [test_set[i] for i in range(6 * broken, 6 * broken + 12)]
    assert [item["view"] for item in items] == list(range(6)) * 2
    assert [item["index"] for item in items] == [broken] * 6 + [broken + 1] * 6
    assert not any(item["valid"] for item in items[:6]) and all(item["valid"] for item in items[6:])
    assert items[0]["video"].abs().sum() == 0 and "broken.mp4" in items[0]["decode_errors"]
    left, centre, right = (items[6 + crop]["video"] for crop in range(3))
    assert not torch.equal(left, right) and not torch.equal(left, centre)

    L.seed_everything(0)
    module = VideoClassifier(build_model(cfg.model, datamodule.class_names),
                             optimizer={"name": "adamw", "lr": 1e-3, "weight_decay": 0.0},
                             scheduler={"name": "constant"})
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    metrics = trainer.test(module, datamodule=datamodule)[0]
    results = module.test_results
    assert sorted(results.indices.tolist()) == sorted(set(range(4)) - {broken})
    assert results.num_views.tolist() == [6, 6, 6] and results.failed == [broken]
    assert 0.0 <= metrics["test/video_acc"] <= 1.0


def test_spatial_crops_span_the_long_side_and_the_centre_matches_eval_transform():
    from timesformer.data.transforms import EvalViewTransform, eval_transform

    landscape = torch.randint(0, 256, (2, 3, 48, 71), dtype=torch.uint8)
    views = EvalViewTransform(32, num_crops=3)
    resized = views.resize(landscape)  # short side 32, long side 47
    assert tuple(resized.shape[-2:]) == (32, 47)
    torch.testing.assert_close(views.crop(resized, 1), eval_transform(32)(landscape))
    assert torch.equal(views.crop(resized, 0), resized[..., :, :32])
    assert torch.equal(views.crop(resized, 2), resized[..., :, -32:])
    portrait = views.resize(landscape.transpose(-1, -2))
    assert torch.equal(views.crop(portrait, 0), portrait[..., :32, :])
    assert torch.equal(views.crop(portrait, 2), portrait[..., -32:, :])


def test_the_spatial_crops_of_a_clip_decode_it_once(tmp_path, monkeypatch):
    import timesformer.data.dataset as dataset_module
    from timesformer.data.dataset import VideoClipDataset
    from timesformer.data.transforms import EvalViewTransform

    videos = [(str(write_video(tmp_path / f"{i}.mp4", seed=i)), i) for i in range(2)]
    calls, decode = [], dataset_module.decode_clip

    def counting_decode(path, *args, **kwargs):
        calls.append(path)
        return decode(path, *args, **kwargs)

    monkeypatch.setattr(dataset_module, "decode_clip", counting_decode)
    dataset = VideoClipDataset(videos, num_frames=4, sampling_rate=2, transform=EvalViewTransform(32, 3),
                               training=False, temporal_clips=2, spatial_crops=3)
    items = [dataset[i] for i in range(len(dataset))]
    assert len(items) == 12 and len(calls) == 4  # 2 videos x 2 temporal clips
    # the two temporal clips of a video start at different frames
    assert not torch.equal(items[0]["video"], items[3]["video"])


# -- broken videos ------------------------------------------------------------------------------------------------
def break_videos(folder: Path) -> dict[str, Path]:
    """A zero-byte file, a truncated mp4 (the moov atom at its end is lost) and a text file named .mp4."""
    empty = folder / "empty.mp4"
    empty.write_bytes(b"")
    truncated = write_video(folder / "truncated.mp4", num_frames=32)
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 3])
    text = folder / "text.mp4"
    text.write_text("this is not a video\n" * 20)
    return {"empty": empty, "truncated": truncated, "text": text}


def test_broken_training_videos_are_replaced_and_reported_once(tmp_path, caplog):
    root = tmp_path / "data"
    make_folder(root)
    broken = break_videos(root / "train" / "cat")
    # Good videos that vanish after the index was read are handled like broken ones.
    deleted = root / "train" / "dog" / "dog1.mp4"
    cfg = compose_config("train", [*tiny_overrides("folder", root), "data.max_failed_fraction=1.0"], tmp_path / "run")
    datamodule = hydra_datamodule(cfg)
    deleted.unlink()
    dataset = datamodule.datasets["train"]
    bad = {str(path) for path in [*broken.values(), deleted]}
    torch.manual_seed(0)
    items = [dataset[i] for i in range(len(dataset))]
    for (path, _), item in zip(dataset.entries, items, strict=True):
        assert item["valid"] and item["video"].shape == (8, 3, 32, 32)
        assert item["replaced"] == (path in bad)
        assert dataset.entries[item["index"]][0] not in bad  # the replacement decodes
        # the label is the replacement's, the video's that was decoded (not the broken one's)
        replacement_class = Path(dataset.entries[item["index"]][0]).parent.name
        assert item["label"] == dataset.entries[item["index"]][1] == ["cat", "dog"].index(replacement_class)
        if path in bad:
            assert item["decode_errors"].startswith(path + "\t")
    # (the draws above replace a broken cat video with a dog video: the two labels differ there)
    assert any(dataset.entries[i][1] != item["label"] for i, item in enumerate(items) if item["replaced"])

    # The DataModule names every failed file once, however often it fails.
    batch = torch.utils.data.default_collate(items)
    with caplog.at_level(logging.WARNING, logger="timesformer.data.datamodule"):
        for _ in range(2):
            out = datamodule.on_before_batch_transfer(dict(batch), 0)
    assert "decode_errors" not in out and int(out["replaced"].sum()) == len(bad)
    named = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Could not decode")]
    assert len(named) == len(bad) and all(any(path in message for message in named) for path in bad)


def test_training_stops_when_too_many_videos_fail(tmp_path):
    root = tmp_path / "data"
    make_folder(root)
    break_videos(root / "train" / "cat")  # 3 broken of 7
    cfg = compose_config("train", [*tiny_overrides("folder", root), "+trainer.fast_dev_run=true",
                                   "data.batch_size=7"], tmp_path / "run")
    with pytest.raises(RuntimeError, match="misconfigured"):
        train(cfg)


def test_nothing_decodes_is_an_error_not_a_hang(tmp_path):
    root = tmp_path / "data"
    for split in ("train", "val"):
        for name in ("a", "b"):
            (root / split / name).mkdir(parents=True)
            (root / split / name / "x.mp4").write_text("not a video")
    cfg = compose_config("train", tiny_overrides("folder", root), tmp_path / "run")
    dataset = hydra_datamodule(cfg).datasets["train"]
    with pytest.raises(RuntimeError, match="11 videos in a row could not be decoded.*misconfigured"):
        dataset[0]


# -- python -m timesformer.data.check ------------------------------------------------------------------------------
def test_check_lists_problems_and_writes_a_clean_list(tmp_path, capsys):
    from timesformer.data.check import main

    root = tmp_path / "data"
    make_kinetics(root)
    (root / "val" / "va10abcdefg_000004_000014.mp4").write_text("not a video")
    clean = tmp_path / "clean"
    assert main(["data=kinetics400", f"data.root={root}", "model=tiny", "data.sampling_rate=4", "--workers=2",
                 "--write-clean", str(clean)]) == 1  # (problems found)
    out = capsys.readouterr().out
    assert "gone0000000_000000_000010" in out  # missing
    assert "va10abcdefg_000004_000014.mp4" in out  # unreadable
    assert "too short" in out  # 16 frames at 25 fps < 8 x 4 at 30 fps
    assert '"dancing, solo (ballet)"' in (clean / "train.csv").read_text()  # quoted: it has a comma
    index = CsvSource(clean).load()
    assert index.class_names == sorted(KINETICS_LABELS)
    assert len(index.splits["train"]) == 6 and len(index.splits["val"]) == 2


def test_check_lists_the_videos_decoded_from_their_start_which_a_resized_copy_seeks(tmp_path, capsys):
    """An AVI holding h264 (B-frames allowed: timestamps in decode order) is read from its first frame for every clip:
    it works, slowly, so it is listed without failing the check; its `timesformer.data.resize` copy seeks."""
    from timesformer.data.check import main
    from timesformer.data.resize import resize_dataset

    root = tmp_path / "data"
    make_folder(root)
    write_video(root / "train" / "cat" / "slow.avi", num_frames=40)
    heading = "decoded from their first frame for every clip"
    assert main(["data=folder", f"data.root={root}", "--workers=1"]) == 0
    listed = capsys.readouterr().out.split(heading)[1].split("\n\n")[0]
    assert "slow.avi" in listed and ".mp4" not in listed
    resize_dataset(root, tmp_path / "copy", short_side=16)  # 64x48 -> 22x16
    assert main(["data=folder", f"data.root={tmp_path / 'copy'}", "--workers=1"]) == 0
    assert heading not in capsys.readouterr().out


@pytest.mark.parametrize("num_frames, sampling_rate, fps, target_fps", [
    (8, 8, 30.0, 30.0), (8, 32, 30.0, 30.0), (8, 4, 25.0, 30.0), (16, 4, 60.0, 30.0),
    (56, 1, 23.976, 29.97),  # (T - 1) * rate * fps / target rounds to 44.0 where the indices' step reaches 43.99..
])
def test_check_calls_too_short_exactly_the_videos_whose_clips_repeat_frames(num_frames, sampling_rate, fps,
                                                                            target_fps):
    """`check` lists a video as too short exactly when the dataset pads its clips (repeats the last frame): a
    60-frame video fits 8 x 8 (frames 0 ... 56), which check used to count as 64 frames."""
    from types import SimpleNamespace

    from timesformer.data.check import frames_needed

    datamodule = SimpleNamespace(sampling="dense", num_frames=num_frames, sampling_rate=sampling_rate,
                                 target_fps=target_fps)
    needed = frames_needed(datamodule, fps)
    step = sampling_rate * fps / target_fps
    spaced = [math.floor(i * step) for i in range(num_frames)]  # the clip at the video's start
    for length in (needed - 1, needed):  # both shorter than the span: the clip starts at frame 0
        indices = dense_clip_indices(length, num_frames, sampling_rate, fps, target_fps, clip_index=0)
        assert (indices != spaced) == (length < needed), (length, indices)  # the end clamped: last frame repeated


@pytest.mark.parametrize("arguments, message", [
    (["--splits=trian,val"], "valid splits are train, val, test"),
    (["--limit=-1"], "--limit must be >= 1"),
    (["--max-listed=-1"], "--max-listed must be >= 0"),
    (["--limit=2", "--write-clean=clean"], "--write-clean lists every usable video"),
])
def test_check_refuses_bad_options_by_name(tmp_path, capsys, arguments, message):
    from timesformer.data.check import main

    with pytest.raises(SystemExit):
        main(["data=folder", f"data.root={tmp_path}", *arguments])
    assert message in capsys.readouterr().err


def test_check_reports_its_progress_and_counts_each_class(tmp_path, capsys, monkeypatch):
    """A line every PROGRESS_EVERY videos (Kinetics' 240k take hours: it printed nothing until the end) and the
    per-class table of each split."""
    import timesformer.data.check as check

    root = tmp_path / "data"
    make_folder(root)
    write_video(root / "train" / "dog" / "dog2.mp4")
    monkeypatch.setattr(check, "PROGRESS_EVERY", 2)
    assert check.main(["data=folder", f"data.root={root}", "--workers=2"]) == 0
    captured = capsys.readouterr()
    assert "train: 2/5 videos" in captured.err and "train: 4/5 videos" in captured.err
    assert "train: 5/5" not in captured.err
    table = captured.out.split("class  train  val")[1].splitlines()[2:4]
    assert [line.split() for line in table] == [["cat", "2", "1"], ["dog", "3", "1"]]


def test_check_reports_videos_whose_names_a_clean_list_cannot_hold(tmp_path, capsys):
    """A file name that is not UTF-8 (Latin-1 from an old archive) crashed --write-clean half-way; it is left out of
    the lists, named (its bytes escaped) and makes the exit status 1."""
    from timesformer.data.check import main

    root = tmp_path / "data"
    make_folder(root)
    original = next((root / "train" / "cat").glob("*.mp4"))
    os.rename(original, os.fsencode(original.parent) + b"/caf\xe9.mp4")
    clean = tmp_path / "clean"
    assert main(["data=folder", f"data.root={root}", "--workers=1", "--write-clean", str(clean)]) == 1
    out = capsys.readouterr().out
    assert "names are not UTF-8" in out and "caf\\xe9.mp4" in out
    index = CsvSource(clean).load()
    assert len(index.splits["train"]) == 3 and len(index.splits["val"]) == 2  # every other usable video is listed
    # A class folder so named: the class is left out of classes.txt with its videos (classes.txt crashed)
    for split in ("train", "val"):
        os.rename(root / split / "dog", os.fsencode(root / split) + b"/d\xf6g")
    assert main(["data=folder", f"data.root={root}", "--workers=1", "--write-clean", str(clean), "--overwrite"]) == 1
    assert "d\\xf6g/dog0.mp4" in capsys.readouterr().out
    index = CsvSource(clean).load()
    assert index.class_names == ["cat"] and len(index.splits["train"]) == 1 and len(index.splits["val"]) == 1


def test_clean_lists_inside_the_dataset_follow_a_resized_copy(tmp_path, capsys, monkeypatch):
    """check --write-clean DATASET/lists, then resize DATASET: the copy's lists name the copy's videos (absolute
    paths sent the resized dataset's training back to the full-size originals). --no-decode lists no "too short"
    videos (it counts no frames)."""
    from timesformer.data.check import main
    from timesformer.data.resize import resize_dataset

    root = tmp_path / "data"
    make_folder(root)
    write_video(root / "train" / "stray.mp4")
    assert main(["data=folder", f"data.root={root}", "--no-decode"]) == 0
    assert "too short (frames are repeated)" not in capsys.readouterr().out
    assert main(["data=folder", f"data.root={root}", "--workers=1", "--write-clean", str(root / "lists")]) == 0
    copy = tmp_path / "copy"
    resize_dataset(root, copy, short_side=2000)  # nothing to shrink: every file copied
    index = CsvSource(copy / "lists").load()
    assert len(index.splits["train"]) == 4
    assert all(Path(path).resolve().is_relative_to(copy.resolve()) for path, _ in index.splits["train"])
    # lists outside the dataset, the dataset named by a relative data.root: absolute paths
    monkeypatch.chdir(tmp_path)
    assert main(["data=folder", "data.root=data", "--workers=1", "--write-clean", str(tmp_path / "elsewhere")]) == 0
    assert len(CsvSource(tmp_path / "elsewhere").load().splits["train"]) == 4
    assert all(Path(path).is_absolute() for path, _ in CsvSource.read_rows(tmp_path / "elsewhere" / "train.csv"))


def test_clean_lists_go_to_any_folder_name_and_never_over_other_files(tmp_path, capsys):
    """A folder with a space, brackets, a comma or a quote: the lists' command was pasted unquoted into a Hydra
    override, which failed after every video was decoded, with nothing written. Lists already in DIR (the dataset's
    own train.csv, say) were overwritten; now refused before decoding, unless --overwrite."""
    import shlex

    from timesformer.data.check import compose_data_config, main

    root, clean = tmp_path / "data", tmp_path / "clean (v2), it's"
    make_folder(root)
    arguments = ["data=folder", f"data.root={root}", "--workers=1", "--write-clean", str(clean)]
    assert main(arguments) == 0
    command = capsys.readouterr().out.split("Train on them with: ")[1].strip()
    words = shlex.split(command)
    assert words[:2] == ["python", "train.py"] and compose_data_config(words[2:])["root"] == str(clean)
    assert len(CsvSource(clean).load().splits["train"]) == 4

    (clean / "train.csv").write_text("my own list\n")
    assert main(arguments) == 2
    assert "--overwrite" in capsys.readouterr().err and (clean / "train.csv").read_text() == "my own list\n"
    assert main([*arguments, "--overwrite"]) == 0
    assert len(CsvSource(clean).load().splits["train"]) == 4


def test_clean_lists_keep_the_datasets_class_order(tmp_path, capsys):
    """classes.txt is the dataset's class order (UCF101's classInd.txt here, not alphabetical): a model trained on the
    clean lists numbers its classes as one trained on the dataset, and its checkpoints stay interchangeable."""
    from timesformer.data.check import main

    classes = ["HandstandPushups", "ApplyEyeMakeup"]  # classInd order, the reverse of the sorted one
    make_ucf101(tmp_path / "data", classes=classes)
    clean = tmp_path / "clean"
    assert main(["data=ucf101", f"data.root={tmp_path / 'data'}", "--workers=1", "--write-clean", str(clean)]) == 0
    assert (clean / "classes.txt").read_text().splitlines() == classes
    index = CsvSource(clean).load()
    assert index.class_names == classes
    for split, count in (("train", 4), ("val", 2)):
        assert len(index.splits[split]) == count
        for path, label in index.splits[split]:
            assert label == classes.index(Path(path).parent.name)  # the class folder's position in classInd


def test_check_of_a_test_split_that_is_the_val_split_checks_and_lists_val(tmp_path, capsys):
    """UCF101's test list is its val split: --splits test wrote no list and counted none of its missing videos."""
    from timesformer.data.check import main

    make_ucf101(tmp_path)
    with open(tmp_path / "ucfTrainTestlist" / "testlist01.txt", "a", newline="") as file:
        file.write("ApplyEyeMakeup/v_ApplyEyeMakeup_g02_c01.avi\r\n")  # annotated, no file
    assert main(["data=ucf101", f"data.root={tmp_path}", "--splits=test", "--no-decode"]) == 1
    assert "v_ApplyEyeMakeup_g02_c01.avi" in capsys.readouterr().out
    (tmp_path / "UCF-101" / "ApplyEyeMakeup" / "v_ApplyEyeMakeup_g02_c01.avi").write_bytes(
        (tmp_path / "UCF-101" / "ApplyEyeMakeup" / "v_ApplyEyeMakeup_g01_c01.avi").read_bytes())
    assert main(["data=ucf101", f"data.root={tmp_path}", "--splits=test", "--workers=1",
                 "--write-clean", str(tmp_path / "clean")]) == 0
    assert len(CsvSource(tmp_path / "clean").load().splits["val"]) == 3


def test_folder_videos_outside_class_folders_are_reported(tmp_path, caplog):
    make_folder(tmp_path)
    write_video(tmp_path / "train" / "stray.mp4")
    with caplog.at_level(logging.WARNING):
        index = FolderSource(tmp_path).load()
    assert len(index.splits["train"]) == 4
    assert "train: 1 videos outside" in caplog.text and "stray.mp4" in caplog.text


def test_evaluate_reads_moved_data_and_lists_failed_videos(tmp_path):
    """evaluate.py data.root=NEW finds a run's dataset where it now is; a test video that cannot be decoded is
    listed in eval.json, not dropped."""
    from timesformer.pipeline import evaluate

    root = tmp_path / "data"
    make_folder(root)
    write_video(root / "test" / "cat" / "a.mp4")
    (root / "test" / "dog").mkdir()
    (root / "test" / "dog" / "broken.mp4").write_text("not a video")
    metrics = train(compose_config("train", [*tiny_overrides("folder", root), "trainer.max_epochs=1"],
                                   tmp_path / "run"))
    assert metrics["test/video_acc"] in (0.0, 1.0)  # one video evaluated, with 3 views
    moved = root.rename(tmp_path / "moved")
    evaluate(compose_config("eval", [f"ckpt={metrics['best_checkpoint']}", f"++data.root={moved}",
                                     "trainer.enable_progress_bar=false"], tmp_path / "eval"))
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["views"] == {"test_temporal_clips": 1, "test_spatial_crops": 3}
    assert report["videos_total"] == 2 and report["videos_evaluated"] == 1
    assert report["failed_videos"] == [str(moved / "test" / "dog" / "broken.mp4")]
    assert report["missing_videos"] == []  # (a folder dataset annotates nothing it does not hold)
    assert report["clips"]["sampling_rate"] == 2 and report["clips"]["num_frames"] == 8
    # A checkpoint of the first train.py, whose run config had no `module` section, crashed evaluate.py in OmegaConf.
    checkpoint = torch.load(metrics["best_checkpoint"], weights_only=False)
    del checkpoint["hyper_parameters"]["run_config"]["module"]
    torch.save(checkpoint, tmp_path / "old.ckpt")
    evaluate(compose_config("eval", [f"ckpt={tmp_path / 'old.ckpt'}", f"++data.root={moved}",
                                     "trainer.enable_progress_bar=false"], tmp_path / "eval_old"))
    assert json.loads((tmp_path / "eval_old" / "eval.json").read_text())["videos_evaluated"] == 1
    # data=<name> swaps the dataset but keeps how the model's clips were cut (folder.yaml's sampling_rate is 8),
    # except what the command line sets
    evaluate(compose_config("eval", [f"ckpt={metrics['best_checkpoint']}", "data=folder", f"++data.root={moved}",
                                     "++data.mean=[0.5,0.5,0.5]", "trainer.enable_progress_bar=false"],
                            tmp_path / "eval_swapped"))
    swapped = json.loads((tmp_path / "eval_swapped" / "eval.json").read_text())
    assert swapped["clips"] == {**report["clips"], "mean": [0.5, 0.5, 0.5]}
    # Nothing decodes: an error, after an eval.json that lists the videos and has no accuracies (torchmetrics
    # reported 0.0 for the clips).
    (moved / "test" / "cat" / "a.mp4").write_text("not a video either")
    with pytest.raises(RuntimeError, match="None of the 2 test videos could be decoded"):
        evaluate(compose_config("eval", [f"ckpt={metrics['best_checkpoint']}", f"++data.root={moved}",
                                         "trainer.enable_progress_bar=false"], tmp_path / "eval_none"))
    report = json.loads((tmp_path / "eval_none" / "eval.json").read_text())
    assert report["videos_evaluated"] == 0 and len(report["failed_videos"]) == 2
    assert set(report["clip"].values()) == set(report["video"].values()) == {None}

    # A dataset with the model's "dog" class only: its own numbering has dog = 0, the model's cat = 0, dog = 1.
    subset = tmp_path / "dogs"
    for split in ("train", "val", "test"):
        write_video(subset / split / "dog" / "d.mp4", seed=1)
    evaluate(compose_config("eval", [f"ckpt={metrics['best_checkpoint']}", f"++data.root={subset}",
                                     "trainer.enable_progress_bar=false"], tmp_path / "eval_dogs"))
    with open(tmp_path / "eval_dogs" / "predictions.csv") as file:
        assert [row["true_label"] for row in csv.DictReader(file)] == ["dog"]
    # The model's classes named otherwise (case, brackets: SSv2's templates in Hugging Face's label files) match
    for split in ("train", "val", "test"):
        (subset / split / "dog").rename(subset / split / "[Dog]")
    evaluate(compose_config("eval", [f"ckpt={metrics['best_checkpoint']}", f"++data.root={subset}",
                                     "trainer.enable_progress_bar=false"], tmp_path / "eval_dogs_renamed"))
    with open(tmp_path / "eval_dogs_renamed" / "predictions.csv") as file:
        assert [row["true_label"] for row in csv.DictReader(file)] == ["dog"]
    (subset / "test" / "bird").mkdir()
    write_video(subset / "test" / "bird" / "b.mp4")
    with pytest.raises(ValueError, match="1 of the dataset's 2 classes are not among the model's 2: bird"):
        evaluate(compose_config("eval", [f"ckpt={metrics['best_checkpoint']}", f"++data.root={subset}"],
                                tmp_path / "eval_birds"))


@pytest.mark.parametrize("header", ["clip,class", "video_id,label", "name,category", None])
def test_csv_header_rows_are_not_videos(tmp_path, header):
    """A header row is skipped whatever the first column is called: read as a video, "class" became a class and
    moved "dog" from id 1 to id 2."""
    lines = ([header] if header else []) + ["a.mp4,cat", "b.mp4,dog"]
    (tmp_path / "train.csv").write_text("\n".join(lines) + "\n")
    assert CsvSource.read_rows(tmp_path / "train.csv") == [("a.mp4", "cat"), ("b.mp4", "dog")]


# -- annotation files as users have them (found by review; each failed before its fix) -----------------------
def touch(root: Path, *relative: str) -> None:
    """Empty files: finding videos reads directory listings only."""
    for name in relative:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")


def test_kinetics_rows_take_only_their_own_clip(tmp_path, caplog):
    header = "label,youtube_id,time_start,time_end,split"
    write_lines(tmp_path / "train.csv", [header, "dancing,-abcdefghij,10,20,train", "singing,-abcdefghij,30,40,train",
                                         "singing,whole000000,0,10,train", ",unlabelled0,0,10,train"])
    write_lines(tmp_path / "validate.csv", [header, "singing,-abcdefghij,30,40,validate"])
    touch(tmp_path, "train/singing/-abcdefghij_30_40.mp4", "train/singing/whole000000.mp4",
          "train/x/unlabelled0_000000_000010.mp4", "val/-abcdefghij_000030_000040.mp4")
    with caplog.at_level(logging.WARNING):
        scan = KineticsSource(tmp_path).scan()
    # A missing clip is missing, not another time span of the same video under its label.
    assert scan.missing["train"] == ["-abcdefghij_000010_000020"]
    assert sorted((Path(path).name, scan.class_names[label]) for path, label in scan.splits["train"]) == [
        ("-abcdefghij_30_40.mp4", "singing"), ("whole000000.mp4", "singing")]  # any padding; a bare id too
    assert scan.class_names == ["dancing", "singing"]  # no "" class from the row without a label...
    assert any("1 rows have an empty label" in warning for warning in scan.warnings)  # ...which is counted
    write_lines(tmp_path / "train.csv", [header, "dancing,abcdefghijk,,20,train"])
    with pytest.raises(ValueError, match=r"train.csv, line 2: .*numeric times"):
        KineticsSource(tmp_path).scan()


def test_kinetics_test_csv_with_empty_labels_is_unlabelled(tmp_path):
    make_kinetics(tmp_path)
    write_lines(tmp_path / "annotations" / "test.csv",
                ["label,youtube_id,time_start,time_end,split", ",te00abcdefg,0,10,test"])
    index = KineticsSource(tmp_path).load()
    assert index.class_names == sorted(KINETICS_LABELS) and index.splits["test"] is index.splits["val"]


def test_kinetics_labelled_test_csv_is_the_test_split(tmp_path):
    """A test.csv with labels (Kinetics-600/700 released them) is the test split, with its own clips in test/; the
    validation split stays validate.csv's."""
    header = "label,youtube_id,time_start,time_end,split"
    write_lines(tmp_path / "train.csv", [header, "abseiling,train000000,0,10,train", "zumba,train000001,0,10,train"])
    write_lines(tmp_path / "validate.csv", [header, "zumba,valid000000,0,10,validate"])
    write_lines(tmp_path / "test.csv", [header, "zumba,test0000000,0,10,test", "abseiling,test0000001,5,15,test"])
    touch(tmp_path, "train/abseiling/train000000_000000_000010.mp4", "train/zumba/train000001_000000_000010.mp4",
          "val/valid000000_000000_000010.mp4", "test/test0000000_000000_000010.mp4",
          "test/test0000001_000005_000015.mp4")
    index = KineticsSource(tmp_path).load()
    assert index.class_names == ["abseiling", "zumba"]
    named = {split: sorted((Path(path).relative_to(tmp_path).as_posix(), label) for path, label in entries)
             for split, entries in index.splits.items()}
    assert named["test"] == [("test/test0000000_000000_000010.mp4", 1), ("test/test0000001_000005_000015.mp4", 0)]
    assert named["val"] == [("val/valid000000_000000_000010.mp4", 1)]


def test_slowfast_class_names_follow_their_ids_not_the_alphabet(tmp_path):
    """classids.json maps name -> id: "zumba" with id 0 is class 0 (sorted names would swap every label)."""
    make_slowfast_kinetics(tmp_path)
    (tmp_path / "classids.json").write_text(json.dumps({"abseiling": 1, "zumba": 0}))
    index = KineticsSource(tmp_path).load()
    assert index.class_names == ["zumba", "abseiling"]
    assert [index.class_names[label] for _, label in index.splits["train"]] == ["zumba", "abseiling"] * 2


def test_slowfast_class_ids_as_strings(tmp_path):
    make_slowfast_kinetics(tmp_path)
    (tmp_path / "classids.json").write_text(json.dumps({"abseiling": "0", "zumba": "1"}))
    assert KineticsSource(tmp_path).load().class_names == ["abseiling", "zumba"]


def test_lists_with_commas_in_paths_and_header_words_as_labels(tmp_path):
    touch(tmp_path, "clips/a.mp4", "clips/b, take 2.mp4", "t1.mp4")
    write_lines(tmp_path / "spaces.csv", ["clips/a.mp4 0", "clips/b, take 2.mp4 1"])  # PySlowFast form
    assert CsvSource.read_rows(tmp_path / "spaces.csv") == [("clips/a.mp4", "0"), ("clips/b, take 2.mp4", "1")]
    write_lines(tmp_path / "named.csv", ["clips/a.mp4 jump", "clips/b, take 2.mp4 run"])
    assert CsvSource.read_rows(tmp_path / "named.csv")[1] == ("clips/b, take 2.mp4", "run")
    write_lines(tmp_path / "commas.csv", ['"clips/b, take 2.mp4",run', "my clip.mp4,jump"])
    assert CsvSource.read_rows(tmp_path / "commas.csv") == [("clips/b, take 2.mp4", "run"), ("my clip.mp4", "jump")]
    write_lines(tmp_path / "labels.csv", ["a.mp4,playing guitar", "b.mp4, riding bike"])  # spaces in every label
    assert CsvSource.read_rows(tmp_path / "labels.csv") == [("a.mp4", "playing guitar"), ("b.mp4", "riding bike")]
    # A first row whose label is a header word is a video when its path is a video file.
    write_lines(tmp_path / "train.csv", ["t1.mp4,action", "clips/a.mp4,comedy"])
    assert CsvSource.read_rows(tmp_path / "train.csv") == [("t1.mp4", "action"), ("clips/a.mp4", "comedy")]


def test_csv_test_list_that_is_set_must_exist(tmp_path):
    touch(tmp_path, "a.mp4")
    write_lines(tmp_path / "train.csv", ["a.mp4,0"])
    write_lines(tmp_path / "val.csv", ["a.mp4,0"])
    with pytest.raises(FileNotFoundError, match="data.source.test_list=heldout.csv"):
        CsvSource(tmp_path, test_list="heldout.csv").load()
    assert CsvSource(tmp_path).load().splits["test"] is not None  # the default name may be absent: test = val


def test_folder_reports_nested_videos_and_reads_transport_streams(tmp_path, caplog):
    touch(tmp_path, "train/jump/a.mp4", "train/run/day1/b.mp4", "train/swim/c.MTS", "val/jump/d.ts", "val/swim/e.m2ts")
    with caplog.at_level(logging.WARNING):
        index = FolderSource(tmp_path).load()
    assert index.class_names == ["jump", "swim"]
    assert len(index.splits["train"]) == 2 and len(index.splits["val"]) == 2
    assert "1 videos outside" in caplog.text and "run/day1/b.mp4" in caplog.text


def test_list_rows_are_read_whole_or_refused(tmp_path):
    write_lines(tmp_path / "quoted.csv", ['"a.mp4", "cat"', "b.mp4,cat"])  # a space before a quoted field
    assert CsvSource.read_rows(tmp_path / "quoted.csv") == [("a.mp4", "cat"), ("b.mp4", "cat")]
    write_lines(tmp_path / "tabs.csv", ["a.mp4\tplaying guitar", "b.mp4\tdog"])
    assert CsvSource.read_rows(tmp_path / "tabs.csv") == [("a.mp4", "playing guitar"), ("b.mp4", "dog")]
    write_lines(tmp_path / "tabs.csv", ["a.mp4\tcat", "b.mp4\t", "c.mp4\tdog"])  # named line 1 before
    with pytest.raises(ValueError, match=r"tabs.csv, line 2: expected `path,label`"):
        CsvSource.read_rows(tmp_path / "tabs.csv")
    write_lines(tmp_path / "header.csv", ["filepath,activity", "a.mp4,running", "b.mp4,walking"])  # unknown words
    assert CsvSource.read_rows(tmp_path / "header.csv") == [("a.mp4", "running"), ("b.mp4", "walking")]
    write_lines(tmp_path / "extra.csv", ["path,label,start", "a.mp4,cat,3"])  # columns the header names
    assert CsvSource.read_rows(tmp_path / "extra.csv") == [("a.mp4", "cat")]
    write_lines(tmp_path / "comma.csv", ["a.mp4,dancing, solo", "b.mp4,dancing"])  # was read as "dancing"
    with pytest.raises(ValueError, match=r"comma.csv, line 1: 3 fields where the list has 2.*quote"):
        CsvSource.read_rows(tmp_path / "comma.csv")
    (tmp_path / "latin.csv").write_bytes("a.mp4,café\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin.csv is not UTF-8"):
        CsvSource.read_rows(tmp_path / "latin.csv")


def test_class_name_files_cannot_shift_or_merge_ids(tmp_path):
    touch(tmp_path, "a.mp4")
    write_lines(tmp_path / "train.csv", ["a.mp4,c"])
    (tmp_path / "classes.txt").write_text("x\n\na\nb\nc\n")
    with pytest.raises(ValueError, match=r"classes.txt: blank line 2"):
        CsvSource(tmp_path).scan()
    (tmp_path / "classes.txt").write_text("a\nb\na\nc\n")
    with pytest.raises(ValueError, match=r"classes.txt: a named more than once"):
        CsvSource(tmp_path).scan()
    (tmp_path / "classes.txt").write_text("a\nb\nc\n\n")  # blank lines at the end are no class
    assert CsvSource(tmp_path).scan().class_names == ["a", "b", "c"]


def test_lists_that_disagree_are_reported(tmp_path, caplog):
    touch(tmp_path, "a.mp4", "b.mp4", "c.mp4", "d.mp4")
    write_lines(tmp_path / "train.csv", ["a.mp4,cat", "a.mp4,dog", "b.mp4,dog", "b.mp4,dog"])
    write_lines(tmp_path / "val.csv", ["c.mp4,Dog", "a.mp4,cat"])
    with caplog.at_level(logging.WARNING):
        CsvSource(tmp_path).load()
    assert "val has classes with no training video: Dog" in caplog.text  # another case: never classified right
    assert "train: 2 videos are listed more than once" in caplog.text
    assert "train: 1 videos are listed with different labels" in caplog.text and "a.mp4 (cat / dog)" in caplog.text
    assert "1 videos are in both train and val" in caplog.text
    write_lines(tmp_path / "train.csv", ["a.mp4,1", "b.mp4,2"])  # class ids counted from 1
    write_lines(tmp_path / "val.csv", ["c.mp4,1", "d.mp4,2"])
    scan = CsvSource(tmp_path).scan()
    assert scan.class_names == ["0", "1", "2"]
    assert [warning.split(":")[0] for warning in consistency_warnings(scan)] == [
        "1 of 3 classes have no video in any split (0)"]


def test_annotations_left_out_are_named(tmp_path):
    touch(tmp_path, "train/abcdefghijk_000000_000010.mp4", "val/x.mp4")
    write_lines(tmp_path / "train.csv", ["label,youtube_id,time_start,time_end,split", "cat,abcdefghijk,0,10,train"])
    write_lines(tmp_path / "val.csv", ["val/x.mp4 0"])  # a PySlowFast list beside an official CSV
    assert any("val.csv not read" in warning for warning in KineticsSource(tmp_path).scan().warnings)

    ssv2 = tmp_path / "ssv2"
    touch(ssv2, *(f"20bn-something-something-v2/{i}.webm" for i in range(1, 5)))
    (ssv2 / "labels.json").write_text(json.dumps({"Tearing something": "0"}))
    for name, ids in (("train", [1]), ("validation", [2])):
        (ssv2 / f"{name}.json").write_text(json.dumps([{"id": str(i), "template": "Tearing [something]"} for i in ids]))
    (ssv2 / "test.json").write_text(json.dumps([{"id": "3"}, {"id": "4"}]))
    write_lines(ssv2 / "test-answers.csv", ["3;Tearing something"])  # no answer for video 4
    scan = SomethingSomethingV2Source(ssv2).scan()
    assert len(scan.splits["test"]) == 1
    assert any("1 videos have no answer in test-answers.csv" in warning and "4.webm" in warning
               for warning in scan.warnings)


def test_malformed_annotation_files_name_the_file_and_line(tmp_path):
    make_ucf101(tmp_path / "ucf")
    class_list = next((tmp_path / "ucf").rglob("classInd.txt"))
    class_list.write_text("ApplyEyeMakeup\n")
    with pytest.raises(ValueError, match=r"classInd.txt: expected `<id> <class name>`"):
        UCF101Source(tmp_path / "ucf", split=1).load()
    make_ssv2(tmp_path / "ssv2")
    labels = next((tmp_path / "ssv2").rglob("labels.json"))
    labels.write_text(labels.read_text()[:20])
    with pytest.raises(ValueError, match=r"labels.json is not valid JSON"):
        SomethingSomethingV2Source(tmp_path / "ssv2").load()


def test_resize_follows_linked_folders_skips_hidden_files_and_moves_absolute_lists(tmp_path):
    from timesformer.data.resize import resize_dataset

    src, elsewhere = tmp_path / "src", tmp_path / "elsewhere"
    write_video(src / "train" / "jump" / "a.mp4")
    write_video(elsewhere / "run" / "b.mp4")
    (src / "train" / "run").symlink_to(elsewhere / "run")
    (src / "train" / "jump" / "._a.mp4").write_bytes(b"\x00\x05\x16\x07")  # a macOS resource fork
    (src / "test").symlink_to(src / "train")  # a link met before the folder it points to
    (src / "train" / "loop").symlink_to(src)  # a link back up the tree: not followed
    write_lines(src / "train.csv", [f"{src}/train/jump/a.mp4 0", f"{src}/train/run/b.mp4 1", f"..{src}/x.mp4 1"])
    outcome = resize_dataset(src, tmp_path / "dst", short_side=2 * WIDTH)  # small videos: copied
    assert not outcome["failed"] and len(outcome["copied"]) == 5  # 2 videos in train/ and test/, and the list
    dst = tmp_path / "dst"
    assert (dst / "train" / "run" / "b.mp4").is_file() and not (dst / "train" / "jump" / "._a.mp4").exists()
    assert (dst / "test" / "run" / "b.mp4").is_file() and (dst / "train" / "jump" / "a.mp4").is_file()
    assert (dst / "train.csv").read_text().split() == [f"{dst}/train/jump/a.mp4", "0", f"{dst}/train/run/b.mp4", "1",
                                                       f"..{src}/x.mp4", "1"]  # (a path inside another: kept)


def test_clean_lists_keep_the_datasets_recipe():
    from timesformer.data.check import clean_list_command

    command = clean_list_command(["data=ssv2", "data.root=/d", "model=tiny"], Path("/clean"))
    assert command.startswith("python train.py model=tiny data=csv data.root=/clean")
    assert "data.sampling=segment" in command and "data.horizontal_flip=false" in command
    assert "data.sampling_rate=32" in clean_list_command(["data=kinetics400", "data.root=/d"], Path("/clean"))
    # Diving-48: segment sampling like SSv2's, but with flips (data=csv's default: nothing to override)
    command = clean_list_command(["data=diving48", "data.root=/d"], Path("/clean"))
    assert "data.sampling=segment" in command and "horizontal_flip" not in command


def test_data_split_and_data_source_split_must_agree():
    from timesformer.data.check import compose_datamodule

    with pytest.raises(Exception, match="data.source.split=2 and data.split=1 disagree"):
        compose_datamodule(["data=ucf101", "data.root=/d", "+data.source.split=2"])

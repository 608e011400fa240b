"""Video-level aggregation of evaluation views."""

import pytest
import torch

from timesformer.evaluation import ViewAggregator


def test_views_are_averaged_per_video_and_repeats_count_once():
    aggregator = ViewAggregator("softmax")
    # video 0: two views that disagree; the confident one wins after averaging probabilities
    logits = torch.tensor([[4.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    aggregator.update(logits, labels=torch.tensor([0, 0, 2]), indices=torch.tensor([0, 0, 1]),
                      views=torch.tensor([0, 1, 0]))
    # DDP's sampler repeats a sample to even out the ranks: it must not count twice
    aggregator.update(torch.tensor([[0.0, 9.0, 0.0]]), labels=torch.tensor([0]), indices=torch.tensor([0]),
                      views=torch.tensor([1]))
    results = aggregator.compute()
    assert results.indices.tolist() == [0, 1] and results.num_views.tolist() == [2, 1]
    expected = (logits[0].softmax(0) + logits[1].softmax(0)) / 2
    torch.testing.assert_close(results.scores[0], expected)
    assert results.metrics(3)["top1"] == 1.0


def test_failed_views_are_excluded_and_failed_videos_listed():
    aggregator = ViewAggregator("logits")
    aggregator.update(torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 0.0]]), labels=torch.tensor([1, 1, 0]),
                      indices=torch.tensor([0, 0, 1]), views=torch.tensor([0, 1, 0]),
                      valid=torch.tensor([False, True, False]))
    results = aggregator.compute()
    assert results.indices.tolist() == [0] and results.failed == [1]
    # logits aggregation: the mean of the views' logits, reported as probabilities (predictions.csv's scores)
    torch.testing.assert_close(results.scores[0], torch.tensor([0.0, 1.0]).softmax(0))


def test_mean_class_accuracy_weights_classes_equally():
    aggregator = ViewAggregator()
    # class 0: 3 videos all right; class 1: 1 video wrong -> top1 0.75, mean class accuracy 0.5
    logits = torch.tensor([[2.0, 0.0]] * 4)
    aggregator.update(logits, labels=torch.tensor([0, 0, 0, 1]), indices=torch.arange(4))
    metrics = aggregator.compute().metrics(2)
    assert metrics["top1"] == pytest.approx(0.75) and metrics["mean_class_accuracy"] == pytest.approx(0.5)


def test_unknown_aggregation_names_the_choices():
    with pytest.raises(ValueError, match="softmax, logits"):
        ViewAggregator("max")


def test_no_decoded_video_gives_empty_results_not_a_crash():
    """evaluate.py on a test split where nothing decodes: eval.json lists the failures, and the per-class table
    and confusion matrix are still written (argmax over no scores raised)."""
    aggregator = ViewAggregator()
    aggregator.update(torch.zeros(2, 3), labels=torch.tensor([0, 2]), indices=torch.tensor([0, 1]),
                      valid=torch.tensor([False, False]))
    results = aggregator.compute()
    assert results.failed == [0, 1]
    assert torch.equal(results.confusion_matrix(3), torch.zeros(3, 3, dtype=torch.int64))


def test_tied_scores_rank_as_argmax_everywhere(tmp_path):
    """bf16 logits often tie for first place: eval.json's top-1, predictions.csv, per_class.csv and the confusion
    matrix must all pick the first tied class, as argmax() and torchmetrics' clip-level accuracy do (topk() put
    another tied class first here, so eval.json's top-1 disagreed with the confusion matrix of the same run)."""
    import csv

    from timesformer.evaluation import write_report_files

    aggregator = ViewAggregator()
    aggregator.update(torch.zeros(1, 5), labels=torch.tensor([0]), indices=torch.tensor([0]))  # a five-way tie
    results = aggregator.compute()
    assert results.metrics(5)["top1"] == 1.0 and results.confusion_matrix(5)[0, 0] == 1
    names = [f"c{c}" for c in range(5)]
    paths = write_report_files(tmp_path, results, [("v.mp4", 0)], names)
    row = next(csv.DictReader(paths["predictions"].open()))
    assert [row[f"pred_{k}"] for k in range(1, 6)] == names


def test_a_repeated_view_counts_in_no_metric():
    """A process with no view of its own runs one again (WholeVideoSampler) to reach the epoch's end with the others;
    its clip-level loss and accuracy and its video-level results must leave it out."""
    from tests.conftest import tiny_classifier

    module = tiny_classifier()
    batch = {"video": torch.zeros(1, 4, 3, 32, 32), "label": torch.tensor([1]), "index": torch.tensor([0]),
             "view": torch.tensor([0]), "valid": torch.tensor([True]), "repeated": True}
    module.test_step(batch, 0)
    accuracy = module.test_metrics["acc"]
    assert module.test_loss.weight == 0 and accuracy.tp.sum() == accuracy.fn.sum() == 0
    assert len(module.test_videos.compute().indices) == 0


def test_views_of_a_video_split_between_processes_add_up_and_a_view_twice_is_an_error(monkeypatch):
    """Each process keeps its videos' summed scores (not every view's row: 3.7 GB per process for Kinetics' 20k
    videos x 30 views); a video whose views two processes share (another sampler than WholeVideoSampler) is
    averaged over all of them, and a view both evaluated, which the sums cannot take out again, is an error."""
    logits = torch.randn(4, 3)
    everything, first, second = ViewAggregator(), ViewAggregator(), ViewAggregator()
    everything.update(logits, labels=torch.tensor([1, 1, 1, 2]), indices=torch.tensor([0, 0, 0, 1]),
                      views=torch.tensor([0, 1, 2, 0]))
    first.update(logits[:2], labels=torch.tensor([1, 1]), indices=torch.tensor([0, 0]), views=torch.tensor([0, 1]))
    second.update(logits[2:], labels=torch.tensor([1, 2]), indices=torch.tensor([0, 1]), views=torch.tensor([2, 0]))
    monkeypatch.setattr(first, "_gathered", lambda: [first._local(), second._local()])
    merged, alone = first.compute(), everything.compute()
    assert merged.indices.tolist() == [0, 1] and merged.num_views.tolist() == [3, 1]
    torch.testing.assert_close(merged.scores, alone.scores)
    torch.testing.assert_close(merged.scores[0], logits[:3].softmax(-1).mean(0))
    # A whole video again (a DistributedSampler's padding, in single-view validation) counts once, as it did
    first.update(logits[3:], labels=torch.tensor([2]), indices=torch.tensor([1]), views=torch.tensor([0]))
    torch.testing.assert_close(first.compute().scores, alone.scores)
    second.update(logits[:1], labels=torch.tensor([1]), indices=torch.tensor([0]), views=torch.tensor([0]))
    with pytest.raises(RuntimeError, match="video 0: two processes evaluated some of the same views"):
        first.compute()


def test_many_videos_are_summed_in_place_as_they_come():
    """Rows grow past their first capacity (64 videos) without losing a video's earlier views."""
    aggregator, expected = ViewAggregator("logits"), {}
    generator = torch.Generator().manual_seed(0)
    for view in range(2):
        for start in range(0, 200, 7):
            videos = torch.arange(start, min(start + 7, 200))
            logits = torch.randn(len(videos), 5, generator=generator)
            aggregator.update(logits, labels=videos % 5, indices=videos, views=torch.full_like(videos, view))
            for video, row in zip(videos.tolist(), logits, strict=True):
                expected[video] = expected.get(video, 0) + row / 2
    results = aggregator.compute()
    assert results.indices.tolist() == list(range(200)) and set(results.num_views.tolist()) == {2}
    # what a process sends to the others is its 200 rows, not the spare capacity (256) behind them
    assert all(t.untyped_storage().nbytes() == t.nbytes for t in aggregator._local()[2:])
    assert results.labels.tolist() == [video % 5 for video in range(200)]
    torch.testing.assert_close(results.scores, torch.stack([expected[v] for v in range(200)]).softmax(-1))


def _scores_ranking(order: list[int]) -> torch.Tensor:
    """Six classes' scores ranked as ``order`` says, best first."""
    return torch.tensor([float(6 - order.index(c)) for c in range(6)])


# (label, ranking) of five videos of six classes: two right, one whose label is 2nd (top-5 only), one whose label is
# last (wrong in both), one right; classes 3, 4 and 5 have no video.
SIX_CLASS_VIDEOS = [(0, [0, 1, 2, 3, 4, 5]), (0, [0, 2, 1, 3, 4, 5]), (0, [3, 0, 1, 2, 4, 5]), (1, [0, 2, 3, 4, 5, 1]),
                    (2, [2, 0, 1, 3, 4, 5])]


def test_video_metrics_rank_five_classes_and_average_the_classes_present():
    """top5 counts a label ranked 2nd; mean class accuracy averages the per-class accuracies of the classes that have
    videos (class 0: 2/3, class 1: 0, class 2: 1), not counting absent classes as 0."""
    from timesformer.evaluation import VideoResults

    results = VideoResults(indices=torch.arange(5), labels=torch.tensor([label for label, _ in SIX_CLASS_VIDEOS]),
                           scores=torch.stack([_scores_ranking(order) for _, order in SIX_CLASS_VIDEOS]).softmax(-1),
                           num_views=torch.ones(5, dtype=torch.int64), failed=[])
    metrics = results.metrics(6)
    assert metrics["top1"] == pytest.approx(3 / 5)
    assert metrics["top5"] == pytest.approx(4 / 5)
    assert metrics["mean_class_accuracy"] == pytest.approx((2 / 3 + 0 + 1) / 3)


def test_logged_test_metrics_are_the_clip_and_video_accuracies_of_the_valid_views():
    """What test/* reports, against values counted by hand: clip accuracy over all valid views (micro: class 0's three
    views weigh three times class 1's one), clip top-5 over five classes, the loss of the valid views, and the
    video-level top-1, top-5 and mean class accuracy. A view that failed to decode (here one that would be wrong) is
    counted in test/failed_views only."""
    import lightning as L
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from timesformer import TimeSformer, TimeSformerConfig
    from timesformer.module import VideoClassifier

    config = TimeSformerConfig(image_size=16, patch_size=8, num_frames=2, hidden_size=16, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=32, num_classes=6)
    module = VideoClassifier(TimeSformer(config), optimizer={"name": "sgd", "lr": 0.1, "weight_decay": 0.0},
                             scheduler={"name": "constant"})
    module.model.forward = lambda video: video  # each sample's "video" is its view's logits
    samples = [{"video": _scores_ranking(order), "label": label, "index": video, "view": 0, "valid": True}
               for video, (label, order) in enumerate(SIX_CLASS_VIDEOS)]
    # video 4's second view failed to decode; its (zeroed) clip would rank its label last
    samples.append({"video": _scores_ranking([0, 1, 3, 4, 5, 2]), "label": 2, "index": 4, "view": 1, "valid": False})
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False,
                        enable_model_summary=False)
    logged = trainer.test(module, DataLoader(samples, batch_size=3), verbose=False)[0]
    valid = samples[:5]
    expected_loss = F.cross_entropy(torch.stack([s["video"] for s in valid]), torch.tensor([s["label"] for s in valid]))
    assert logged["test/failed_views"] == 1.0
    assert logged["test/loss"] == pytest.approx(expected_loss.item(), rel=1e-5)
    assert logged["test/acc"] == pytest.approx(3 / 5)  # (a macro average, over classes, would be 0.42)
    assert logged["test/acc_top5"] == pytest.approx(4 / 5)
    assert logged["test/video_acc"] == pytest.approx(3 / 5)
    assert logged["test/video_acc_top5"] == pytest.approx(4 / 5)
    assert logged["test/video_mean_class_acc"] == pytest.approx((2 / 3 + 0 + 1) / 3)


def test_report_files_name_each_videos_file_and_count_true_classes_by_row(tmp_path):
    """predictions.csv names a row's own video (entries[video], not entries[row]: they part once a video failed and
    left the results); the confusion matrix has the true class as its row and the predicted one as its column, and
    per_class.csv counts each class's videos (row sums) and its correct ones (the diagonal) from it."""
    import csv

    from timesformer.evaluation import VideoResults, write_report_files

    # video 1 failed; videos 0, 2, 3, 4 of labels 0, 1, 1, 2 are predicted 1, 1, 0, 1
    results = VideoResults(indices=torch.tensor([0, 2, 3, 4]), labels=torch.tensor([0, 1, 1, 2]),
                           scores=torch.tensor([[0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1], [0.3, 0.4, 0.3]]),
                           num_views=torch.tensor([3, 3, 2, 3]), failed=[1])
    expected = torch.zeros(3, 3, dtype=torch.int64)
    for true, predicted in ((0, 1), (1, 1), (1, 0), (2, 1)):
        expected[true, predicted] += 1
    assert torch.equal(results.confusion_matrix(3), expected)

    entries = [("a.mp4", 0), ("b.mp4", 1), ("c.mp4", 1), ("d.mp4", 1), ("e.mp4", 2)]
    paths = write_report_files(tmp_path, results, entries, ["x", "y", "z"])
    predictions = list(csv.DictReader(paths["predictions"].open()))
    assert [(row["video"], row["true_label"], row["num_views"], row["pred_1"]) for row in predictions] == [
        ("a.mp4", "x", "3", "y"), ("c.mp4", "y", "3", "y"), ("d.mp4", "y", "2", "x"), ("e.mp4", "z", "3", "y")]
    assert [float(row["score_1"]) for row in predictions] == [0.7, 0.8, 0.6, 0.4]
    per_class = list(csv.DictReader(paths["per_class"].open()))
    assert [(row["class"], row["videos"], row["correct"], row["accuracy"]) for row in per_class] == [
        ("x", "1", "0", "0.000000"), ("y", "2", "1", "0.500000"), ("z", "1", "0", "0.000000")]

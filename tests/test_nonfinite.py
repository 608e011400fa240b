"""A NaN or infinite loss: a checkpoint of the last finite weights and the step named, or the batch skipped without a
trace; on one DDP process, handled by every process."""

import os
import signal
import subprocess
import sys

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from tests.conftest import ROOT, tiny_classifier


def _nan_loader(drop_poisoned: bool = False):
    torch.manual_seed(0)
    videos = torch.randn(4, 4, 3, 32, 32)
    videos[2] = float("nan")  # the third batch is poisoned
    samples = [{"video": v, "label": i % 2, "index": i} for i, v in enumerate(videos)]
    return DataLoader([s for s in samples if not (drop_poisoned and s["index"] == 2)], batch_size=1)


def test_nonfinite_loss_saves_a_checkpoint_and_names_the_step(tmp_path):
    module = tiny_classifier()
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, default_root_dir=tmp_path, logger=False,
                        enable_progress_bar=False, enable_checkpointing=False)
    with pytest.raises(FloatingPointError, match="at global step 2"):
        trainer.fit(module, train_dataloaders=_nan_loader())
    saved = torch.load(tmp_path / "checkpoints" / "nonfinite-step2.ckpt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values())


@pytest.mark.parametrize("mode", ["skip", "error"])
def test_a_nonfinite_loss_on_one_ddp_process_is_handled_by_every_process(mode, tmp_path):
    # Before, "skip" crashed (Lightning refuses a skipped training_step under DDP) and "error" hung for good: the
    # process with the NaN loss waited in the checkpoint's barrier while the other waited for its gradients.
    # Now every process learns of the NaN (an all-reduce of the flag) and they skip or stop together.
    from tests.nonfinite_ddp import POISONED

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, str(ROOT / "tests" / "nonfinite_ddp.py"), mode, str(tmp_path)],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # Lightning's second process too
        pytest.fail(f"nonfinite_loss={mode}: the DDP processes hung")
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    poisoned_rank = next(r for r in ranks if POISONED in r["seen"])
    step = poisoned_rank["seen"].index(POISONED)  # one sample per step
    if mode == "error":
        assert poisoned_rank["seen"][-1] == POISONED  # stopped at that step
        for result in ranks:
            assert f"at global step {step} " in result.get("error", ""), (result, output[-3000:])
        saved = torch.load(tmp_path / "checkpoints" / f"nonfinite-step{step}.ckpt", weights_only=False)
        assert all(torch.isfinite(v).all() for v in saved["state_dict"].values())
        return
    assert [r.get("skipped") for r in ranks] == [1, 1], output[-3000:]
    assert ranks[0]["steps"] == 4  # 8 samples, 4 per process, the poisoned step's update skipped
    for name, weight in ranks[0]["weights"].items():
        assert torch.isfinite(weight).all() and torch.equal(weight, ranks[1]["weights"][name]), name


def test_nonfinite_loss_can_skip_the_batch(tmp_path):
    module = tiny_classifier(nonfinite_loss="skip")
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, default_root_dir=tmp_path, logger=False,
                        enable_progress_bar=False, enable_checkpointing=False)
    trainer.fit(module, train_dataloaders=_nan_loader())
    assert module.skipped_batches == 1
    # The same as training without the poisoned batch: it left no trace (weights, momentum).
    reference = tiny_classifier()
    L.Trainer(accelerator="cpu", max_epochs=1, default_root_dir=tmp_path / "ref", logger=False,
              enable_progress_bar=False, enable_checkpointing=False).fit(reference, _nan_loader(drop_poisoned=True))
    for (name, param), expected in zip(module.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(param, expected, msg=name)


def test_the_skipped_batch_count_goes_on_after_a_resume(tmp_path):
    """train/skipped_batches counts the run's skipped batches: a resumed run started it at 0 again."""
    module = tiny_classifier(nonfinite_loss="skip")
    options = dict(accelerator="cpu", default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                   enable_checkpointing=False)
    trainer = L.Trainer(max_epochs=1, **options)
    trainer.fit(module, train_dataloaders=_nan_loader())
    trainer.save_checkpoint(tmp_path / "epoch1.ckpt")
    resumed = tiny_classifier(nonfinite_loss="skip")
    L.Trainer(max_epochs=2, **options).fit(resumed, _nan_loader(), ckpt_path=tmp_path / "epoch1.ckpt")
    assert module.skipped_batches == 1 and resumed.skipped_batches == 2  # the poisoned batch, once an epoch


def test_a_skipped_batch_under_gradient_accumulation_leaves_the_step_to_the_others(tmp_path):
    # Batches 2 and 3 make one step; batch 2 is poisoned. The step goes on with batch 3's gradient alone (halved, as
    # Lightning divides every batch's loss by the accumulation), the same as a run that never saw batch 2, whose
    # second step is batch 3 alone at the epoch's end.
    module = tiny_classifier(nonfinite_loss="skip")
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, default_root_dir=tmp_path, logger=False,
                        enable_progress_bar=False, enable_checkpointing=False, accumulate_grad_batches=2)
    trainer.fit(module, train_dataloaders=_nan_loader())
    assert module.skipped_batches == 1 and trainer.global_step == 2
    reference = tiny_classifier()
    L.Trainer(accelerator="cpu", max_epochs=1, default_root_dir=tmp_path / "ref", logger=False,
              enable_progress_bar=False, enable_checkpointing=False, accumulate_grad_batches=2).fit(
        reference, _nan_loader(drop_poisoned=True))
    for (name, param), expected in zip(module.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(param, expected, msg=name)


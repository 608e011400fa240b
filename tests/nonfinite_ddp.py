"""Two CPU processes (DDP, gloo) train a tiny model; one sample, seen by one process only, is NaN.

    python tests/nonfinite_ddp.py {skip,error} OUT_DIR

Each process writes ``OUT_DIR/rank<r>.pt``: the sample indices it trained on, in order, and its final weights and
skipped-step count, or the error it stopped with.
Run by tests/test_nonfinite.py in a subprocess (Lightning launches the second process by running this file again).
"""

import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timesformer import TimeSformer, TimeSformerConfig  # noqa: E402
from timesformer.module import VideoClassifier  # noqa: E402

POISONED = 5  # the index of the NaN sample


def main(mode: str, out_dir: Path) -> None:
    torch.manual_seed(0)
    videos = torch.randn(8, 4, 3, 32, 32)
    videos[POISONED] = float("nan")  # one process gets it from the DistributedSampler
    samples = [{"video": v, "label": i % 2, "index": i} for i, v in enumerate(videos)]
    torch.manual_seed(1)
    config = TimeSformerConfig(image_size=32, patch_size=8, num_frames=4, hidden_size=32, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=64, num_classes=2)
    module = VideoClassifier(TimeSformer(config), optimizer={"name": "adamw", "lr": 0.01, "weight_decay": 0.05},
                             scheduler={"name": "constant"}, nonfinite_loss=mode)
    trainer = L.Trainer(accelerator="cpu", strategy="ddp", devices=2, max_epochs=1, default_root_dir=out_dir,
                        logger=False, enable_progress_bar=False, enable_checkpointing=False,
                        enable_model_summary=False)
    seen: list[int] = []
    module.on_train_batch_start = lambda batch, batch_idx: seen.extend(batch["index"].tolist())
    result: dict = {}
    try:
        trainer.fit(module, train_dataloaders=DataLoader(samples, batch_size=1, shuffle=False))
        result = {"weights": module.model.state_dict(), "skipped": module.skipped_batches,
                  "steps": trainer.global_step}
    except FloatingPointError as error:
        result = {"error": str(error)}
    result["seen"] = seen
    torch.save(result, out_dir / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))

"""Evaluate a checkpoint written by train.py: `python evaluate.py ckpt=PATH [overrides]`.

Model and data are rebuilt from the checkpoint's saved config. `data=<name>` swaps the dataset (clips still cut as
the checkpoint's); `data.<key>=<value>` changes one value of the saved data config. Results (eval.json,
predictions.csv, per_class.csv, confusion_matrix.png) go to this evaluation's own run dir, logs/eval/runs/<date>/
(hydra.run.dir=... chooses another), which the summary names; not to the checkpoint's run dir.
"""

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from timesformer.pipeline import evaluate

os.environ.setdefault("TIMESFORMER_ROOT", str(Path(__file__).resolve().parent))


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    # The data config lives in the checkpoint, not in eval.yaml, so `data.x=y` must add a key for Hydra
    # (`++`); evaluate() then merges it over the saved data config.
    sys.argv = [("++" + arg) if arg.startswith("data.") else arg for arg in sys.argv]
    main()

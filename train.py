"""Train a TimeSformer: `python train.py [overrides]`, e.g.

    python train.py experiment=demo
    python train.py model.attention_type=divided_space_time data=kinetics400 trainer=gpu

Everything is configured in configs/ (Hydra); the work is done by timesformer.pipeline.train.
"""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

from timesformer.pipeline import sweep_objective, train

os.environ.setdefault("TIMESFORMER_ROOT", str(Path(__file__).resolve().parent))


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    return sweep_objective(metrics, cfg.get("optimized_metric"))  # what Hydra sweepers optimise


if __name__ == "__main__":
    main()

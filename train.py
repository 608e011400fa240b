"""Train a TimeSformer: `python train.py [overrides]`, e.g.

    python train.py experiment=demo
    python train.py model.attention_type=divided_space_time data=kinetics400 trainer=gpu

Everything is configured in configs/ (Hydra); the work is done by timesformer.pipeline.train.
"""

import os
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from timesformer.pipeline import sweep_objective, train

os.environ.setdefault("TIMESFORMER_ROOT", str(Path(__file__).resolve().parent))


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    # What a Hydra sweeper optimises (Optuna's; the basic sweeper of `-m` grids ignores it).
    hydra_cfg = HydraConfig.get()
    optimizing = hydra_cfg.mode == RunMode.MULTIRUN and "BasicSweeper" not in hydra_cfg.sweeper._target_
    return sweep_objective(metrics, cfg.get("optimized_metric"), required=optimizing)


if __name__ == "__main__":
    main()

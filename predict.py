"""Predict the classes of videos, or extract features of a dataset split: `python predict.py ckpt=PATH ...`.

    python predict.py ckpt=model.ckpt input=clip.mp4                  # top-5 classes with probabilities
    python predict.py ckpt=model.ckpt input=videos/ json=preds.json   # every video under a folder
    python predict.py ckpt=model.ckpt input=clip.mp4 attention_maps=true   # + attention overlays (PNG, GIF)
    python predict.py ckpt=model.ckpt input=videos/ features=feats.pt # + pooled embeddings for each video
    python predict.py ckpt=model.ckpt data=ucf101 data.root=/x split=train features=feats.npy  # a dataset split

`ckpt` is a train.py checkpoint, a Hugging Face folder or an original *.pyth. `input=` and `data=`/`split=` are
exclusive; without `data=<name>`, a train.py checkpoint's own data config is used (`data.<key>=<value>` changes it).
"""

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from timesformer.inference import run

os.environ.setdefault("TIMESFORMER_ROOT", str(Path(__file__).resolve().parent))


@hydra.main(version_base="1.3", config_path="configs", config_name="predict")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    # As in evaluate.py: without data=<name> the data config is the checkpoint's, not in predict.yaml, so
    # `data.x=y` must add a key for Hydra (`++`); run() merges it over the saved data config.
    sys.argv = [("++" + arg) if arg.startswith("data.") else arg for arg in sys.argv]
    main()

"""Predict the classes of videos: `python predict.py ckpt=PATH input=VIDEO_OR_FOLDER [overrides]`.

    python predict.py ckpt=model.ckpt input=clip.mp4                  # top-5 classes with probabilities
    python predict.py ckpt=model.ckpt input=videos/ json=preds.json   # every video under a folder
    python predict.py ckpt=model.ckpt input=clip.mp4 attention_maps=true   # + attention overlays (PNG, GIF)
    python predict.py ckpt=model.ckpt input=videos/ features=feats.pt # + pooled embeddings for each video

`ckpt` is a train.py checkpoint, a Hugging Face folder or an original *.pyth.
"""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

from timesformer.inference import predict

os.environ.setdefault("TIMESFORMER_ROOT", str(Path(__file__).resolve().parent))


@hydra.main(version_base="1.3", config_path="configs", config_name="predict")
def main(cfg: DictConfig) -> None:
    predict(cfg)


if __name__ == "__main__":
    main()

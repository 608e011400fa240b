"""The learning-rate schedule as the optimizer sees it, step by step, however training is bounded."""

import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from timesformer import TimeSformer, TimeSformerConfig
from timesformer.module import VideoClassifier, lr_multiplier


class RecordLearningRate(L.Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def _fit(tmp_path, scheduler: dict, batches: int = 4, **trainer_kwargs) -> list[float]:
    torch.manual_seed(0)
    config = TimeSformerConfig(image_size=16, patch_size=8, num_frames=2, hidden_size=16, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=32, num_classes=2)
    module = VideoClassifier(TimeSformer(config), optimizer={"name": "sgd", "lr": 1.0, "weight_decay": 0.0},
                             scheduler=scheduler)
    samples = [{"video": torch.randn(2, 3, 16, 16), "label": i % 2, "index": i} for i in range(batches)]
    recorder = RecordLearningRate()
    trainer = L.Trainer(accelerator="cpu", default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[recorder], **trainer_kwargs)
    trainer.fit(module, DataLoader(samples, batch_size=1))
    return recorder.lrs


@pytest.mark.parametrize("bounds", [dict(max_epochs=-1, max_steps=8), dict(max_epochs=15, max_steps=8),
                                    dict(max_epochs=2)])
def test_warmup_lasts_the_epochs_asked_whatever_bounds_training(bounds, tmp_path):
    """warmup_epochs=1 with 4 batches an epoch is 4 steps, whether max_epochs or max_steps ends training (it was
    total_steps / max_epochs: 8 steps of warmup with max_epochs=-1, 1 step with max_epochs=15 and max_steps=8)."""
    lrs = _fit(tmp_path, {"name": "cosine", "warmup_epochs": 1.0}, **bounds)
    assert len(lrs) == 8
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    # cosine over the 4 steps after warmup, from the peak: 0.5 (1 + cos(pi (s - 4) / 4)) for s = 4..7
    assert lrs[4:] == pytest.approx([0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)])
    assert lrs[4:] == pytest.approx([1.0, 0.853553, 0.5, 0.146447], abs=1e-6)
    assert max(lrs) == pytest.approx(1.0)  # the peak is reached once, never passed


def test_cosine_decays_from_the_peak_to_the_floor_over_the_steps_after_warmup():
    """lr_multiplier's documented shape: linear warmup to exactly 1.0, then
    min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + cos(pi * progress)) with progress over total - warmup steps."""
    warmup, total, floor = 4, 12, 0.01
    factors = [lr_multiplier(step, "cosine", total_steps=total, warmup_steps=warmup, min_lr_ratio=floor)
               for step in range(total + 3)]
    expected = [(step + 1) / warmup for step in range(warmup)]
    expected += [floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
                 for step in range(warmup, total)]
    expected += [floor] * 3  # after the end of training: held at the floor
    assert factors == pytest.approx(expected, abs=1e-9)
    assert factors[warmup] == 1.0 and max(factors) == 1.0  # the peak, at the first step after warmup, never above
    assert factors[warmup + 4] == pytest.approx(floor + (1 - floor) / 2)  # halfway through the decay: 0.505
    assert factors[-1] == pytest.approx(0.01)  # the floor, not 0
    # without warmup: half the peak halfway through training, the floor at its end
    assert lr_multiplier(50, "cosine", total_steps=100, min_lr_ratio=0.1) == pytest.approx(0.55)
    assert lr_multiplier(100, "cosine", total_steps=100, min_lr_ratio=0.1) == pytest.approx(0.1)


def test_warmup_counts_optimizer_steps_under_gradient_accumulation(tmp_path):
    lrs = _fit(tmp_path, {"name": "cosine", "warmup_epochs": 1.0}, batches=8, max_epochs=2,
               accumulate_grad_batches=2)  # 4 optimizer steps an epoch
    assert lrs[:8:2] == pytest.approx([0.25, 0.5, 0.75, 1.0])


def test_an_unbounded_run_is_refused(tmp_path):
    with pytest.raises(ValueError, match="set trainer.max_epochs or trainer.max_steps"):
        _fit(tmp_path, {"name": "cosine"}, max_epochs=-1)


def test_multistep_milestones_are_fractions_of_training(tmp_path):
    lrs = _fit(tmp_path, {"name": "multistep", "milestones": [0.5, 0.75], "gamma": 0.1}, max_epochs=2)
    assert lrs == pytest.approx([1.0] * 4 + [0.1] * 2 + [0.01] * 2)
    with pytest.raises(ValueError, match=r"milestones=\[11, 14\]: milestones are fractions of training"):
        _fit(tmp_path, {"name": "multistep", "milestones": [11, 14]}, max_epochs=2)  # epochs: never reached


def test_layer_decay_and_weight_decay_groups():
    from timesformer.module import build_optimizer

    model = TimeSformer(TimeSformerConfig(image_size=16, patch_size=8, num_frames=2, hidden_size=16,
                                          num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                                          num_classes=2))
    model.blocks[1].mlp.fc2.weight.requires_grad_(False)  # a frozen parameter is in no group
    optimizer = build_optimizer(model, "adamw", lr=1.0, weight_decay=0.05, layer_decay=0.5)
    setting = {id(p): (group["lr"], group["weight_decay"]) for group in optimizer.param_groups for p in group["params"]}
    named = dict(model.named_parameters())
    assert setting[id(named["patch_embed.proj.weight"])] == (0.5 ** 3, 0.05)  # embeddings: 3 layers below the head
    for embedding in ("cls_token", "pos_embed", "time_embed"):  # no decay on embeddings, norms, biases
        assert setting[id(named[embedding])] == (0.5 ** 3, 0.0), embedding
    assert setting[id(named["blocks.0.attn.qkv.weight"])] == (0.5 ** 2, 0.05)
    assert setting[id(named["blocks.1.norm1.bias"])] == (0.5, 0.0)
    assert setting[id(named["head.weight"])] == (1.0, 0.05)
    assert id(named["blocks.1.mlp.fc2.weight"]) not in setting
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match=r"optimizer.layer_decay=.* must be in \(0, 1\]"):
            build_optimizer(model, "adamw", lr=1.0, weight_decay=0.05, layer_decay=bad)


def test_decay_norm_bias_embed_decays_every_parameter():
    """configs/optimizer/sgd.yaml (the paper's recipe) sets decay_norm_bias_embed=true: the original decays
    everything, embeddings, norms and biases included."""
    from timesformer.module import build_optimizer

    model = TimeSformer(TimeSformerConfig(image_size=16, patch_size=8, num_frames=2, hidden_size=16,
                                          num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                          num_classes=2))
    optimizer = build_optimizer(model, "sgd", lr=0.1, weight_decay=1e-4, decay_norm_bias_embed=True)
    decay = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    named = dict(model.named_parameters())
    assert len(decay) == len(named)
    for name in ("cls_token", "pos_embed", "time_embed", "norm.weight", "head.bias", "blocks.0.attn.qkv.weight"):
        assert decay[id(named[name])] == 1e-4, name


def test_optimizer_options_reach_the_optimizer():
    """momentum, nesterov (SGD) and betas (AdamW) are the optimizer's, not its defaults."""
    from timesformer.module import build_optimizer

    model = torch.nn.Linear(3, 2)
    sgd = build_optimizer(model, "sgd", lr=0.1, weight_decay=0.0, momentum=0.8, nesterov=False)
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.defaults["momentum"] == 0.8 and sgd.defaults["nesterov"] is False
    assert all(group["momentum"] == 0.8 and group["nesterov"] is False for group in sgd.param_groups)
    sgd = build_optimizer(model, "sgd", lr=0.1, weight_decay=0.0, momentum=0.5, nesterov=True)
    assert sgd.defaults["momentum"] == 0.5 and sgd.defaults["nesterov"] is True
    adamw = build_optimizer(model, "adamw", lr=0.1, weight_decay=0.0, betas=(0.8, 0.99))
    assert isinstance(adamw, torch.optim.AdamW)
    assert all(tuple(group["betas"]) == (0.8, 0.99) for group in adamw.param_groups)

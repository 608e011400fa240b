"""Parameters and GFLOPs per view of TimeSformer configurations, counted without running the model.

    python -m timesformer.profile model=base
    python -m timesformer.profile model=hr model.attention_type=axial
    python -m timesformer.profile model=base model.num_frames=16
    python -m timesformer.profile --all            # every attention type x (base, hr, large)

The model configs are configs/model/*.yaml, composed with Hydra's compose API; arguments are Hydra overrides
of the ``model`` group (``model=<name>`` picks the file, ``model.<field>=<value>`` sets a field). A
``num_classes: null`` (taken from the data when training) counts as 400, the Kinetics-400 head of the paper.

One fused multiply-add counts as one FLOP, as in fvcore and the paper: the patch-embedding convolution, every
linear layer and attention's two matmuls (Q·Kᵀ and weights·V); norms, activations and softmax are not
counted. The model is built on the meta device (shapes only, no memory) and its forward pass runs under
``torch.utils.flop_counter.FlopCounterMode``. On the meta device ``scaled_dot_product_attention`` falls back
to its matmul form, which the counter sees; on CPU it runs a fused kernel the counter does not count, so
counting there would miss attention (``count_flops`` checks that this PyTorch still counts it).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from timesformer.model import ATTENTION_TYPES, TimeSformer, TimeSformerConfig

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
PAPER_MODELS = ("base", "hr", "large")  # TimeSformer, -HR, -L: 196, 1703 and 2380 GFLOPs per view (divided)
# Model-config entries that are not architecture (they say where weights come from).
_NOT_ARCHITECTURE = ("pretrained", "init_from")
DEFAULT_NUM_CLASSES = 400
# Dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, TFLOP/s, matched on the device name in
# this order (the first name it contains): the denominator of model FLOPs utilisation (MFU).
DATASHEET_BF16_TFLOPS = {"GH200": 989.4, "H200 NVL": 835.5, "H200": 989.4, "H100 PCIe": 756.0, "H100 NVL": 835.0,
                         "H100": 989.4, "A100": 312.0, "L40S": 362.1, "L40": 181.0, "A10G": 70.0, "L4": 121.0,
                         "RTX 4090": 165.2}


@dataclass(frozen=True)
class Profile:
    model: str  # the configs/model file it was composed from
    attention_type: str
    num_frames: int
    image_size: int
    parameters: int
    gflops: float  # per view (1 clip of num_frames × image_size²), one multiply-add = one FLOP


def compose_model_config(overrides: list[str] | tuple[str, ...] = ()) -> tuple[str, TimeSformerConfig]:
    """Compose configs/model with Hydra overrides ("model=hr", "model.num_frames=16") -> (name, config)."""
    from hydra import compose, initialize_config_dir

    overrides = list(overrides)
    choice = [o for o in overrides if o.split("=", 1)[0].lstrip("+") == "model"]
    name = choice[-1].split("=", 1)[1] if choice else "base"
    # There is no primary config here, so the model group is added (+model=...) rather than overridden.
    field_overrides = [o for o in overrides if o not in choice]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose(overrides=[f"+model={name}", *field_overrides])
    values = {k: v for k, v in dict(cfg.model).items() if k not in _NOT_ARCHITECTURE}
    if values.get("num_classes") is None:
        values["num_classes"] = DEFAULT_NUM_CLASSES
    return name, TimeSformerConfig.from_dict(values)


def count_flops(config: TimeSformerConfig) -> int:
    """Multiply-adds of one forward pass over one view (1, T, C, H, W), counted on the meta device."""
    _check_attention_is_counted()
    with torch.device("meta"):
        model = TimeSformer(config).eval()
        video = torch.empty(1, config.num_frames, config.num_channels, config.image_size, config.image_size)
    model.use_shortcuts(False)  # the architecture's FLOPs, not those of our shortcuts
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(video)
    return counter.get_total_flops() // 2  # the counter counts a multiply-add as 2 FLOPs


def datasheet_bf16_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU named ``device_name`` (``torch.cuda.get_device_name()``); None if unknown."""
    return next((tflops for name, tflops in DATASHEET_BF16_TFLOPS.items() if name in device_name), None)


def _check_attention_is_counted() -> None:
    q = torch.empty(1, 1, 4, 8, device="meta")  # (batch, heads, L, head_dim)
    with FlopCounterMode(display=False) as counter:
        F.scaled_dot_product_attention(q, q, q)
    if counter.get_total_flops() != 2 * (2 * 4 * 4 * 8):  # Q·Kᵀ and weights·V, 2 FLOPs per multiply-add
        raise RuntimeError("this PyTorch's FlopCounterMode does not count scaled_dot_product_attention on the meta "
                           "device: the FLOPs would leave attention out")


def profile(name: str, config: TimeSformerConfig) -> Profile:
    with torch.device("meta"):
        parameters = TimeSformer(config).num_parameters()
    return Profile(name, config.attention_type, config.num_frames, config.image_size, parameters,
                   count_flops(config) / 1e9)


def format_table(profiles: list[Profile]) -> str:
    header = ("model", "attention", "frames", "resolution", "parameters", "GFLOPs/view")
    rows = [(p.model, p.attention_type, str(p.num_frames), f"{p.image_size}x{p.image_size}",
             f"{p.parameters / 1e6:.2f}M", f"{p.gflops:.1f}" if p.gflops >= 1 else f"{p.gflops:.3f}")
            for p in profiles]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    left_aligned = (True, True, False, False, False, False)
    lines = ["  ".join(cell.ljust(width) if left else cell.rjust(width)
                       for cell, width, left in zip(row, widths, left_aligned, strict=True)) for row in [header, *rows]]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m timesformer.profile",
        description="Parameters and GFLOPs per view (one multiply-add = one FLOP, as in the paper).",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides: model=hr, model.num_frames=16, ...")
    parser.add_argument("--all", action="store_true",
                        help="every attention type x (base, hr, large); other overrides still apply")
    args = parser.parse_args(argv)

    if args.all:
        field_overrides = [o for o in args.overrides if o.split("=", 1)[0].lstrip("+") != "model"]
        if len(field_overrides) != len(args.overrides):
            parser.error("--all profiles every model (base, hr, large): drop model=..., or drop --all")
        profiles = []
        for name in PAPER_MODELS:
            _, config = compose_model_config([f"model={name}", *field_overrides])
            for attention_type in ATTENTION_TYPES:
                profiles.append(profile(name, dataclasses.replace(config, attention_type=attention_type)))
    else:
        profiles = [profile(*compose_model_config(args.overrides))]
    print(format_table(profiles))


if __name__ == "__main__":
    main()

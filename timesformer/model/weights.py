"""Reading and writing the weight formats users already have (all from local disk, never a download).

Our parameter names are the original repository's (facebookresearch/TimeSformer) without its ``model.``
prefix, so an original ``*.pyth`` checkpoint needs only the prefix stripped. Hugging Face folders are
mapped name for name (no transposes: both store nn.Linear's (out, in) layout).
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from timesformer.model.config import ARCHITECTURE_FIELDS, TimeSformerConfig

log = logging.getLogger(__name__)

# ours (= original without "model.") -> Hugging Face, for the parameters outside the blocks
_HF_TOP_LEVEL = {
    "cls_token": "timesformer.embeddings.cls_token",
    "pos_embed": "timesformer.embeddings.position_embeddings",
    "time_embed": "timesformer.embeddings.time_embeddings",
    "patch_embed.proj": "timesformer.embeddings.patch_embeddings.projection",
    "norm": "timesformer.layernorm",
    "head": "classifier",
}
# ours -> Hugging Face, inside block i (prefix "blocks.i." -> "timesformer.encoder.layer.i.")
_HF_BLOCK = {
    "norm1": "layernorm_before",
    "attn.qkv": "attention.attention.qkv",
    "attn.proj": "attention.output.dense",
    "temporal_norm1": "temporal_layernorm",
    "temporal_attn.qkv": "temporal_attention.attention.qkv",
    "temporal_attn.proj": "temporal_attention.output.dense",
    "temporal_fc": "temporal_dense",
    "norm2": "layernorm_after",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}
_HF_ACT = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu", "silu": "silu"}
_HF_CONFIG_FIELDS = (
    "image_size", "patch_size", "num_channels", "num_frames", "hidden_size", "num_hidden_layers",
    "num_attention_heads", "intermediate_size", "hidden_act", "hidden_dropout_prob",
    "attention_probs_dropout_prob", "initializer_range", "layer_norm_eps", "qkv_bias", "attention_type",
    "drop_path_rate",
)


def _rename(name: str, table: dict[str, str]) -> str | None:
    """Rename ``<module>.<weight|bias|...>`` (or a bare parameter) by its longest matching module prefix."""
    for source in sorted(table, key=len, reverse=True):
        if name == source or name.startswith(source + "."):
            return table[source] + name[len(source):]
    return None


def to_hf_key(name: str) -> str | None:
    """Our parameter name -> Hugging Face's, or None when HF has no such parameter."""
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    if match:
        inner = _rename(match.group(2), _HF_BLOCK)
        return None if inner is None else f"timesformer.encoder.layer.{match.group(1)}.{inner}"
    return _rename(name, _HF_TOP_LEVEL)


def from_hf_key(name: str) -> str | None:
    """Hugging Face parameter name -> ours, or None when we have no such parameter."""
    match = re.fullmatch(r"timesformer\.encoder\.layer\.(\d+)\.(.+)", name)
    if match:
        inner = _rename(match.group(2), {v: k for k, v in _HF_BLOCK.items()})
        return None if inner is None else f"blocks.{match.group(1)}.{inner}"
    return _rename(name, {v: k for k, v in _HF_TOP_LEVEL.items()})


def hf_config_to_ours(hf: dict[str, Any]) -> TimeSformerConfig:
    """A Hugging Face ``config.json`` dict -> TimeSformerConfig (labels from ``id2label``)."""
    values = {name: hf[name] for name in _HF_CONFIG_FIELDS if name in hf}
    if "hidden_act" in values:
        reverse = {v: k for k, v in _HF_ACT.items()}
        if values["hidden_act"] not in reverse:
            raise ValueError(f"config.json hidden_act={values['hidden_act']!r} is not supported; "
                             f"supported: {sorted(reverse)}")
        values["hidden_act"] = reverse[values["hidden_act"]]
    id2label = hf.get("id2label")
    if id2label:
        ordered = [id2label[str(i)] if str(i) in id2label else id2label[i] for i in range(len(id2label))]
        values["num_classes"] = len(ordered)
        if ordered != [f"LABEL_{i}" for i in range(len(ordered))]:  # transformers' (and our export's) "no names"
            values["class_names"] = ordered
    elif "num_labels" in hf:
        values["num_classes"] = int(hf["num_labels"])
    return TimeSformerConfig(**values)


def ours_config_to_hf(config: TimeSformerConfig) -> dict[str, Any]:
    # drop_path_rate is left out: it only matters in training, and recent transformers releases reject a
    # float there ("expected int"), which would make every exported folder with 0.1 unloadable.
    values: dict[str, Any] = {name: getattr(config, name) for name in _HF_CONFIG_FIELDS if name != "drop_path_rate"}
    values["hidden_act"] = _HF_ACT[config.hidden_act]
    names = config.class_names or [f"LABEL_{i}" for i in range(config.num_classes)]
    values.update(
        model_type="timesformer",
        architectures=["TimesformerForVideoClassification"],
        id2label={str(i): name for i, name in enumerate(names)},
        label2id={name: i for i, name in enumerate(names)},
    )
    return values


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def _read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The weights of a Hugging Face folder, in transformers' order of preference: one file, else the shards an
    index (``*.index.json``, its ``weight_map``) names."""
    for filename in ("model.safetensors", "pytorch_model.bin"):
        if (folder / filename).is_file():
            return _read_tensors(folder / filename)
    for filename in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / filename
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
            missing = [shard for shard in shards if not (folder / shard).is_file()]
            if not shards or missing:
                raise FileNotFoundError(f"{index} names no weight files" if not shards else
                                        f"{index} names shard(s) that are not in {folder}: {', '.join(missing)}")
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(_read_tensors(folder / shard))
            return state
    raise FileNotFoundError(f"{folder} has a config.json but no weights: neither model.safetensors nor "
                            "pytorch_model.bin, nor a sharded model's *.index.json")


def read_hf_folder(folder: Path) -> tuple[TimeSformerConfig, dict[str, torch.Tensor]]:
    """A Hugging Face model folder -> (config, state dict in our names)."""
    config = hf_config_to_ours(json.loads((folder / "config.json").read_text()))
    hf_state = _read_hf_weights(folder)
    state, unplaced = {}, []
    for name, tensor in hf_state.items():
        if name.split(".")[0] in ("embeddings", "encoder", "layernorm"):  # a TimesformerModel (backbone) folder
            name = f"timesformer.{name}"
        ours = from_hf_key(name)
        if ours is None:
            unplaced.append(name)
        else:
            state[ours] = tensor
    if unplaced:
        log.warning("%s: %d tensor(s) could not be placed by name and were ignored: %s", folder, len(unplaced),
                    ", ".join(unplaced[:10]) + (" ..." if len(unplaced) > 10 else ""))
    return config, state


def write_hf_folder(folder: Path, config: TimeSformerConfig, state: dict[str, torch.Tensor],
                    clip: dict[str, Any] | None = None) -> None:
    """Write ``config.json`` + ``model.safetensors`` that transformers' TimesformerForVideoClassification loads.

    ``clip``: how clips were cut for the model (data-config keys: ``sampling_rate``, ``mean``, ``std``, ...), kept
    in ``config.json`` as ``timesformer_clip`` (read back by ``timesformer.inference.clip_settings``), with the
    mean and std also in a ``preprocessor_config.json`` for transformers' image processor.
    """
    from safetensors.torch import save_file

    hf_state = {}
    for name, tensor in state.items():
        hf_name = to_hf_key(name)
        if hf_name is None:  # before anything is written: no empty folder left behind
            raise ValueError(f"parameter {name!r} has no Hugging Face equivalent "
                             f"(attention_type={config.attention_type!r} cannot be exported)")
        hf_state[hf_name] = tensor.detach().contiguous().cpu()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(hf_state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    hf_config = ours_config_to_hf(config)
    if clip:
        hf_config["timesformer_clip"] = clip
        size = int(clip.get("image_size", config.image_size))  # the crops the model was trained and tested on
        short_side = int(clip.get("test_short_side", size))  # what a (centre) crop is cut from
        (folder / "preprocessor_config.json").write_text(json.dumps({
            "image_processor_type": "VideoMAEImageProcessor", "do_resize": True, "size": {"shortest_edge": short_side},
            "do_center_crop": True, "crop_size": {"height": size, "width": size}, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(clip["mean"]),
            "image_std": list(clip["std"]), "resample": 2}, indent=2) + "\n")
    elif (folder / "preprocessor_config.json").is_file():
        # Not ours to delete, but it no longer describes these weights' clips for certain: predict.py would take
        # its mean and std.
        log.warning("%s keeps the preprocessor_config.json that was there before (its mean and std are used by "
                    "predict.py and transformers' image processor): delete it if these weights were trained with "
                    "other ones, or export with timesformer.inference.export_pretrained, which writes it",
                    folder)
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")


def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Drop ``prefix`` from every key that has it; keys without it are dropped (they are not the model's)."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


# Head counts of the released ViTs by width, which their weights' shapes do not show: tiny to large have heads of 64;
# the wider ones keep 16 (huge 1280 = 16 x 80, giant 1408 = 16 x 88, gigantic 1664 = 16 x 104, SigLIP so400m 1152).
RELEASED_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1152: 16, 1280: 16, 1408: 16, 1664: 16}
# What a file of tensors alone (an original *.pyth, a state dict, an image ViT) does not say about its model.
NOT_IN_THE_SHAPES = ("num_attention_heads", "hidden_act", "layer_norm_eps")


def default_heads(hidden_size: int) -> int | None:
    """The head count of the released ViTs of this width (not visible in their weights' shapes); None for others."""
    return RELEASED_HEADS.get(hidden_size)


def infer_config_from_state(state: dict[str, torch.Tensor], source: str | Path = "weights",
                            **overrides: Any) -> TimeSformerConfig:
    """Read the architecture off an original-layout state dict (the ``.pyth`` files carry no usable config).

    Head count is not visible in the shapes: it defaults to the released ViTs' for the width (`default_heads`); for
    another width it must be given (an error naming ``source`` otherwise), and one other than the released ViTs' for
    a released width is logged as a warning.
    """
    dim = state["cls_token"].shape[-1]
    patch = state["patch_embed.proj.weight"].shape[-1]
    grid = int(round((state["pos_embed"].shape[1] - 1) ** 0.5))
    if "blocks.0.width_attn.qkv.weight" in state:
        attention_type = "axial"
    elif "blocks.0.local_attn.qkv.weight" in state:
        attention_type = "sparse_local_global"
    elif "blocks.0.temporal_attn.qkv.weight" in state:
        attention_type = "divided_space_time"
    elif "time_embed" in state:
        attention_type = "joint_space_time"
    else:
        attention_type = "space_only"
    released, heads = default_heads(dim), overrides.get("num_attention_heads")
    if heads is None and released is None:
        raise ValueError(
            f"{source}: the weights are {dim} wide, not a released ViT's width "
            f"({', '.join(map(str, RELEASED_HEADS))}), and their head count is not stored with them: pass "
            f"num_attention_heads=... (model.num_attention_heads in train.py), or write a folder that keeps it, once: "
            f"TimeSformer.from_pretrained(path, num_attention_heads=N).save_pretrained(folder)")
    if heads is None:
        log.info("%s: num_attention_heads not stored with the weights: assuming %d heads of %d (the released ViTs and "
                 "TimeSformers of width %d); pass num_attention_heads=... for others", source, released,
                 dim // released, dim)
    elif released is not None and heads != released:
        log.warning("%s: %d heads of %d (num_attention_heads=%d), where the released ViTs of width %d have %d heads "
                    "of %d; the weights do not store it: check it is the head count they were trained with", source,
                    heads, dim // heads, heads, dim, released, dim // released)
    values: dict[str, Any] = dict(
        hidden_size=dim,
        patch_size=patch,
        num_channels=state["patch_embed.proj.weight"].shape[1],
        image_size=grid * patch,
        num_hidden_layers=len({k.split(".")[1] for k in state if k.startswith("blocks.")}),
        num_attention_heads=heads or released,
        intermediate_size=state["blocks.0.mlp.fc1.weight"].shape[0],
        qkv_bias="blocks.0.attn.qkv.bias" in state,
        attention_type=attention_type,
    )
    if "head.weight" in state:  # an image ViT saved without its classifier has none
        values["num_classes"] = state["head.weight"].shape[0]
    if "time_embed" in state:
        values["num_frames"] = state["time_embed"].shape[1]
    values.update(overrides)
    return TimeSformerConfig(**values)


def read_image_vit(path: Path) -> dict[str, torch.Tensor]:
    """An image ViT state dict in timm's ``VisionTransformer`` names from a .pth/.bin/.safetensors file.

    Accepts a bare state dict or one wrapped as ``{"model": ...}`` (DeiT, MAE) or ``{"state_dict": ...}``.
    Loaded with ``weights_only=True``: tensors and plain containers only, no arbitrary pickles.
    """
    path = Path(path)
    if path.is_dir():  # e.g. a timm model from the Hugging Face hub: config.json + model.safetensors
        inside = [path / name for name in ("model.safetensors", "pytorch_model.bin") if (path / name).is_file()]
        if not inside:
            raise FileNotFoundError(f"image ViT {path} is a folder without model.safetensors or pytorch_model.bin: "
                                    f"pass its weights file (.safetensors, .bin, .pth)")
        path = inside[0]
    if not path.is_file():
        raise FileNotFoundError(f"image ViT state dict {path} does not exist")
    state = _read_tensors(path)
    for wrapper in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict) or "cls_token" not in state or "pos_embed" not in state:
        keys = list(state) if isinstance(state, dict) else []
        hint = ("; it is a video TimeSformer (Hugging Face's names): start from it with model.pretrained="
                if any(key.startswith("timesformer.") for key in keys) else
                "; it is in Hugging Face's ViTModel names: load it with timm (timm.create_model(..., pretrained=True, "
                "pretrained_cfg_overlay=dict(file=...))) and save its state_dict()"
                if any(key.endswith("embeddings.cls_token") for key in keys) else "")
        raise ValueError(f"{path}: not an image ViT state dict in timm's names (no cls_token / pos_embed){hint}")
    positions = state["pos_embed"].shape[1]
    grid = int(round((positions - 1) ** 0.5))
    if grid * grid + 1 != positions:
        raise ValueError(
            f"{path}: pos_embed has {positions} positions, expected 1 (class token) + a square grid; ViTs without "
            f"a class-token position (timm's no_embed_class) or with register tokens are not supported"
        )
    return state


def _check_architecture(path: Path, stored: TimeSformerConfig, overrides: dict[str, Any],
                        unseen: tuple[str, ...] = (), kind: str = "") -> None:
    """Architecture fields in ``overrides`` must be the checkpoint's (``unseen``: fields it does not store; ``kind``:
    what it is, if not a TimeSformer of its attention type)."""
    differ = [f"{name}={overrides[name]!r} (it has {getattr(stored, name)!r})" for name in ARCHITECTURE_FIELDS
              if name in overrides and name not in unseen and overrides[name] != getattr(stored, name)]
    if differ:
        raise ValueError(
            f"{path} is {kind or f'a {stored.attention_type} TimeSformer'} of width {stored.hidden_size} and depth "
            f"{stored.num_hidden_layers}; its weights cannot be loaded into a model with {', '.join(differ)}. Use the "
            f"checkpoint's values (e.g. the model config it was trained with) or another checkpoint; only the frame "
            f"count and image size may differ (the time and position embeddings are resized)"
        )


def load_checkpoint_file(path: str | Path, option: str = "", mmap: bool = False) -> Any:
    """``torch.load`` of a checkpoint file on the CPU, with an error naming the file (and ``option``, e.g.
    "ckpt_path") when it is not one: pickle's own message (a text file, a truncated download) names nothing.

    Loaded with ``weights_only=True``: tensors, numbers, strings and containers of them, which is all that train.py
    checkpoints and the original repository's ``*.pyth`` (its config is a YAML string) hold. Other objects are
    refused with an error saying how to convert the file: unpickling them can run any code, and checkpoints are
    downloaded and shared. ``mmap``: tensors are read when used (a train.py checkpoint's optimizer state, twice the
    weights with AdamW, is not read for its config or weights); a file in torch's legacy (pre-1.6, not zip) format,
    which cannot be mapped, is read whole."""
    mmap = mmap and zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        # (any other refusal, e.g. "Unsupported operand", is a file that is not a pickle: an HTML page, a gzip file)
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if refused is None:
            raise ValueError(f"{option + '=' if option else ''}{path} cannot be read as a PyTorch checkpoint "
                             "(not a pickle torch can read); is it truncated, or another kind of file?") from error
        raise ValueError(
            f"{option + '=' if option else ''}{path} holds Python objects besides tensors and plain values (e.g. "
            f"{refused.group(1)}), which are not loaded: unpickling them can run any code. If you trust the file, "
            "load it with torch.load(PATH, weights_only=False) and save it again without them; for model.pretrained= "
            "its state dict is enough (a model's state_dict(), a checkpoint's 'state_dict' or 'model_state')"
        ) from error
    except Exception as error:
        raise ValueError(f"{option + '=' if option else ''}{path} cannot be read as a PyTorch checkpoint "
                         f"({type(error).__name__}: {error}); is it truncated, or another kind of file?") from error


def read_checkpoint(path: Path, **overrides: Any) -> tuple[TimeSformerConfig, dict[str, torch.Tensor]]:
    """Detect the format at ``path`` and return (config, state dict in our names).

    Formats: a Hugging Face folder (config.json + weights), an original checkpoint (``model_state`` with
    ``model.`` keys), a Lightning checkpoint written by our trainer (``state_dict`` + ``timesformer_config``),
    or a bare state dict in our names. ``overrides`` set config fields; architecture fields
    (``ARCHITECTURE_FIELDS``) other than the checkpoint's are an error, except those formats that hold only tensors
    (original checkpoints, state dicts) do not store: the head count, activation and norm epsilon.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is a folder without config.json: not a Hugging Face model folder")
        config, state = read_hf_folder(path)
        _check_architecture(path, config, overrides)
        return (TimeSformerConfig(**{**config.to_dict(), **overrides}) if overrides else config), state
    blob = load_checkpoint_file(path, mmap=True)
    if isinstance(blob, dict) and "timesformer_config" in blob and "state_dict" in blob:
        _check_architecture(path, TimeSformerConfig.from_dict(blob["timesformer_config"]), overrides)
        config = TimeSformerConfig.from_dict({**blob["timesformer_config"], **overrides})
        return config, strip_prefix(blob["state_dict"], "model.")
    state = blob.get("model_state", blob) if isinstance(blob, dict) else None
    if isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
        # The original saves model.state_dict() of its wrapper ("model." keys), under DataParallel / DDP with a
        # "module." prefix in front.
        if all(key.startswith("module.") for key in state):
            state = strip_prefix(state, "module.")
        if any(key.startswith("model.") for key in state):
            state = strip_prefix(state, "model.")
        if "cls_token" in state:
            heads = {k: v for k, v in overrides.items() if k == "num_attention_heads"}  # not in the shapes
            inferred = infer_config_from_state(state, path, **heads)
            _check_architecture(path, inferred, overrides, unseen=NOT_IN_THE_SHAPES)
            assumed = [f"{name}={getattr(inferred, name)!r}" for name in NOT_IN_THE_SHAPES if name not in overrides]
            if assumed and not (isinstance(blob, dict) and "model_state" in blob):  # (an original's are known)
                log.warning("%s holds weights alone: %s assumed (the defaults; pass others if it was trained with "
                            "them). TimeSformer.save_pretrained and train.py checkpoints keep them", path,
                            ", ".join(assumed))
            return TimeSformerConfig(**{**inferred.to_dict(), **overrides}), state
    raise ValueError(
        f"{path}: unrecognised checkpoint format (expected a Hugging Face folder, an original TimeSformer "
        f"*.pyth with 'model_state', a Lightning checkpoint from train.py, or a state dict)"
    )

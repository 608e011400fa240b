"""Where does the class token look? Attention rollout (Abnar & Zuidema, 2020) for TimeSformer.

Forward hooks record every attention's input; the attention probabilities are recomputed from it (the
model itself runs fused SDPA, which never materialises them). Each block's token mixing is written as one
(1 + T·N) x (1 + T·N) matrix over the clip's tokens (cls first, then frame-major patches: t·N + n), with the
residual as 0.5·I + 0.5·A, and the blocks' matrices are multiplied. The cls row of the product, over the
patches, is the map: (T, h, w). Divided, joint and space-only attention are supported.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from timesformer.model import TimeSformer
from timesformer.model.timesformer import layer_norm

SUPPORTED = ("divided_space_time", "joint_space_time", "space_only")


def _probabilities(attention: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Head-averaged softmax(q kᵀ / √d) of ``attention`` on its input (..., L, D) -> (..., L, L)."""
    *batch, length, dim = x.shape
    qkv = attention.qkv(x.reshape(-1, length, dim)).reshape(-1, length, 3, attention.num_heads, attention.head_dim)
    q, k, _ = qkv.float().permute(2, 0, 3, 1, 4).unbind(0)  # (S, H, L, head_dim), in float32 whatever the model's
    probabilities = (q @ k.transpose(-2, -1) * attention.head_dim**-0.5).softmax(dim=-1).mean(dim=1)
    return probabilities.reshape(*batch, length, length).cpu()  # the rollout's matrices live on the CPU


def _with_residual(mixing: torch.Tensor) -> torch.Tensor:
    """0.5·I + 0.5·A, rows renormalised: the residual stream carries half of each token forward."""
    mixing = 0.5 * mixing + 0.5 * torch.eye(mixing.shape[-1], dtype=mixing.dtype)
    return mixing / mixing.sum(dim=-1, keepdim=True)


@torch.no_grad()
def attention_rollout(model: TimeSformer, video: torch.Tensor) -> torch.Tensor:
    """Rolled-out cls-to-patch attention for one clip (T, C, H, W) -> (T, h, w) on the CPU, summing to 1.

    The model may be on any device and in any dtype (the clip is moved to it); its mode is left as it was.

    For space_only the frames never exchange information: each frame's own cls token is rolled out and the
    frames' maps are averaged (as the per-frame cls tokens are before the head).
    """
    attention_type = model.config.attention_type
    if attention_type not in SUPPORTED:
        raise ValueError(f"attention maps support attention_type in {SUPPORTED}, not {attention_type!r}")
    T, _, H, W = video.shape
    h, w = H // model.config.patch_size, W // model.config.patch_size
    N = h * w
    inputs: dict[nn.Module, torch.Tensor] = {}

    def record(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
        # The attention's own input: the block may hand over the pre-norm tokens with the norm to fold in.
        x, norm = args[0].detach(), kwargs.get("norm")
        inputs[module] = layer_norm(norm, x) if norm is not None else x

    hooks = [module.register_forward_hook(record, with_kwargs=True)
             for block in model.blocks for module in (getattr(block, "temporal_attn", None), block.attn) if module]
    was_training = model.training
    weight = model.patch_embed.proj.weight
    try:
        model.eval()(video.to(device=weight.device, dtype=weight.dtype).unsqueeze(0))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()

    if attention_type == "space_only":  # every frame on its own: (T, 1 + N, 1 + N) rollouts, one per frame
        rollout = torch.eye(1 + N).expand(T, -1, -1)
        for block in model.blocks:
            rollout = _with_residual(_probabilities(block.attn, inputs[block.attn])[0]) @ rollout
        cls_to_patches = rollout[:, 0, 1:].reshape(T, h, w) / T  # the frames' cls tokens are averaged
        return cls_to_patches / cls_to_patches.sum()

    size = 1 + T * N
    rollout = torch.eye(size)
    for block in model.blocks:
        spatial = _probabilities(block.attn, inputs[block.attn])[0]  # batch of one
        if attention_type == "joint_space_time":  # spatial: (1 + T·N, 1 + T·N), tokens already in our order
            mixing = _with_residual(spatial)
        else:  # divided: temporal (N, T, T) per position, then spatial (T, 1 + N, 1 + N) per frame
            temporal = _probabilities(block.temporal_attn, inputs[block.temporal_attn])[0]
            time_mix = torch.eye(size)
            for n in range(N):
                tokens = torch.tensor([1 + t * N + n for t in range(T)])
                time_mix[tokens[:, None], tokens] = _with_residual(temporal[n])
            space_mix = torch.zeros(size, size)
            for t in range(T):
                frame = torch.tensor([0] + [1 + t * N + n for n in range(N)])
                block_mix = _with_residual(spatial[t])
                space_mix[frame[1:, None], frame] = block_mix[1:]
                space_mix[0, frame] += block_mix[0] / T  # the T cls copies are averaged
            mixing = space_mix @ time_mix
        rollout = mixing @ rollout
    cls_to_patches = rollout[0, 1:].reshape(T, h, w)
    return cls_to_patches / cls_to_patches.sum()


def overlay_frames(video: torch.Tensor, heatmap: torch.Tensor, mean: tuple[float, ...],
                   std: tuple[float, ...]) -> torch.Tensor:
    """Normalised clip (T, C, H, W) + map (T, h, w) -> uint8 frames (T, H, W, 3) with the map overlaid."""
    import matplotlib

    colormap = matplotlib.colormaps["jet"]
    T, _, H, W = video.shape
    frames = video.float() * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
    frames = frames.clamp(0, 1).permute(0, 2, 3, 1)  # (T, H, W, 3)
    heat = torch.nn.functional.interpolate(heatmap[:, None], size=(H, W), mode="bilinear", align_corners=False)[:, 0]
    heat = (heat / heat.max().clamp(min=1e-12)).clamp(0, 1)  # one scale for the whole clip
    colours = torch.from_numpy(colormap(heat.numpy())[..., :3]).float()  # (T, H, W, 3)
    blended = 0.55 * frames + 0.45 * colours
    return (blended * 255).round().to(torch.uint8)


def save_attention_figures(frames: torch.Tensor, output_stem: Path, title: str = "", fps: int = 4) -> list[Path]:
    """uint8 (T, H, W, 3) overlays -> ``<stem>.png`` (a grid of the frames) and ``<stem>.gif``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    output_stem.parent.mkdir(parents=True, exist_ok=True)
    T = frames.shape[0]
    columns = min(T, 8)
    rows = -(-T // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(2 * columns, 2 * rows + 0.4), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < T:
            ax.imshow(frames[i].numpy())
            ax.set_title(f"frame {i}", fontsize=8)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    # appended, not with_suffix: the stem may end in the video's own suffix (clip.mp4 and clip.avi differ)
    png, gif = (output_stem.with_name(f"{output_stem.name}{suffix}") for suffix in (".png", ".gif"))
    figure.savefig(png, dpi=100)
    plt.close(figure)
    images = [Image.fromarray(frame.numpy()) for frame in frames]
    images[0].save(gif, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return [png, gif]

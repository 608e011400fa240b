"""GPU benchmark: TimeSformer-base 8x224 in bf16, ours (eager and torch.compile) against Hugging Face's on one GPU.

    python benchmarks/gpu.py                  # a CUDA GPU: about 5 minutes on an H100/H200
    python benchmarks/gpu.py --quick          # tiny sizes, runs on the CPU too (a smoke test of this script)

Sections, each printed as a table when done and saved to --out (gpu.md, gpu.json) as it goes:
0. Attention kernels: forward + backward of one attention call over 50,176 tokens cut into sequences of L (the
   model's layout), for the model's short-sequence path and each SDPA backend: why SHORT_SEQUENCE is what it is.
0b. The fused short-sequence kernel (``model.fused_short_attention``) alone, forward and backward timed apart, at
   every launch that fits its registers: which launch its ops should use, and how close it gets to memory speed.
1. The device and its ceilings: a bf16 8192x8192x8192 matrix product's rate, measured, next to the datasheet's
   dense bf16 peak, which MFU is computed against (the usual convention).
2. Parity on this device: ours and HF with the same weights (a random HF model saved with save_pretrained and
   read by ``TimeSformer.from_pretrained``), same input: logits in fp32 and under bf16 autocast.
3. Training throughput (--variants; --profile adds a kernel-time breakdown): clips/s of a full step (bf16
   autocast forward, cross-entropy, backward, fused AdamW) at one batch size, peak memory, and
   MFU = 3 x forward FLOPs per clip x clips/s / peak. Forward FLOPs are counted by
   ``timesformer.profile.count_flops`` (one multiply-add = 2 FLOPs here).
3b. train.py's loop: the same model and batch through ``VideoClassifier`` in a Lightning ``Trainer``, fed uint8
   clips by a DataLoader and normalised on the device, against the bare step: what the framework costs.
4. Inference with 3 views (3 spatial crops per video, the paper's test protocol): clips/s and videos/s.
5. Largest training batch (eager): predicted from the peak memory at two batch sizes, then run.
6. Cost growth on the GPU: a training step (forward + backward, batch 1) against frames and resolution for
   every attention scheme, ours and HF (HF has divided and joint only; out-of-memory is reported as such).

Times are medians over repeated steps timed with CUDA events, after warm-up steps (torch.compile's compilation is
reported apart). Inputs are random (never zeros) and two input batches alternate.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Before CUDA starts: segments that grow rather than fragment (the largest-batch search relies on it).
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout, installed or not

import transformers  # noqa: E402

from benchmarks.run import ATTENTION_TYPES, SHORT, Case, HFModel, build_pair, markdown_table  # noqa: E402
from timesformer.model import TimeSformer, TimeSformerConfig  # noqa: E402
from timesformer.profile import count_flops, datasheet_bf16_tflops  # noqa: E402

VIEWS = 3  # spatial crops per video at test time
# HF compiled too: "2x HF" must hold against HF at its best, compiled against compiled (HF compiles without a
# graph break; Inductor fuses its copies and elementwise work, half of its kernel time in GPU run 6)
DEFAULT_VARIANTS = ("HF eager", "HF torch.compile", "ours eager", "ours torch.compile")
HF_ATTENTION_TYPES = ("divided_space_time", "joint_space_time")  # the schemes HF has (space_only differs: per frame)


# -- measuring ----------------------------------------------------------------------------------------------------
def median_seconds(fn: Callable[[], Any], steps: int, warmup: int, device: torch.device) -> float:
    """Median time of ``fn()`` over ``steps`` calls after ``warmup`` calls; CUDA events on a GPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak device memory allocated while ``fn()`` runs, everything resident included (0 on the CPU)."""
    if device.type != "cuda":
        fn()
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def free_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Trainer:
    """One training step of ``model`` (video -> logits): bf16 autocast forward, cross-entropy, backward, AdamW."""

    def __init__(self, model: Callable, parameters: list[torch.nn.Parameter], device: torch.device,
                 dtype: torch.dtype) -> None:
        self.model, self.device, self.dtype = model, device, dtype
        self.optimizer = torch.optim.AdamW(parameters, lr=1e-4, fused=device.type == "cuda")

    def step(self, video: torch.Tensor, labels: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=self.dtype):
            loss = F.cross_entropy(self.model(video), labels)
        loss.backward()
        self.optimizer.step()


def inputs(batch: int, case: Case, device: torch.device, count: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` random (video, labels) batches on the device (they alternate, so no step reuses a cached input)."""
    generator = torch.Generator(device).manual_seed(0)
    return [(torch.randn(batch, case.frames, 3, case.image_size, case.image_size, device=device,
                         generator=generator),
             torch.randint(0, 400, (batch,), device=device, generator=generator)) for _ in range(count)]


def cycling(fn: Callable[[torch.Tensor, torch.Tensor], Any],
            batches: list[tuple[torch.Tensor, torch.Tensor]]) -> Callable[[], Any]:
    state = {"i": 0}

    def call() -> Any:
        state["i"] += 1
        return fn(*batches[state["i"] % len(batches)])

    return call


# -- sections -----------------------------------------------------------------------------------------------------
def device_section(device: torch.device, quick: bool) -> dict[str, Any]:
    if device.type != "cuda":
        return {"name": "cpu", "datasheet_tflops": None, "matmul_tflops": None, "torch": torch.__version__}
    props = torch.cuda.get_device_properties(device)
    n = 2048 if quick else 8192
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    seconds = median_seconds(lambda: a @ b, steps=10, warmup=3, device=device)
    name = props.name
    datasheet = datasheet_bf16_tflops(name)
    return {"name": name, "multiprocessors": props.multi_processor_count, "memory_gib": props.total_memory / 2**30,
            "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
            "matmul_tflops": 2 * n**3 / seconds / 1e12, "datasheet_tflops": datasheet}


def parity_section(case: Case, device: torch.device) -> dict[str, Any]:
    ours, hf = build_pair(case)
    ours.to(device).eval()
    hf.model.to(device).eval()
    video = torch.randn(2, case.frames, 3, case.image_size, case.image_size, device=device)
    result = {}
    with torch.no_grad():
        reference = hf(video).float()
        result["fp32_max_abs_diff"] = (ours(video).float() - reference).abs().max().item()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            ours_bf16, hf_bf16 = ours(video).float(), hf(video).float()
    scale = reference.norm().item()
    result["bf16_ours_rel_err"] = (ours_bf16 - reference).norm().item() / scale
    result["bf16_hf_rel_err"] = (hf_bf16 - reference).norm().item() / scale
    return result


def with_config(ours: TimeSformer, **changes: Any) -> TimeSformer:
    """The same weights in a model whose config has ``changes`` (e.g. memory_saving_backward=False)."""
    other = TimeSformer(dataclasses.replace(ours.config, **changes))
    other.load_state_dict(ours.state_dict())
    return other


def as_train_py_builds_it(ours: TimeSformer) -> TimeSformer:
    """``ours`` with the speed and memory settings train.py gives it (configs/model/base.yaml; the sections after
    the training variants measure what a user runs)."""
    base = yaml.safe_load((ROOT / "configs" / "model" / "base.yaml").read_text())
    return with_config(ours, **{name: base[name] for name in ("memory_saving_backward", "bf16_residual_stream",
                                                                "drop_path_rate")})


class WithAttentionBackend:
    """Calls ``model`` with SDPA restricted to ``backend`` (its backward then uses the same kernel family)."""

    def __init__(self, model: Callable, backend: SDPBackend) -> None:
        self.model, self.backend = model, backend

    def __call__(self, video: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel(self.backend):
            return self.model(video)


# What a training variant's name may add after "ours eager" or "ours torch.compile", comma-separated, in any
# combination: "ours torch.compile, bf16 residual stream, plain autograd, max-autotune".
VARIANT_OPTIONS = {
    "bf16 residual stream": "bf16_residual_stream=True (train.py's setting)",
    "plain autograd": "memory_saving_backward=False",
    "fused short attention": "fused_short_attention=True: sequences of at most 16 tokens (the time attention) as "
                             "one Triton kernel per pass",
    "as written": "both shortcuts off: proj and <name>_fc as two layers, every token in the last block",
    "max-autotune": "torch.compile(mode='max-autotune-no-cudagraphs'): Inductor benchmarks GEMM and Triton "
                    "configurations per shape (minutes of compilation)",
    "cuDNN attention": "SDPA restricted to cuDNN's kernel",
    "flash attention": "SDPA restricted to the flash kernel",
}


def variant_parts(name: str) -> tuple[str, list[str]]:
    """A training variant's name -> (base, options), or a ValueError naming the valid ones."""
    if name in ("HF eager", "HF torch.compile"):
        return name, []
    base, *options = [part.strip() for part in name.split(",")]
    unknown = [option for option in options if option not in VARIANT_OPTIONS]
    if base not in ("ours eager", "ours torch.compile") or unknown:
        raise ValueError(f"unknown training variant {name!r}: 'HF eager', 'HF torch.compile', or 'ours eager' / "
                         "'ours torch.compile' "
                         f"followed by any of {sorted(VARIANT_OPTIONS)}, comma-separated")
    if "max-autotune" in options and base == "ours eager":
        raise ValueError(f"{name!r}: max-autotune is a torch.compile mode")
    return base, options


def training_variant(name: str, ours: TimeSformer, hf: HFModel) -> tuple[Callable, torch.nn.Module]:
    """(callable video -> logits, the module holding its parameters) for a variant's name: "HF eager", "HF
    torch.compile", or "ours eager" / "ours torch.compile" followed by options from VARIANT_OPTIONS."""
    base, options = variant_parts(name)
    if base == "HF eager":
        return hf, hf.model
    if base == "HF torch.compile":
        return HFModel(torch.compile(hf.model)), hf.model
    model = with_config(ours, bf16_residual_stream="bf16 residual stream" in options,
                        memory_saving_backward="plain autograd" not in options,
                        fused_short_attention="fused short attention" in options)
    model.use_shortcuts("as written" not in options)
    run: Callable = model
    if base == "ours torch.compile":
        run = torch.compile(model, mode="max-autotune-no-cudagraphs" if "max-autotune" in options else None)
    for option, backend in (("cuDNN attention", SDPBackend.CUDNN_ATTENTION),
                            ("flash attention", SDPBackend.FLASH_ATTENTION)):
        if option in options:
            run = WithAttentionBackend(run, backend)
    return run, model


def training_variants(case: Case, names: list[str]) -> dict[str, tuple[Callable, torch.nn.Module]]:
    """name -> (callable video -> logits, the module holding its parameters), for the names asked for."""
    ours, hf = build_pair(case)
    return {name: training_variant(name, ours, hf) for name in names}


def kernel_profile(step: Callable[[], Any], steps: int = 2, top: int = 12) -> dict[str, Any]:
    """CUDA kernel time of ``steps`` steps by category (matmul, attention, fused by Triton, the rest) and the
    ``top`` kernels, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    kernels: dict[str, float] = {}
    for event in prof.events():
        if event.device_type.name == "CUDA":
            kernels[event.name] = kernels.get(event.name, 0.0) + event.device_time / 1000 / steps  # ms per step
    categories = {"attention": ("flash", "fmha", "attention", "sdpa", "softmax"),
                  "matmul": ("gemm", "nvjet", "cutlass", "xmma", "cublas"),
                  "triton (fused)": ("triton",), "norm": ("layer_norm", "layernorm"),
                  "copy/cat": ("copy", "cat", "transpose"), "elementwise/reduce": ("elementwise", "reduce")}
    by_category = {name: 0.0 for name in (*categories, "other")}
    for kernel, ms in kernels.items():
        lower = kernel.lower()
        category = next((c for c, keys in categories.items() if any(k in lower for k in keys)), "other")
        by_category[category] += ms
    return {"total_ms": sum(kernels.values()), "by_category_ms": by_category,
            "top": sorted(([k[:90], ms] for k, ms in kernels.items()), key=lambda km: -km[1])[:top]}


def attention_section(device: torch.device, quick: bool, steps: int) -> list[dict[str, Any]]:
    """Forward + backward of one attention call, bf16, in the model's layout, per kernel: the temporal attention
    of 50,176 tokens (32 clips x 196 positions x 8 frames) as sequences of L, and the spatial attention (L = 197).
    "short" is the model's ``short_sequence_attention``, "short fused" the Triton kernel of
    ``fused_short_attention`` (model.triton_short_attention)."""
    from timesformer.model.timesformer import short_sequence_attention

    def fused_short(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        from timesformer.model.triton_short_attention import short_attention

        return short_attention(q, k, v, q.shape[-1] ** -0.5)

    def sdpa(backend: SDPBackend) -> Callable[..., torch.Tensor]:
        def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v)
        return attention

    heads, head_dim, tokens = (2, 64, 2048) if quick else (12, 64, 32 * 196 * 8)
    lengths = (8, 16, 197) if quick else (8, 15, 16, 32, 64, 96, 197)
    kernels = {"short": short_sequence_attention, "short fused": fused_short, "SDPA math": sdpa(SDPBackend.MATH),
               "SDPA flash": sdpa(SDPBackend.FLASH_ATTENTION), "SDPA efficient": sdpa(SDPBackend.EFFICIENT_ATTENTION),
               "SDPA cuDNN": sdpa(SDPBackend.CUDNN_ATTENTION)}
    rows = []
    for length in lengths:
        sequences = tokens // length
        q, k, v = (torch.randn(sequences, length, heads, head_dim, device=device, dtype=torch.bfloat16)
                   .transpose(1, 2).requires_grad_() for _ in range(3))  # (S, H, L, d) views, as in the model
        grad = torch.randn(sequences, heads, length, head_dim, device=device, dtype=torch.bfloat16)
        row = {"length": length, "sequences": sequences, "ms": {}}
        for name, attention in kernels.items():
            def step(attention=attention, q=q, k=k, v=v, grad=grad) -> None:
                torch.autograd.grad(attention(q, k, v), (q, k, v), grad)

            try:
                row["ms"][name] = 1000 * median_seconds(step, steps=steps, warmup=2, device=device)
            except Exception as error:  # noqa: BLE001 (a kernel that does not take these inputs)
                row["ms"][name] = None
                row.setdefault("unsupported", {})[name] = str(error).splitlines()[0][:120]
        rows.append(row)
        print(f"  L={length}: " + ", ".join(f"{n} {ms:.2f} ms" if ms else f"{n} -" for n, ms in row["ms"].items()),
              flush=True)
    return rows


def fused_launch_section(device: torch.device, quick: bool, steps: int) -> list[dict[str, Any]]:
    """The fused short-sequence kernel at every launch of ``launch_candidates`` (rows per program, warps), bf16,
    forward and backward apart, on the time attention of 32 clips x 196 positions at 8 and 16 frames, laid out as
    in the model (q, k, v views of one qkv projection's output; the output's gradient as SDPA's output is laid
    out). GB/s counts the bytes a pass must move (forward: q, k, v read, the output written; backward: those
    four read, dq, dk, dv written). Each launch's results are compared with the default launch's. Without a GPU
    (or Triton's interpreter, ``TRITON_INTERPRET=1``) there is nothing to run: no rows."""
    try:
        from timesformer.model import triton_short_attention as fused
    except ImportError as error:
        print(f"  skipped: {error}", flush=True)
        return []
    if device.type != "cuda" and not fused.INTERPRETED:
        print("  skipped: the kernel needs a CUDA GPU (or TRITON_INTERPRET=1)", flush=True)
        return []
    heads, head_dim, sequences = (2, 64, 4) if quick else (12, 64, 32 * 196)
    scale = head_dim ** -0.5
    rows = []
    for length in (8, 16):
        qkv = torch.randn(sequences, length, 3 * heads * head_dim, device=device, dtype=torch.bfloat16)
        q, k, v = (t.reshape(sequences, length, heads, head_dim).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        grad = torch.randn(sequences, length, heads, head_dim, device=device, dtype=torch.bfloat16).transpose(1, 2)
        default = fused.default_launch(length, head_dim)
        reference = [fused.attention_forward(q, k, v, scale, default).float(),
                     *(g.float() for g in fused.attention_backward(grad, q, k, v, scale, default))]
        tensor_bytes = q.numel() * q.element_size()
        for launch in fused.launch_candidates(length, head_dim):
            def forward(launch=launch, q=q, k=k, v=v) -> torch.Tensor:
                return fused.attention_forward(q, k, v, scale, launch)

            def backward(launch=launch, q=q, k=k, v=v, grad=grad) -> tuple[torch.Tensor, ...]:
                return fused.attention_backward(grad, q, k, v, scale, launch)

            results = [forward(), *backward()]
            forward_s = median_seconds(forward, steps=steps, warmup=2, device=device)
            backward_s = median_seconds(backward, steps=steps, warmup=2, device=device)
            rows.append({"length": length, "sequences": sequences, "heads": heads, "rows": launch["ROWS"],
                         "warps": launch["num_warps"], "default": launch == default,
                         "forward_ms": 1000 * forward_s, "backward_ms": 1000 * backward_s,
                         "forward_gb_per_s": 4 * tensor_bytes / forward_s / 1e9,
                         "backward_gb_per_s": 7 * tensor_bytes / backward_s / 1e9,
                         "max_diff_from_default": max((r.float() - d).abs().max().item()
                                                      for r, d in zip(results, reference, strict=True))})
            print(f"  L={length} rows {launch['ROWS']} warps {launch['num_warps']}: forward "
                  f"{rows[-1]['forward_ms']:.3f} ms, backward {rows[-1]['backward_ms']:.3f} ms", flush=True)
    return rows


def training_section(case: Case, batch: int, device: torch.device, steps: int, variant_names: list[str],
                     flops_per_clip: float, peak_tflops: float | None, profile: bool,
                     after_each: Callable[[list[dict[str, Any]]], None] = lambda rows: None) -> list[dict[str, Any]]:
    """Training clips/s, peak memory and MFU of each variant at ``batch``; ``after_each(rows so far)`` after each
    variant (main saves them: a run cut short in the next variant's compile keeps the ones measured)."""
    variants = training_variants(case, variant_names)
    batches = inputs(batch, case, device)
    rows = []
    for name, (model, module) in variants.items():
        module.to(device).train()
        trainer = Trainer(model, list(module.parameters()), device, torch.bfloat16)
        step = cycling(trainer.step, batches)
        try:
            first = time.perf_counter()
            step()  # compiles, for the compiled variant
            if device.type == "cuda":
                torch.cuda.synchronize()
            first = time.perf_counter() - first
            seconds = median_seconds(step, steps=steps, warmup=2, device=device)
            peak = peak_bytes(step, device)
            clips = batch / seconds
            rows.append({"variant": name, "batch": batch, "step_s": seconds, "clips_per_s": clips,
                         "peak_gib": peak / 2**30, "first_step_s": first,
                         "mfu": clips * 3 * flops_per_clip / (peak_tflops * 1e12) if peak_tflops else None})
            print(f"  {name}: {clips:.1f} clips/s, peak {peak / 2**30:.1f} GiB, first step {first:.1f} s", flush=True)
            if profile and device.type == "cuda":
                try:
                    rows[-1]["profile"] = kernel_profile(step)
                    print(f"    kernel ms per step: {json.dumps(rows[-1]['profile']['by_category_ms'])}", flush=True)
                except Exception as error:  # noqa: BLE001 (a profiler failure leaves the timing)
                    rows[-1]["profile"] = {"error": f"{type(error).__name__}: {error}"}
        except Exception as error:  # noqa: BLE001 (one variant failing leaves the others' figures)
            report_error(rows, name, error)
        del trainer, step
        module.to("cpu")
        free_memory()
        after_each(rows)
    return rows


def lightning_section(case: Case, batch: int, device: torch.device, steps: int, compiled: bool,
                      flops_per_clip: float, peak_tflops: float | None, quick: bool) -> list[dict[str, Any]]:
    """What train.py's loop costs over the bare step of section 3: the same model and batch through
    ``VideoClassifier`` in a Lightning ``Trainer`` (bf16-mixed, fused AdamW, the non-finite-loss check, accuracy
    metrics, logging), fed uint8 clips by a DataLoader (pinned memory, 4 workers) and normalised on the device."""
    import lightning as L
    from lightning.pytorch.loggers import Logger

    from timesformer.callbacks import TrainingSpeed
    from timesformer.module import VideoClassifier

    warmup = 3
    clips = torch.randint(0, 256, (4, case.frames, 3, case.image_size, case.image_size), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0))

    class Clips(torch.utils.data.Dataset):  # what the datasets return: uint8 (T, C, H, W), a label, an index
        def __len__(self) -> int:
            return batch * (warmup + steps)

        def __getitem__(self, index: int) -> dict[str, Any]:
            return {"video": clips[index % len(clips)].clone(), "label": index % 400, "index": index}

    class Data(L.LightningDataModule):
        def train_dataloader(self) -> torch.utils.data.DataLoader:
            workers = 0 if quick else 4
            # (fork: Clips is local, which spawn and forkserver, Python 3.14's default, cannot pickle)
            return torch.utils.data.DataLoader(Clips(), batch_size=batch, num_workers=workers, drop_last=True,
                                               pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                                               multiprocessing_context="fork" if workers else None)

        def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
            # timesformer.data.normalize's work (that package imports the video decoders, absent on GPU images)
            batch["video"] = (batch["video"].float() / 255 - 0.45) / 0.225
            return batch

    class Clock(L.Callback):
        """Seconds from the first timed batch's start to the end of training, the GPU drained at both ends; and the
        GPU's idle time from the forward's end (the non-finite flag computed) to the backward's first kernel: the
        time between two CUDA events, recorded then and when backward() starts (the second runs as soon as the GPU
        reaches it if the host has already queued it, so idle time only is counted). On the CPU: host time."""

        def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
            reduce, self.marks = trainer.strategy.reduce, []

            def reduce_then_mark(*args: Any, **kwargs: Any) -> Any:
                flag = reduce(*args, **kwargs)
                self.forward_end = self.mark()
                return flag

            trainer.strategy.reduce = reduce_then_mark

        @staticmethod
        def mark() -> Any:
            if device.type != "cuda":
                return time.perf_counter()
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event

        def on_before_backward(self, trainer: L.Trainer, module: L.LightningModule, loss: torch.Tensor) -> None:
            self.marks.append((self.forward_end, self.mark()))

        def idle_before_backward_s(self) -> list[float]:
            if device.type != "cuda":
                return [end - start for start, end in self.marks]
            return [start.elapsed_time(end) / 1000 for start, end in self.marks]  # after on_train_end's sync

        def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, index: int) -> None:
            if index == warmup:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                self.start = time.perf_counter()

        def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
            if device.type == "cuda":
                torch.cuda.synchronize()
            self.seconds = time.perf_counter() - self.start

    class Collect(Logger):
        """Keeps what TrainingSpeed logs (its clips/s and MFU are checked against the clock here)."""

        def __init__(self) -> None:
            super().__init__()
            self.rows: list[dict[str, float]] = []

        name, version = "collect", 0

        def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
            self.rows.append(metrics)

        def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
            pass

    rows = []
    for variant in ["ours eager", *(["ours torch.compile"] if compiled else [])]:
        model = as_train_py_builds_it(build_pair(case)[0]).to(device).train()
        try:
            bare = Trainer(torch.compile(model) if "compile" in variant else model, list(model.parameters()),
                           device, torch.bfloat16)
            step = cycling(bare.step, inputs(batch, case, device))
            step()
            bare_s = median_seconds(step, steps=steps, warmup=2, device=device)
            del bare, step
            model.zero_grad(set_to_none=True)
            free_memory()
            module = VideoClassifier(model, optimizer={"name": "adamw", "lr": 1e-4, "weight_decay": 0.05},
                                     scheduler={"name": "cosine", "warmup_epochs": 0.1}, compile="compile" in variant)
            clock, logged = Clock(), Collect()
            # TrainingSpeed logs once, over batches 1 to warmup + steps - 1 (it leaves the first out)
            trainer = L.Trainer(accelerator=device.type, devices=1, precision="bf16-mixed", max_epochs=1,
                                logger=logged, log_every_n_steps=warmup + steps - 1, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                                callbacks=[clock, TrainingSpeed(peak_tflops)])
            trainer.fit(module, datamodule=Data())
            loop_s = clock.seconds / steps
            speed = next((r for r in logged.rows if "perf/clips_per_s" in r), {})
            rows.append({"variant": variant, "batch": batch, "bare_step_s": bare_s, "lightning_step_s": loop_s,
                         "lightning_clips_per_s": batch / loop_s, "lightning_vs_bare": bare_s / loop_s,
                         "idle_before_backward_s": statistics.median(clock.idle_before_backward_s()[warmup:]),
                         "mfu": batch / loop_s * 3 * flops_per_clip / (peak_tflops * 1e12) if peak_tflops else None,
                         "training_speed_clips_per_s": speed.get("perf/clips_per_s"),
                         "training_speed_mfu": speed.get("perf/mfu"),
                         "training_speed_data_wait": speed.get("perf/data_wait_fraction")})
            print(f"  {variant}: bare step {bare_s * 1000:.1f} ms, Lightning {loop_s * 1000:.1f} ms per step",
                  flush=True)
        except Exception as error:  # noqa: BLE001 (one variant failing leaves the other's figures)
            report_error(rows, variant, error)
        model.to("cpu")
        free_memory()
    return rows


def report_error(rows: list[dict[str, Any]], variant: str, error: BaseException) -> None:
    import traceback

    traceback.print_exc()
    rows.append({"variant": variant, "error": f"{type(error).__name__}: {str(error)[:300]}"})


def inference_section(case: Case, videos: int, device: torch.device, steps: int,
                      compile_: bool) -> list[dict[str, Any]]:
    """Clips/s of a bf16 forward over ``videos`` x 3 views (one batch), and videos/s."""
    ours, hf = build_pair(case)
    ours = as_train_py_builds_it(ours)
    variants = {"HF eager": (hf, hf.model), "ours eager": (ours, ours)}
    if compile_:
        variants["HF torch.compile"] = (HFModel(torch.compile(hf.model)), hf.model)
        variants["ours torch.compile"] = (torch.compile(ours), ours)
    batches = inputs(videos * VIEWS, case, device)
    rows = []
    for name, (model, module) in variants.items():
        module.to(device).eval()

        def forward(video: torch.Tensor, labels: torch.Tensor, model=model) -> torch.Tensor:
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
                logits = model(video)
            return logits.float().softmax(-1).view(-1, VIEWS, logits.shape[-1]).mean(1)  # one per video

        call = cycling(forward, batches)
        try:
            first = time.perf_counter()
            call()
            if device.type == "cuda":
                torch.cuda.synchronize()
            first = time.perf_counter() - first
            seconds = median_seconds(call, steps=steps, warmup=2, device=device)
            rows.append({"variant": name, "clips": videos * VIEWS, "clips_per_s": videos * VIEWS / seconds,
                         "videos_per_s": videos / seconds, "first_call_s": first,
                         "peak_gib": peak_bytes(call, device) / 2**30})
            print(f"  {name}: {rows[-1]['clips_per_s']:.1f} clips/s", flush=True)
        except Exception as error:  # noqa: BLE001
            report_error(rows, name, error)
        module.to("cpu")
        free_memory()
    return rows


def largest_batch_section(case: Case, device: torch.device, small: int, large: int,
                          tries: int = 4) -> list[dict[str, Any]]:
    """Eager training steps: peak memory at two batch sizes gives memory per clip; the batch that fills the device
    is predicted from it, then run (5% smaller after an out-of-memory, ``tries`` times)."""
    ours, hf = build_pair(case)
    ours = as_train_py_builds_it(ours)
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 0
    rows = []
    for name, (model, module) in {"HF eager": (hf, hf.model), "ours eager": (ours, ours)}.items():
        module.to(device).train()
        trainer = Trainer(model, list(module.parameters()), device, torch.bfloat16)
        peaks = {}
        for batch in (small, large):
            step = cycling(trainer.step, inputs(batch, case, device, count=1))
            step()
            peaks[batch] = peak_bytes(step, device)
            del step
            free_memory()
        per_clip = (peaks[large] - peaks[small]) / (large - small)
        fixed = peaks[small] - small * per_clip  # weights, gradients, optimizer states, workspaces
        batch = int((0.97 * total - fixed) / per_clip) if total else large
        row = {"variant": name, "per_clip_gib": per_clip / 2**30, "fixed_gib": fixed / 2**30,
               "predicted": batch, "largest_run": None, "out_of_memory_at": []}
        for _ in range(tries):
            try:
                step = cycling(trainer.step, inputs(batch, case, device, count=1))
                row["peak_gib"] = peak_bytes(step, device) / 2**30
                row["largest_run"] = batch
                break
            except Exception as error:  # noqa: BLE001 (only out-of-memory is expected)
                if not is_out_of_memory(error):
                    raise
                row["out_of_memory_at"].append(batch)
                batch = int(batch * 0.95)
            finally:
                step = None
                trainer.optimizer.zero_grad(set_to_none=True)
                free_memory()
        rows.append(row)
        print(f"  {name}: {per_clip / 2**30:.3f} GiB per clip, largest batch run {row['largest_run']}", flush=True)
        del trainer
        module.to("cpu")
        free_memory()
    return rows


def growth_section(points: list[tuple[int, int]], width: int, depth: int, device: torch.device,
                   steps: int) -> list[dict[str, Any]]:
    """Forward + backward (no optimizer) at batch 1 for every scheme and point; HF for divided and joint."""
    rows = []
    for attention_type in ATTENTION_TYPES:
        for frames, size in points:
            case = Case(attention_type, frames, size, depth=depth, width=width)
            builders = {"ours": lambda case=case: TimeSformer(TimeSformerConfig(**case.config()))}
            if attention_type in HF_ATTENTION_TYPES:
                builders["HF"] = lambda case=case: HFModel(transformers.TimesformerForVideoClassification(
                    transformers.TimesformerConfig(**case.config(), num_labels=400)))
            for name, build in builders.items():
                with torch.device(device):  # random weights, initialised on the device (fast)
                    model = build()
                module = model.model if isinstance(model, HFModel) else model
                module.train()
                video, labels = inputs(1, case, device, count=1)[0]

                def step(model=model, module=module, video=video, labels=labels) -> None:
                    module.zero_grad(set_to_none=True)
                    with torch.autocast(device.type, dtype=torch.bfloat16):
                        loss = F.cross_entropy(model(video), labels)
                    loss.backward()

                row = {"attention_type": attention_type, "frames": frames, "image_size": size, "model": name,
                       "tokens": frames * (size // 16) ** 2}
                try:
                    step()
                    module.zero_grad(set_to_none=True)
                    resident = torch.cuda.memory_allocated() if device.type == "cuda" else 0
                    row["peak_gib"] = (peak_bytes(step, device) - resident) / 2**30
                    row["step_s"] = median_seconds(step, steps=steps, warmup=1, device=device)
                except Exception as error:  # noqa: BLE001
                    if not is_out_of_memory(error):
                        raise
                    row["out_of_memory"] = True
                rows.append(row)
                del model, module, step
                free_memory()
            print(f"  {SHORT[attention_type]} {frames}x{size}: " + ", ".join(
                f"{r['model']} " + (f"{r['step_s'] * 1000:.0f} ms {r['peak_gib']:.2f} GiB" if "step_s" in r
                                    else "out of memory") for r in rows if r["frames"] == frames
                and r["image_size"] == size and r["attention_type"] == attention_type), flush=True)
    return rows


# -- report -------------------------------------------------------------------------------------------------------
def report(results: dict[str, Any]) -> str:
    dev = results["device"]
    parts = [f"device: {dev['name']}" + (f", {dev['multiprocessors']} SMs, {dev['memory_gib']:.0f} GiB; torch "
                                         f"{dev['torch']} (CUDA {dev['cuda']}), transformers {dev['transformers']}; "
                                         f"bf16 matmul measured {dev['matmul_tflops']:.0f} TFLOP/s, datasheet "
                                         f"{dev['datasheet_tflops']} TFLOP/s (MFU's denominator)"
                                         if dev.get("matmul_tflops") else "")]
    if "parity" in results:
        p = results["parity"]
        parts.append(f"\nparity, same weights: fp32 max |logit diff| {p['fp32_max_abs_diff']:.2e}; bf16 autocast "
                     f"relative error vs HF fp32: ours {p['bf16_ours_rel_err']:.2e}, HF {p['bf16_hf_rel_err']:.2e}")
    if results.get("training") and any("error" not in r for r in results["training"]):
        rows = [r for r in results["training"] if "error" not in r]
        hf = next((r for r in rows if r["variant"] == "HF eager"), rows[0] if rows else None)
        hf_compiled = next((r for r in rows if r["variant"] == "HF torch.compile"), None)
        parts += [f"\n### Training, {results['case_label']}, bf16 autocast, batch {hf['batch']}, AdamW step included\n",
                  markdown_table(["variant", "clips/s", "vs HF", "vs HF compiled", "step ms", "MFU", "peak GiB",
                                  "first step s"], [
                      [r["variant"], f"{r['clips_per_s']:.1f}", f"{r['clips_per_s'] / hf['clips_per_s']:.2f}x",
                       f"{r['clips_per_s'] / hf_compiled['clips_per_s']:.2f}x" if hf_compiled else "-",
                       f"{r['step_s'] * 1000:.1f}", f"{100 * r['mfu']:.1f}%" if r["mfu"] else "-",
                       f"{r['peak_gib']:.1f}", f"{r['first_step_s']:.1f}"] for r in rows])]
    if results.get("lightning") and any("error" not in r for r in results["lightning"]):
        rows = [r for r in results["lightning"] if "error" not in r]
        parts += [f"\n### train.py's loop (Lightning, uint8 clips from 4 workers) against the bare step, batch "
                  f"{rows[0]['batch']}, ours as configs/model/base.yaml builds it\n",
                  markdown_table(["variant", "bare step ms", "Lightning step ms", "Lightning clips/s",
                                  "Lightning / bare speed", "GPU idle before backward ms", "MFU",
                                  "TrainingSpeed clips/s, MFU, data wait"], [
                      [r["variant"], f"{r['bare_step_s'] * 1000:.1f}", f"{r['lightning_step_s'] * 1000:.1f}",
                       f"{r['lightning_clips_per_s']:.1f}", f"{r['lightning_vs_bare']:.3f}",
                       f"{r['idle_before_backward_s'] * 1000:.2f}",
                       f"{100 * r['mfu']:.1f}%" if r["mfu"] else "-",
                       (f"{r['training_speed_clips_per_s']:.1f}, "
                        + (f"{100 * r['training_speed_mfu']:.1f}%" if r["training_speed_mfu"] else "-")
                        + f", {r['training_speed_data_wait']:.3f}") if r["training_speed_clips_per_s"] else "-"]
                      for r in rows])]
    if results.get("inference") and any("error" not in r for r in results["inference"]):
        rows = [r for r in results["inference"] if "error" not in r]
        hf = next((r for r in rows if r["variant"] == "HF eager"), rows[0] if rows else None)
        hf_compiled = next((r for r in rows if r["variant"] == "HF torch.compile"), None)
        parts += [f"\n### Inference, {VIEWS} views per video, bf16, {hf['clips']} clips per forward, ours as "
                  "configs/model/base.yaml builds it\n",
                  markdown_table(["variant", "clips/s", "videos/s", "vs HF", "vs HF compiled", "peak GiB",
                                  "first call s"], [
                      [r["variant"], f"{r['clips_per_s']:.1f}", f"{r['videos_per_s']:.1f}",
                       f"{r['clips_per_s'] / hf['clips_per_s']:.2f}x",
                       f"{r['clips_per_s'] / hf_compiled['clips_per_s']:.2f}x" if hf_compiled else "-",
                       f"{r['peak_gib']:.1f}",
                       f"{r['first_call_s']:.1f}"] for r in rows])]
    if "largest_batch" in results:
        parts += ["\n### Largest training batch (eager, bf16), ours as configs/model/base.yaml builds it\n",
                  markdown_table(["variant", "GiB per clip", "fixed GiB", "predicted", "largest run", "its peak GiB",
                                  "out of memory at"], [
                      [r["variant"], f"{r['per_clip_gib']:.3f}", f"{r['fixed_gib']:.1f}", str(r["predicted"]),
                       str(r["largest_run"]), f"{r.get('peak_gib', 0):.1f}",
                       ", ".join(map(str, r["out_of_memory_at"])) or "-"] for r in results["largest_batch"]])]
    if "attention" in results:
        names = list(results["attention"][0]["ms"])
        tokens = results["attention"][0]["sequences"] * results["attention"][0]["length"]
        parts += [f"\n### One attention call, forward + backward, bf16, {tokens:,} tokens as sequences of L, ms\n",
                  markdown_table(["L", "sequences", *names], [
                      [str(r["length"]), str(r["sequences"]),
                       *[f"{r['ms'][n]:.2f}" if r["ms"][n] else "n/a" for n in names]] for r in results["attention"]])]
    if results.get("fused_launch"):
        first = results["fused_launch"][0]
        parts += [f"\n### The fused short-sequence kernel per launch, bf16, {first['sequences']:,} sequences x "
                  f"{first['heads']} heads (* = the default launch)\n",
                  markdown_table(["L", "rows per program", "warps", "forward ms", "forward GB/s", "backward ms",
                                  "backward GB/s", "max diff from default"], [
                      [str(r["length"]), str(r["rows"]) + ("*" if r["default"] else ""), str(r["warps"]),
                       f"{r['forward_ms']:.3f}", f"{r['forward_gb_per_s']:.1f}", f"{r['backward_ms']:.3f}",
                       f"{r['backward_gb_per_s']:.1f}", f"{r['max_diff_from_default']:.1e}"]
                      for r in results["fused_launch"]])]
    if "growth" in results:
        rows = results["growth"]
        points = sorted({(r["frames"], r["image_size"]) for r in rows}, key=lambda p: (p[1], p[0]))
        header = ["attention", "model", *[f"{f}x{s}" for f, s in points]]

        def table(cell: Callable[[dict], str]) -> str:
            lines = []
            for attention_type in ATTENTION_TYPES:
                for model in ("ours", "HF"):
                    found = {(r["frames"], r["image_size"]): r for r in rows
                             if r["attention_type"] == attention_type and r["model"] == model}
                    if found:
                        lines.append([SHORT[attention_type], model, *[
                            cell(found[p]) if p in found else "-" for p in points]])
            return markdown_table(header, lines)

        parts += ["\n### Training step (fwd+bwd, batch 1, bf16) ms\n",
                  table(lambda r: "OOM" if r.get("out_of_memory") else f"{r['step_s'] * 1000:.1f}"),
                  "\n### Peak training-step memory above the weights, GiB\n",
                  table(lambda r: "OOM" if r.get("out_of_memory") else f"{r['peak_gib']:.2f}")]
    return "\n".join(parts)


# -- main ---------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few steps: a smoke test (CPU is fine)")
    parser.add_argument("--batch", type=int, default=32, help="training batch (clips)")
    parser.add_argument("--videos", type=int, default=32, help=f"inference batch, videos of {VIEWS} views")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS),
                        help="training variants (default: %(default)s): 'HF eager', 'HF torch.compile', or "
                             "'ours eager' / 'ours torch.compile' followed by comma-separated options: "
                             + "; ".join(f"'{k}': {v}" for k, v in VARIANT_OPTIONS.items()))
    parser.add_argument("--profile", action="store_true", help="a kernel-time breakdown of each training variant")
    parser.add_argument("--only", nargs="+", choices=("attention", "fused_launch", "parity", "training", "lightning",
                                                      "inference", "largest_batch", "growth"),
                        help="run these sections only")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="skip the sections that start after this many seconds (their results are lost)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="where gpu.md/.json go")
    args = parser.parse_args(argv)
    for name in args.variants:  # (at once, not when the training section starts minutes later)
        try:
            variant_parts(name)
        except ValueError as error:
            parser.error(str(error))

    start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.quick:  # (the full sizes ran on the CPU for the whole time limit)
        parser.error("torch sees no CUDA device (torch.cuda.is_available() is False; a driver too old for this "
                     "torch?): --quick is the CPU smoke test")
    if args.quick:
        case, batch, videos, steps = Case("divided_space_time", 4, 64, depth=2, width=128), 4, 2, 2
        growth_points, growth_width, growth_depth = [(4, 64), (8, 64), (4, 96)], 128, 1
    else:
        case, batch, videos, steps = Case("divided_space_time", 8, 224, depth=12), args.batch, args.videos, 10
        growth_points, growth_width, growth_depth = [(8, 224), (16, 224), (32, 224), (64, 224), (96, 224),
                                                     (8, 448)], 768, 12
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"case_label": f"{case.label}, {case.depth} blocks, width {case.width}"}
    results["device"] = device_section(device, args.quick)
    flops_per_clip = 2 * count_flops(TimeSformerConfig(**case.config()))  # forward, 2 FLOPs per multiply-add
    results["forward_gflops_per_clip"] = flops_per_clip / 1e9
    peak_tflops = results["device"]["datasheet_tflops"] or results["device"]["matmul_tflops"]
    compile_ = not args.no_compile
    variants = [v for v in args.variants if compile_ or "compile" not in v]

    def save(**partial: Any) -> None:
        """Write what is measured so far (with a section's rows so far, ``partial``) to gpu.json and gpu.md."""
        so_far = {**results, **partial, "elapsed_s": time.perf_counter() - start}
        (args.out / "gpu.json").write_text(json.dumps(so_far, indent=1))
        (args.out / "gpu.md").write_text(report(so_far) + "\n")

    sections = {
        "attention": lambda: attention_section(device, args.quick, steps),
        "fused_launch": lambda: fused_launch_section(device, args.quick, steps),
        "parity": lambda: parity_section(case, device),
        "training": lambda: training_section(case, batch, device, steps, variants, flops_per_clip, peak_tflops,
                                             args.profile, after_each=lambda rows: save(training=rows)),
        "lightning": lambda: lightning_section(case, batch, device, steps, compile_, flops_per_clip, peak_tflops,
                                               args.quick),
        "largest_batch": lambda: largest_batch_section(case, device, small=max(1, batch // 4), large=batch),
        "inference": lambda: inference_section(case, videos, device, steps, compile_),
        "growth": lambda: growth_section(growth_points, growth_width, growth_depth, device, steps=3),
    }
    for name, run in sections.items():
        if args.only and name not in args.only:
            continue
        elapsed = time.perf_counter() - start
        if args.budget_s is not None and elapsed > args.budget_s:
            print(f"{name}: skipped, {elapsed:.0f} s spent of the {args.budget_s:.0f} s budget", flush=True)
            results.setdefault("skipped", []).append(name)
            continue
        print(f"{name} ...", flush=True)
        try:
            results[name] = run()
        except Exception as error:  # noqa: BLE001 (the other sections still run; the error is reported)
            import traceback

            traceback.print_exc()
            results.setdefault("errors", {})[name] = f"{type(error).__name__}: {error}"
        save()
    print("\n" + report(results))
    failed = {**results.get("errors", {}), **{f"{section} / {r['variant']}": r["error"] for section in
                                               ("training", "inference") for r in results.get(section, [])
                                               if "error" in r}}
    if failed:
        print(f"\nerrors: {failed}")
    print(f"\nwritten to {args.out} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()

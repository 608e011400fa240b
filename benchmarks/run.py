"""Benchmarks: our TimeSformer against Hugging Face's, and how the attention schemes' cost grows.

    python benchmarks/run.py                # everything: about 10 minutes on 2 CPU cores
    python benchmarks/run.py --quick        # every measurement at a tiny size (smoke test, ~20 s)
    python benchmarks/run.py --only hf      # part 1 only (--only growth: part 2, --only data: part 3)

1. Ours vs Hugging Face ``TimesformerForVideoClassification``: the same weights (a random HF model saved with
   save_pretrained and read by ``TimeSformer.from_pretrained``), the same input, fp32, eager, on the CPU:
   forward time, forward+backward time and peak training memory; then our model under ``torch.compile``
   (compile time apart from the steady-state step time). Measured at 1 and 2 blocks: the difference is the cost
   of one more block, from which a 12-block model is extrapolated.
2. Cost growth: time and peak memory of one training step against frames and resolution, for every attention
   scheme (the paper's Fig. 3, with memory-efficient attention).
3. The data pipeline (benchmarks/data_pipeline.py, also runnable alone): decode + augment clips/s per worker,
   ours (decord, PyAV) against a plain PyAV decode, repeated augmentation, the DataLoader, what a GPU needs.

Tables are printed and written, with a plot and the raw numbers, to benchmarks/results/ (git-ignored). How
each number is measured, and why, is in benchmarks/README.md. In short: every measurement runs in a worker
subprocess (``--worker``); times are medians of repeats, ours and the baseline interleaved in one process;
peak memory is the peak resident set size during a training step minus the resident size just before it, in a
process whose malloc returns every freed block of 64 KiB or more to the OS.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import dataclasses
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
ATTENTION_TYPES = ("divided_space_time", "space_only", "joint_space_time", "sparse_local_global", "axial")
SHORT = {"divided_space_time": "divided (T+S)", "space_only": "space (S)", "joint_space_time": "joint (ST)",
         "sparse_local_global": "local-global (L+G)", "axial": "axial (T+W+H)"}
# glibc: serve every allocation of 64 KiB or more with its own mmap, unmapped when freed (no dynamic threshold),
# so that the resident set size follows the live tensors. Only for the memory workers: a fresh mapping for every
# tensor costs time (~10% of a training step here).
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072"}
FULL_DEPTH = 12  # TimeSformer-base


@dataclass(frozen=True)
class Case:
    """A model and a clip: ViT width ``width`` (heads of 64, MLP 4x), ``depth`` blocks, batch ``batch``."""

    attention_type: str
    frames: int
    image_size: int
    depth: int
    width: int = 768
    batch: int = 1

    @property
    def label(self) -> str:
        return f"{SHORT[self.attention_type]} {self.frames}x{self.image_size}"

    def config(self) -> dict[str, Any]:
        """TimeSformerConfig / transformers.TimesformerConfig fields (the names are the same)."""
        return dict(attention_type=self.attention_type, num_frames=self.frames, image_size=self.image_size,
                    num_hidden_layers=self.depth, hidden_size=self.width, num_attention_heads=self.width // 64,
                    intermediate_size=4 * self.width)


# -- sizes ----------------------------------------------------------------------------------------------------
# Part 1, (case, repeats, torch.compile it too): ViT-B width, batch 1, at 1 and 2 blocks: the difference is the cost
# of a block that is not the last (ours computes only the class token in the last block). Joint: 3 repeats (HF's
# joint step at 16 frames takes 3-7 s a block here).
HF_PLAN = [(Case("divided_space_time", 8, 224, depth=1), 7, False),
           (Case("divided_space_time", 8, 224, depth=2), 7, True),
           (Case("joint_space_time", 16, 224, depth=1), 3, False),
           (Case("joint_space_time", 16, 224, depth=2), 3, True)]
# Part 2: one block of ViT-B width, batch 1. Frames at 224 px, then 448 px at 8 frames.
GROWTH_DEPTH = 1
GROWTH_POINTS = [(8, 224), (16, 224), (32, 224), (64, 224), (96, 224), (8, 448)]
# Points whose forward pass needs more multiply-adds than this are skipped (joint attention at 96 frames would take
# minutes per step here); the table says so.
GROWTH_MAX_GFLOPS = 400.0
# --quick: the same measurements on a tiny model (width 128), one thread.
# Memory only, at larger batches: the weights (and their gradients) are the same in both models, so the weights'
# share of the whole peak, and the ratio counted with them, depends on the batch.
HF_MEMORY_BATCH_PLAN = [Case("divided_space_time", 8, 224, depth=depth, batch=batch) for batch in (2, 4)
                        for depth in (1, 2)]
QUICK_HF_PLAN = [(Case("divided_space_time", 4, 64, depth=1, width=128), 2, False),
                 (Case("divided_space_time", 4, 64, depth=2, width=128), 2, False),
                 (Case("joint_space_time", 8, 64, depth=1, width=128), 2, False),
                 (Case("joint_space_time", 8, 64, depth=2, width=128), 2, False)]
QUICK_HF_MEMORY_BATCH_PLAN = [Case("divided_space_time", 4, 64, depth=depth, width=128, batch=2) for depth in (1, 2)]
QUICK_GROWTH_POINTS = [(4, 64), (8, 64), (4, 96)]
QUICK_WIDTH = 128


# -- measuring (in the workers) -------------------------------------------------------------------------------
def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def time_and_peak_memory(fn) -> tuple[float, float]:
    """Seconds ``fn()`` takes, and its peak resident set size above the resident size just before it, in MiB.

    Linux: writing 5 to /proc/self/clear_refs resets the high-water mark VmHWM to the current VmRSS.
    """
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_bytes("VmRSS")
    seconds = timed(fn)
    return seconds, (_status_bytes("VmHWM") - before) / 2**20


def build_pair(case: Case):
    """A random HF model, and ours loaded from its save_pretrained folder; both in train mode."""
    import torch
    import transformers

    from timesformer import TimeSformer

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    config = transformers.TimesformerConfig(**case.config(), id2label={i: str(i) for i in range(400)})
    hf = transformers.TimesformerForVideoClassification(config)
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        ours = TimeSformer.from_pretrained(folder)
    return ours.train(), HFModel(hf.train())


class HFModel:
    """HF's model called like ours: video -> logits."""

    def __init__(self, model) -> None:
        self.model = model

    def __call__(self, video):
        return self.model(pixel_values=video).logits

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.model.zero_grad(set_to_none=set_to_none)

    def parameters(self):
        return self.model.parameters()


def make_input(case: Case):
    import torch

    generator = torch.Generator().manual_seed(0)
    video = torch.randn(case.batch, case.frames, 3, case.image_size, case.image_size, generator=generator)
    return video, torch.zeros(case.batch, dtype=torch.long)


def train_step(model, video, labels) -> None:
    """Forward + backward of a cross-entropy loss; the gradients are freed first (set to None)."""
    import torch.nn.functional as F

    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(video), labels).backward()


def training_macs(model, video, labels) -> int:
    """Multiply-adds of one training step (matmuls, convolutions, attention) as ``FlopCounterMode`` counts them, plus
    what it leaves out on the CPU: in-place ``addmm_`` (our backward's) and SDPA's CPU flash attention."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten
    uncounted = {  # formulas on shapes, in FLOPs (2 per multiply-add), as the counter's own
        aten.addmm_: lambda bias, a, b, **_: 2 * a[0] * a[1] * b[1],
        aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *_, **__: sdpa_flop_count(q, k, v),
        aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda grad, q, k, v, *_, **__: sdpa_backward_flop_count(grad, q, k, v),
    }
    with FlopCounterMode(display=False, custom_mapping=uncounted) as counter:
        train_step(model, video, labels)
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() // 2


def hf_speed(plan: list[tuple[Case, int, bool]]) -> list[dict]:
    """Part 1 times. All models are built (and compiled) first; then, repeat after repeat, every case takes its turn:
    one training step of ours, of HF (and of ours compiled), then one forward pass of each. A slow spell of the
    shared machine then hits all of them alike. Medians over the repeats."""
    import torch

    runs = []
    for case, repeats, compile_ in plan:
        ours, hf = build_pair(case)
        video, labels = make_input(case)
        with torch.no_grad():
            max_diff = (ours(video) - hf(video)).abs().max().item()
        # ours_as_written: the same model without its shortcuts (training steps only), what they gain
        models = {"ours": ours, "hf": hf, "ours_as_written": copy.deepcopy(ours).use_shortcuts(False)}
        result = {"case": dataclasses.asdict(case), "max_abs_logit_diff": max_diff,
                  "step_all_s": {name: [] for name in (*models, *(["ours_compiled"] if compile_ else []))},
                  "forward_all_s": {"ours": [], "hf": []}}
        if compile_:
            models["ours_compiled"] = torch.compile(ours)
            result["first_compiled_step_s"] = timed(partial(train_step, models["ours_compiled"], video, labels))
        for name in ("ours", "hf", "ours_as_written"):  # warm-up
            train_step(models[name], video, labels)
        runs.append((repeats, models, video, labels, result))
    for repeat in range(max(repeats for repeats, *_ in runs)):
        for repeats, models, video, labels, result in runs:
            if repeat >= repeats:
                continue
            for name, model in models.items():
                result["step_all_s"][name].append(timed(partial(train_step, model, video, labels)))
            with torch.no_grad():
                for name in result["forward_all_s"]:
                    result["forward_all_s"][name].append(timed(partial(models[name], video)))
    results = []
    for *_, result in runs:
        for kind in ("step", "forward"):
            result[f"{kind}_s"] = {k: statistics.median(v) for k, v in result[f"{kind}_all_s"].items()}
        if "first_compiled_step_s" in result:
            result["compile_s"] = result["first_compiled_step_s"] - result["step_s"]["ours_compiled"]
        results.append(result)
        print(f"  {Case(**result['case']).label}, {result['case']['depth']} block(s): step {result['step_s']}",
              file=sys.stderr, flush=True)
    return results


def hf_memory(plan: list[tuple[Case, int, bool]], count_macs: bool = True) -> list[dict]:
    """Part 1 memory: peak memory of a training step of ours and of HF, each after a warm-up step (the first
    step in a process also allocates one-off library buffers: up to ~40 MiB here). "peak_mib" is what the step adds
    to the process (activations, gradients, temporaries); "weights_mib" the parameters', resident before it."""
    results = []
    for case, _, _ in plan:
        ours, hf = build_pair(case)
        video, labels = make_input(case)
        peaks = {}
        for name, model in (("ours", ours), ("hf", hf)):
            train_step(model, video, labels)
            model.zero_grad(set_to_none=True)
            peaks[name] = time_and_peak_memory(partial(train_step, model, video, labels))[1]
            model.zero_grad(set_to_none=True)
        weights = {name: sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
                   for name, model in (("ours", ours), ("hf", hf))}
        macs = ({name: training_macs(model, video, labels) for name, model in (("ours", ours), ("hf", hf))}
                if count_macs else None)
        results.append({"case": dataclasses.asdict(case), "peak_mib": peaks, "weights_mib": weights,
                        "train_macs": macs})
        print(f"  {case.label}, {case.depth} block(s): peak MiB {peaks}, training MACs {macs}", file=sys.stderr,
              flush=True)
        del ours, hf, model
        gc.collect()
    return results


def growth(cases: list[Case], gflops: list[float], min_seconds: float) -> list[dict]:
    """Part 2. Per case: the peak memory of one training step, then the median time of the steps after it, repeated
    until ``min_seconds`` (at least 1, at most 3: the memory step, a case's first, pays its one-off costs and is not
    timed). Runs in a memory worker (MEMORY_ENV): times include its fresh-page costs."""
    from timesformer import TimeSformer, TimeSformerConfig

    results = []
    for i, (case, case_gflops) in enumerate(zip(cases, gflops, strict=True)):
        model = TimeSformer(TimeSformerConfig(**case.config())).train()
        model.last_block_cls_only = False  # a block as all but a model's last run: every token's output
        video, labels = make_input(case)
        step = partial(train_step, model, video, labels)
        if i == 0:  # warm-up: the first step in a process also allocates one-off library buffers
            step()
            model.zero_grad(set_to_none=True)
        _, peak = time_and_peak_memory(step)
        times = [timed(step)]
        while sum(times) < min_seconds and len(times) < 3:
            times.append(timed(step))
        results.append({"case": dataclasses.asdict(case), "gflops": case_gflops,
                        "tokens": case.frames * (case.image_size // 16) ** 2,
                        "step_s": statistics.median(times), "step_all_s": times, "peak_mib": peak})
        print(f"  {case.label}: {results[-1]['step_s']:.2f} s, {peak:.0f} MiB", file=sys.stderr, flush=True)
        del model
        gc.collect()
    return results


def run_worker(task: dict) -> dict:
    import torch

    if task.get("threads"):
        torch.set_num_threads(task["threads"])
    plan = [(Case(**case), repeats, compile_) for case, repeats, compile_ in task.get("plan", [])]
    jobs = {"speed": lambda: hf_speed(plan), "memory": lambda: hf_memory(plan),
            "memory_by_batch": lambda: hf_memory([(Case(**case), 1, False) for case in task["batch_plan"]],
                                                 count_macs=False),
            "growth": lambda: growth([Case(**c) for c in task["cases"]], task["gflops"], task["min_seconds"])}
    return {"threads": torch.get_num_threads(), **{job: jobs[job]() for job in task["jobs"]}}


def in_worker(task: dict, env: dict[str, str] | None = None) -> dict:
    """Run ``task`` in a fresh ``python benchmarks/run.py --worker`` process; returns its result."""
    full_env = {**os.environ, **(env or {}), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    with tempfile.TemporaryDirectory() as cache:  # a cold torch.compile cache: compile times are reproducible
        full_env["TORCHINDUCTOR_CACHE_DIR"] = cache
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(task)], env=full_env, cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {task['jobs']} failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- tables and plot ------------------------------------------------------------------------------------------
def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def _pair(ours: float, hf: float, digits: int) -> str:
    return f"{ours:.{digits}f} / {hf:.{digits}f}"


def _plus(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: a[k] + b[k] for k in ("ours", "hf")}


def _ratio(memory: dict[str, float]) -> str:
    return f"{memory['ours'] / memory['hf']:.2f}"


def memory_batch_rows(memory: list[dict], memory_by_batch: list[dict]) -> list[list[str]]:
    """Per (case, batch): the 12-block model's step memory extrapolated from 1 and 2 blocks, alone and with the
    weights (and with AdamW's two states per weight, counted, not measured)."""
    by_key = {}
    for entry in [*memory, *memory_by_batch]:
        case = Case(**entry["case"])
        by_key.setdefault((case.label, case.batch), {})[case.depth] = (entry["peak_mib"], entry["weights_mib"])
    rows = []
    for (label, batch), by_depth in sorted(by_key.items()):
        if not {1, 2} <= set(by_depth) or label not in {Case(**e["case"]).label for e in memory_by_batch}:
            continue
        (m1, w1), (m2, w2) = by_depth[1], by_depth[2]
        m = {k: m1[k] + (FULL_DEPTH - 1) * (m2[k] - m1[k]) for k in ("ours", "hf")}
        w = {k: w1[k] + (FULL_DEPTH - 1) * (w2[k] - w1[k]) for k in ("ours", "hf")}
        rows.append([label, str(batch), _pair(m["ours"], m["hf"], 0), _ratio(m), f"{w['ours']:.0f}",
                     _ratio(_plus(m, w)), _ratio(_plus(m, {k: 3 * v for k, v in w.items()}))])
    return rows


def hf_report(speed: list[dict], memory: list[dict], targets: bool = True,
              memory_by_batch: list[dict] = ()) -> tuple[str, list[str]]:
    """Markdown tables of part 1, and one line per target (met or not). Peak memory is reported as the step's own
    (what it adds: activations, gradients, temporaries) and with the weights, which both models hold throughout."""
    peaks = {json.dumps(m["case"], sort_keys=True): m["peak_mib"] for m in memory}
    macs = {json.dumps(m["case"], sort_keys=True): m["train_macs"] for m in memory}
    weights = {json.dumps(m["case"], sort_keys=True): m["weights_mib"] for m in memory}
    # (attention, frames, size) -> {depth: (forward, step, peak, multiply-adds, weights)}, each {"ours": x, "hf": x}
    rows = {}
    raw = {}  # the same -> {depth: (forward times, step times)}, each {"ours": [s, ...], "hf": [s, ...]}
    measured, compiled, shortcuts = [], [], []
    for s in speed:
        case = Case(**s["case"])
        f, t, m = s["forward_s"], s["step_s"], peaks[json.dumps(s["case"], sort_keys=True)]
        c, w = macs[json.dumps(s["case"], sort_keys=True)], weights[json.dumps(s["case"], sort_keys=True)]
        rows.setdefault((case.attention_type, case.frames, case.image_size), {})[case.depth] = (f, t, m, c, w)
        raw.setdefault((case.attention_type, case.frames, case.image_size), {})[case.depth] = (
            s["forward_all_s"], s["step_all_s"])
        measured.append([case.label, str(case.depth), _pair(f["ours"], f["hf"], 3), f"{f['hf'] / f['ours']:.2f}x",
                         _pair(t["ours"], t["hf"], 3), f"{t['hf'] / t['ours']:.2f}x", _pair(m["ours"], m["hf"], 0),
                         f"{m['ours'] / m['hf']:.2f}", _ratio(_plus(m, w)), _pair(c["ours"] / 1e9, c["hf"] / 1e9, 2),
                         f"{c['hf'] / c['ours']:.2f}x", f"{s['max_abs_logit_diff']:.1e}"])
        shortcuts.append([case.label, str(case.depth), _pair(t["ours"], t["ours_as_written"], 3),
                          f"{t['ours_as_written'] / t['ours']:.3f}x"])
        if "compile_s" in s:
            compiled.append([case.label, str(case.depth), f"{s['compile_s']:.1f}", f"{t['ours_compiled']:.3f}",
                             f"{t['ours'] / t['ours_compiled']:.2f}x", f"{t['hf'] / t['ours_compiled']:.2f}x"])
    # Per block: the 2-block minus the 1-block model (times: the median of the differences within each repeat).
    # 12 blocks: the 1-block model plus 11 more blocks.
    derived, target_lines = [], []
    for (attention_type, frames, size), by_depth in rows.items():
        label = f"{SHORT[attention_type]} {frames}x{size}"
        if 1 in by_depth and 2 in by_depth:
            (f1, t1, m1, c1, w1), (_, t2, m2, c2, w2) = by_depth[1], by_depth[2]
            one, two = raw[(attention_type, frames, size)][1], raw[(attention_type, frames, size)][2]
            per_block = [{k: statistics.median(b - a for a, b in zip(times1[k], times2[k], strict=True))
                          for k in ("ours", "hf")} for times1, times2 in zip(one, two, strict=True)]  # fwd, step
            per_block.append({k: m2[k] - m1[k] for k in ("ours", "hf")})
            per_block.append({k: c2[k] - c1[k] for k in ("ours", "hf")})
            per_block.append({k: w2[k] - w1[k] for k in ("ours", "hf")})
            # The same from each model's fastest repeat: other jobs on the machine only ever add time, so the
            # fastest repeats are the least disturbed (timeit's reasoning); a second estimate of the same cost.
            fastest = [{k: min(times2[k]) - min(times1[k]) for k in ("ours", "hf")}
                       for times1, times2 in zip(one, two, strict=True)] + per_block[2:]
            full = [{k: one[k] + (FULL_DEPTH - 1) * more[k] for k in ("ours", "hf")}
                    for one, more in zip((f1, t1, m1, c1, w1), per_block, strict=True)]
            more = statistics.median(b - a for a, b in zip(one[1]["ours"], two[1]["ours"], strict=True))
            more_as_written = statistics.median(
                b - a for a, b in zip(one[1]["ours_as_written"], two[1]["ours_as_written"], strict=True))
            shortcuts.append([label, "one more block (2 - 1)", _pair(more, more_as_written, 3),
                              f"{more_as_written / more:.3f}x"])
            for name, (f, t, m, c, w) in (("one more block (2 - 1)", per_block),
                                          ("one more block, fastest repeats", fastest),
                                          (f"{FULL_DEPTH} blocks (extrapolated)", full)):
                derived.append([label, name, _pair(f["ours"], f["hf"], 3), f"{f['hf'] / f['ours']:.2f}x",
                                _pair(t["ours"], t["hf"], 3), f"{t['hf'] / t['ours']:.2f}x",
                                _pair(m["ours"], m["hf"], 0), f"{m['ours'] / m['hf']:.2f}", _ratio(_plus(m, w)),
                                _pair(c["ours"] / 1e9, c["hf"] / 1e9, 2), f"{c['hf'] / c['ours']:.2f}x"])
            evaluated = [("2 blocks", t2, m2, w2), ("per block", per_block[1], per_block[2], per_block[4]),
                         (f"{FULL_DEPTH} blocks", full[1], full[2], full[4])]
        else:
            depth = max(by_depth)
            _, t, m, _, w = by_depth[depth]
            evaluated = [(f"{depth} block(s)", t, m, w)]
        speedups = ", ".join(f"{name} {t['hf'] / t['ours']:.2f}x" for name, t, _, _ in evaluated)
        met = lambda ok: "met" if ok else "NOT met"  # noqa: E731
        target_lines.append(f"{label}: fwd+bwd speedup >= 1.25x: {speedups} -> "
                            f"{met(all(t['hf'] / t['ours'] >= 1.25 for _, t, _, _ in evaluated))}")
        for kind, total in (("the step's own", lambda m, w: m), ("with the weights", _plus)):
            ratios = [(name, total(m, w)["ours"] / total(m, w)["hf"]) for name, _, m, w in evaluated]
            target_lines.append(f"{label}: peak training memory <= 0.6x HF, {kind}, batch 1: "
                                f"{', '.join(f'{name} {ratio:.2f}' for name, ratio in ratios)} -> "
                                f"{met(all(ratio <= 0.6 for _, ratio in ratios))}")
    width = Case(**speed[0]["case"]).width
    text = [f"### Ours vs Hugging Face: fp32 eager, CPU, batch 1, width {width} ({width // 64} heads, "
            f"MLP {4 * width})\n",
            markdown_table(["case", "blocks", "forward s (ours / HF)", "speedup", "fwd+bwd s (ours / HF)", "speedup",
                            "peak train MiB (ours / HF)", "ours/HF", "ours/HF with weights",
                            "fwd+bwd GMACs (ours / HF)", "HF/ours", "max abs logit diff"], measured)]
    if derived:
        text += ["\n### Per block, and a full-depth model extrapolated from it\n",
                 markdown_table(["case", "", "forward s (ours / HF)", "speedup", "fwd+bwd s (ours / HF)", "speedup",
                                 "peak train MiB (ours / HF)", "ours/HF", "ours/HF with weights",
                                 "fwd+bwd GMACs (ours / HF)", "HF/ours"], derived)]
    if memory_by_batch:
        text += ["\n### Peak training memory against the batch (memory only; 12 blocks: 1 block + 11 x (2 - 1))\n",
                 markdown_table(["case", "batch", "step's own MiB (ours / HF)", "ours/HF", "weights MiB",
                                 "ours/HF with weights", "with weights and AdamW's 2 states"],
                                memory_batch_rows(memory, memory_by_batch))]
    text += ["\n### Ours against ours as written (no folded projections, every token in the last block): fwd+bwd s\n",
             markdown_table(["case", "blocks", "fwd+bwd s (ours / as written)", "speedup"], shortcuts)]
    if compiled:
        text += ["\n### Ours under torch.compile (training step; compile time apart, cold cache)\n",
                 markdown_table(["case", "blocks", "compile s", "fwd+bwd s", "vs ours eager", "vs HF eager"], compiled)]
    if targets:
        text += ["\n### Targets (eager vs eager)\n", *[f"- {line}" for line in target_lines]]
    return "\n".join(text), target_lines


def growth_report(results: list[dict], skipped: list[dict]) -> str:
    points = sorted({(r["case"]["frames"], r["case"]["image_size"]) for r in results + skipped},
                    key=lambda p: (p[1], p[0]))
    by_key = {(r["case"]["attention_type"], r["case"]["frames"], r["case"]["image_size"]): r for r in results}
    header = ["attention"] + [f"{t}x{s}" for t, s in points]
    c = Case(**(results + skipped)[0]["case"])
    title = (f"{c.depth} block(s) of width {c.width} ({c.width // 64} heads, MLP {4 * c.width}), batch {c.batch}, "
             "fp32, CPU, SDPA attention")

    def table(fmt) -> str:
        rows = []
        for attention_type in ATTENTION_TYPES:
            cells = [fmt(by_key[(attention_type, t, s)]) if (attention_type, t, s) in by_key else "skipped"
                     for t, s in points]
            rows.append([SHORT[attention_type], *cells])
        return markdown_table(header, rows)

    text = [f"### Training step (fwd+bwd) time, s: {title}\n", table(lambda r: f"{r['step_s']:.2f}"),
            f"\n### Peak training-step memory, MiB: {title}\n", table(lambda r: f"{r['peak_mib']:.0f}"),
            "\n### Forward GFLOPs (multiply-adds) of the same model\n", table(lambda r: f"{r['gflops']:.1f}")]
    if skipped:
        text.append(f"\nskipped: forward above {GROWTH_MAX_GFLOPS:.0f} GFLOPs (minutes per step on this machine)")
    return "\n".join(text)


def plot_growth(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    size = min(r["case"]["image_size"] for r in results)  # frames are swept at the smallest resolution,
    frames = min(r["case"]["frames"] for r in results)  # resolution at the fewest frames
    for attention_type in ATTENTION_TYPES:
        rows = [r for r in results if r["case"]["attention_type"] == attention_type]
        sweeps = (("frames", [r for r in rows if r["case"]["image_size"] == size], f"frames ({size} px)"),
                  ("image_size", [r for r in rows if r["case"]["frames"] == frames],
                   f"resolution, px ({frames} frames)"))
        for col, (key, sweep, xlabel) in enumerate(sweeps):
            sweep = sorted(sweep, key=lambda r: r["case"][key])
            xs = [r["case"][key] for r in sweep]
            axes[0, col].plot(xs, [r["step_s"] for r in sweep], marker="o", label=SHORT[attention_type])
            axes[1, col].plot(xs, [r["peak_mib"] for r in sweep], marker="o", label=SHORT[attention_type])
            axes[1, col].set_xlabel(xlabel)
    for row, ylabel in enumerate(("training step, s", "peak training memory, MiB")):
        for col in range(2):
            axes[row, col].set_ylabel(ylabel)
            axes[row, col].grid(alpha=0.3)
    axes[0, 0].legend()
    c = results[0]["case"]
    fig.suptitle(f"TimeSformer cost growth: {c['depth']} block(s) of width {c['width']}, batch {c['batch']}, "
                 "fp32, CPU, memory-efficient attention (SDPA)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine() -> str:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    versions = f"Python {platform.python_version()}, torch {torch.__version__}"
    try:
        import transformers

        versions += f", transformers {transformers.__version__}"
    except ImportError:
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{cpu}, {os.cpu_count()} cores, {versions}; load average at start {load}"


# -- main -----------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one thread, no torch.compile: a smoke test")
    parser.add_argument("--only", choices=("hf", "growth", "data"), help="run one part only")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile measurements")
    parser.add_argument("--threads", type=int, help="torch threads in the workers (default: torch's, all cores; "
                        "--quick: 1). One thread gives steadier ratios on a machine shared with other jobs")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where tables, plot and JSON go")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return

    start = time.perf_counter()
    # One thread for the tiny quick sizes: with two on a busy machine, every tiny op can wait for a descheduled
    # OpenMP thread (a 4 ms step then takes 400 ms).
    threads = args.threads or (1 if args.quick else None)
    args.out.mkdir(parents=True, exist_ok=True)
    info = machine()
    print(f"machine: {info}\n", flush=True)
    results: dict[str, Any] = {"machine": info, "quick": args.quick}

    hf_task = growth_task = None
    if args.only in (None, "hf"):
        plan = [(dataclasses.asdict(case), repeats, compile_ and not (args.quick or args.no_compile))
                for case, repeats, compile_ in (QUICK_HF_PLAN if args.quick else HF_PLAN)]
        batch_plan = [dataclasses.asdict(case) for case in (QUICK_HF_MEMORY_BATCH_PLAN if args.quick
                                                              else HF_MEMORY_BATCH_PLAN)]
        hf_task = {"plan": plan, "batch_plan": batch_plan, "threads": threads}
    if args.only in (None, "growth"):
        from timesformer.model import TimeSformerConfig
        from timesformer.profile import count_flops

        width, depth = (QUICK_WIDTH, 1) if args.quick else (768, GROWTH_DEPTH)
        cases = [Case(attention_type, frames, size, depth=depth, width=width)
                 for attention_type in ATTENTION_TYPES
                 for frames, size in (QUICK_GROWTH_POINTS if args.quick else GROWTH_POINTS)]
        gflops = [count_flops(TimeSformerConfig(**c.config())) / 1e9 for c in cases]
        run_them = [(c, g) for c, g in zip(cases, gflops, strict=True) if g <= GROWTH_MAX_GFLOPS]
        skipped = [{"case": dataclasses.asdict(c), "gflops": g} for c, g in zip(cases, gflops, strict=True)
                   if g > GROWTH_MAX_GFLOPS]
        growth_task = {"cases": [dataclasses.asdict(c) for c, _ in run_them], "gflops": [g for _, g in run_them],
                       "min_seconds": 0.0 if args.quick else 1.0, "threads": threads}

    out: dict[str, Any] = {}
    if args.quick:  # one process for everything (saves imports); its times are then less exact
        print("quick: both parts at tiny sizes, one worker ...", flush=True)
        jobs = (["speed", "memory", "memory_by_batch"] if hf_task else []) + (["growth"] if growth_task else [])
        out = in_worker({**(hf_task or {}), **(growth_task or {}), "jobs": jobs}, env=MEMORY_ENV)
    if hf_task:
        if not args.quick:  # times with the default malloc, memory with MEMORY_ENV
            print("part 1: ours vs Hugging Face ...", flush=True)
            out.update(in_worker({**hf_task, "jobs": ["speed"]}))
            out["memory"] = in_worker({**hf_task, "jobs": ["memory"]}, env=MEMORY_ENV)["memory"]
            print("part 1: memory at larger batches ...", flush=True)
            out["memory_by_batch"] = in_worker({**hf_task, "jobs": ["memory_by_batch"]},
                                               env=MEMORY_ENV)["memory_by_batch"]
        results["hf"] = {"threads": out["threads"], "speed": out["speed"], "memory": out["memory"],
                         "memory_by_batch": out["memory_by_batch"]}
        table, _ = hf_report(out["speed"], out["memory"], targets=not args.quick,
                             memory_by_batch=out["memory_by_batch"])
        (args.out / "hf_comparison.md").write_text(f"machine: {info}; {out['threads']} thread(s)\n\n{table}\n")
        print(f"{table}\n", flush=True)
    if growth_task:
        if not args.quick:
            print(f"part 2: cost growth, {len(run_them)} cases ...", flush=True)
            out.update(in_worker({**growth_task, "jobs": ["growth"]}, env=MEMORY_ENV))
        results["growth"] = out["growth"] + skipped
        table = growth_report(out["growth"], skipped)
        plot_growth(out["growth"], args.out / "cost_growth.png")
        (args.out / "cost_growth.md").write_text(f"machine: {info}; {out['threads']} thread(s)\n\n{table}\n\n"
                                                 "![cost growth](cost_growth.png)\n")
        print(f"{table}\n", flush=True)

    if args.only in (None, "data"):
        print("part 3: data pipeline ...", flush=True)
        command = [sys.executable, str(Path(__file__).with_name("data_pipeline.py")), "--out", str(args.out)]
        subprocess.run(command + (["--quick"] if args.quick else []), check=True, cwd=ROOT)

    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"written to {args.out} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # run from a checkout, installed or not
    main()

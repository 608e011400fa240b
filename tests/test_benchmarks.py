"""benchmarks/run.py runs (its --quick smoke mode), and the model's memory-saving backward passes are exact."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from timesformer import TimeSformer, TimeSformerConfig
from timesformer.model import ATTENTION_TYPES
from timesformer.model import timesformer as tsf

ROOT = Path(__file__).resolve().parents[1]


def test_quick_benchmark_prints_and_writes_its_tables(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("matplotlib")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = " ".join(proc.stdout.split())  # table cells are padded: compare with single spaces
    for header in ("| case | blocks | forward s (ours / HF) | speedup | fwd+bwd s (ours / HF) | speedup | "
                   "peak train MiB (ours / HF) | ours/HF | ours/HF with weights | fwd+bwd GMACs (ours / HF) | "
                   "HF/ours | max abs logit diff |",
                   "### Peak training memory against the batch",
                   "| case | batch | step's own MiB (ours / HF) | ours/HF | weights MiB | ours/HF with weights |",
                   "### Per block, and a full-depth model extrapolated from it",
                   "| divided (T+S) 4x64 | one more block, fastest repeats |",
                   "| joint (ST) 8x64 | one more block (2 - 1) |",
                   "| case | blocks | fwd+bwd s (ours / as written) | speedup |",
                   "### Training step (fwd+bwd) time, s: 1 block(s) of width 128",
                   "### Peak training-step memory, MiB",
                   "| attention | 4x64 | 8x64 | 4x96 |",
                   "| video | decoder | decode ms | augment ms | clips/s | decode speed vs baseline | "
                   "clips/s vs baseline | vs baseline, equal output | identical |",
                   "| video | decoder | k | clips/s per worker |", "| video | decoder | workers | clips/s |",
                   "| clips | ms per clip |"):
        assert header in out, f"{header!r} not in\n{out}"
    for name in ("divided (T+S)", "space (S)", "joint (ST)", "local-global (L+G)", "axial (T+W+H)"):
        assert f"| {name}" in out
    # Same frames, same crops: the baseline's clips and ours are element for element equal.
    assert "| NO |" not in out and out.count("| yes |") == 6
    assert "| float32 |" in out and "| uint8 |" in out
    for file in ("hf_comparison.md", "cost_growth.md", "cost_growth.png", "results.json", "data_pipeline.md"):
        assert (tmp_path / file).stat().st_size > 0


def test_gpu_benchmark_quick_runs_on_the_cpu(tmp_path):
    """benchmarks/gpu.py's smoke mode: every section runs (on the CPU here) and reports, with no errors."""
    pytest.importorskip("transformers")
    # (each option's own code path: test_gpu_benchmark_variant_names_combine_options_and_reject_unknown_ones)
    variants = ["HF eager", "ours eager", "ours eager, bf16 residual stream, plain autograd, as written"]
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--quick", "--no-compile",
                           "--variants", *variants, "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = " ".join(proc.stdout.split())
    for header in ("| L | sequences | short | short fused | SDPA math |",
                   "| variant | clips/s | vs HF | vs HF compiled | step ms | MFU |",
                   "| variant | clips/s | videos/s | vs HF | vs HF compiled |", "| variant | GiB per clip |",
                   "### Training step (fwd+bwd, batch 1, bf16) ms", "| joint (ST) | HF |",
                   "| variant | bare step ms | Lightning step ms | Lightning clips/s | Lightning / bare speed | "
                   "GPU idle before backward ms |"):
        assert header in out, f"{header!r} not in\n{out}"
    results = json.loads((tmp_path / "gpu.json").read_text())
    assert "errors" not in results and not any("error" in row for row in results["training"])
    assert [row["variant"] for row in results["training"]] == variants
    assert results["parity"]["fp32_max_abs_diff"] < 1e-4  # same weights, same logits
    assert all(row["ms"]["short"] > 0 for row in results["attention"])
    assert [row["variant"] for row in results["lightning"]] == ["ours eager"]  # train.py's loop ran, no error
    assert 0 < results["lightning"][0]["idle_before_backward_s"] < results["lightning"][0]["lightning_step_s"]


def test_gpu_benchmark_hands_on_each_training_variant_as_it_is_measured(tmp_path):
    """A lent GPU's call can be cut short at its time limit, most likely in a training variant's compile: main saves
    the variants measured so far, handed on by the training section after each one (gpu.json, gpu.md)."""
    pytest.importorskip("transformers")
    from benchmarks.gpu import training_section
    from benchmarks.run import Case

    handed_on = []
    rows = training_section(Case("divided_space_time", 2, 32, depth=1, width=64), 2, torch.device("cpu"), 1,
                            ["HF eager", "ours eager", "ours eager, cuDNN attention"], 1e9, None, False,
                            after_each=lambda so_far: handed_on.append([row["variant"] for row in so_far]))
    assert handed_on == [["HF eager"], ["HF eager", "ours eager"],
                         ["HF eager", "ours eager", "ours eager, cuDNN attention"]]
    assert "error" not in rows[1] and "error" in rows[2]  # no cuDNN on the CPU: a variant that fails is handed on too


def test_gpu_benchmark_variant_names_combine_options_and_reject_unknown_ones():
    """A training variant's name is 'ours eager' / 'ours torch.compile' and comma-separated options, in any
    combination; an unknown option or base names the valid ones."""
    pytest.importorskip("transformers")
    from benchmarks.gpu import training_variant
    from benchmarks.run import Case, build_pair

    ours, hf = build_pair(Case("divided_space_time", 2, 32, depth=1, width=128))
    run, model = training_variant("ours torch.compile, plain autograd, as written, bf16 residual stream", ours, hf)
    assert model is not ours and run is not model  # a copy with its own config, compiled
    assert (model.config.memory_saving_backward, model.config.bf16_residual_stream) == (False, True)
    assert not model.last_block_cls_only and not model.blocks[0].fold_projections
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ours.state_dict().values(), strict=True))
    run, model = training_variant("ours eager", ours, hf)
    assert run is model and model.config.memory_saving_backward and model.last_block_cls_only
    # HF compiled: "2x HF" was judged against HF eager only (compiled against eager)
    run, model = training_variant("HF torch.compile", ours, hf)
    assert model is hf.model and isinstance(run.model, torch._dynamo.eval_frame.OptimizedModule)
    assert run.model._orig_mod is hf.model
    for bad in ("ours eager, max-autotune", "ours eager, fast", "theirs eager"):
        with pytest.raises(ValueError, match="max-autotune"):
            training_variant(bad, ours, hf)


def test_gpu_benchmark_refuses_at_once_what_would_cost_a_session(capsys):
    """A misspelt variant failed when the training section began, minutes into a lent GPU's time; without CUDA (a
    driver too old for torch) the full sizes ran on the CPU until the time limit, with no message."""
    pytest.importorskip("transformers")
    from benchmarks.gpu import main

    with pytest.raises(SystemExit):
        main(["--quick", "--variants", "ours eager, fast"])
    assert "unknown training variant 'ours eager, fast'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            main(["--only", "attention"])
        assert "torch sees no CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize("attention_type", ["divided_space_time", "joint_space_time"])
def test_training_multiply_adds_count_every_matmul_the_step_runs(attention_type):
    """run.py's fwd+bwd GMACs (the per-block ceiling of a matmul-bound step): FlopCounterMode alone misses the
    in-place addmm_ of our backward and SDPA's CPU flash attention. HF's step (plain autograd) is 3x its forward less
    the patch convolution's input gradient; ours as written costs the same with the memory-saving backward as with
    plain autograd; the folded projections and the class-token-only last block cost less."""
    pytest.importorskip("transformers")
    from benchmarks.gpu import training_variant
    from benchmarks.run import Case, build_pair, make_input, training_macs

    case = Case(attention_type, 4, 64, depth=2, width=128)
    ours, hf = build_pair(case)
    video, labels = make_input(case)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        hf(video)
    forward = counter.get_total_flops() // 2
    convolution = counter.get_flop_counts()["Global"][torch.ops.aten.convolution] // 2
    assert training_macs(hf, video, labels) == 3 * forward - convolution
    as_written = training_macs(training_variant("ours eager, as written", ours, hf)[1], video, labels)
    plain = training_macs(training_variant("ours eager, plain autograd, as written", ours, hf)[1], video, labels)
    assert as_written == plain
    assert training_macs(ours, video, labels) < as_written


def test_the_gpu_session_script_names_sections_and_variants_gpu_py_has():
    """benchmarks/gpu_session.sh is the one prepared call for a lent GPU (minutes of device time): a renamed
    section or variant would only fail there."""
    pytest.importorskip("transformers")
    import re
    import shlex

    from benchmarks.gpu import training_variant
    from benchmarks.run import Case, build_pair

    script = (ROOT / "benchmarks" / "gpu_session.sh").read_text()
    command = " ".join(re.search(r"^python3 benchmarks/gpu\.py (.*?) 2>&1", script, re.M | re.S)[1].split("\\\n"))
    words = shlex.split(command)
    sections = words[words.index("--only") + 1: words.index("--profile")]
    variants = words[words.index("--variants") + 1:]
    assert sections and variants, words  # the command was found and read
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--only", *sections, "--help"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]  # argparse refuses an unknown section
    ours, hf = build_pair(Case("divided_space_time", 2, 32, depth=1, width=128))
    for variant in variants:
        training_variant(variant, ours, hf)  # raises for an unknown option or base


# -- the model's memory-saving autograd functions -------------------------------------------------------------
def _reference(monkeypatch) -> None:
    """Replace the memory-saving functions by the plain compositions they stand for (autograd's own backward)."""
    def layer_norm_linear(x, norm_weight, norm_bias, weight, bias, eps, chunks):
        y = F.linear(F.layer_norm(x, (x.shape[-1],), norm_weight, norm_bias, eps), weight, bias)
        return y.chunk(chunks, dim=-1)

    monkeypatch.setattr(tsf._LayerNormLinear, "apply", layer_norm_linear)
    monkeypatch.setattr(tsf._ActivationLinear, "apply",
                        lambda x, weight, bias, act: F.linear(tsf._ACTIVATIONS[act][0](x), weight, bias))
    monkeypatch.setattr(tsf._FoldedLinear, "apply", tsf._folded_linear)
    monkeypatch.setattr(tsf._ContiguousGrad, "apply", lambda x: x)


def _unfold(monkeypatch, model: TimeSformer) -> None:
    """Run the extra attentions' proj and <name>_fc as the two layers they are (``Block.fold_projections``)."""
    for block in model.blocks:
        monkeypatch.setattr(block, "fold_projections", False)


def _gradients(model: TimeSformer, video: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(video).logsumexp(-1).sum().backward()
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attention_type, hidden_act", [(a, "gelu") for a in ATTENTION_TYPES] + [
    ("divided_space_time", act) for act in ("gelu_tanh", "relu", "silu")])
def test_memory_saving_backward_equals_autograd(attention_type, hidden_act, monkeypatch):
    torch.manual_seed(0)
    config = TimeSformerConfig(image_size=40, patch_size=8, num_frames=3, hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=4, intermediate_size=64, num_classes=5,
                               attention_type=attention_type, hidden_act=hidden_act)
    model = TimeSformer(config).double().train()
    with torch.no_grad():  # nothing zero (the *_fc projections start at zero)
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    model.blocks[0].norm1.weight.requires_grad_(False)  # a frozen parameter: its gradient is not computed
    video = torch.randn(2, 3, 3, 40, 40, dtype=torch.double)  # odd sizes: padded L+G groups
    ours = _gradients(model, video)
    _reference(monkeypatch)
    _unfold(monkeypatch, model)
    expected = _gradients(model, video)
    assert ours.keys() == expected.keys() and "blocks.0.norm1.weight" not in ours
    for name in expected:
        torch.testing.assert_close(ours[name], expected[name], rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
def test_memory_saving_backward_off_gives_the_same_gradients(attention_type):
    """memory_saving_backward=False (PyTorch's own autograd) is the same function with the same gradients."""
    torch.manual_seed(0)
    config = TimeSformerConfig(image_size=40, patch_size=8, num_frames=3, hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=4, intermediate_size=64, num_classes=5,
                               attention_type=attention_type)
    saving = TimeSformer(config).double().train()
    with torch.no_grad():
        for param in saving.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    plain = TimeSformer(dataclasses.replace(config, memory_saving_backward=False)).double().train()
    plain.load_state_dict(saving.state_dict())
    video = torch.randn(2, 3, 3, 40, 40, dtype=torch.double)
    expected, ours = _gradients(plain, video), _gradients(saving, video)
    assert ours.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(ours[name], expected[name], rtol=1e-9, atol=1e-12, msg=name)


def _matmul_multiply_adds(model: TimeSformer, video: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter:
        model(video).sum().backward()
    return counter.get_total_flops() // 2


@pytest.mark.parametrize("attention_type", [a for a in ATTENTION_TYPES if tsf.EXTRA_ATTENTIONS[a]])
@pytest.mark.parametrize("drop_path_rate, hidden_dropout_prob", [(0.0, 0.0), (0.5, 0.0), (0.0, 0.3)])
def test_folded_projections_are_the_two_layers(attention_type, drop_path_rate, hidden_dropout_prob):
    """proj and <name>_fc as one linear map: the same outputs and gradients as the two layers, drop_path included
    (it drops whole samples between the two), and fewer multiply-adds. With the attention's output dropout between
    them they are not one map, and the two layers run."""
    torch.manual_seed(0)
    config = TimeSformerConfig(image_size=32, patch_size=8, num_frames=4, hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=4, intermediate_size=64, num_classes=5,
                               attention_type=attention_type, drop_path_rate=drop_path_rate,
                               hidden_dropout_prob=hidden_dropout_prob)
    model = TimeSformer(config).double().train()
    with torch.no_grad():  # nothing zero (the *_fc projections start at zero)
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    video = torch.randn(6, 4, 3, 32, 32, dtype=torch.double)

    def run(fold: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        for block in model.blocks:
            block.fold_projections = fold
        torch.manual_seed(1)  # the same drop_path masks and dropout in both
        logits = model(video)
        torch.manual_seed(1)
        grads = _gradients(model, video)
        torch.manual_seed(1)
        return logits, grads, _matmul_multiply_adds(model, video)

    two_layers, folded = run(False), run(True)
    torch.testing.assert_close(folded[0], two_layers[0], rtol=1e-10, atol=1e-12)
    if drop_path_rate > 0:  # the masks did drop something: some samples' logits differ from the eval model's
        assert not torch.allclose(two_layers[0], model.eval()(video))
    assert folded[1].keys() == two_layers[1].keys()
    for name in two_layers[1]:
        torch.testing.assert_close(folded[1][name], two_layers[1][name], rtol=1e-9, atol=1e-12, msg=name)
    if hidden_dropout_prob > 0:
        assert folded[2] == two_layers[2]
    else:
        assert folded[2] < two_layers[2]
    # Folding pays from 4/3·D tokens per call (the weights' product costs D³): a one-frame clip of 16 patches at
    # width 32 (16 tokens) runs the two layers.
    few_tokens = torch.randn(1, 1, 3, 32, 32, dtype=torch.double)
    counts = []
    for fold in (False, True):
        for block in model.blocks:
            block.fold_projections = fold
        counts.append(_matmul_multiply_adds(model, few_tokens))
    assert counts[0] == counts[1]


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
@pytest.mark.parametrize("memory_saving, qkv_bias", [(True, True), (False, True), (True, False)])
def test_the_last_block_computes_the_class_token_only(attention_type, memory_saving, qkv_bias):
    """The last block's patch tokens reach nothing: computing only the class token there gives the same logits and
    gradients (drop_path and gradient checkpointing included), with fewer multiply-adds."""
    torch.manual_seed(0)
    config = TimeSformerConfig(image_size=40, patch_size=8, num_frames=3, hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=4, intermediate_size=64, num_classes=5, drop_path_rate=0.5,
                               attention_type=attention_type, memory_saving_backward=memory_saving,
                               qkv_bias=qkv_bias)
    model = TimeSformer(config).double().train()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    video = torch.randn(4, 3, 3, 40, 40, dtype=torch.double)  # odd sizes: padded L+G groups, masked keys

    def run(cls_only: bool, checkpointing: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        model.last_block_cls_only = cls_only
        model.config.gradient_checkpointing = checkpointing
        torch.manual_seed(1)  # the same drop_path masks
        logits = model(video)
        torch.manual_seed(1)
        grads = _gradients(model, video)
        torch.manual_seed(1)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(video)
        return logits, grads, counter.get_total_flops()

    every_token, cls_only, checkpointed = run(False), run(True), run(True, checkpointing=True)
    for ours in (cls_only, checkpointed):
        torch.testing.assert_close(ours[0], every_token[0], rtol=1e-10, atol=1e-12)
        assert ours[1].keys() == every_token[1].keys()
        for name in every_token[1]:
            torch.testing.assert_close(ours[1][name], every_token[1][name], rtol=1e-9, atol=1e-12, msg=name)
    assert cls_only[2] < 0.9 * every_token[2]  # the last of two blocks: most of its patch work is gone


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
def test_torch_compile_traces_the_training_model_in_one_graph(attention_type):
    """module.compile=true compiles the model: a graph break (a Python fallback mid-model) would cost GPU speed."""
    torch.manual_seed(0)
    config = TimeSformerConfig(image_size=32, patch_size=8, num_frames=4, hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=4, intermediate_size=64, num_classes=5, drop_path_rate=0.1,
                               attention_type=attention_type, bf16_residual_stream=True)
    model = TimeSformer(config).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        explanation = torch._dynamo.explain(model)(torch.randn(2, 4, 3, 32, 32))
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_memory_saving_functions_pass_gradcheck():
    torch.manual_seed(0)

    def leaf(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, dtype=torch.double, requires_grad=True)

    x = leaf(5, 3, 6).transpose(0, 1)  # a non-contiguous input
    norm_weight, norm_bias, weight, bias = leaf(6), leaf(6), leaf(9, 6), leaf(9)
    assert torch.autograd.gradcheck(lambda *a: tsf._LayerNormLinear.apply(*a, 1e-6, 3),
                                    (x, norm_weight, norm_bias, weight, bias))
    for act in tsf._ACTIVATIONS:
        assert torch.autograd.gradcheck(lambda *a, act=act: tsf._ActivationLinear.apply(*a, act),
                                        (x, leaf(4, 6), leaf(4)))
    for bias2 in (leaf(4), None):  # linear(9 -> 4) after linear(6 -> 9)
        assert torch.autograd.gradcheck(tsf._FoldedLinear.apply, (x, weight, bias, leaf(4, 9), bias2))


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
def test_memory_saving_backward_under_bfloat16_autocast_matches_autograd(attention_type, monkeypatch):
    """bf16-mixed training (trainer=gpu) runs the model under autocast: the backward passes must cast as autograd's
    own casts would, so that the gradients equal the plain layers' under the same autocast up to bf16 rounding,
    and come back in the parameters' dtype (float32)."""
    torch.manual_seed(0)
    config = TimeSformerConfig(image_size=32, patch_size=8, num_frames=4, hidden_size=64, num_hidden_layers=2,
                               num_attention_heads=4, intermediate_size=128, num_classes=5,
                               attention_type=attention_type)
    model = TimeSformer(config).train()
    with torch.no_grad():  # nothing zero (the *_fc projections start at zero)
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    video = torch.randn(2, 4, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = _gradients(model, video)
    exact = _gradients(model, video)  # float32, no autocast: how far bf16 rounding alone moves the gradients
    _reference(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = _gradients(model, video)
    _unfold(monkeypatch, model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        two_layers = _gradients(model, video)  # the plain model as written: proj and <name>_fc not folded
    assert ours.keys() == expected.keys() == exact.keys() == two_layers.keys()

    def error(a: dict, b: dict) -> float:  # relative to the gradients' size over the whole model
        return (sum((a[n] - b[n]).float().square().sum() for n in a) / sum(b[n].square().sum() for n in b)).sqrt()

    assert all(g.dtype == torch.float32 for g in ours.values())
    rounding = error(two_layers, exact)
    assert 1e-4 < rounding < 3e-2  # autocast did run in bf16, and bf16 gradients are still gradients
    assert error(ours, expected) < 0.3 * rounding
    assert error(ours, exact) < 1.5 * rounding  # folding rounds differently, not more


class OneDtypeLayerNorms(TorchDispatchMode):
    """Records LayerNorm kernels called with tensors of several floating dtypes: the CPU's accept a bf16 input with
    float32 weights, CUDA's refuse it ("expected scalar type BFloat16 but found Float")."""

    def __init__(self) -> None:
        super().__init__()
        self.calls, self.mixed, self.input_dtypes = 0, [], set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.native_layer_norm.default, torch.ops.aten.native_layer_norm_backward.default):
            self.calls += 1
            self.input_dtypes.add(args[0].dtype)
            dtypes = {a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()}
            if len(dtypes) > 1:
                self.mixed.append((func.__name__, sorted(map(str, dtypes))))
        return func(*args, **(kwargs or {}))


def test_the_memory_saving_norm_runs_in_one_dtype_for_bf16_tokens():
    """With bf16_residual_stream, norm_linear gets bf16 tokens and float32 norm weights. Its backward runs outside
    autocast, where CUDA's LayerNorm kernels refuse mixed dtypes (the eager GPU step crashed on that), so the norm
    must run in float32 there and in the forward, as nn.LayerNorm does under autocast."""
    torch.manual_seed(0)
    norm, linear = torch.nn.LayerNorm(16, eps=1e-6), torch.nn.Linear(16, 24)
    with torch.no_grad():
        norm.weight.add_(torch.randn(16) * 0.1), norm.bias.add_(torch.randn(16) * 0.1)
    x = torch.randn(5, 16).bfloat16().requires_grad_()
    with OneDtypeLayerNorms() as norms:
        out = tsf.norm_linear(norm, linear, x)
        out.square().sum().backward()
    assert norms.calls == 3 and norms.mixed == []  # the forward, its recomputation and the norm's backward
    assert x.grad.dtype == torch.bfloat16 and norm.weight.grad.dtype == torch.float32
    ours = {"x": x.grad.float(), "norm": norm.weight.grad.clone(), "linear": linear.weight.grad.clone()}
    for param in (norm.weight, linear.weight):
        param.grad = None
    x64 = x.detach().double().requires_grad_()
    F.linear(F.layer_norm(x64, (16,), norm.weight.double(), norm.bias.double(), 1e-6),
             linear.weight.double(), linear.bias.double()).square().sum().backward()
    torch.testing.assert_close(ours["x"], x64.grad.float(), rtol=1e-2, atol=1e-2)  # bf16 rounding
    torch.testing.assert_close(ours["norm"], norm.weight.grad.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours["linear"], linear.weight.grad.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
def test_every_norm_runs_in_float32_under_bf16_autocast(attention_type):
    """CUDA's autocast runs nn.LayerNorm in float32, the CPU's in its input's dtype: bf16 on the bf16 residual
    stream. Every norm of the model (the final one included) runs in float32 on both, with and without the
    memory-saving backward, so the two give the same logits and the same gradients up to bf16 rounding of the
    GEMMs. Worst parameter gradient between them, measured: 3.4e-3 (space_only) to 4.8e-3 (axial); 8.2e-3 (axial)
    to 2.7e-2 (joint) with bf16 norms."""
    torch.manual_seed(0)
    config = TimeSformerConfig(image_size=32, patch_size=8, num_frames=4, hidden_size=64, num_hidden_layers=2,
                               num_attention_heads=4, intermediate_size=128, num_classes=5,
                               attention_type=attention_type, bf16_residual_stream=True)
    saving = TimeSformer(config).train()
    with torch.no_grad():
        for param in saving.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    plain = TimeSformer(dataclasses.replace(config, memory_saving_backward=False)).train()
    plain.load_state_dict(saving.state_dict())
    video = torch.randn(2, 4, 3, 32, 32)
    logits, gradients = {}, {}
    for name, model in (("saving", saving), ("plain", plain)):
        with OneDtypeLayerNorms() as norms, torch.autocast("cpu", dtype=torch.bfloat16):
            logits[name] = model(video)
            logits[name].float().square().sum().backward()
        assert norms.calls > 0 and norms.input_dtypes == {torch.float32}, (name, norms.input_dtypes)
        gradients[name] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    torch.testing.assert_close(logits["plain"], logits["saving"], rtol=0, atol=0)
    worst = max((gradients["plain"][n] - g).norm() / g.norm() for n, g in gradients["saving"].items() if g.norm() > 0)
    assert worst < 6e-3, worst


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
def test_bf16_residual_stream_keeps_the_tokens_in_bf16(attention_type):
    """bf16_residual_stream=True: under bf16 autocast the token stream stays bf16 from the embedding on (float32
    embeddings would promote it), at the cost of bf16 rounding in the gradients of the size the float32 stream
    already has under autocast. Without autocast, or under float16 autocast, the model is unchanged."""
    torch.manual_seed(0)
    config = TimeSformerConfig(image_size=32, patch_size=8, num_frames=4, hidden_size=64, num_hidden_layers=2,
                               num_attention_heads=2, intermediate_size=128, num_classes=5,
                               attention_type=attention_type)
    model = TimeSformer(config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    stream = TimeSformer(dataclasses.replace(config, bf16_residual_stream=True))
    stream.load_state_dict(model.state_dict())
    video = torch.randn(2, 4, 3, 32, 32)
    dtypes = {}

    def record(name: str):
        def hook(module, inputs, outputs) -> None:
            dtypes.setdefault(name, [t.dtype for t in (*inputs[:2], *outputs)])
        return hook

    stream.blocks[0].register_forward_hook(record("stream"))  # the last block returns no patches
    model.blocks[0].register_forward_hook(record("model"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = _gradients(stream, video)
        expected = _gradients(model, video)
    assert dtypes == {"stream": [torch.bfloat16] * 4, "model": [torch.float32] * 4}  # cls and patches, in and out
    assert all(g.dtype == torch.float32 for g in ours.values())  # the parameters stay float32
    exact = _gradients(model, video)  # float32
    rounding = (sum((expected[n] - exact[n]).square().sum() for n in exact)
                / sum(exact[n].square().sum() for n in exact)).sqrt()
    error = (sum((ours[n] - exact[n]).square().sum() for n in exact)
             / sum(exact[n].square().sum() for n in exact)).sqrt()
    assert error < 2 * rounding, (error, rounding)  # measured (divided): 7.9e-3 against 6.6e-3

    with torch.no_grad():
        torch.testing.assert_close(stream(video), model(video), rtol=0, atol=0)  # no autocast: no change
        with torch.autocast("cpu", dtype=torch.float16):
            torch.testing.assert_close(stream(video), model(video), rtol=0, atol=0)  # float16: the float32 stream

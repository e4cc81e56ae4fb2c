"""Devices, dtypes and the kernel seam (treespec/device.py, models/device_kernels.py).

The portable kernels are what CUDA runs; here they run on the CPU, so CPU CI exercises that code: its model matches
transformers, speculative greedy equals plain greedy, seeded speculative sampling equals seeded plain sampling, and
sampled tokens follow the target (χ²). Tests marked `cuda` run the same checks on a GPU and are skipped without one
(benchmarks/gpu_check.sh runs them). bfloat16 is checked to run, not to match fp32 (see benchmarks/bf16_divergence.py).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from serving_tiny import run_to_end, save_tiny_model_dir, tiny_hf_model, tiny_tokenizer
from test_drafter_model import (CHI_CASES, CHI_PROMPT, CHI_VOCAB, chi_squared_p_value, drafter, path_table,
                                perturbed, sample_first_two, tiny_llama)
from test_spec_greedy import BEST_FIRST, NGRAM, PROMPTS, generate
from tiny_hf import FAMILIES, hf_logits, hf_model, prefill

from treespec import LLM
from treespec.config import EngineConfig, SpecConfig
from treespec.device import DType, Kernels, Placement, check_device, resolve_device
from treespec.drafters.registry import build_drafters
from treespec.engine.engine import LLMEngine
from treespec.errors import ConfigError
from treespec.models import build_model
from treespec.models.layers import Linear
from treespec.sampling import SamplingParams

CPU_PORTABLE = Placement(kernels=Kernels.PORTABLE)
CUDA_FP32 = Placement(torch.device("cuda"), torch.float32, Kernels.PORTABLE)
FP32_PLACEMENTS = [pytest.param(CPU_PORTABLE, id="cpu-portable"),
                   pytest.param(CUDA_FP32, id="cuda-fp32", marks=pytest.mark.cuda)]
BF16_PLACEMENTS = [pytest.param(Placement(torch.device("cpu"), torch.bfloat16, Kernels.PORTABLE), id="cpu-bf16"),
                   pytest.param(Placement(torch.device("cuda"), torch.bfloat16, Kernels.PORTABLE), id="cuda-bf16",
                                marks=pytest.mark.cuda)]


# ---- resolution and validation -----------------------------------------------------------------------------------
def test_defaults_on_this_machine_resolve_to_the_cpu_fast_paths_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: auto picks it")
    assert Placement.resolve() == Placement(torch.device("cpu"), torch.float32, Kernels.CPU)
    assert Placement.resolve("cpu", DType.BFLOAT16) == Placement(torch.device("cpu"), torch.bfloat16, Kernels.PORTABLE)
    assert Placement.resolve("cpu", kernels=Kernels.PORTABLE).kernels is Kernels.PORTABLE


@pytest.mark.parametrize("bad", ["gpu", "cuda:", "cuda:x", "CUDA", "", "cpu:0 "])
def test_bad_device_strings_are_config_errors(bad):
    with pytest.raises(ConfigError, match="^device: "):
        check_device(bad)


def test_cuda_without_cuda_is_one_config_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="^device: 'cuda' asked for, but torch sees no CUDA device"):
        resolve_device("cuda")


def test_cpu_kernels_refuse_other_dtypes():
    with pytest.raises(ConfigError, match="^kernels: 'cpu' runs float32 on the CPU only"):
        Placement.resolve("cpu", DType.BFLOAT16, Kernels.CPU)


def test_engine_config_validates_device_fields():
    with pytest.raises(ConfigError, match="^dtype: "):
        EngineConfig(dtype="float8")
    with pytest.raises(ConfigError, match="^kernels: "):
        EngineConfig(kernels="fast")
    with pytest.raises(ConfigError, match="^device: "):
        EngineConfig(device="tpu")


@pytest.mark.parametrize("args, message", [
    (["generate", "--device", "tpu", "hi"], "--device"),
    (["generate", "--dtype", "float8", "hi"], "--dtype"),
    (["serve", "--kernels", "fast"], "--kernels"),
    (["bench", "--device", "cuda:x"], "--device"),
])
def test_cli_bad_device_flags_exit_2_while_parsing(args, message):
    _assert_one_line_exit_2(args, message)


def test_cli_cuda_without_cuda_exits_2_and_serve_never_starts():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    for cmd in (["generate", "hi"], ["serve", "--port", "1"], ["bench"]):
        _assert_one_line_exit_2([*cmd, "--device", "cuda"], "no CUDA device")


def _assert_one_line_exit_2(argv: list[str], message: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "treespec.cli", *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("treespec: error:") and message in lines[0], proc.stderr
    assert "ready" not in proc.stdout and "loading" not in proc.stdout


def test_api_refuses_cpu_only_options_off_the_cpu_kernels(tmp_path):
    d = save_tiny_model_dir(tmp_path / "m")
    with pytest.raises(ConfigError, match="^weight_quantization 'fp16' needs the CPU kernels"):
        LLM(str(d), weight_quantization="fp16", device="cpu", kernels="portable")
    with pytest.raises(ConfigError, match="^method: 'layer_skip' does not draft"):
        LLM(str(d), speculative_config={"method": "layer_skip"}, device="cpu", dtype="bfloat16")
    llm = LLM(str(d), speculative_config={"method": "auto", "budget": 4}, device="cpu", dtype="bfloat16")
    assert [dr.cfg.method.value for dr in llm.engine.speculator.drafters] == ["ngram"]  # auto: n-gram off fp32 CPU
    assert llm.placement.describe() == "cpu bfloat16 portable kernels"
    (out,) = llm.generate("hello", SamplingParams(max_tokens=5, ignore_eos=True))
    assert len(out.token_ids) == 5


# ---- the seam ----------------------------------------------------------------------------------------------------
def test_kernel_sets_differ_only_in_their_products():
    spec = tiny_llama(300, seed=0, layers=1)
    fast = build_model(spec["config"], spec["tensors"])
    portable = build_model(spec["config"], spec["tensors"], placement=CPU_PORTABLE)
    lin = [m for m in portable.modules() if isinstance(m, Linear)]
    assert lin and all(not m.cpu_products and m.packed is None for m in lin)
    assert portable.lm_head.portable and not portable.lm_head.prepare()
    tokens = torch.tensor([5, 17, 250, 3, 99])
    _, a = prefill(fast, tokens)
    _, b = prefill(portable, tokens)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.equal(fast.lm_head.argmax(a), portable.lm_head.argmax(b))


def test_model_code_does_not_branch_on_the_device():
    root = Path(__file__).parents[1] / "treespec" / "models"
    for path in root.glob("*.py"):
        text = path.read_text()
        for needle in ("is_cuda", "device.type", "torch.cuda"):
            assert needle not in text, f"{path.name} branches on the device ({needle}); use models/device_kernels.py"


# ---- the portable path (CPU here; CUDA where marked) -------------------------------------------------------------
@pytest.mark.parametrize("placement", FP32_PLACEMENTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_portable_model_matches_transformers(family, placement):
    hf = hf_model(family)
    tokens = torch.randint(0, hf.config.vocab_size, (12,), generator=torch.Generator().manual_seed(1))
    ref = hf_logits(hf.to(placement.device), tokens.to(placement.device)).float().cpu()
    model = build_model(hf.config.to_dict(), {k: v.cpu() for k, v in hf.state_dict().items()}, placement=placement)
    _, h = prefill(model, tokens)
    ours = model.logits(h).cpu()
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(model.lm_head.argmax(h).cpu(), ref.argmax(-1))


def _models(placement: Placement) -> dict[str, torch.nn.Module]:
    spec = tiny_llama(64, seed=0)
    models = {"target": build_model(spec["config"], spec["tensors"], placement=placement)}
    if placement.device.type == "cpu":  # model drafters follow the target on the CPU
        models["draft_b"] = perturbed(spec, 0.25, seed=2)
    return models


@pytest.mark.parametrize("placement", FP32_PLACEMENTS)
def test_portable_speculative_greedy_equals_plain_greedy(placement):
    models = _models(placement)
    plain = [r.output_ids for r in generate(models, None)]
    specs = [NGRAM] + ([{"drafters": [NGRAM, BEST_FIRST]}] if "draft_b" in models else [])
    for spec in specs:
        reqs = generate(models, spec)
        assert [r.output_ids for r in reqs] == plain
        assert sum(r.metrics.num_accepted_tokens for r in reqs) > 0


def _tiny_engine(tok, placement: Placement, spec: dict | None = None) -> LLMEngine:
    cfg, hf = tiny_hf_model(tok.vocab_size)
    model = build_model(cfg.to_dict(), hf.state_dict(), placement=placement)
    spec_cfg = SpecConfig.parse(spec)
    return LLMEngine(model, tok, EngineConfig(model="tiny"), spec_cfg, build_drafters(spec_cfg, model, tok))


@pytest.mark.parametrize("placement", FP32_PLACEMENTS)
@pytest.mark.parametrize("temperature, top_p", [(0.3, 1.0), (0.3, 0.9)], ids=["gumbel", "full"])
def test_portable_seeded_speculative_sampling_equals_plain(placement, temperature, top_p):
    tok = tiny_tokenizer()
    ids = tok.encode("the cat sat on the mat. the cat sat on the mat. the cat sat on the")
    params = [SamplingParams(temperature=temperature, top_p=top_p, seed=s, max_tokens=30, ignore_eos=True)
              for s in range(4)]
    plain = run_to_end(_tiny_engine(tok, placement), [ids] * 4, params, speculate=False)
    engine = _tiny_engine(tok, placement, {"method": "ngram", "budget": 6})
    assert run_to_end(engine, [ids] * 4, params) == plain
    assert engine.stats.num_accepted_tokens > 0 and len({tuple(o) for o in plain}) > 1


def test_portable_sampled_tokens_follow_the_target():
    """χ² on the first two tokens at T = 1 (20k samples), target and SSM both on the portable kernels."""
    spec = tiny_llama(CHI_VOCAB, seed=11)
    target = build_model(spec["config"], spec["tensors"], placement=CPU_PORTABLE)
    draft_spec = {"config": dict(spec["config"], num_hidden_layers=1),
                  "tensors": {k: v for k, v in spec["tensors"].items() if not k.startswith("model.layers.1.")}}
    draft = build_model(draft_spec["config"], draft_spec["tensors"], placement=CPU_PORTABLE)
    params = SamplingParams(temperature=1.0, max_tokens=8)
    table = path_table(target, CHI_PROMPT, 3, params)
    sampling, cfg = CHI_CASES["iid_static"]
    counts = sample_first_two([drafter(draft, CHI_VOCAB, **cfg)], table, params, sampling, 20_000)
    assert sum(counts.values()) == 20_000
    assert chi_squared_p_value(counts, table) > 0.01


@pytest.mark.parametrize("placement", BF16_PLACEMENTS)
def test_bfloat16_runs_greedy_and_seeded_speculation(placement):
    """Outputs may differ from fp32 (and speculative from plain at near-ties): this checks it runs end to end."""
    models = _models(placement)
    assert models["target"].embed_tokens.weight.dtype == torch.bfloat16
    for spec in (None, NGRAM):
        reqs = generate(models, spec, max_tokens=12, prompts=PROMPTS[:2])
        assert all(len(r.output_ids) == 12 and all(0 <= t < 64 for t in r.output_ids) for r in reqs)
    tok = tiny_tokenizer()
    ids = tok.encode("the cat sat on the mat. the cat sat on the")
    params = [SamplingParams(temperature=0.7, seed=1, max_tokens=10, ignore_eos=True)]
    out = run_to_end(_tiny_engine(tok, placement, {"method": "ngram"}), [ids], params)
    assert len(out[0]) == 10

"""The GPU check of issue 14 (run by benchmarks/gpu_check.sh after the cuda-marked tests): parity with transformers
on the device for the tiny model of every family, then speed on random weights of Gemma 3 270M's shapes (the real
GGUF does not travel to a lent GPU machine). Writes gpu_check.json and gpu_check.md under --out.

    python benchmarks/gpu_check.py --out OUT                          # CUDA, bfloat16, 128 new tokens
    python benchmarks/gpu_check.py --device cpu --quick --out OUT     # proves the script end to end on a CPU

Speed (same process, same device, dtype and weights): plain decoding tok/s against HF eager `generate`; the cost of
verifying a 16-node tree against a one-token step; engine overhead, a speculative step with a drafter that replays
the target's own greedy output (every node accepted, drafting free) against its verify forward alone; throughput of
1 vs 16 concurrent streams through the engine (plain and replayed speculation; no HTTP in between).
Random weights make many near-ties, so replayed drafts are not always all accepted: the acceptance is reported.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tiny models of every family

from treespec.attention.metadata import single  # noqa: E402
from treespec.config import DrafterConfig, DrafterMethod, EngineConfig, SpecConfig  # noqa: E402
from treespec.device import DType, Kernels, Placement, synchronize  # noqa: E402
from treespec.drafters.base import ConfiguredDrafter, DraftRequest  # noqa: E402
from treespec.engine.engine import LLMEngine  # noqa: E402
from treespec.models import build_model  # noqa: E402
from treespec.sampling import SamplingParams  # noqa: E402
from treespec.tree import DraftKind, Proposal, TokenTree  # noqa: E402
from tiny_hf import StubTokenizer  # noqa: E402

TREE_NODES = 16


class ReplayDrafter(ConfiguredDrafter):
    """Proposes a chain of the target's own greedy continuation (precomputed per prompt): drafting costs nothing
    and every node is accepted wherever the tree forward rounds like the one-row forward did."""

    def __init__(self, outputs: dict[tuple[int, ...], list[int]]) -> None:
        self.cfg, self.drafter_id, self.outputs = DrafterConfig(DrafterMethod.NGRAM), 0, outputs

    def propose(self, batch: list[DraftRequest]) -> list[TokenTree]:
        trees = []
        for d in batch:
            r = d.request
            tree = TokenTree.root(r.root_token)
            ahead = self.outputs[tuple(r.prompt_ids)][len(r.output_ids):][:min(d.max_nodes, d.max_depth)]
            for i, tok in enumerate(ahead):
                tree.add_child(i, tok, Proposal(0, DraftKind.DETERMINISTIC, None))
            trees.append(tree)
        return trees

    def observe(self, batch, trees, results) -> None:
        pass

    def observe_features(self, request, start, hidden) -> None:
        pass

    def release(self, request) -> None:
        pass


# ---- parity -----------------------------------------------------------------------------------------------------
def parity(placement: Placement, new_tokens: int) -> list[dict]:
    """Per family: max |logit difference| to transformers over a 12-token forward, and whether greedy generation
    (treespec's engine vs transformers stepping its own KV cache, same device and dtype) emits the same tokens.
    (transformers' `generate` itself differs from its step-by-step forward on the tiny Mistral's 4-token window.)"""
    from tiny_hf import FAMILIES, hf_greedy, hf_model
    rows = []
    for fam in FAMILIES:
        hf = hf_model(fam)
        model = build_model(hf.config.to_dict(), hf.state_dict(), placement=placement)
        hf = hf.to(placement.device, placement.dtype)
        tokens = torch.randint(0, hf.config.vocab_size, (12,), generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            ref = hf(tokens[None].to(placement.device)).logits[0].float()
            cache = model.new_cache(64)
            cache.reserve(12)
            ours = model.logits(model(tokens, torch.arange(12), single(cache, 12)))
            hf_out = hf_greedy(hf, tokens.to(placement.device), new_tokens)
        engine = LLMEngine(model, StubTokenizer(), EngineConfig(model=fam))
        out = _run(engine, [tokens.tolist()], new_tokens)[0]
        rows.append({"family": fam, "max_abs_logit_diff": float((ours - ref).abs().max()),
                     "argmax_agree": float((ours.argmax(-1) == ref.argmax(-1)).float().mean()),
                     "greedy_equal": out == hf_out})
    return rows


# ---- speed on Gemma 3 270M shapes --------------------------------------------------------------------------------
def gemma3_270m_config():
    import transformers as tf
    sliding = ["sliding_attention"] * 5 + ["full_attention"]
    return tf.Gemma3TextConfig(
        vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, rms_norm_eps=1e-6, max_position_embeddings=32768,
        tie_word_embeddings=True, query_pre_attn_scalar=256, sliding_window=512, layer_types=sliding * 3,
        hidden_activation="gelu_pytorch_tanh", final_logit_softcapping=None, attn_logit_softcapping=None,
        bos_token_id=2, eos_token_id=1, pad_token_id=0,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})


def random_models(placement: Placement):
    """transformers' Gemma 3 (eager attention) with random weights, and treespec's model over the same weights."""
    import transformers as tf
    cfg = gemma3_270m_config()
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = tf.Gemma3ForCausalLM(cfg).eval()
    model = build_model(cfg.to_dict(), hf.state_dict(), placement=placement)
    if placement.kernels is Kernels.CPU:
        model.lm_head.prepare()
    return hf.to(placement.device, placement.dtype), model


def _run(engine: LLMEngine, prompts: list[list[int]], new_tokens: int, speculate: bool = True) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    reqs = [engine.add_request(p, params, speculate=speculate) for p in prompts]
    while engine.has_unfinished():
        engine.step()
    return [r.output_ids for r in reqs]


def plain_vs_hf(hf, model, prompt: list[int], new_tokens: int) -> dict:
    from treespec.bench.ar import run_hf
    engine = LLMEngine(model, StubTokenizer(), EngineConfig(model="random-gemma3"))
    _run(engine, [prompt], 4)  # warm-up
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    req = engine.add_request(prompt, params)
    while engine.has_unfinished():
        engine.step()
    m = req.metrics
    ours = (len(req.output_ids) - 1) / (m.decode_time_s - m.decode_time_s / max(1, m.num_steps))
    run_hf(hf, [prompt], 4)  # warm-up
    theirs = run_hf(hf, [prompt], new_tokens).tokens_per_s
    return {"treespec_tok_s": ours, "hf_eager_tok_s": theirs, "ratio": ours / theirs}


@torch.inference_mode()
def verify_cost(model, prefix: int, repeats: int) -> dict:
    """Median seconds of a forward + greedy head over one token and over a 16-node tree after `prefix` tokens."""
    from tiny_hf import ancestor_mask, depths, random_parents
    vocab = model.config.vocab_size
    tokens = torch.randint(0, vocab, (prefix + TREE_NODES,), generator=torch.Generator().manual_seed(0))
    cache = model.new_cache(prefix + TREE_NODES)
    cache.reserve(prefix)
    model(tokens[:prefix], torch.arange(prefix), single(cache, prefix))
    cache.commit()
    parents = random_parents(TREE_NODES, torch.Generator().manual_seed(1))
    shapes = {1: (torch.zeros(1, dtype=torch.long), None),
              TREE_NODES: (torch.tensor(depths(parents)), ancestor_mask(parents))}
    out = {}
    for n, (depth, mask) in shapes.items():
        times = []
        for _ in range(repeats + 2):  # two warm-ups
            synchronize(model.device)
            t = time.perf_counter()
            cache.reserve(n, prefix + depth)
            model.lm_head.argmax(model(tokens[prefix:prefix + n], prefix + depth, single(cache, n, mask)))
            synchronize(model.device)
            times.append(time.perf_counter() - t)
            cache.truncate(prefix)
        out[n] = statistics.median(times[2:])
    return {"one_token_ms": 1e3 * out[1], f"tree{TREE_NODES}_ms": 1e3 * out[TREE_NODES],
            "ratio": out[TREE_NODES] / out[1]}


def replay_overhead(model, prompts: list[list[int]], new_tokens: int, verify_ms: float) -> dict:
    """Seconds per speculative step with the replay drafter (16-node chains) against one verify forward."""
    plain = LLMEngine(model, StubTokenizer(), EngineConfig(model="random-gemma3"))
    outputs = {tuple(p): o for p, o in zip(prompts, _run(plain, prompts, new_tokens + TREE_NODES))}
    engine = replay_engine(model, outputs)
    _run(engine, prompts[:1], 4)  # warm-up
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    req = engine.add_request(prompts[0], params)
    while engine.has_unfinished():
        engine.step()
    m = req.metrics
    step_ms = 1e3 * m.decode_time_s / max(1, m.num_steps)
    return {"step_ms": step_ms, "verify_ms": verify_ms, "ratio": step_ms / verify_ms,
            "tokens_per_step": m.mean_tokens_per_step}


def replay_engine(model, outputs: dict[tuple[int, ...], list[int]]) -> LLMEngine:
    spec = SpecConfig(drafters=[DrafterConfig(DrafterMethod.NGRAM)], budget=TREE_NODES - 1, max_depth=TREE_NODES - 1)
    return LLMEngine(model, StubTokenizer(), EngineConfig(model="random-gemma3", max_num_batched_tokens=1024),
                     spec, [ReplayDrafter(outputs)])


def throughput(model, prompts: list[list[int]], new_tokens: int, streams: tuple[int, int]) -> dict:
    """Generated tokens per second with 1 and N concurrent requests, plain and with replayed speculation."""
    plain = LLMEngine(model, StubTokenizer(), EngineConfig(model="random-gemma3", max_num_batched_tokens=1024))
    outputs = {tuple(p): o for p, o in zip(prompts, _run(plain, prompts, new_tokens + TREE_NODES))}
    result = {}
    for name, engine in (("plain", plain), ("replay_spec", replay_engine(model, outputs))):
        for n in streams:
            synchronize(model.device)
            t = time.perf_counter()
            outs = _run(engine, prompts[:n], new_tokens, speculate=name != "plain")
            result[f"{name}_{n}_streams_tok_s"] = sum(map(len, outs)) / (time.perf_counter() - t)
    result[f"plain_{streams[1]}_over_1"] = result[f"plain_{streams[1]}_streams_tok_s"] / result["plain_1_streams_tok_s"]
    return result


def markdown(report: dict) -> str:
    lines = [f"# GPU check: {report['device_name']} ({report['placement']}, torch {report['torch']})", "",
             f"{report['note']}", "", "## Parity with transformers (tiny models, fp32 on the device)", "",
             "| family | max abs logit diff | argmax agree | greedy equal |", "|---|---|---|---|"]
    lines += [f"| {r['family']} | {r['max_abs_logit_diff']:.2e} | {r['argmax_agree']:.2f} | {r['greedy_equal']} |"
              for r in report["parity"]]
    s = report["speed"]
    lines += ["", f"## Speed, random weights of Gemma 3 270M shapes, {report['new_tokens']} new tokens, batch 1", "",
              "| measure | value |", "|---|---|",
              f"| plain treespec tok/s | {s['plain']['treespec_tok_s']:.1f} |",
              f"| HF eager generate tok/s | {s['plain']['hf_eager_tok_s']:.1f} |",
              f"| treespec / HF | x{s['plain']['ratio']:.2f} |",
              f"| one-token step ms | {s['verify']['one_token_ms']:.2f} |",
              f"| {TREE_NODES}-node tree verify ms | {s['verify'][f'tree{TREE_NODES}_ms']:.2f} |",
              f"| tree / one token | x{s['verify']['ratio']:.2f} |",
              f"| replay spec step ms (vs its verify) | {s['overhead']['step_ms']:.2f} "
              f"(x{s['overhead']['ratio']:.2f}, {s['overhead']['tokens_per_step']:.2f} tokens/step) |"]
    lines += [f"| {k.replace('_', ' ')} | {v:.2f} |" for k, v in s["throughput"].items()]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=[d.value for d in DType])
    ap.add_argument("--kernels", default="auto", choices=[k.value for k in Kernels])
    ap.add_argument("--quick", action="store_true", help="16 new tokens, 3 repeats, 1 vs 4 streams")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    placement = Placement.resolve(args.device, DType(args.dtype), Kernels(args.kernels))
    fp32 = Placement.resolve(args.device, DType.FLOAT32, Kernels.PORTABLE)
    new_tokens, repeats, streams = (16, 3, (1, 4)) if args.quick else (128, 20, (1, 16))
    t0 = time.perf_counter()
    report = {"device_name": torch.cuda.get_device_name(placement.device) if placement.device.type == "cuda"
              else "CPU", "placement": placement.describe(), "torch": torch.__version__, "new_tokens": new_tokens,
              "note": "Measured by benchmarks/gpu_check.py in one process; random weights (near-ties are common)."}
    report["parity"] = parity(fp32, 8)
    print(f"parity done ({time.perf_counter() - t0:.0f} s)", flush=True)
    hf, model = random_models(placement)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 262144, (32,), generator=gen).tolist() for _ in range(streams[1])]
    speed = {"plain": plain_vs_hf(hf, model, prompts[0], new_tokens)}
    del hf
    print(f"plain vs HF done ({time.perf_counter() - t0:.0f} s)", flush=True)
    speed["verify"] = verify_cost(model, 128, repeats)
    speed["overhead"] = replay_overhead(model, prompts[:1], new_tokens, speed["verify"][f"tree{TREE_NODES}_ms"])
    speed["throughput"] = throughput(model, prompts, new_tokens, streams)
    report["speed"], report["wall_s"] = speed, time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    (out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The engine loop. One step = schedule, draft, verify (one target forward for every request), accept, commit, emit.

Plain decoding is the same loop with trees of a single node (the root). The drafters sit behind one Speculator
(drafters/speculator.py: routing, merging, failures, features); the engine sizes their trees (cost model).
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import torch

from treespec.config import DraftSampling, EngineConfig, SpecConfig
from treespec.drafters.base import ConfiguredDrafter, DraftRequest
from treespec.drafters.speculator import Speculator
from treespec.engine.cost_model import CostCurve, CostModel, allocate_nodes
from treespec.engine.emit import apply_stop_strings, emit_tokens
from treespec.engine.request import FinishReason, Request, SpecCounters
from treespec.engine.runner import ForwardOutput, HeadPath, ModelRunner, TreeWork, head_path, score_trees
from treespec.engine.scheduler import Scheduler, StepPlan
from treespec.errors import ConfigError
from treespec.noise import PositionNoise
from treespec.sampling import SamplingParams
from treespec.tokenizer import IncrementalDetokenizer, Tokenizer
from treespec.tree.build import prune_tree
from treespec.tree.token_tree import TokenTree
from treespec.verify import VerifyResult, follow_target, verify_greedy, verify_stochastic


@dataclass
class Draft:
    """This step's trees, one per decoding request (the bare root where it does not speculate), and the draft
    requests of those that speculate (the speculator observes their results)."""
    trees: list[TokenTree]
    batch: list[DraftRequest]


# Every PROBE_EVERY-th sized step may verify a tree up to the next grid size whose cost the engine has not yet
# observed (CostCurve.probe_size): one slightly larger verify, so a too pessimistic cost curve cannot keep trees
# small forever. FLAT makes allocate_nodes keep the best-scored nodes up to a budget.
PROBE_EVERY = 4
FLAT = CostCurve({1: 1.0})


@dataclass
class StepStats(SpecCounters):
    """Totals over the engine's life (the server's Prometheus counters read these)."""
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0


class LLMEngine:
    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, config: EngineConfig,
                 spec: SpecConfig | None = None, drafters: list[ConfiguredDrafter] | None = None,
                 cost_model: CostModel | None = None) -> None:
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.spec = spec or SpecConfig()
        self.speculator = Speculator(drafters or [])
        self.runner = ModelRunner(model)
        self.max_len = min(config.max_model_len or model.config.max_position_embeddings,
                           model.config.max_position_embeddings)
        c = model.config
        itemsize = model.embed_tokens.weight.element_size()  # the cache's dtype is the model's
        slot_bytes = 2 * c.num_layers * c.num_kv_heads * c.head_dim * itemsize  # K and V of one token
        self.scheduler = Scheduler(config.max_num_seqs, config.max_num_batched_tokens, config.max_waiting,
                                   kv_budget_tokens=config.kv_cache_bytes // slot_bytes,
                                   tree_slots=(self.spec.budget or 64) + 1 if self.spec.enabled else 1)
        self.cost_model = cost_model
        self.draft_cost_s = 0.0  # moving average of the draft phase, charged against tree size
        self._probe_in = PROBE_EVERY  # steps until a tree may be grown past the cost model's choice (_size_trees)
        self.stats = StepStats()
        self._ids = itertools.count()

    # ---- requests -------------------------------------------------------------------------------------------
    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                    speculate: bool = True) -> Request:
        if not prompt_ids:
            raise ConfigError("prompt: is empty")
        if len(prompt_ids) + params.max_tokens > self.max_len:
            raise ConfigError(f"max_tokens: prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) "
                              f"exceeds the context length {self.max_len}")
        vocab = self.model.config.vocab_size
        for name, ids in (("prompt", prompt_ids), ("stop_token_ids", params.stop_token_ids or [])):
            if any(not 0 <= t < vocab for t in ids):
                raise ConfigError(f"{name}: token id outside the vocabulary (0..{vocab - 1})")
        req = Request(request_id or f"req-{next(self._ids)}", list(prompt_ids), params, speculate=speculate,
                      device=self.model.device)
        self.scheduler.add(req)
        req.cache = self.model.new_cache(self.max_len)
        req.detokenizer = IncrementalDetokenizer(self.tokenizer)
        self.stats.num_prompt_tokens += len(prompt_ids)
        return req

    def abort(self, request_id: str) -> None:
        if (r := self.scheduler.abort(request_id)) is not None:
            self._release(r)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the loop -------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[Request]:
        """Advance every running request by one target forward; returns requests that emitted or finished."""
        plan = self.scheduler.schedule()
        t0 = time.perf_counter()  # decode time includes drafting: it is part of the cost of a speculative step
        noise = [r.position_noise(self.model.config.vocab_size) for r in plan.decodes]  # drafts and target share it
        draft = self.draft(plan.decodes, noise, plan.node_budget)
        t_verify = time.perf_counter()
        try:  # verify: one target forward over every prefill chunk and tree
            out = self.runner.forward(plan.prefills, [TreeWork(r, t) for r, t in zip(plan.decodes, draft.trees)])
        except Exception as e:  # noqa: BLE001 - a failed forward fails its requests, not the engine
            for r in plan.decodes + [c.request for c in plan.prefills]:
                r.finish(FinishReason.ERROR, f"forward failed: {e}")
            return self._finish_step()
        for c in plan.prefills:
            c.request.metrics.prefill_time_s += time.perf_counter() - t0
        results = self.accept(plan.decodes, draft.trees, noise, out.trees)
        if self.cost_model is not None and plan.decodes and not plan.prefills:  # what c(n) measures: forward + head
            full = any(head_path(r, t) is HeadPath.FULL for r, t in zip(plan.decodes, draft.trees))
            self.cost_model.observe(sum(t.n for t in draft.trees), time.perf_counter() - t_verify, full)
        self.commit(plan, draft, out, results)
        self.emit(plan.decodes, draft.trees, results)
        for r in plan.decodes:
            r.metrics.decode_time_s += time.perf_counter() - t0
        finished = self._finish_step()
        return plan.decodes + [r for r in finished if r not in plan.decodes]

    def draft(self, requests: list[Request], noise: list[PositionNoise], node_budget: int) -> Draft:
        """The speculator proposes trees; the cost model keeps the nodes that raise expected tokens per second."""
        trees = [TokenTree.root(r.root_token) for r in requests]
        spec_reqs = [i for i, r in enumerate(requests) if self._speculates(r)]
        if not spec_reqs:
            return Draft(trees, [])
        t0 = time.perf_counter()
        share = max(0, (node_budget - len(requests)) // len(spec_reqs))  # draft nodes per speculating request
        batch = [self._draft_request(requests[i], noise[i], share) for i in spec_reqs]
        proposed = self.speculator.propose(batch)
        self.draft_cost_s = 0.8 * self.draft_cost_s + 0.2 * (time.perf_counter() - t0)
        sized = self._size_trees(batch, proposed, share, node_budget - len(requests) + len(spec_reqs))
        for i, tree in zip(spec_reqs, sized):
            trees[i] = tree
        return Draft(trees, batch)

    def accept(self, requests: list[Request], trees: list[TokenTree], noise: list[PositionNoise],
               hiddens: list[torch.Tensor]) -> list[VerifyResult]:
        """Score every node with the target and run each request's acceptance rule (a failure ends that request)."""
        try:
            scores = score_trees(self.model, requests, trees, hiddens, noise)
        except Exception as e:  # noqa: BLE001
            for r in requests:
                r.finish(FinishReason.ERROR, f"verification failed: {e}")
            return [VerifyResult(path=[0], bonus_token=r.root_token) for r in requests]
        results = []
        for r, tree, s, n in zip(requests, trees, scores, noise):
            try:
                if s.argmax is not None:
                    results.append(verify_greedy(tree, s.argmax))
                elif s.sampler is not None:
                    results.append(follow_target(tree, s.sampler))
                else:
                    results.append(verify_stochastic(tree, s.probs, r.generator, n))
            except Exception as e:  # noqa: BLE001
                r.finish(FinishReason.ERROR, f"verification failed: {e}")
                results.append(VerifyResult(path=[0], bonus_token=r.root_token))
        return results

    def commit(self, plan: StepPlan, draft: Draft, out: ForwardOutput, results: list[VerifyResult]) -> None:
        """Keep the accepted path's K/V (root included), drop the rest; the drafters observe the verified trees and
        the target's hidden states of the newly committed positions: each prefill chunk's rows and each accepted
        path (root included; EAGLE heads read them)."""
        for r, res in zip(plan.decodes, results):
            r.cache.commit(res.path)
        if draft.batch:
            verified = {r: (tree, res) for r, tree, res in zip(plan.decodes, draft.trees, results)}
            self.speculator.observe(draft.batch, [verified[d.request][0] for d in draft.batch],
                                    [verified[d.request][1] for d in draft.batch])
        for c, hidden in zip(plan.prefills, out.prefills):
            if self._speculates(c.request):
                self.speculator.observe_features(c.request, c.start, hidden)
        for r, hidden, res in zip(plan.decodes, out.trees, results):
            if self._speculates(r) and not r.finished:  # the root's position: the accepted path is committed now
                self.speculator.observe_features(r, r.cache.length - len(res.path), hidden[res.path])

    def emit(self, requests: list[Request], trees: list[TokenTree], results: list[VerifyResult]) -> None:
        """Append accepted tokens + bonus, apply stop conditions, detokenize; count speculation metrics."""
        for r, tree, res in zip(requests, trees, results):
            if r.finished:  # failed in verification
                continue
            try:
                accepted = tree.tokens[res.path[1:]].tolist()
                new = emit_tokens(r, accepted + [res.bonus_token], self.tokenizer.eos_ids, self.max_len)
                r.metrics.record_step(tree.n - 1, len(res.path) - 1)
                r.metrics.num_generated_tokens = len(r.output_ids)
                self.stats.record_step(tree.n - 1, len(res.path) - 1)
                self.stats.num_generation_tokens += len(new)
                text = r.detokenizer.push(new)
                if r.finished:
                    text += r.detokenizer.flush()
                apply_stop_strings(r, text)
            except Exception as e:  # noqa: BLE001
                r.finish(FinishReason.ERROR, f"emit failed: {e}")

    # ---- helpers --------------------------------------------------------------------------------------------
    def _speculates(self, r: Request) -> bool:
        return r.speculate and self.speculator.serves(r)

    def _draft_request(self, r: Request, noise: PositionNoise, max_nodes: int) -> DraftRequest:
        depth = min(self.spec.max_depth, self.max_len - len(r.all_ids) - 1,
                    r.params.max_tokens - len(r.output_ids) - 1)
        return DraftRequest(r, max_nodes=max(0, min(max_nodes, self.spec.budget or 64)),
                            max_depth=max(0, depth),
                            sampling=DraftSampling.DETERMINISTIC if r.params.greedy else self.spec.draft_sampling,
                            noise=noise)

    def _size_trees(self, batch: list[DraftRequest], trees: list[TokenTree], share: int,
                    node_budget: int) -> list[TokenTree]:
        """Static budget (or no cost model): each tree keeps its share; else the cost model allocates node_budget."""
        if self.spec.budget is not None or self.cost_model is None:
            return [prune_tree(t, min(self.spec.budget or share, share)) for t in trees]
        scores = [torch.sort(t.scores[1:], descending=True).values for t in trees]
        curve = self.cost_model.curve(any(head_path(d.request, t) is HeadPath.FULL for d, t in zip(batch, trees)))
        counts = allocate_nodes(scores, curve, self.draft_cost_s, node_budget)
        self._probe_in -= 1
        probe = curve.probe_size(len(trees) + sum(counts))
        if self._probe_in <= 0 and probe is not None and len(trees) + sum(len(x) for x in scores) >= probe:
            counts = allocate_nodes(scores, FLAT, 0.0, min(probe, node_budget))  # the best nodes up to the probe
            self._probe_in = PROBE_EVERY
        return [prune_tree(t, k) for t, k in zip(trees, counts)]

    def _finish_step(self) -> list[Request]:
        done = self.scheduler.collect_finished()
        for r in done:
            self._release(r)
        return done

    def _release(self, r: Request) -> None:
        r.cache = None
        self.speculator.release(r)

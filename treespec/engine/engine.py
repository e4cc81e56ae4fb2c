"""The engine loop. One step = schedule, draft, verify (one target forward for every request), accept, commit, emit.

Plain decoding is the same loop with trees of a single node (the root).
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import torch

from treespec.config import DraftSampling, EngineConfig, SpecConfig
from treespec.drafters.base import Drafter, DraftRequest
from treespec.engine.cost_model import CostModel, allocate_nodes, prune_tree
from treespec.engine.emit import apply_stop_strings, emit_tokens
from treespec.engine.request import FinishReason, Request
from treespec.engine.runner import ModelRunner, TreeWork, target_argmax, target_probs
from treespec.engine.scheduler import Scheduler
from treespec.errors import ConfigError
from treespec.sampling import SamplingParams
from treespec.tokenizer import IncrementalDetokenizer, Tokenizer
from treespec.tree.build import merge_trees
from treespec.tree.token_tree import TokenTree
from treespec.verify import VerifyResult, verify_greedy, verify_stochastic


@dataclass
class StepStats:
    """Totals over the engine's life (the server's Prometheus counters read these)."""
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0


class LLMEngine:
    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, config: EngineConfig,
                 spec: SpecConfig | None = None, drafters: list[Drafter] | None = None,
                 cost_model: CostModel | None = None) -> None:
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.spec = spec or SpecConfig()
        self.drafters = drafters or []
        self.runner = ModelRunner(model)
        self.max_len = min(config.max_model_len or model.config.max_position_embeddings,
                           model.config.max_position_embeddings)
        self.scheduler = Scheduler(config.max_num_seqs, config.max_num_batched_tokens, config.max_waiting)
        self.cost_model = cost_model
        self.draft_cost_s = 0.0  # moving average of the draft phase, charged against tree size
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
        if any(not 0 <= t < self.model.config.vocab_size for t in prompt_ids):
            raise ConfigError("prompt: token id outside the vocabulary")
        req = Request(request_id or f"req-{next(self._ids)}", list(prompt_ids), params, speculate=speculate)
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
        trees = self.draft(plan.decodes, plan.node_budget)
        t0 = time.perf_counter()
        try:
            hiddens = self.runner.forward(plan.prefills, [TreeWork(r, t) for r, t in zip(plan.decodes, trees)])
        except Exception as e:  # noqa: BLE001 - a failed forward fails its requests, not the engine
            for r in plan.decodes + [c.request for c in plan.prefills]:
                r.finish(FinishReason.ERROR, f"forward failed: {e}")
            return self._finish_step()
        for c in plan.prefills:
            c.request.metrics.prefill_time_s += time.perf_counter() - t0
        results = self.verify(plan.decodes, trees, hiddens)
        self.commit(plan.decodes, trees, results)
        self.emit(plan.decodes, trees, results)
        for r in plan.decodes:
            r.metrics.decode_time_s += time.perf_counter() - t0
        finished = self._finish_step()
        return plan.decodes + [r for r in finished if r not in plan.decodes]

    def draft(self, requests: list[Request], node_budget: int) -> list[TokenTree]:
        """Drafters propose trees; the cost model keeps the nodes that raise expected tokens per second."""
        roots = [TokenTree.root(r.root_token) for r in requests]
        spec_reqs = [i for i, r in enumerate(requests) if r.speculate and self.drafters]
        if not spec_reqs:
            return roots
        t0 = time.perf_counter()
        batch = [self._draft_request(requests[i], node_budget) for i in spec_reqs]
        proposals = [d.propose(batch) for d in self.drafters]
        merged = [merge_trees([p[j] for p in proposals]) for j in range(len(batch))]
        self.draft_cost_s = 0.8 * self.draft_cost_s + 0.2 * (time.perf_counter() - t0)
        merged = self._size_trees(merged, node_budget - len(requests) + len(spec_reqs))
        for i, tree in zip(spec_reqs, merged):
            roots[i] = tree
        self._last_batch = (batch, merged, spec_reqs)
        return roots

    def verify(self, requests: list[Request], trees: list[TokenTree], hiddens: list[torch.Tensor]) -> list[VerifyResult]:
        """Score every node with the target and run the acceptance rule of each request."""
        results = []
        for r, tree, h in zip(requests, trees, hiddens):
            if r.params.greedy:
                results.append(verify_greedy(tree, target_argmax(self.model, r, tree, h)))
            else:
                results.append(verify_stochastic(tree, target_probs(self.model, r, tree, h), r.generator))
        return results

    def commit(self, requests: list[Request], trees: list[TokenTree], results: list[VerifyResult]) -> None:
        """Keep the accepted path's K/V (root included), drop the rest; tell the drafters."""
        for r, res in zip(requests, results):
            r.cache.commit(res.path)
        if self.drafters and getattr(self, "_last_batch", None):
            batch, merged, idx = self._last_batch
            for d in self.drafters:
                d.observe(batch, merged, [results[i] for i in idx])
            self._last_batch = None

    def emit(self, requests: list[Request], trees: list[TokenTree], results: list[VerifyResult]) -> None:
        for r, tree, res in zip(requests, trees, results):
            accepted = tree.tokens[res.path[1:]].tolist()
            new = emit_tokens(r, accepted + [res.bonus_token], self.tokenizer.eos_ids, self.max_len)
            r.metrics.record_step(tree.n - 1, len(res.path) - 1)
            r.metrics.num_generated_tokens = len(r.output_ids)
            self.stats.num_drafts += tree.n > 1
            self.stats.num_draft_tokens += tree.n - 1
            self.stats.num_accepted_tokens += len(res.path) - 1
            self.stats.num_generation_tokens += len(new)
            apply_stop_strings(r, r.detokenizer.push(new))

    # ---- helpers --------------------------------------------------------------------------------------------
    def _draft_request(self, r: Request, node_budget: int) -> DraftRequest:
        depth = min(self.spec.max_depth, self.max_len - len(r.all_ids) - 1,
                    r.params.max_tokens - len(r.output_ids) - 1)
        return DraftRequest(r, max_nodes=max(0, min(node_budget - 1, self.spec.budget or 64)),
                            max_depth=max(0, depth),
                            sampling=DraftSampling.DETERMINISTIC if r.params.greedy else self.spec.draft_sampling)

    def _size_trees(self, trees: list[TokenTree], node_budget: int) -> list[TokenTree]:
        if self.spec.budget is not None or self.cost_model is None:
            limit = self.spec.budget or node_budget
            return [prune_tree(t, min(limit, max(0, node_budget // len(trees) - 1))) for t in trees]
        scores = [torch.sort(t.scores[1:], descending=True).values for t in trees]
        counts = allocate_nodes(scores, self.cost_model, self.draft_cost_s, node_budget)
        return [prune_tree(t, k) for t, k in zip(trees, counts)]

    def _finish_step(self) -> list[Request]:
        done = self.scheduler.collect_finished()
        for r in done:
            self._release(r)
        return done

    def _release(self, r: Request) -> None:
        r.cache = None
        for d in self.drafters:
            d.release(r)

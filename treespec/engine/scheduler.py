"""Iteration-level scheduler (Orca / SpecInfer continuous batching).

Invariant: each running request's cache catches up with its tokens. A request's cache holds every prompt
token but the last (prefilled in chunks within the per-step token budget); from then on each step verifies
one tree rooted at its last emitted token, which commits at least that root. Prefill, plain decoding
(a tree of one node) and speculation are the same case: tokens not yet in the cache enter it.

KV memory is never over-committed: a request is admitted only while the worst case of every running request
(prompt + max_tokens + one tree's slots) fits the KV budget, so a running request can always finish.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from treespec.engine.request import FinishReason, Request, RequestStatus
from treespec.engine.runner import PrefillChunk
from treespec.errors import ConfigError, QueueFullError


@dataclass
class StepPlan:
    prefills: list[PrefillChunk] = field(default_factory=list)
    decodes: list[Request] = field(default_factory=list)
    node_budget: int = 0  # tree nodes (roots included) the decodes may use together this step


class Scheduler:
    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int, max_waiting: int,
                 kv_budget_tokens: int | None = None, tree_slots: int = 0) -> None:
        self.max_num_seqs = max_num_seqs
        self.max_tokens = max_num_batched_tokens
        self.max_waiting = max_waiting
        self.kv_budget = kv_budget_tokens  # cache slots all running requests may hold together; None = unbounded
        self.tree_slots = tree_slots       # pending slots one verification may add beyond the committed tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def kv_need(self, request: Request) -> int:
        """Cache slots this request may ever hold."""
        return len(request.prompt_ids) + request.params.max_tokens + self.tree_slots

    def capacity(self, num_tokens: int) -> int:
        """How many requests of num_tokens (prompt + max_tokens) each the queues hold at once when idle: the running
        slots the KV budget leaves room for, plus the waiting bound. More choices of one prompt can never be taken."""
        need = num_tokens + self.tree_slots
        fit = self.max_num_seqs if self.kv_budget is None else min(self.max_num_seqs, self.kv_budget // need)
        return fit + self.max_waiting

    def add(self, request: Request) -> None:
        """Queue the request and start it at once if a running slot and its KV are free; max_waiting bounds only
        the requests that must wait (so max_waiting 0 still serves up to max_num_seqs at once)."""
        if self.kv_budget is not None and self.kv_need(request) > self.kv_budget:
            raise ConfigError(f"max_tokens: prompt + max_tokens needs {self.kv_need(request)} KV slots, more than "
                              f"the engine's KV budget of {self.kv_budget}")
        self.waiting.append(request)
        self._admit()
        if len(self.waiting) > self.max_waiting:  # then it is still waiting, last in line
            self.waiting.pop()
            raise QueueFullError(f"the waiting queue is full ({self.max_waiting} requests)")

    def abort(self, request_id: str) -> Request | None:
        """Finish the request as aborted and take it out of the queues; None if it is not here."""
        for queue in (self.waiting, self.running):
            for r in queue:
                if r.request_id == request_id:
                    r.finish(FinishReason.ABORT)
                    queue.remove(r)
                    return r
        return None

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def collect_finished(self) -> list[Request]:
        done = [r for r in self.running if r.finished] + [r for r in self.waiting if r.finished]
        self.running = [r for r in self.running if not r.finished]
        self.waiting = deque(r for r in self.waiting if not r.finished)
        return done

    def schedule(self) -> StepPlan:
        self._admit()
        plan = StepPlan(decodes=[r for r in self.running if r.prefill_done])
        budget = self.max_tokens - len(plan.decodes)  # every decode verifies at least its root
        # Prefill may take half the budget while others decode, so one long prompt never stalls them.
        prefill_budget = budget // 2 if plan.decodes else budget
        for r in self.running:
            if r.prefill_done or prefill_budget <= 0:
                continue
            end = min(len(r.prompt_ids) - 1, r.num_prefilled + prefill_budget)
            plan.prefills.append(PrefillChunk(r, r.num_prefilled, end))
            prefill_budget -= end - r.num_prefilled
            budget -= end - r.num_prefilled
        plan.node_budget = len(plan.decodes) + max(0, budget)
        return plan

    def _admit(self) -> None:
        """Move waiting requests to running, first come first served, while slots and KV allow."""
        held = sum(self.kv_need(r) for r in self.running)
        while self.waiting and len(self.running) < self.max_num_seqs:
            if self.kv_budget is not None and held + self.kv_need(self.waiting[0]) > self.kv_budget:
                break  # first come, first served: wait until running requests free their KV
            r = self.waiting.popleft()
            held += self.kv_need(r)
            r.status = RequestStatus.RUNNING
            self.running.append(r)

"""Iteration-level scheduler (Orca / SpecInfer continuous batching).

Invariant: each running request's cache catches up with its tokens. A request's cache holds every prompt
token but the last (prefilled in chunks within the per-step token budget); from then on each step verifies
one tree rooted at its last emitted token, which commits at least that root. Prefill, plain decoding
(a tree of one node) and speculation are the same case: tokens not yet in the cache enter it.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from treespec.engine.request import FinishReason, Request, RequestStatus
from treespec.engine.runner import PrefillChunk
from treespec.errors import TreespecError


class QueueFullError(TreespecError):
    """The waiting queue is at its bound; the caller should retry later (HTTP 429)."""


@dataclass
class StepPlan:
    prefills: list[PrefillChunk] = field(default_factory=list)
    decodes: list[Request] = field(default_factory=list)
    node_budget: int = 0  # tree nodes (roots included) the decodes may use together this step


class Scheduler:
    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int, max_waiting: int) -> None:
        self.max_num_seqs = max_num_seqs
        self.max_tokens = max_num_batched_tokens
        self.max_waiting = max_waiting
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, request: Request) -> None:
        if len(self.waiting) >= self.max_waiting:
            raise QueueFullError(f"the waiting queue is full ({self.max_waiting} requests)")
        self.waiting.append(request)

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
        while self.waiting and len(self.running) < self.max_num_seqs:
            r = self.waiting.popleft()
            r.status = RequestStatus.RUNNING
            self.running.append(r)
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

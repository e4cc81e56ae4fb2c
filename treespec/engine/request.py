"""One generation request: its tokens, cache, sampling state (generator, per-position noise) and speculation
counters."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch

from treespec.kv.cache import KVCache
from treespec.noise import PositionNoise, RequestNoise
from treespec.sampling import SamplingParams, make_generator


class RequestStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(Enum):
    STOP = "stop"      # eos, stop token id or stop string
    LENGTH = "length"  # max_tokens or the context length
    ABORT = "abort"    # cancelled by the caller
    ERROR = "error"    # failed inside the engine; other requests carry on


@dataclass
class SpecCounters:
    """Speculation counters. A step verifies one tree; tokens/step = 1 + accepted/steps."""
    num_steps: int = 0                 # target forwards after prefill (per request) / trees verified (engine)
    num_drafts: int = 0                # steps that verified at least one draft token
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)  # [d] = steps that accepted a token at depth d+1

    @property
    def mean_tokens_per_step(self) -> float:
        return 1.0 + self.num_accepted_tokens / self.num_steps if self.num_steps else 0.0

    def record_step(self, num_draft: int, num_accepted: int) -> None:
        self.num_steps += 1
        self.num_drafts += num_draft > 0
        self.num_draft_tokens += num_draft
        self.num_accepted_tokens += num_accepted
        if len(self.accepted_per_position) < num_accepted:
            self.accepted_per_position.extend([0] * (num_accepted - len(self.accepted_per_position)))
        for d in range(num_accepted):
            self.accepted_per_position[d] += 1


@dataclass
class SpecMetrics(SpecCounters):
    """One request's counters and timings."""
    num_generated_tokens: int = 0
    prefill_time_s: float = 0.0
    decode_time_s: float = 0.0

    def as_dict(self) -> dict:
        return {"num_steps": self.num_steps, "num_generated_tokens": self.num_generated_tokens,
                "num_draft_tokens": self.num_draft_tokens, "num_accepted_tokens": self.num_accepted_tokens,
                "accepted_per_position": list(self.accepted_per_position),
                "mean_tokens_per_step": round(self.mean_tokens_per_step, 4),
                "prefill_time_s": round(self.prefill_time_s, 4), "decode_time_s": round(self.decode_time_s, 4)}


@dataclass(eq=False)  # identity semantics: requests are compared and hashed by object
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    speculate: bool = True                      # per-request switch (e.g. the server's override)
    output_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    error: str | None = None
    cache: KVCache | None = None
    num_prefilled: int = 0                      # prompt tokens (all but the last) already in the cache
    metrics: SpecMetrics = field(default_factory=SpecMetrics)
    generator: torch.Generator | None = None
    text: str = ""                              # detokenized output so far (stop strings applied)
    stop_checked: int = 0                       # chars of `text` already searched for stop strings
    num_streamed: int = 0                       # chars of `text` already handed to the caller
    detokenizer: Any = None                     # IncrementalDetokenizer, set by the engine
    device: torch.device = torch.device("cpu")  # the model's: where the Gumbel noise rows are drawn
    noise: RequestNoise = field(init=False, repr=False)  # seeded per-position noise (treespec.noise)

    def __post_init__(self) -> None:
        self.generator = make_generator(self.params.seed)
        self.noise = RequestNoise(self.params.seed if self.params.seed is not None
                                  else int(torch.randint(0, 2**62, ())), self.device)

    def position_noise(self, vocab_size: int) -> PositionNoise:
        """The noise below this step's root: depth d is output position len(output_ids) + d."""
        return PositionNoise(self.noise, len(self.output_ids), vocab_size)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def root_token(self) -> int:
        """The last emitted token: the root of the next tree, not yet in the KV cache."""
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    @property
    def prefill_done(self) -> bool:
        return self.num_prefilled >= len(self.prompt_ids) - 1

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def finish(self, reason: FinishReason, error: str | None = None) -> None:
        self.status, self.finish_reason, self.error = RequestStatus.FINISHED, reason, error

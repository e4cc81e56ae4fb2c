"""The speculator (drafters/speculator.py): the configured drafters behind the one Drafter the engine drives.

Oracles: speculative greedy output equals plain greedy output whatever a drafter does; a drafter that fails (in
propose, observe or a feature update) loses only its own trees and its state of those requests, while the other
drafters keep drafting; each drafter sees only the requests its `requests` setting names; feature readers get the
target's hidden states of every committed position, in order, equal to a plain prefill's.
"""
from __future__ import annotations

import pytest
import torch
from test_drafter_model import StubTokenizer, build, tiny_llama

from treespec.attention.metadata import single
from treespec.config import DrafterConfig, DraftRequests, EngineConfig, SpecConfig
from treespec.drafters.base import DraftRequest
from treespec.drafters.ngram import NgramDrafter
from treespec.drafters.speculator import Speculator
from treespec.engine.engine import LLMEngine
from treespec.engine.request import Request
from treespec.sampling import SamplingParams
from treespec.tree import TokenTree
from treespec.verify import VerifyResult

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
SAMPLED = SamplingParams(temperature=1.0, seed=3, max_tokens=24, ignore_eos=True)
PROMPTS = [[5, 6, 7, 8] * 5, [4, 8, 15, 16, 23, 42] * 3]


class Recording(NgramDrafter):
    """An n-gram drafter that records what it is handed and raises in the phase `fail` names."""

    def __init__(self, drafter_id: int, requests: DraftRequests = DraftRequests.ALL, fail: str | None = None) -> None:
        super().__init__(DrafterConfig("ngram", num_speculative_tokens=4, requests=requests), drafter_id)
        self.fail = fail
        self.proposed: list[str] = []
        self.observed: list[str] = []
        self.released: list[str] = []
        self.features: dict[str, list[tuple[int, torch.Tensor]]] = {}

    def propose(self, batch: list[DraftRequest]) -> list[TokenTree]:
        self.proposed += [d.request.request_id for d in batch]
        if self.fail == "propose":
            raise RuntimeError("propose broke")
        return super().propose(batch)

    def observe(self, batch: list[DraftRequest], trees: list[TokenTree], results: list[VerifyResult]) -> None:
        self.observed += [d.request.request_id for d in batch]
        if self.fail == "observe":
            raise RuntimeError("observe broke")
        super().observe(batch, trees, results)

    def observe_features(self, request, start: int, hidden: torch.Tensor) -> None:
        if self.fail == "features":
            raise RuntimeError("features broke")
        self.features.setdefault(request.request_id, []).append((start, hidden.clone()))

    def release(self, request) -> None:
        self.released.append(request.request_id)
        super().release(request)


@pytest.fixture(scope="module")
def target():
    return build(tiny_llama(64, seed=0))


def run(target, drafters, params=(GREEDY, GREEDY)):
    engine = LLMEngine(target, StubTokenizer(), EngineConfig(model="tiny", max_num_batched_tokens=16),
                       SpecConfig.parse({"method": "ngram", "budget": 6}), drafters)
    reqs = [engine.add_request(p, q, request_id=f"r{i}") for i, (p, q) in enumerate(zip(PROMPTS, params))]
    while engine.has_unfinished():
        engine.step()
    return engine, [r.output_ids for r in reqs]


@pytest.fixture(scope="module")
def plain(target):
    return run(target, [])[1]


@pytest.mark.parametrize("phase", ["propose", "observe", "features"])
def test_a_failing_drafter_leaves_the_others_drafting(target, plain, phase):
    broken, working = Recording(0, fail=phase), Recording(1)
    engine, outputs = run(target, [broken, working])
    assert outputs == plain
    assert broken.released.count("r0") > 1 and broken.released.count("r1") > 1  # once per failure, then at the end
    assert working.released == ["r0", "r1"] or working.released == ["r1", "r0"]  # only when they finished
    assert working.observed and engine.stats.num_accepted_tokens > 0
    if phase == "propose":
        assert not broken.observed  # no tree of its own this step: nothing to observe


def test_a_failing_drafter_alone_leaves_plain_trees(target, plain):
    broken = Recording(0, fail="propose")
    engine, outputs = run(target, [broken])
    assert outputs == plain
    assert broken.proposed and engine.stats.num_draft_tokens == 0


def test_requests_are_routed_by_kind(target, plain):
    greedy, sampling, both = Recording(0, DraftRequests.GREEDY), Recording(1, DraftRequests.SAMPLING), Recording(2)
    _, outputs = run(target, [greedy, sampling, both], params=(GREEDY, SAMPLED))
    assert set(greedy.proposed) == {"r0"} and set(sampling.proposed) == {"r1"} and set(both.proposed) == {"r0", "r1"}
    assert set(greedy.observed) == {"r0"} and set(sampling.observed) == {"r1"}
    assert set(greedy.features) == {"r0"} and set(sampling.features) == {"r1"}
    assert outputs[0] == plain[0]



def test_feature_readers_get_every_committed_position_once(target):
    reader = Recording(0)
    _, outputs = run(target, [reader])
    for i, (prompt, out) in enumerate(zip(PROMPTS, outputs)):
        rows = reader.features[f"r{i}"]
        starts = [s for s, _ in rows]
        assert starts[0] == 0 and all(s == p + h.shape[0] for (p, h), s in zip(rows, starts[1:]))
        ids = torch.tensor(prompt + out[:-1])  # the last token was never fed
        hidden = torch.cat([h for _, h in rows])  # (max_tokens may cut the last step's accepted tokens)
        assert hidden.shape[0] >= ids.numel()
        hidden = hidden[:ids.numel()]
        cache = target.new_cache(64)
        cache.reserve(ids.numel())
        want = target(ids, torch.arange(ids.numel()), single(cache, ids.numel()))
        torch.testing.assert_close(hidden, want, rtol=1e-4, atol=1e-4)


def test_speculator_serves_what_any_drafter_serves():
    greedy, sampled = Request("a", [1, 2], GREEDY), Request("b", [1, 2], SAMPLED)
    assert not Speculator([]).serves(greedy)
    only_greedy = Speculator([Recording(0, DraftRequests.GREEDY)])
    assert only_greedy.serves(greedy) and not only_greedy.serves(sampled)

"""The real default model (Gemma 3 270M) split over 2 tensor-parallel ranks gives one process's greedy tokens,
plainly and with `speculative_config="auto"` (its greedy drafters: n-gram; the sampling self-draft cannot run on a
split target and is left out)."""
from __future__ import annotations

import pytest

from treespec.api import LLM
from treespec.sampling import SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Repeat after me: the quick brown fox jumps over the lazy dog. The quick brown fox",
    "Translate to German: Good morning, how are you today?",
]
PARAMS = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)


def test_tensor_parallel_default_model_equals_one_process():
    one = LLM("gemma-3-270m")
    expected = [o.token_ids for o in one.generate(PROMPTS, PARAMS, speculate=False)]
    del one
    split = LLM("gemma-3-270m", speculative_config={"method": "auto"}, tensor_parallel_size=2, num_threads=1)
    try:
        assert [o.token_ids for o in split.generate(PROMPTS, PARAMS, speculate=False)] == expected
        spec = split.generate(PROMPTS, PARAMS)
        assert [o.token_ids for o in spec] == expected
        assert sum(o.metrics["num_accepted_tokens"] for o in spec) > 0  # it really speculated
    finally:
        split.close()

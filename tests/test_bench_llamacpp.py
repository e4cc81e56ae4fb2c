"""`bench --mode ar` side by side with llama.cpp: absent without llama-cpp-python (a note, not a failure), and with a
fake `llama_cpp` module the same prompt ids, the same thread count, the decode-step count and the ratio and
agreement plumbing."""
import sys
import types

import pytest
import torch
from tiny_gguf import write_model

from treespec import LLM
from treespec.bench.ar_compare import compare_ar
from treespec.bench.llamacpp import Agreement

MAX_TOKENS = 6


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_model(path, "llama")
    return LLM(str(path))


@pytest.fixture
def prompts(llm):
    return [llm.encode_prompt("hello world"), llm.encode_prompt("the world")]


def test_llama_cpp_absent_is_reported(llm, prompts, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # importing it raises ImportError, as when not installed
    out = compare_ar(llm, prompts, MAX_TOKENS, {"plain": None}, with_hf=False)
    assert out.llama_cpp is None and "absent" in out.llama_cpp_note and not out.agreement
    table = out.markdown()
    assert "llama.cpp: absent" in table and "| treespec plain |" in table


class FakeLlama:
    """llama_cpp.Llama's surface that bench uses; it 'generates' a scripted continuation of each prompt."""
    script: dict[tuple[int, ...], list[int]] = {}
    made: list["FakeLlama"] = []

    def __init__(self, model_path, n_threads, n_threads_batch, n_ctx, verbose):
        self.kwargs = dict(model_path=model_path, n_threads=n_threads, n_threads_batch=n_threads_batch, n_ctx=n_ctx)
        self.context: list[int] = []
        self.evals: list[list[int]] = []
        FakeLlama.made.append(self)

    def reset(self):
        self.context = []

    def eval(self, tokens):
        self.evals.append(list(tokens))
        self.context += list(tokens)

    def sample(self, temp):
        assert temp == 0.0
        prompt = next(p for p in self.script if tuple(self.context[: len(p)]) == p)
        return self.script[prompt][len(self.context) - len(prompt)]


def test_fake_llama_cpp_gets_the_same_prompts_and_threads_and_ratios_add_up(llm, prompts, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    plain = compare_ar(llm, prompts, MAX_TOKENS, {"plain": None}, with_hf=False).treespec[0].outputs
    wrong = [t + 1 for t in plain[1]]
    script = {tuple(prompts[0]): plain[0], tuple(prompts[1]): plain[1][:3] + wrong[3:]}  # 2nd differs at token 3
    monkeypatch.setattr(FakeLlama, "script", script)
    monkeypatch.setattr(FakeLlama, "made", [])
    monkeypatch.setitem(sys.modules, "llama_cpp", types.SimpleNamespace(Llama=FakeLlama, __version__="fake"))
    out = compare_ar(llm, prompts, MAX_TOKENS, {"plain": None}, with_hf=False)
    (cpp,) = FakeLlama.made
    threads = torch.get_num_threads()
    assert cpp.kwargs["model_path"] == str(llm.checkpoint_source)
    assert cpp.kwargs["n_threads"] == threads and cpp.kwargs["n_threads_batch"] == threads
    assert cpp.kwargs["n_ctx"] >= max(map(len, prompts)) + MAX_TOKENS
    # per prompt (after a 4-token warm-up on the first): its ids as they are (no second BOS), then each sampled
    # token but the last, one per decode step
    runs = [(prompts[0], 4)] + [(p, MAX_TOKENS) for p in prompts]
    assert cpp.evals == [e for p, n in runs for e in [p] + [[t] for t in script[tuple(p)][:n - 1]]]
    assert out.llama_cpp.outputs == [script[tuple(p)] for p in prompts]
    ours = out.treespec[0]
    assert ours.tokens == out.llama_cpp.tokens == len(prompts) * (MAX_TOKENS - 1)
    assert out.agreement["treespec plain"] == Agreement(1, 2, MAX_TOKENS + 3, 2 * MAX_TOKENS)
    table = out.markdown()
    ratio = ours.tokens_per_s / out.llama_cpp.tokens_per_s
    assert f"| treespec plain | {ours.tokens} | {ours.tokens_per_s:.2f} |" in table
    assert table.splitlines()[2].endswith(f"| {ratio:.2f}x |") and "| llama.cpp |" in table
    assert "1/2 outputs equal" in table and "llama-cpp-python fake, " in table


def test_every_engine_decodes_as_far_as_plain_up_to_its_end_of_text(llm, prompts, monkeypatch):
    """No engine is timed past the end of plain's text (where a base model repeats itself and n-gram drafting
    flatters speculation): each prompt runs to plain's end-of-text token, speculative methods and llama.cpp too."""
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    free = compare_ar(llm, prompts, MAX_TOKENS, {"plain": None}, with_hf=False).treespec[0].outputs
    eos = free[0][2]
    monkeypatch.setattr(llm.tokenizer, "eos_ids", {eos})
    expected = [out.index(eos) + 1 if eos in out else MAX_TOKENS for out in free]
    assert expected[0] <= 3 < MAX_TOKENS
    monkeypatch.setattr(FakeLlama, "script", {tuple(p): out + [0] * MAX_TOKENS for p, out in zip(prompts, free)})
    monkeypatch.setattr(FakeLlama, "made", [])
    monkeypatch.setitem(sys.modules, "llama_cpp", types.SimpleNamespace(Llama=FakeLlama, __version__="fake"))
    out = compare_ar(llm, prompts, MAX_TOKENS, {"plain": None, "ngram": {"method": "ngram"}}, with_hf=False)
    for run in out.treespec + [out.llama_cpp]:
        assert [len(o) for o in run.outputs] == expected, run.name
    assert out.treespec[1].outputs == out.treespec[0].outputs == [o[:n] for o, n in zip(free, expected)]
    assert "up to its end of text" in out.markdown()


def test_a_speculative_method_is_checked_against_plain(llm, prompts, monkeypatch):
    """Each --method's greedy tokens are compared with treespec plain's: the lossless contract, in the table."""
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    out = compare_ar(llm, prompts, MAX_TOKENS, {"plain": None, "ngram": {"method": "ngram"}}, with_hf=False)
    assert list(out.exact) == ["treespec ngram"]
    assert out.exact["treespec ngram"] == Agreement(2, 2, 2 * MAX_TOKENS, 2 * MAX_TOKENS)
    assert "greedy tokens, treespec ngram vs treespec plain: 2/2 outputs equal" in out.markdown()

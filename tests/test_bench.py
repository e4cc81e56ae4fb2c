"""Benchmark harness: Spec-Bench loading, the side-by-side runner, summary maths and report files."""
import json

import pytest
from serving_tiny import save_tiny_model_dir, tiny_backend, tiny_tokenizer

from treespec import LLM, SamplingParams
from treespec.bench.dataset import CATEGORY_ORDER, BenchPrompt, load_prompts
from treespec.bench.prompt_form import COMPLETION_FRAME, PromptForm, asked_form, prompt_text, resolve_form
from treespec.bench.report import markdown_table, write_outputs
from treespec.bench.spec_bench import RunRecord, run_methods, summarize
from treespec.errors import ConfigError
from treespec.tokenizer import Tokenizer


def test_shipped_spec_bench_has_six_categories_of_80():
    prompts = load_prompts()
    cats = {}
    for p in prompts:
        cats[p.category] = cats.get(p.category, 0) + 1
    assert cats == {c: 80 for c in CATEGORY_ORDER}
    assert {p.category for p in load_prompts(limit=3)} == set(CATEGORY_ORDER) and len(load_prompts(limit=3)) == 18


def test_custom_jsonl_and_bad_files(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"prompt": "hello"}) + "\n\n" + json.dumps({"turns": ["a", "b"], "category": "x"}) + "\n")
    assert [(p.category, p.text) for p in load_prompts(f)] == [("default", "hello"), ("x", "a")]
    f.write_text("{not json\n")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_prompts(f)
    for bad in ({"text": "no prompt field"}, {"turns": []}, ["a list"]):
        f.write_text(json.dumps(bad) + "\n")
        with pytest.raises(ConfigError, match="turns"):
            load_prompts(f)
    with pytest.raises(ConfigError, match="cannot read"):
        load_prompts(tmp_path / "missing.jsonl")


def _rec(method, cat, tokens, secs, steps, accepted, equal=None):
    return RunRecord(method, "q", cat, tokens, secs, secs, steps, accepted, equal, [])


def test_summary_speedup_is_total_tokens_over_total_time():
    recs = [_rec("plain", "a", 100, 10.0, 100, 0), _rec("plain", "b", 100, 10.0, 100, 0),
            _rec("ngram", "a", 100, 2.0, 25, 75, True), _rec("ngram", "b", 100, 8.0, 80, 20, False)]
    s = summarize(recs)
    assert s["ngram"]["a"]["speedup"] == 5.0 and s["ngram"]["overall"]["speedup"] == 2.0
    assert s["ngram"]["overall"]["tokens_per_step"] == round(1 + 95 / 105, 3)
    assert s["ngram"]["overall"]["equal"] == 1
    assert "| ngram | **overall** | 2 | 20.0 | 2.00x |" in markdown_table(s)


def test_run_methods_and_reports_on_a_tiny_model(tmp_path):
    llm = LLM(str(save_tiny_model_dir(tmp_path / "m")), speculative_config=None)
    prompts = load_prompts(limit=1)[:2]
    params = SamplingParams(temperature=0.0, max_tokens=8)
    recs = run_methods(llm, {"plain": None, "ngram": {"method": "ngram", "budget": 4}}, prompts, params,
                       PromptForm.COMPLETION, progress=False)
    assert [r.method for r in recs] == ["plain", "ngram"] * 2
    assert all(r.equal_to_plain for r in recs if r.method == "ngram")
    paths = write_outputs(tmp_path / "out", {"records": [r.as_dict() for r in recs]}, summarize(recs), "t")
    assert all(p.exists() and p.stat().st_size > 0 for p in paths)


def test_auto_prompt_form_is_chat_only_for_an_own_template_on_a_model_not_named_base(tmp_path):
    family_default = tiny_tokenizer()  # has <start_of_turn>: treespec adds Gemma's template, the checkpoint did not
    assert family_default.chat_template is not None and not family_default.ships_chat_template
    bk = tiny_backend()
    own = Tokenizer(bk, bk.token_to_id("<bos>"), bk.token_to_id("<eos>"), chat_template="{{ messages }}")
    assert own.ships_chat_template
    auto, chat, completion = PromptForm.AUTO, PromptForm.CHAT, PromptForm.COMPLETION
    for name in ("m-it", "m-instruct.gguf"):
        assert resolve_form(auto, own, tmp_path / name)[0] is chat
    for name in ("m-pt", "m-base", "m_base.gguf", "Base model"):
        assert resolve_form(auto, own, tmp_path / name)[0] is completion
    assert resolve_form(auto, family_default, tmp_path / "m-it")[0] is completion
    assert resolve_form(chat, family_default, tmp_path / "m-pt")[0] is chat  # asked for: kept
    assert resolve_form(completion, own, tmp_path / "m-it")[0] is completion


def test_no_chat_is_an_alias_of_completion_and_a_contradiction_is_an_error():
    assert asked_form("auto", no_chat=True) is PromptForm.COMPLETION
    assert asked_form("chat", no_chat=False) is PromptForm.CHAT
    assert asked_form("auto", no_chat=False) is PromptForm.AUTO
    with pytest.raises(ConfigError, match="no-chat"):
        asked_form("chat", no_chat=True)


def test_completion_form_frames_questions_and_feeds_text_rows_as_they_are():
    q, text = BenchPrompt("1", "qa", "Why is the sky blue?", question=True), BenchPrompt("2", "x", "Once upon")
    assert prompt_text(q, PromptForm.COMPLETION) == "Question: Why is the sky blue?\nAnswer:"
    assert prompt_text(q, PromptForm.COMPLETION) == COMPLETION_FRAME.format(question=q.text)
    assert prompt_text(q, PromptForm.CHAT) == q.text and prompt_text(text, PromptForm.COMPLETION) == "Once upon"
    assert all(p.question for p in load_prompts(limit=1))


def test_the_default_gguf_is_a_base_model_run_in_completion_form():
    from treespec.weights.gguf_file import read_gguf
    from treespec.weights.gguf_tokenizer import tokenizer_from_gguf
    from treespec.weights.loader import resolve_model
    path = resolve_model("gemma-3-270m")
    tok = tokenizer_from_gguf(read_gguf(path).metadata, "gemma3")
    assert resolve_form(PromptForm.AUTO, tok, path)[0] is PromptForm.COMPLETION

"""The offline API (LLM.generate) and the CLI on a tiny model saved to disk, incl. bad input: one line, exit 2."""
import json
import subprocess
import sys

import pytest
from serving_tiny import save_tiny_model_dir

from treespec import LLM, SamplingParams
from treespec.cli import main
from treespec.errors import ConfigError

PROMPTS = ["the cat sat on the mat. the cat sat on the", "a server streams tokens", "hello"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def llm(model_dir, tmp_path_factory):
    import os
    os.environ["TREESPEC_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    return LLM(str(model_dir), speculative_config={"method": "ngram"})  # budget chosen by the cost model


def test_generate_outputs_and_speculation_is_exact(llm):
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    spec = llm.generate(PROMPTS, params)
    plain_engine = llm.make_engine(None)
    assert llm.engine.cost_model is not None
    for p, out in zip(PROMPTS, spec):
        req = plain_engine.add_request(llm.tokenizer.encode(p), params)
        while plain_engine.has_unfinished():
            plain_engine.step()
        assert out.token_ids == req.output_ids and out.prompt == p
        assert out.finish_reason == "length" and len(out.token_ids) == 24
        assert out.text == llm.tokenizer.decode(out.token_ids)
        assert out.metrics["num_generated_tokens"] == 24 and out.metrics["num_steps"] <= 24


def test_generate_single_prompt_streaming_and_seeded_sampling(llm):
    chunks = []
    params = SamplingParams(temperature=1.0, max_tokens=16, seed=7, ignore_eos=True)
    (a,) = llm.generate("hello", params, on_token=lambda r, d: chunks.append(d))
    (b,) = llm.generate("hello", params)
    assert a.token_ids == b.token_ids and "".join(chunks) == a.text


def test_bad_prompts_raise_config_errors(llm):
    with pytest.raises(ConfigError, match="prompt"):
        llm.generate("")
    with pytest.raises(ConfigError, match="prompts"):
        llm.generate([])
    with pytest.raises(ConfigError, match="max_tokens"):
        llm.generate("hi", SamplingParams(max_tokens=10_000))


@pytest.fixture(scope="module")
def plain_llm(model_dir):
    return LLM(str(model_dir))  # default bounds: 16 running, 256 waiting


def test_generate_feeds_any_number_of_prompts_as_capacity_frees(plain_llm):
    prompts = [f"{i} the cat sat" for i in range(3000)]  # far beyond the waiting queue's 256
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    outs = plain_llm.generate(prompts, params)
    assert [o.prompt for o in outs] == prompts and all(len(o.token_ids) == 2 for o in outs)
    assert not plain_llm.engine.has_unfinished()
    for i in (0, 1234, 2999):  # batched == alone
        assert plain_llm.generate(prompts[i], params)[0].token_ids == outs[i].token_ids


def test_generate_that_fails_midway_leaves_nothing_in_the_engine(plain_llm):
    prompts = ["hello"] * 300 + ["hello " * 300]  # the last one does not fit the context
    with pytest.raises(ConfigError, match="context length"):
        plain_llm.generate(prompts, SamplingParams(max_tokens=4))
    assert not plain_llm.engine.has_unfinished()


def test_generate_speculate_false_decodes_plainly(llm):
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    (plain,) = llm.generate(PROMPTS[0], params, speculate=False)
    (spec,) = llm.generate(PROMPTS[0], params)
    assert plain.metrics["num_draft_tokens"] == 0 < spec.metrics["num_draft_tokens"]
    assert plain.token_ids == spec.token_ids


def test_cli_generate_json(model_dir, capsys):
    assert main(["generate", "--model", str(model_dir), "--max-tokens", "8", "--json", "--ngram",
                 "--compare", "the cat sat"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["plain"]["token_ids"] == out["speculative"]["token_ids"]
    assert out["speculative"]["metrics"]["num_generated_tokens"] == len(out["speculative"]["token_ids"])


def test_cli_inspect(model_dir, capsys):
    assert main(["inspect", str(model_dir)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model_type"] == "llama" and info["parameters"] > 0


@pytest.mark.parametrize("args, message", [
    (["generate", "--model", "/nonexistent/model", "hi"], "nonexistent"),
    (["generate", "--max-tokens", "0", "hi"], "max-tokens"),
    (["generate", "--temperature", "-1", "--model", "{dir}", "hi"], "temperature"),
    (["generate", "--top-p", "1.5", "--model", "{dir}", "hi"], "top_p"),
    (["generate", "--model", "{dir}", ""], "prompt"),
    (["generate", "--model", "{dir}", "--max-tokens", "100000", "hi"], "context"),
    (["generate", "--model", "{dir}", "--speculative-config", "{{bad", "hi"], "speculative_config"),
    (["generate", "--model", "{dir}", "--speculative-config", '{{"method": "magic"}}', "hi"], "method"),
    (["generate", "--model", "{dir}/bad.gguf", "hi"], "GGUF"),
    (["generate", "--model", "{dir}/weights.bin", "hi"], "pickle"),
    (["bench", "--limit", "0"], "limit"),
    (["frobnicate"], "invalid choice"),
])
def test_cli_bad_input_is_one_line_and_exit_2(model_dir, args, message):
    (model_dir / "bad.gguf").write_bytes(b"GGUF\x03\x00\x00\x00truncated")
    (model_dir / "weights.bin").write_bytes(b"\x80\x04pickle")
    argv = [a.format(dir=model_dir) for a in args]
    proc = subprocess.run([sys.executable, "-m", "treespec.cli", *argv], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()]  # a load progress bar may precede
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert errors[0].startswith("treespec: error:") and message.lower() in errors[0].lower()
    assert proc.stderr.strip().splitlines()[-1] == errors[0]


def test_cli_speculative_auto(model_dir, capsys):
    assert main(["generate", "--model", str(model_dir), "--speculative", "auto", "--max-tokens", "6", "--json",
                 "--compare", "the cat sat on the mat. the cat sat"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["plain"]["token_ids"] == out["speculative"]["token_ids"]

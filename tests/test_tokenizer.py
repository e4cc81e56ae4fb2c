"""Tokenizers from GGUF metadata and HF directories (== transformers), incremental detokenizer, chat templates."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tiny_gguf import write_model

from treespec.chat_template import render_chat_template
from treespec.errors import ConfigError, ModelLoadError
from treespec.tokenizer import IncrementalDetokenizer, Tokenizer
from treespec.weights.gguf_file import read_gguf
from treespec.weights.gguf_tokenizer import sentencepiece_merges, tokenizer_from_gguf
from treespec.weights.loader import resolve_model

TEXTS = [
    "hello world", "Hello World!", "  hello  world\n\n\nthe thing", "日本語 🤗 ünïcödé", "中文测试，标点。", "", " ", "\n",
    "\t\ttab  \r\n", "def f(x):\n    return x\n\n\nclass A:\n\tpass", "x = 1  # comment\n    y=2", "a  <end_of_turn> b",
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n", "<|im_start|>user\nhi<|im_end|>\n<think>",
    "[multimodal] the", "hello<bos>world", "“quotes” — … ½ ∑ 𝔘 👩‍👩‍👧 🇫🇷", "   leading and trailing   ", "don't I'll",
]
TINY = {"gemma3": "llama", "llama": "llama", "qwen2": "gpt2"}  # arch -> tokenizer kind


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, tuple[Tokenizer, object]]:
    """arch -> (our tokenizer, transformers' tokenizer), both built from the same tiny GGUF."""
    from transformers import AutoTokenizer
    out = {}
    for arch, kind in TINY.items():
        path = tmp_path_factory.mktemp(arch) / "m.gguf"
        write_model(path, arch, tokenizer=kind)
        meta = read_gguf(path).metadata
        ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file="m.gguf")
        out[arch] = (tokenizer_from_gguf(meta, arch), ref)
    return out


def assert_same_as_transformers(mine: Tokenizer, ref, texts: list[str]) -> None:
    for text in texts:
        for special in (True, False):
            ids = mine.encode(text, add_special_tokens=special)
            assert ids == ref(text, add_special_tokens=special).input_ids, (text, special)
            for skip in (True, False):
                assert mine.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), text


@pytest.mark.parametrize("arch", list(TINY))
def test_tiny_gguf_tokenizer_equals_transformers(tiny, arch: str) -> None:
    mine, ref = tiny[arch]
    assert_same_as_transformers(mine, ref, TEXTS)


def test_special_ids(tiny) -> None:
    gemma, _ = tiny["gemma3"]
    assert gemma.bos_id == 2 and gemma.eos_ids == {1, gemma.token_to_id("<end_of_turn>")}
    assert gemma.encode("hi")[0] == 2 and gemma.encode("hi", add_special_tokens=False)[0] != 2
    qwen, _ = tiny["qwen2"]
    assert qwen.eos_ids == {qwen.token_to_id("<|im_end|>"), qwen.token_to_id("<|endoftext|>")}
    assert qwen.encode("hi") == qwen.encode("hi", add_special_tokens=False)  # the file says add_bos_token false


def test_sentencepiece_merges_break_ties_like_transformers() -> None:
    from transformers.tokenization_utils_base import generate_merges
    tokens = ["a", "b", "c", "ab", "bc", "abc", "ca", "cab", "bca", "abca", "aa", "aaa", "aaaa", "bb"]
    vocab = {t: i for i, t in enumerate(tokens)}
    scores = {t: float(-(i // 3)) for i, t in enumerate(tokens)}  # groups of three share a score
    assert sentencepiece_merges(vocab, scores) == [tuple(m) for m in generate_merges(vocab, scores)]


def test_hf_directory_tokenizer_equals_transformers(tiny, tmp_path: Path) -> None:
    from transformers import AutoTokenizer
    _, ref = tiny["gemma3"]
    ref.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 5]}))
    mine = Tokenizer.from_hf_dir(tmp_path)
    assert_same_as_transformers(mine, AutoTokenizer.from_pretrained(tmp_path), TEXTS)
    assert mine.bos_id == 2 and {1, 5, mine.token_to_id("<end_of_turn>")} <= mine.eos_ids
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**cfg, "add_bos_token": False}))
    assert Tokenizer.from_hf_dir(tmp_path).encode("hi")[0] != 2


def test_hf_directory_without_tokenizer_json(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.model").write_bytes(b"\x00")
    with pytest.raises(ModelLoadError, match="no tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)


# ---- incremental detokenizer --------------------------------------------------------------------------------

def stream(tok: Tokenizer, ids: list[int], rng: random.Random) -> list[str]:
    """Push ids in random chunks of 1-3; the flushed remainder is the last piece."""
    detok, pieces, i = IncrementalDetokenizer(tok), [], 0
    while i < len(ids):
        n = rng.randint(1, 3)
        pieces.append(detok.push(ids[i: i + n]))
        i += n
    return pieces + [detok.flush()]


@pytest.mark.parametrize("arch", list(TINY))
def test_detokenizer_concatenates_to_full_decode(tiny, arch: str) -> None:
    tok, _ = tiny[arch]
    rng = random.Random(0)
    for text in TEXTS:
        ids = tok.encode(text)
        pieces = stream(tok, ids, rng)
        assert "".join(pieces) == tok.decode(ids), text
        assert not any("\ufffd" in p for p in pieces)  # never half a character
    # special tokens end a request, so streams are drawn from the others
    plain = [i for i in range(tok.vocab_size) if tok.decode([i], skip_special_tokens=True)]
    for _ in range(50):  # arbitrary sequences, including byte tokens that never form a valid character
        ids = rng.choices(plain, k=rng.randint(1, 30))
        assert "".join(stream(tok, ids, rng)) == tok.decode(ids)


def test_detokenizer_holds_back_a_partial_character(tiny) -> None:
    tok, _ = tiny["gemma3"]
    ids = tok.encode("語", add_special_tokens=False)  # not in the vocabulary: three byte-fallback tokens
    assert len(ids) == 3
    detok = IncrementalDetokenizer(tok)  # a byte run is held until a non-byte token (or flush) ends it
    assert [detok.push([i]) for i in ids] + [detok.push(tok.encode("a", add_special_tokens=False))] == \
        ["", "", "", "語a"]
    detok = IncrementalDetokenizer(tok)
    assert detok.push(ids[:2]) == "" and detok.flush() == tok.decode(ids[:2]) == "\ufffd\ufffd"


# ---- chat templates -----------------------------------------------------------------------------------------

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi "},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]


def test_gemma_default_chat_template(tiny) -> None:
    tok, _ = tiny["gemma3"]  # the GGUF carries no template: the Gemma family default applies
    text = tok.apply_chat_template(CHAT)
    assert text == ("<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
                    "<start_of_turn>model\nHello.<end_of_turn>\n"
                    "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n")
    assert tok.apply_chat_template(CHAT[1:2], add_generation_prompt=False) == \
        "<bos><start_of_turn>user\nHi<end_of_turn>\n"
    ids = tok.encode(text, add_special_tokens=False)
    assert ids.count(2) == 1 and ids[0] == 2 and ids.count(tok.token_to_id("<start_of_turn>")) == 4


def test_chatml_default_and_gguf_template(tiny, tmp_path: Path) -> None:
    qwen, _ = tiny["qwen2"]
    assert qwen.apply_chat_template(CHAT[1:2]) == "<|im_start|>user\n Hi <|im_end|>\n<|im_start|>assistant\n"
    path = tmp_path / "m.gguf"
    write_model(path, "llama", chat_template="{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}")
    tok = tokenizer_from_gguf(read_gguf(path).metadata, "llama")
    assert tok.apply_chat_template(CHAT[:2]) == "[system]Be brief.[user] Hi "


def test_template_errors_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="roles must alternate"):
        render_chat_template("{{ raise_exception('roles must alternate') }}", CHAT)
    with pytest.raises(ConfigError, match="syntax error"):
        render_chat_template("{% for %}", CHAT)


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__ }}", "{{ messages.append(1) }}", "{{ cycler.__init__.__globals__ }}",
    "{{ ().__class__.__base__.__subclasses__() }}"])
def test_sandbox_refuses_internals(template: str) -> None:
    messages = [{"role": "user", "content": "x"}]
    with pytest.raises(ConfigError, match="unsafe"):
        render_chat_template(template, messages)
    assert messages == [{"role": "user", "content": "x"}]


def test_template_helpers() -> None:
    out = render_chat_template("{{ messages | tojson }}|{{ strftime_now('%Y') | length }}",
                               [{"role": "user", "content": "<b>&ü"}])
    assert out == '[{"role": "user", "content": "<b>&ü"}]|4'


def test_model_without_template(tmp_path: Path) -> None:
    from tokenizers import Tokenizer as Backend
    from tokenizers import models
    Backend(models.WordLevel({"<unk>": 0, "hi": 1}, unk_token="<unk>")).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ConfigError, match="no chat template"):
        Tokenizer.from_hf_dir(tmp_path).apply_chat_template(CHAT)


# ---- the default model --------------------------------------------------------------------------------------

LONG_TEXTS = TEXTS + [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Ελληνικά, русский, العربية, עברית, हिन्दी, ภาษาไทย, 한국어, にほんご",
    "for (int i = 0; i < n; ++i) {\n        sum += a[i] * b[i];\n    }\n",
    "emoji: 😀😃😄😁 🧑🏽‍💻 ❤️‍🔥 🏳️‍🌈", "numbers 1234567890 3.14159 1e-10 0x7fff",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n", "<eos><pad><unk><mask>",
    "\u00a0non-breaking\u2009thin\u200bzero-width", "Ça va? Über straße naïve café",
]


@pytest.fixture(scope="module")
def gemma() -> Tokenizer:
    return tokenizer_from_gguf(read_gguf(resolve_model("gemma-3-270m")).metadata, "gemma3")


@pytest.mark.slow
def test_default_model_tokenizer_equals_transformers(gemma: Tokenizer) -> None:
    from transformers import AutoTokenizer
    path = resolve_model("gemma-3-270m")
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert gemma.vocab_size == len(ref) == 262144
    assert_same_as_transformers(gemma, ref, LONG_TEXTS)
    for text in LONG_TEXTS:
        assert gemma.decode(gemma.encode(text, add_special_tokens=False), skip_special_tokens=False) == text


@pytest.mark.slow
def test_default_model_specials_template_and_detokenizer(gemma: Tokenizer) -> None:
    assert gemma.bos_id == 2 and {1, 106} <= gemma.eos_ids and gemma.token_to_id("<end_of_turn>") == 106
    ids = gemma.encode(gemma.apply_chat_template([{"role": "user", "content": "Hi"}]), add_special_tokens=False)
    assert ids[:2] == [2, 105] and ids[-3:] == [105, 4368, 107]  # <start_of_turn>model\n
    rng = random.Random(1)
    for text in LONG_TEXTS:
        ids = gemma.encode(text)
        pieces = stream(gemma, ids, rng)
        assert "".join(pieces) == gemma.decode(ids) and not any("\ufffd" in p for p in pieces)

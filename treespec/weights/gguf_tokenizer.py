"""A `tokenizers` tokenizer rebuilt from GGUF metadata, matching what transformers builds from the same file.

Two vocabulary kinds (`tokenizer.ggml.model`):
- "llama": SentencePiece BPE with byte fallback. The file has tokens and scores but no merges, so the merges
  are recovered from the vocabulary: every split of a token into two tokens is a merge, ranked by the merged
  token's priority (its score; for Gemma its position in the file, since Gemma's scores do not follow its
  merge order), longer left parts first. Gemma files also spell whitespace-only tokens with real spaces where
  the model looks up U+2581, so those are respelled first.
- "gpt2": byte-level BPE (Llama 3, Qwen) with the file's merges and the family's pre-tokenizer regex.
Control tokens become special added tokens (kept whole, skipped by decode); user-defined ones plain added tokens.
"""
from __future__ import annotations

from enum import IntEnum
from itertools import groupby
from typing import Any, Sequence

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as Backend

from treespec.errors import ModelLoadError
from treespec.tokenizer import Tokenizer, special_tokens_processor

SPIECE_SPACE = "\u2581"


class TokenType(IntEnum):
    """llama.cpp's `tokenizer.ggml.token_type` values."""
    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> split regex; None: GPT-2's own regex (ByteLevel's default)
_BYTE_LEVEL_SPLITS: dict[str, str | None] = {
    "default": None, "gpt-2": None,
    "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
}


def tokenizer_from_gguf(meta: dict[str, Any], arch: str) -> Tokenizer:
    kind = meta.get("tokenizer.ggml.model")
    tokens: list[str] | None = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ModelLoadError("GGUF metadata has no tokenizer.ggml.tokens: cannot build a tokenizer")
    types = [int(t) for t in meta.get("tokenizer.ggml.token_type", [TokenType.NORMAL] * len(tokens))]
    if kind == "llama":
        backend = _sentencepiece(meta, tokens, gemma=arch.startswith("gemma"))
        _add_added_tokens(backend, tokens, types, spellable=lambda t: True)
    elif kind == "gpt2":
        backend = _byte_level(meta, tokens)
        alphabet = set(bytes_to_unicode().values())
        _add_added_tokens(backend, tokens, types, spellable=lambda t: set(t) <= alphabet)
    else:
        raise ModelLoadError(f"GGUF tokenizer model {kind!r} is not supported (supported: llama, gpt2)")
    bos_id, eos_id = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama"))  # SentencePiece files add bos
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    backend.post_processor = special_tokens_processor(backend, bos_id if add_bos else None,
                                                      eos_id if add_eos else None)
    extra_eos = frozenset(int(meta[k]) for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
                          if k in meta)
    return Tokenizer(backend, bos_id, eos_id, meta.get("tokenizer.chat_template"), extra_eos)


def _sentencepiece(meta: dict[str, Any], tokens: list[str], gemma: bool) -> Backend:
    if gemma:
        tokens = [SPIECE_SPACE * len(t) if " " in t and not t.strip() else t for t in tokens]
        priority = {t: -i for i, t in enumerate(tokens)}
    else:
        priority = dict(zip(tokens, (float(s) for s in meta.get("tokenizer.ggml.scores", [0.0] * len(tokens)))))
    vocab = {t: i for i, t in enumerate(tokens)}
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if isinstance(unk_id, int) and 0 <= unk_id < len(tokens) else None
    backend = Backend(models.BPE(vocab=vocab, merges=sentencepiece_merges(vocab, priority), unk_token=unk,
                                 fuse_unk=True, byte_fallback=True, dropout=None))
    steps = [decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if gemma:  # Gemma: spaces become U+2581 up front, no prefix space
        backend.normalizer = normalizers.Replace(" ", SPIECE_SPACE)
        backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    else:
        prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPIECE_SPACE, split=False,
                                                         prepend_scheme="first" if prefix else "never")
        if prefix:
            steps.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(steps)
    return backend


def sentencepiece_merges(vocab: dict[str, int], priority: dict[str, float]) -> list[tuple[str, str]]:
    """Every (left, right) with left, right and left+right in `vocab`, best merged token first.

    Ties in priority go to the longer left part, then the longer right part, then to the token listed first
    in `priority`: the order transformers' `generate_merges` produces. With distinct priorities (Gemma:
    262k tokens, 515k merges) there are no ties and this is one scan.
    """
    ranked = sorted(priority.items(), key=lambda kv: kv[1], reverse=True)  # stable: ties keep dict order
    if len({score for _, score in ranked}) == len(ranked):
        return _splits([token for token, _ in ranked], vocab)
    merges: list[tuple[str, str]] = []
    for _, group in groupby(ranked, key=lambda kv: kv[1]):
        splits = _splits([token for token, _ in group], vocab)
        splits.sort(key=lambda s: (len(s[0]), len(s[1])), reverse=True)
        merges.extend(splits)
    return merges


def _splits(tokens: list[str], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """(left, right) pairs of vocabulary tokens that make up each token, longest left part first."""
    out: list[tuple[str, str]] = []
    for token in tokens:
        for k in range(len(token) - 1, 0, -1):
            left = token[:k]
            if left in vocab:
                right = token[k:]
                if right in vocab:
                    out.append((left, right))
    return out


def _byte_level(meta: dict[str, Any], tokens: list[str]) -> Backend:
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _BYTE_LEVEL_SPLITS:
        raise ModelLoadError(f"GGUF pre-tokenizer {pre!r} is not supported "
                             f"(supported: {', '.join(sorted(_BYTE_LEVEL_SPLITS))})")
    spell = bytes_to_unicode()
    alphabet = set(spell.values())
    vocab = {t if set(t) <= alphabet else "".join(spell[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ")) for m in meta.get("tokenizer.ggml.merges", [])]
    if any(len(m) != 2 for m in merges):
        raise ModelLoadError("GGUF tokenizer.ggml.merges has an entry that is not two space-separated tokens")
    backend = Backend(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                 end_of_word_suffix="", fuse_unk=False))
    split = _BYTE_LEVEL_SPLITS[pre]
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    return backend


def _add_added_tokens(backend: Backend, tokens: Sequence[str], types: Sequence[int], spellable) -> None:
    """Control tokens -> special (matched whole, dropped by decode(skip_special_tokens)); user-defined -> plain.

    A byte-level vocabulary spells every real token in its byte alphabet; a control token outside it is a
    converter mislabel and is skipped, as is a user-defined token the (respelled) vocabulary does not hold.
    """
    control = [AddedToken(t, special=True, normalized=False)
               for t, k in zip(tokens, types) if k == TokenType.CONTROL and spellable(t)]
    backend.add_special_tokens(control)
    user = [AddedToken(t, special=False, normalized=False)
            for t, k in zip(tokens, types) if k == TokenType.USER_DEFINED and backend.token_to_id(t) is not None]
    backend.add_tokens(user)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte alphabet: printable Latin-1 bytes stand for themselves, the other 68 map to U+0100 upward."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spell = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in spell:
            spell[b] = chr(256 + extra)
            extra += 1
    return spell

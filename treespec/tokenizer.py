"""Tokenizer: a `tokenizers.Tokenizer` plus what generation needs around it (bos, stop ids, chat template).

Built from an HF directory (`tokenizer.json` + `tokenizer_config.json`) by `Tokenizer.from_hf_dir`, or from
GGUF metadata by `treespec.weights.gguf_tokenizer.tokenizer_from_gguf`. Special tokens (bos/eos) are added by
the backend's post-processor, so `encode(text)` equals transformers' `tokenizer(text).input_ids`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import tokenizers
from tokenizers import processors

from treespec.chat_template import default_chat_template, render_chat_template
from treespec.detokenizer import IncrementalDetokenizer
from treespec.errors import ConfigError, ModelLoadError

__all__ = ["Tokenizer", "IncrementalDetokenizer", "special_tokens_processor"]

# Tokens that end a turn in some family's chat format: generation stops on them even when the checkpoint
# names only <eos> (Gemma's <end_of_turn>, ChatML's <|im_end|>, Llama 3's <|eot_id|>/<|eom_id|>).
END_OF_TURN_TOKENS = ("<end_of_turn>", "<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")


class Tokenizer:
    def __init__(self, backend: tokenizers.Tokenizer, bos_id: int | None, eos_id: int | None,
                 chat_template: str | None = None, extra_eos_ids: frozenset[int] = frozenset()) -> None:
        self.backend = backend
        self.bos_id, self.eos_id = bos_id, eos_id
        # every id that ends generation: eos, the checkpoint's other stop ids, and end-of-turn markers
        self.eos_ids = {i for i in [eos_id] if i is not None} | set(extra_eos_ids) | _end_of_turn_ids(backend)
        self.ships_chat_template = bool(chat_template)  # the checkpoint's own, not a family default (bench's auto)
        self.chat_template = chat_template or default_chat_template(lambda t: backend.token_to_id(t) is not None)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **context: Any) -> str:
        """The prompt text for `messages` ([{role, content}]); encode it with add_special_tokens=False."""
        if self.chat_template is None:
            raise ConfigError("chat: this model has no chat template; send a plain prompt instead")
        specials = {"bos_token": self._token(self.bos_id), "eos_token": self._token(self.eos_id)}
        return render_chat_template(self.chat_template, messages, add_generation_prompt, **{**specials, **context})

    def _token(self, token_id: int | None) -> str:
        return "" if token_id is None else (self.backend.id_to_token(token_id) or "")

    @classmethod
    def from_hf_dir(cls, path: Path) -> "Tokenizer":
        """tokenizer.json (+ tokenizer_config.json, chat_template.jinja, config.json, generation_config.json)."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise ModelLoadError(f"{path}: no tokenizer.json (a sentencepiece tokenizer.model alone is not supported)")
        try:
            backend = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:  # the Rust side raises plain Exception on malformed JSON
            raise ModelLoadError(f"{path / 'tokenizer.json'}: unreadable tokenizer ({e})") from None
        cfg = _read_json(path / "tokenizer_config.json")
        bos, eos = _token_content(cfg.get("bos_token")), _token_content(cfg.get("eos_token"))
        bos_id = backend.token_to_id(bos) if bos else None
        eos_id = backend.token_to_id(eos) if eos else None
        extra_eos: set[int] = set()
        for extra in (_read_json(path / "config.json"), _read_json(path / "generation_config.json")):
            extra_eos |= _ids(extra.get("eos_token_id"))
            bos_id = bos_id if bos_id is not None else _first(extra.get("bos_token_id"))
            eos_id = eos_id if eos_id is not None else _first(extra.get("eos_token_id"))
        if "add_bos_token" in cfg or "add_eos_token" in cfg:  # the flags override tokenizer.json's processor
            backend.post_processor = special_tokens_processor(
                backend, bos_id if cfg.get("add_bos_token") else None, eos_id if cfg.get("add_eos_token") else None)
        return cls(backend, bos_id, eos_id, _chat_template(path, cfg), frozenset(extra_eos))


def special_tokens_processor(backend: tokenizers.Tokenizer, bos_id: int | None,
                             eos_id: int | None) -> processors.PostProcessor | None:
    """A post-processor adding bos before and/or eos after the text (None: add nothing)."""
    specials = [(backend.id_to_token(i), i) for i in (bos_id, eos_id) if i is not None]
    if not specials:
        return None
    bos = f"{backend.id_to_token(bos_id)} " if bos_id is not None else ""
    eos = f" {backend.id_to_token(eos_id)}" if eos_id is not None else ""
    return processors.TemplateProcessing(single=f"{bos}$A{eos}", special_tokens=specials)


def _end_of_turn_ids(backend: tokenizers.Tokenizer) -> set[int]:
    return {i for t in END_OF_TURN_TOKENS if (i := backend.token_to_id(t)) is not None}


def _chat_template(path: Path, cfg: dict[str, Any]) -> str | None:
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    template = cfg.get("chat_template")
    if isinstance(template, list):  # [{name, template}, ...]: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data


def _token_content(token: Any) -> str | None:
    """tokenizer_config spells a special token as a string or as {"content": ...}."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else None


def _first(value: Any) -> int | None:
    ids = value if isinstance(value, list) else [value]
    return next((v for v in ids if isinstance(v, int)), None)


def _ids(value: Any) -> set[int]:
    if isinstance(value, int):
        return {value}
    return {v for v in value if isinstance(v, int)} if isinstance(value, list) else set()

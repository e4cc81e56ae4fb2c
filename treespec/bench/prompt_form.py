"""How bench feeds a prompt to the model: through its chat template, or as text to continue (completion form).

A base model fed a chat-formatted prompt mostly echoes the turn format and the question back, which n-gram
drafting predicts perfectly, so chat form overstates speculation on base models. `auto` therefore picks chat form
only when the checkpoint ships its own chat template (a family default added by treespec does not count) and its
file or folder name does not mark it as a base model (`-pt`, `-base`, `base`); anything else runs in completion
form. In completion form a dataset's chat question (a `turns` row) is framed as `Question: ...\\nAnswer:` so that
a base model answers it; a `prompt` row is already text to continue and is fed as it is.
"""
from __future__ import annotations

import re
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

from treespec.bench.dataset import BenchPrompt
from treespec.errors import ConfigError

if TYPE_CHECKING:
    from treespec.api import LLM
    from treespec.tokenizer import Tokenizer

COMPLETION_FRAME = "Question: {question}\nAnswer:"
_BASE_NAME = re.compile(r"(^|[-_.\s])(pt|base)($|[-_.\s])", re.IGNORECASE)


class PromptForm(Enum):
    AUTO = "auto"
    CHAT = "chat"
    COMPLETION = "completion"


def resolve_form(form: PromptForm, tokenizer: Tokenizer, source: Path) -> tuple[PromptForm, str]:
    """The form `auto` stands for with this checkpoint, and why (one line for the report)."""
    if form is not PromptForm.AUTO:
        return form, "asked for"
    name = source.stem if source.is_file() else source.name
    if not tokenizer.ships_chat_template:
        return PromptForm.COMPLETION, "auto: the checkpoint ships no chat template (a base model)"
    if _BASE_NAME.search(name):
        return PromptForm.COMPLETION, f"auto: {name!r} names a base model"
    return PromptForm.CHAT, "auto: the checkpoint ships a chat template"


def prompt_text(prompt: BenchPrompt, form: PromptForm) -> str:
    """The text to send (through the chat template when `form` is CHAT)."""
    if form is PromptForm.COMPLETION and prompt.question:
        return COMPLETION_FRAME.format(question=prompt.text)
    return prompt.text


def asked_form(prompt_form: str, no_chat: bool) -> PromptForm:
    """`--prompt-form`, with `--no-chat` as an alias of `--prompt-form completion`."""
    form = PromptForm(prompt_form)
    if no_chat and form is PromptForm.CHAT:
        raise ConfigError("--no-chat contradicts --prompt-form chat")
    return PromptForm.COMPLETION if no_chat else form


def form_for(llm: LLM, asked: PromptForm) -> PromptForm:
    """The form `asked` stands for with this model (auto resolved), printed with the reason."""
    form, why = resolve_form(asked, llm.tokenizer, llm.checkpoint_source)
    print(f"prompt form: {form.value} ({why})")
    return form


def encode(llm: LLM, prompt: BenchPrompt, form: PromptForm) -> list[int]:
    """Token ids of a bench prompt in `form` (CHAT or COMPLETION)."""
    return llm.encode_prompt(prompt_text(prompt, form), chat=form is PromptForm.CHAT)

"""Chat templates: Jinja rendered in a sandbox, as transformers does, plus family defaults for GGUFs without one.

A chat template comes with the checkpoint, so it is untrusted code: it runs in Jinja's immutable sandbox
(no attribute access to internals such as `__class__`, no mutating methods), and every template failure,
including the template's own `raise_exception(...)`, becomes one `ConfigError` line.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from treespec.errors import ConfigError

# Gemma 3: turns are <start_of_turn>{user|model}\n...<end_of_turn>\n; Gemma has no system role, so a system
# message is folded into the first user turn (as Google's own template does). Text parts of list contents
# are joined.
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{%- set sys = messages[0]['content'] + '\\n\\n' if messages and messages[0]['role'] == 'system' else '' -%}"
    "{%- for m in (messages[1:] if sys else messages) -%}"
    "{%- set text = m['content'] if m['content'] is string "
    "else m['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') -%}"
    "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\\n' }}"
    "{{ (sys if loop.first else '') + text | trim + '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)

# ChatML (Qwen and others): <|im_start|>{role}\n...<|im_end|>\n
CHATML_TEMPLATE = (
    "{%- for m in messages -%}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

# the marker token that identifies a family's turn format -> its default template
_DEFAULTS = {"<start_of_turn>": GEMMA_TEMPLATE, "<|im_start|>": CHATML_TEMPLATE}


def default_chat_template(has_token) -> str | None:
    """The family template for a vocabulary (has_token: str -> bool), or None if no family matches."""
    return next((t for marker, t in _DEFAULTS.items() if has_token(marker)), None)


def render_chat_template(template: str, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                         **context: Any) -> str:
    """Render `template` over `messages` (HF's variable names: messages, add_generation_prompt, bos_token...)."""
    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **context)
    except jinja2.TemplateError as e:
        raise ConfigError(f"chat template: {e}") from None


class _TemplateRaised(jinja2.TemplateError):
    """Raised by a template's own raise_exception(message)."""


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """HF's tojson: plain json.dumps (Jinja's built-in HTML-escapes <, >, & and ')."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(f"chat template: syntax error on line {e.lineno}: {e.message}") from None

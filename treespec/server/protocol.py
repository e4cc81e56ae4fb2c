"""OpenAI-compatible request bodies, validated strictly (a wrong type is an error, not a silent coercion).

Ranges follow the OpenAI API where it sets them; `speculate` (default true) is treespec's extra field to turn
speculation off for one request; `ignore_eos`, `top_k`, `min_p`, `repetition_penalty`, `stop_token_ids`,
`return_token_ids` and `stream_options.continuous_usage_stats` are the usual vLLM extras.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from treespec.sampling import SamplingParams

MAX_N = 16             # choices per request
MAX_STOP = 16          # stop strings per request
MAX_STOP_LEN = 256     # characters per stop string
MAX_STOP_IDS = 64
MAX_SEED = 2**63 - 1

StopString = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_LEN)]
TokenId = Annotated[int, Field(ge=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's extension: usage (so far) on every chunk


class SamplingFields(_Strict):
    """Fields shared by /v1/completions and /v1/chat/completions."""
    model: str | None = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    temperature: float = Field(default=1.0, ge=0.0, le=100.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1)          # 0 or -1: off
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stop: StopString | list[StopString] | None = Field(default=None)
    stop_token_ids: list[TokenId] | None = Field(default=None, max_length=MAX_STOP_IDS)
    ignore_eos: bool = False
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    speculate: bool = True
    return_token_ids: bool = False                # vLLM's extension: token ids on each choice / chunk
    user: str | None = None                       # accepted and ignored, as OpenAI's abuse-monitoring hint

    @model_validator(mode="after")
    def _check(self):
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stops) > MAX_STOP:
            raise ValueError(f"stop: at most {MAX_STOP} stop strings")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        return self

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        return SamplingParams(n=self.n, max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, min_p=self.min_p, seed=self.seed, stop=self.stop_list or None,
                              stop_token_ids=list(self.stop_token_ids or []) or None, ignore_eos=self.ignore_eos,
                              presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                              repetition_penalty=self.repetition_penalty)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)


class CompletionRequest(SamplingFields):
    # A string, a list of token ids, or a one-element list of either (batched prompts: one request per prompt).
    prompt: str | list[TokenId] | list[str] | list[list[TokenId]]
    max_tokens: int | None = Field(default=16, ge=1)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0)
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1, le=MAX_N)

    @model_validator(mode="after")
    def _one_prompt(self):
        p = self.prompt
        if isinstance(p, list) and p and not isinstance(p[0], int):
            if len(p) != 1:
                raise ValueError("prompt: batched prompts are not supported; send one request per prompt")
            self.prompt = p[0]
        if not self.prompt:
            raise ValueError("prompt: must not be empty")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of: only best_of == n is supported")
        for name in ("echo", "logprobs", "suffix"):
            if getattr(self, name):
                raise ValueError(f"{name}: not supported")
        return self


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_template_input(self) -> dict:
        """The plain {role, content} dict chat templates expect (text parts joined)."""
        content = self.content if isinstance(self.content, str) or self.content is None \
            else "".join(part.text for part in self.content)
        return {"role": self.role, "content": content or ""}


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=1024)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _unsupported(self):
        if self.logprobs or self.top_logprobs:
            raise ValueError("logprobs: not supported")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

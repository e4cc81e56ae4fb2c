"""OpenAI response and SSE chunk bodies for completions and chat completions, built from engine deltas."""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from enum import Enum

from treespec.engine.async_engine import RequestDelta
from treespec.engine.request import FinishReason

DONE = b"data: [DONE]\n\n"


class Endpoint(Enum):
    COMPLETION = "text_completion"
    CHAT = "chat.completion"

    @property
    def id_prefix(self) -> str:
        return "cmpl" if self is Endpoint.COMPLETION else "chatcmpl"


def sse(payload: dict) -> bytes:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


@dataclass
class ChoiceState:
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    error: str | None = None
    metrics: dict | None = None


class ResponseBuilder:
    """Accumulates the deltas of one request's n choices; renders chunks, the full response and usage."""

    def __init__(self, endpoint: Endpoint, model: str, num_prompt_tokens: int, n: int,
                 return_token_ids: bool = False) -> None:
        self.endpoint, self.model, self.num_prompt_tokens = endpoint, model, num_prompt_tokens
        self.return_token_ids = return_token_ids
        self.id = f"{endpoint.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.choices = [ChoiceState() for _ in range(n)]

    def add(self, delta: RequestDelta) -> None:
        c = self.choices[delta.index]
        c.text.append(delta.text)
        c.token_ids.extend(delta.token_ids)
        if delta.finish_reason is not None:
            c.finish_reason, c.error, c.metrics = delta.finish_reason, delta.error, delta.metrics

    @property
    def error(self) -> str | None:
        return next((c.error or "request failed" for c in self.choices if c.finish_reason is FinishReason.ERROR), None)

    def usage(self) -> dict:
        completion = sum(len(c.token_ids) for c in self.choices)
        return {"prompt_tokens": self.num_prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.num_prompt_tokens + completion, "speculation": self._speculation()}

    def _speculation(self) -> dict:
        """Speculation counters summed over the finished choices (tokens/step = 1 + accepted / steps)."""
        done = [c.metrics for c in self.choices if c.metrics]
        steps = sum(m["num_steps"] for m in done)
        accepted = sum(m["num_accepted_tokens"] for m in done)
        per_pos: list[int] = []
        for m in done:
            for d, k in enumerate(m["accepted_per_position"]):
                per_pos.extend([0] * (d + 1 - len(per_pos)))
                per_pos[d] += k
        return {"num_steps": steps, "num_draft_tokens": sum(m["num_draft_tokens"] for m in done),
                "num_accepted_tokens": accepted, "accepted_per_position": per_pos,
                "mean_tokens_per_step": round(1 + accepted / steps, 4) if steps else 0.0}

    # ---- non-streaming ----------------------------------------------------------------------------------------
    def response(self) -> dict:
        choices = []
        for i, c in enumerate(self.choices):
            text, reason = "".join(c.text), _reason(c.finish_reason)
            if self.endpoint is Endpoint.COMPLETION:
                choice = {"index": i, "text": text, "logprobs": None, "finish_reason": reason}
            else:
                choice = {"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                          "finish_reason": reason}
            if self.return_token_ids:
                choice["token_ids"] = list(c.token_ids)
            choices.append(choice)
        return {"id": self.id, "object": self.endpoint.value, "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage()}

    # ---- streaming --------------------------------------------------------------------------------------------
    def role_chunks(self) -> list[dict]:
        """Chat streams open each choice with a delta carrying only the role."""
        if self.endpoint is not Endpoint.CHAT:
            return []
        return [self._chunk(i, {"role": "assistant", "content": ""}, None) for i in range(len(self.choices))]

    def delta_chunks(self, delta: RequestDelta) -> list[dict]:
        reason = _reason(delta.finish_reason)
        ids = delta.token_ids if self.return_token_ids else []
        if self.endpoint is Endpoint.COMPLETION:
            return [self._chunk(delta.index, delta.text, reason, ids)] if delta.text or ids or reason else []
        chunks = [self._chunk(delta.index, {"content": delta.text}, None, ids)] if delta.text or ids else []
        if reason:
            chunks.append(self._chunk(delta.index, {}, reason, []))
        return chunks

    def usage_chunk(self) -> dict:
        return {"id": self.id, "object": self._chunk_object, "created": self.created, "model": self.model,
                "choices": [], "usage": self.usage()}

    @property
    def _chunk_object(self) -> str:
        return "text_completion" if self.endpoint is Endpoint.COMPLETION else "chat.completion.chunk"

    def _chunk(self, index: int, content: str | dict, reason: str | None, token_ids: list[int] | None = None) -> dict:
        choice = {"index": index, "logprobs": None, "finish_reason": reason}
        choice["text" if self.endpoint is Endpoint.COMPLETION else "delta"] = content
        if self.return_token_ids:
            choice["token_ids"] = list(token_ids or [])
        return {"id": self.id, "object": self._chunk_object, "created": self.created, "model": self.model,
                "choices": [choice]}


def _reason(reason: FinishReason | None) -> str | None:
    return None if reason is None else reason.value

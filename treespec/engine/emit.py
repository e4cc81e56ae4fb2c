"""Emit: append a step's tokens to a request, apply stop conditions, and detokenize incrementally."""
from __future__ import annotations

from treespec.engine.request import FinishReason, Request


def first_stop_index(tokens: list[int], request: Request, eos_ids: set[int]) -> int | None:
    """Index of the first token that ends the request (eos unless ignore_eos, or a stop token id)."""
    stop_ids = set(request.params.stop_token_ids or ())
    if not request.params.ignore_eos:
        stop_ids |= eos_ids
    for i, t in enumerate(tokens):
        if t in stop_ids:
            return i
    return None


def emit_tokens(request: Request, tokens: list[int], eos_ids: set[int], max_len: int) -> list[int]:
    """Append the accepted tokens + bonus to the request; finish it on eos / stop id / max_tokens / context.

    Returns the tokens actually appended (stop token included, like vLLM's token_ids; its text is not).
    """
    params = request.params
    room = params.max_tokens - len(request.output_ids)
    stop_at = first_stop_index(tokens, request, eos_ids)
    if stop_at is not None and stop_at < room:
        kept = tokens[: stop_at + 1]
        request.output_ids.extend(kept)
        request.finish(FinishReason.STOP)
        return kept
    kept = tokens[:room]
    request.output_ids.extend(kept)
    if len(request.output_ids) >= params.max_tokens or len(request.all_ids) >= max_len:
        request.finish(FinishReason.LENGTH)
    return kept


def apply_stop_strings(request: Request, new_text: str) -> None:
    """Append new_text to request.text; on a stop string, cut the text before it and finish the request."""
    stops = request.params.stop or []
    request.text += new_text
    if not stops:
        return
    search_from = max(0, request.stop_checked - max(len(s) for s in stops) + 1)
    hits = [i for s in stops if (i := request.text.find(s, search_from)) >= 0]
    if hits:
        request.text = request.text[: min(hits)]
        request.finish(FinishReason.STOP)
    request.stop_checked = len(request.text)


def stream_delta(request: Request) -> str:
    """Text not streamed yet, holding back a tail that could still grow into a stop string."""
    end = len(request.text)
    if not request.finished:
        for s in request.params.stop or []:
            for k in range(min(len(s) - 1, end), 0, -1):
                if request.text.endswith(s[:k]):
                    end = min(end, len(request.text) - k)
                    break
    end = max(end, request.num_streamed)
    delta = request.text[request.num_streamed:end]
    request.num_streamed = end
    return delta

"""Spec-Bench prompts (shipped with the package) or any JSONL with a `turns` or `prompt` field."""
from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from treespec.errors import ConfigError

# Spec-Bench's six categories; its MT-bench rows carry their own eight sub-categories.
MT_BENCH = {"writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"}
CATEGORY_ORDER = ["mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag"]


@dataclass
class BenchPrompt:
    question_id: str
    category: str
    text: str
    question: bool = False  # a chat turn (a `turns` row) rather than text to continue (a `prompt` row)


def default_dataset() -> Path:
    return Path(str(resources.files("treespec") / "data" / "spec_bench" / "question.jsonl"))


def load_prompts(path: str | Path | None = None, limit: int | None = None) -> list[BenchPrompt]:
    """First-turn prompts; `limit` keeps the first N of each category (in file order)."""
    path = Path(path) if path else default_dataset()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"dataset: cannot read {path}: {e}") from None
    prompts: list[BenchPrompt] = []
    per_cat: dict[str, int] = {}
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise ConfigError(f"dataset: {path}:{no} is not valid JSON") from None
        row = row if isinstance(row, dict) else {}
        question = isinstance(row.get("turns"), list)
        text = (row["turns"] or [None])[0] if question else row.get("prompt")
        if not isinstance(text, str) or not text:
            raise ConfigError(f"dataset: {path}:{no} has neither a 'turns' list nor a 'prompt' string")
        cat = str(row.get("category", "default"))
        cat = "mt_bench" if cat in MT_BENCH else cat
        if limit is not None and per_cat.get(cat, 0) >= limit:
            continue
        per_cat[cat] = per_cat.get(cat, 0) + 1
        prompts.append(BenchPrompt(str(row.get("question_id", no)), cat, text, question))
    if not prompts:
        raise ConfigError(f"dataset: {path} holds no prompts")
    return prompts


def category_order(cats: set[str]) -> list[str]:
    return [c for c in CATEGORY_ORDER if c in cats] + sorted(cats - set(CATEGORY_ORDER))

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
        text = row.get("turns", [None])[0] if isinstance(row.get("turns"), list) else row.get("prompt")
        if not isinstance(text, str) or not text:
            raise ConfigError(f"dataset: {path}:{no} has neither a 'turns' list nor a 'prompt' string")
        cat = row.get("category", "default")
        cat = "mt_bench" if cat in MT_BENCH else cat
        if limit is not None and per_cat.get(cat, 0) >= limit:
            continue
        per_cat[cat] = per_cat.get(cat, 0) + 1
        prompts.append(BenchPrompt(str(row.get("question_id", no)), cat, text))
    if not prompts:
        raise ConfigError(f"dataset: {path} holds no prompts")
    return prompts


def category_order(cats: set[str]) -> list[str]:
    return [c for c in CATEGORY_ORDER if c in cats] + sorted(cats - set(CATEGORY_ORDER))

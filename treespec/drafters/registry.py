"""Build the drafters a SpecConfig names; `method: auto` adds the drafters shipped for the loaded model (if they pay)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from treespec.config import DrafterConfig, DrafterMethod, DraftRequests, DraftSampling, SpecConfig
from treespec.device import Placement
from treespec.drafters.base import ConfiguredDrafter
from treespec.drafters.ngram import NgramDrafter

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "data" / "drafters"  # one directory per target alias


def build_drafters(spec: SpecConfig, target: torch.nn.Module, tokenizer,
                   placement: Placement | None = None) -> list[ConfiguredDrafter]:
    """The configured drafters; draft models are loaded with the target's placement (device, dtype, kernels)."""
    drafters: list[ConfiguredDrafter] = []
    for i, cfg in enumerate(spec.drafters):
        if cfg.method is DrafterMethod.NGRAM:
            drafters.append(NgramDrafter(cfg, i, tokenizer))
        elif cfg.method is DrafterMethod.DRAFT_MODEL:
            from treespec.drafters.model import ModelDrafter
            drafters.append(ModelDrafter.load(cfg, i, target, tokenizer, placement))
        elif cfg.method is DrafterMethod.LAYER_SKIP:
            from treespec.drafters.layer_skip import LayerSkipDrafter
            drafters.append(LayerSkipDrafter(cfg, i, target))
        elif cfg.method is DrafterMethod.LEARNED:
            from treespec.drafters.learned import LearnedDrafter
            drafters.append(LearnedDrafter.load(cfg, i, target, tokenizer))
    return drafters


def shipped_drafters(source: Path) -> list[Path]:
    """Drafter directories shipped for the checkpoint at `source` (its config.json names the target's alias)."""
    from treespec.errors import ModelLoadError
    from treespec.weights.loader import resolve_model
    found = []
    for cfg_file in sorted(SHIPPED_DIR.glob("*/config.json")):
        alias = json.loads(cfg_file.read_text()).get("target", "")
        try:
            if resolve_model(alias).resolve() == Path(source).resolve():
                found.append(cfg_file.parent)
        except ModelLoadError:  # the alias's package is not installed
            continue
    return found


def resolve_auto(spec: SpecConfig, source: Path) -> SpecConfig:
    """`method: auto` -> its n-gram drafter merged with the drafters shipped for this model that pay.

    A shipped drafter joins only if its `auto.json` says `"use_in_auto": true`, which records a Spec-Bench
    measurement (merged vs n-gram alone, same run); drafting settings come from the same file. Its `"sampling"`
    entry names a drafter for sampling requests (measured at T = 1); then those requests get that drafter with
    coupled drafting, and greedy requests the others.
    """
    if not spec.auto:
        return spec
    learned, sampling = [], []
    for path in shipped_drafters(source):
        policy = _auto_policy(path)
        if policy.get("use_in_auto") is True:
            learned.append(DrafterConfig(DrafterMethod.LEARNED, model=str(path), **policy.get("drafter", {})))
        if isinstance(policy.get("sampling"), dict) and isinstance(policy["sampling"].get("drafter"), dict):
            sampling.append(_sampling_drafter(path, policy["sampling"]["drafter"]))
    drafters = learned + list(spec.drafters)
    if not sampling:
        return dataclasses.replace(spec, drafters=drafters, auto=False)
    greedy = [dataclasses.replace(d, requests=DraftRequests.GREEDY) for d in drafters]
    draft_sampling = DraftSampling.COUPLED if spec.draft_sampling is DraftSampling.IID else spec.draft_sampling
    return dataclasses.replace(spec, drafters=greedy + sampling, draft_sampling=draft_sampling, auto=False)


def _sampling_drafter(path: Path, d: dict) -> DrafterConfig:
    """auto.json's drafter for sampling requests (e.g. the fp16 self-draft); a counts file is relative to `path`."""
    d = dict(d, requests=DraftRequests.SAMPLING.value)
    if d.get("draft_vocab_counts"):
        d["draft_vocab_counts"] = str(path / d["draft_vocab_counts"])
    return DrafterConfig.from_dict(d)


def _auto_policy(path: Path) -> dict:
    try:
        policy = json.loads((path / "auto.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return policy if isinstance(policy, dict) else {}

"""Build the drafters a SpecConfig names."""
from __future__ import annotations

import torch

from treespec.config import DrafterMethod, SpecConfig
from treespec.drafters.base import Drafter
from treespec.drafters.ngram import NgramDrafter


def build_drafters(spec: SpecConfig, target: torch.nn.Module, tokenizer) -> list[Drafter]:
    drafters: list[Drafter] = []
    for i, cfg in enumerate(spec.drafters):
        if cfg.method is DrafterMethod.NGRAM:
            drafters.append(NgramDrafter(cfg, i, tokenizer))
        elif cfg.method is DrafterMethod.DRAFT_MODEL:
            from treespec.drafters.model import ModelDrafter
            drafters.append(ModelDrafter.load(cfg, i, target, tokenizer))
        elif cfg.method is DrafterMethod.LAYER_SKIP:
            from treespec.drafters.layer_skip import LayerSkipDrafter
            drafters.append(LayerSkipDrafter(cfg, i, target))
    return drafters

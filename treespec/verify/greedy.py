"""Greedy verification (SpecInfer VerifyGreedy): follow the target's argmax down the tree."""
from __future__ import annotations

import torch

from treespec.tree.token_tree import TokenTree
from treespec.verify.result import VerifyResult


def verify_greedy(tree: TokenTree, target_argmax: torch.Tensor) -> VerifyResult:
    """target_argmax: [n] long, the target's argmax at every node. Output equals plain greedy decoding."""
    choice = target_argmax.tolist()
    child_of = {(par, tok): i for i, (par, tok) in enumerate(zip(tree.parents.tolist(), tree.tokens.tolist()))}
    path = [0]
    while (path[-1], choice[path[-1]]) in child_of:
        path.append(child_of[(path[-1], choice[path[-1]])])
    return VerifyResult(path, int(choice[path[-1]]))

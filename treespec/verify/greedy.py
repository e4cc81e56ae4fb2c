"""Greedy verification (SpecInfer VerifyGreedy): follow the target's choice down the tree.

The same walk verifies sampling when every proposal is one-hot: choose(u) is then the target's own draw at node
u (a Gumbel-max draw with the noise of u's output position), and descending into the child holding that token,
else emitting it, is the one-hot acceptance rule with its residual, written as one draw.
"""
from __future__ import annotations

from typing import Callable

import torch

from treespec.tree.token_tree import TokenTree
from treespec.verify.result import VerifyResult


def verify_greedy(tree: TokenTree, target_argmax: torch.Tensor) -> VerifyResult:
    """target_argmax: [n] long, the target's argmax at every node. Output equals plain greedy decoding."""
    return follow_target(tree, target_argmax.tolist().__getitem__)


def follow_target(tree: TokenTree, choose: Callable[[int], int]) -> VerifyResult:
    """Descend while the target's choice at the current node is one of its children; that choice at the last
    node is the bonus token. choose(u) is called once per visited node, root first."""
    child_of = {(par, tok): i for i, (par, tok) in enumerate(zip(tree.parents.tolist(), tree.tokens.tolist()))}
    path = [0]
    while True:
        y = int(choose(path[-1]))
        if (path[-1], y) not in child_of:
            return VerifyResult(path, y)
        path.append(child_of[(path[-1], y)])

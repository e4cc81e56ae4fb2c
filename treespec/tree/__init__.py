"""Token trees: structure (token_tree) and construction (build)."""
from treespec.tree.build import SPECINFER_EXPANSION, draw_children, expand_static, grow_best_first, merge_trees
from treespec.tree.token_tree import DraftKind, Proposal, Stage, TokenTree

__all__ = ["DraftKind", "Proposal", "SPECINFER_EXPANSION", "Stage", "TokenTree", "draw_children", "expand_static",
           "grow_best_first", "merge_trees"]

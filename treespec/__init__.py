"""treespec: speculative inference with token-tree verification."""

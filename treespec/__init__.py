"""treespec: speculative inference with token-tree verification."""
from typing import Any

__all__ = ["LLM", "SamplingParams", "RequestOutput"]


def __getattr__(name: str) -> Any:  # lazy: `import treespec.tree` must not load models, weights or servers
    if name in ("LLM", "RequestOutput"):
        from treespec import api
        return getattr(api, name)
    if name == "SamplingParams":
        from treespec.sampling import SamplingParams
        return SamplingParams
    raise AttributeError(name)

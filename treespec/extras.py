"""Optional dependency groups (pyproject's extras). Generation needs none of them; the commands that do check
here, at the CLI's entry point, before importing their modules: a missing extra is one line, not a traceback."""
from __future__ import annotations

import importlib
from enum import Enum

from treespec.errors import MissingExtraError


class Extra(Enum):
    SERVE = "serve"  # the OpenAI-compatible server
    BENCH = "bench"  # HF transformers (--mode ar), plots, the load generator's HTTP client
    DISTRIBUTED = "distributed"  # Ray: worker ranks placed on a Ray cluster, or Ray Serve replicas (serve -dp K)


# the top-level modules each extra provides (pyproject.toml lists their distributions)
MODULES: dict[Extra, tuple[str, ...]] = {
    Extra.SERVE: ("fastapi", "uvicorn", "prometheus_client"),
    Extra.BENCH: ("transformers", "matplotlib", "httpx"),
    Extra.DISTRIBUTED: ("ray", "ray.serve"),
}


def require(extra: Extra, command: str) -> None:
    """Raise MissingExtraError naming the extra to install unless all of its modules import."""
    for name in MODULES[extra]:
        try:
            importlib.import_module(name)
        except ImportError:
            raise MissingExtraError(f"{command} needs the '{extra.value}' extra: "
                                    f"pip install 'treespec[{extra.value}]'") from None

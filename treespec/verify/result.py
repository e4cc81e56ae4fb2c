"""The outcome of verifying one token tree."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class VerifyResult:
    path: list[int]     # accepted node indices from the root: path[0] == 0; accepted tokens = tokens[path[1:]]
    bonus_token: int    # the token the target emits after path[-1]

    @property
    def num_accepted(self) -> int:
        return len(self.path) - 1

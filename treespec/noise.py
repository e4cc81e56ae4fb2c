"""Per-position noise: the seeded randomness that makes a seeded speculative run emit what seeded plain sampling
emits.

The token at output position k is drawn with noise fixed by (request seed, k) alone, whatever the tree or the
batch: one uniform for inverse-CDF draws (verify/stochastic.py) and one row of uniforms for Gumbel-max draws
(models/head_sampler.py; coupled drafting draws its children under the same row). `PositionNoise` is that noise
as seen from one step's tree: depth d below the root is output position first_position + d. The engine makes
one per request and step and hands it to the drafters and the verifier.
"""
from __future__ import annotations

import torch

_GUMBEL_STREAM = 0x5851F42D4C957F2D  # xor'ed into the position seed: the Gumbel rows are apart from the uniforms


def gumbel(u: torch.Tensor) -> torch.Tensor:  # u: any shape, float64 in [0, 1) -> Gumbel(0, 1) noise
    """g(u) = -log(-log u): argmax_v (log q_v + g(u_v)) is a draw from q (Gumbel-max)."""
    return -torch.log(-torch.log(u))


class RequestNoise:
    """One request's noise streams, seeded by (seed, output position). Gumbel rows are kept until their position
    is emitted: coupled drafting and the verification of the same step read the same rows, and rows of positions
    drafted but not reached are read again next step."""

    def __init__(self, seed: int, device: torch.device | str = "cpu") -> None:
        """device: where the Gumbel rows are drawn (the model's: a CUDA generator there, so the streams differ
        from the CPU's; the uniforms of inverse-CDF draws stay on the host, where the acceptance walk reads them)."""
        self.seed, self.device = seed, torch.device(device)
        self.rows: dict[int, torch.Tensor] = {}  # output position -> its Gumbel-max uniforms [V] float64

    def uniform(self, k: int) -> float:
        """The uniform that samples output token k by inverse CDF."""
        return float(torch.rand((), generator=self._generator(k), dtype=torch.float64))

    def gumbel_uniforms(self, k: int, vocab_size: int, emitted: int) -> torch.Tensor:  # -> [vocab_size] float64
        """The uniforms behind the Gumbel-max draw of output token k; rows of positions below `emitted` (the
        output length) are dropped when a new row is made."""
        u = self.rows.get(k)
        if u is None or u.shape[0] != vocab_size:
            for old in [j for j in self.rows if j < emitted]:
                del self.rows[old]
            u = self.rows[k] = torch.rand(vocab_size, generator=self._generator(k, _GUMBEL_STREAM, self.device),
                                          dtype=torch.float64, device=self.device)
        return u

    def _generator(self, k: int, stream: int = 0, device: torch.device | None = None) -> torch.Generator:
        """A generator seeded by (request seed, output position k), xor `stream` to keep draws apart."""
        g = torch.Generator() if device is None or device.type == "cpu" else torch.Generator(device)
        return g.manual_seed((self.seed * 0x9E3779B1 + k) % 2**63 ^ stream)


class PositionNoise:
    """The noise below one tree's root: depth d is output position first_position + d (the root's own output
    position is first_position: the token emitted after it)."""

    def __init__(self, noise: RequestNoise, first_position: int, vocab_size: int) -> None:
        self.noise, self.first_position, self.vocab_size = noise, first_position, vocab_size

    def uniform(self, d: int) -> float:
        """The inverse-CDF uniform of the token emitted after a node at depth d."""
        return self.noise.uniform(self.first_position + d)

    def gumbel_uniforms(self, d: int) -> torch.Tensor:  # -> [vocab_size] float64
        """The uniforms u of the Gumbel-max draw after a node at depth d (noise g = gumbel(u)); callers read u
        itself where it is cheaper (block maxima, thresholds: g is increasing in u)."""
        return self.noise.gumbel_uniforms(self.first_position + d, self.vocab_size, self.first_position)

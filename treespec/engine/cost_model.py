"""Choosing tree sizes: measured verify cost c(n) against the expected accepted tokens of each draft node.

A node's score is the drafter's estimate that it gets accepted (product of draft probabilities along its path,
or an observed per-depth acceptance rate for drafters without probabilities); scores never rise from parent to
child, so keeping the best-scored nodes keeps every tree connected. The engine keeps, across all requests of a
step, the best nodes while expected tokens per second still rises:  (sum of roots + kept scores) / (c(n) + draft).
"""
from __future__ import annotations

import bisect
import hashlib
import json
import os
import statistics
import time
from collections import deque
from pathlib import Path

import torch

from treespec.device import synchronize

GRID = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)
# Ordinary prose for the measurement (see CostModel.measure), tokenized by the model's own tokenizer.
CALIBRATION_TEXT = (
    "The old lighthouse keeper climbed the narrow stairs every evening at dusk. He checked the lamp, wiped the "
    "salt from the windows and wrote the weather in a worn notebook: wind from the west, light rain, three ships "
    "passing north. In winter the storms were long and the supply boat came only twice a month, so he kept a "
    "garden of potatoes and onions behind the house and read the same books again. Questions people asked him "
    "most often: was he lonely, how did the lamp work, and why did he stay. He answered that the sea was never "
    "the same two days in a row, and that someone had to keep the light burning for those who were still out.")
_VERSION = 9  # bump when the forward's speed changes enough to invalidate cached measurements


# Online correction (CostCurve.observe). What sizes trees is the curve's shape (c(n) against c(1) and its
# neighbours), so an observed step is read against the machine's current load: its ratio to the curve divided by
# the median ratio of the last LOAD_WINDOW one-token steps (those of the last ANCHOR_AGE steps; of any size where
# there are none). A grid point whose last OBSERVATIONS load-relative ratios have a median a factor DRIFT or more
# away from 1 is rescaled by it. A curve measured on a busy machine (steep: speculation never looks worth it) is
# thereby corrected, while a busy spell, which slows every size alike, corrects nothing. c(1) is the anchor and is
# never rescaled: ratios between sizes cannot tell which one drifted, and when trees are most steps, a c(1)
# rescaled against them (seen: x1.6) made every tree look cheap and speculation slower.
DRIFT = 2.0
OBSERVATIONS = 3
LOAD_WINDOW = 3
ANCHOR_AGE = 16


class CostCurve:
    """c(n): seconds of one target forward plus its head over n query tokens, piecewise linear.

    Points are measured once (CostModel.measure) and corrected online from observed steps (`observe`). A point the
    engine never reaches (a steep curve keeps trees small) is reached by probing (`probe_size`) until observed.
    """

    def __init__(self, points: dict[int, float]) -> None:
        self.points = dict(points)
        self.load: deque[float] = deque(maxlen=LOAD_WINDOW)  # observed / predicted of recent steps, any size
        self.anchor: deque[tuple[int, float]] = deque(maxlen=LOAD_WINDOW)  # (step, observed / c(1)) of 1-token ones
        self.steps = 0
        self.ratios: dict[int, deque[float]] = {n: deque(maxlen=OBSERVATIONS) for n in points}  # load-relative
        self.confirmed: set[int] = set()  # grid points whose observed cost agrees with the curve
        self._smooth()

    def _smooth(self) -> None:
        self.ns = sorted(self.points)
        self.ts: list[float] = []
        for n in self.ns:  # more nodes never cost less: smooth out timing noise
            self.ts.append(max([self.points[n]] + self.ts[-1:]))

    def __call__(self, n: int) -> float:
        ns, ts = self.ns, self.ts
        if n <= ns[0] or len(ns) == 1:
            return ts[0]
        i = min(bisect.bisect_left(ns, n), len(ns) - 1)  # past the grid: extrapolate with the last slope
        n0, n1, t0, t1 = ns[i - 1], ns[i], ts[i - 1], ts[i]
        return t0 + (t1 - t0) * (n - n0) / (n1 - n0)

    def as_dict(self) -> dict[int, float]:
        return dict(zip(self.ns, self.ts))

    def observe(self, n: int, seconds: float) -> bool:
        """A step over n query tokens took `seconds`; True if that corrected the curve."""
        g = min(self.ns, key=lambda m: (abs(m - n), m))
        self.steps += 1
        observed = seconds / self(n)
        self.load.append(observed)
        if g == self.ns[0]:  # the anchor: its steps measure the load
            self.anchor.append((self.steps, observed))
            self.confirmed.add(g)
            return False
        recent = [r for step, r in self.anchor if self.steps - step <= ANCHOR_AGE]
        ratios = self.ratios[g]
        ratios.append(observed / statistics.median(recent or self.load))
        if len(ratios) < OBSERVATIONS:
            return False
        ratio = statistics.median(ratios)
        if 1 / DRIFT < ratio < DRIFT:
            self.confirmed.add(g)
            return False
        self.points[g] = self(g) * ratio
        self.confirmed.discard(g)
        ratios.clear()
        self._smooth()
        return True

    def probe_size(self, n: int) -> int | None:
        """The next grid point above n if its cost is unconfirmed: worth one larger tree to find out."""
        nxt = next((m for m in self.ns if m > n), None)
        return None if nxt is None or nxt in self.confirmed else nxt


class CostModel:
    """Verify cost for greedy requests (the head's exact fast argmax) and sampling ones (full fp32 logits)."""

    def __init__(self, greedy: dict[int, float], sampled: dict[int, float], path: Path | None = None) -> None:
        self.greedy, self.sampled = CostCurve(greedy), CostCurve(sampled)
        self.path = path  # the cache file: corrections are written back, so the next start begins corrected

    def as_dict(self) -> dict[str, dict[int, float]]:
        return {"greedy": self.greedy.as_dict(), "sampled": self.sampled.as_dict()}

    def curve(self, full: bool) -> CostCurve:
        """Sampling requests' full fp32 logits, or the greedy head (Gumbel draws cost like argmax)."""
        return self.sampled if full else self.greedy

    def observe(self, n: int, seconds: float, full: bool) -> None:
        """A verify step over n query tokens took `seconds` (see CostCurve.observe)."""
        if self.curve(full).observe(n, seconds):
            self.save()

    def save(self) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.as_dict()))
        except OSError:
            pass  # a read-only home only costs a re-measure next time

    @classmethod
    @torch.inference_mode()
    def measure(cls, model: torch.nn.Module, text: list[int] | None = None, prefix: int = 128,
                repeats: int = 3) -> "CostModel":
        """text: token ids of ordinary text, repeated to length. Random ids make many rows near-ties, which send
        the head's exact argmax to its slow fallback far more often than real text does (Gemma 3 270M: c(12)
        83 ms on random ids, 57 ms on text); random ids are only the fallback when no text is given."""
        from treespec.attention.metadata import single
        need = prefix + max(GRID) + 1
        if text:
            tokens = torch.tensor((list(text) * (need // len(text) + 1))[:need], dtype=torch.long)
        else:
            vocab = model.config.vocab_size
            tokens = torch.randint(min(100, vocab - 1), vocab, (need,), generator=torch.Generator().manual_seed(0))
        cache = model.new_cache(need)
        cache.reserve(prefix)
        model(tokens[:prefix], torch.arange(prefix), single(cache, prefix))
        cache.commit()
        curves: dict[str, dict[int, float]] = {"greedy": {}, "sampled": {}}
        heads = {"greedy": model.lm_head.argmax, "sampled": model.lm_head.logits}
        for n in (1,) + GRID:  # the first n=1 round is a warm-up and is overwritten
            for name, head in heads.items():
                best = float("inf")
                for _ in range(repeats):
                    t = time.perf_counter()
                    cache.reserve(n)
                    head(model(tokens[prefix:prefix + n], prefix + torch.arange(n), single(cache, n)))
                    synchronize(model.device)
                    best = min(best, time.perf_counter() - t)
                    cache.truncate(prefix)
                curves[name][n] = best
        return cls(**curves)

    @classmethod
    def load_or_measure(cls, model: torch.nn.Module, key: str, text: list[int] | None = None) -> "CostModel":
        """Measure once per model, device and thread count; cached under ~/.cache/treespec (TREESPEC_CACHE) and
        corrected there when the engine's observed steps drift from it (CostCurve.observe)."""
        tag = f"{key}|{torch.get_num_threads()}|{torch.__version__}|{_VERSION}"
        digest = hashlib.sha256(tag.encode()).hexdigest()[:16]
        path = Path(os.environ.get("TREESPEC_CACHE", Path.home() / ".cache" / "treespec")) / f"cost-{digest}.json"
        try:
            raw = json.loads(path.read_text())
            return cls(**{k: {int(n): float(t) for n, t in v.items()} for k, v in raw.items()}, path=path)
        except (OSError, ValueError, TypeError, AttributeError):
            pass
        cm = cls.measure(model, text)
        cm.path = path
        cm.save()
        return cm


def allocate_nodes(scores: list[torch.Tensor], cost: CostCurve, draft_cost: float, budget: int) -> list[int]:
    """How many draft nodes (excluding roots) each tree keeps.

    scores: per request, [n_draft] scores of its draft nodes in descending order (parents first on ties).
    budget: total query tokens allowed this step, roots included.
    """
    counts = [0] * len(scores)
    gains = sorted(((float(s), r) for r, row in enumerate(scores) for s in row.tolist()), key=lambda x: -x[0])
    n = len(scores)
    expected = float(n)
    best_rate, best_k = expected / (cost(n) + draft_cost), 0
    for k, (g, _) in enumerate(gains[: max(0, budget - n)], start=1):
        expected += g
        rate = expected / (cost(n + k) + draft_cost)
        if rate > best_rate:
            best_rate, best_k = rate, k
    for _, r in gains[:best_k]:
        counts[r] += 1
    return counts

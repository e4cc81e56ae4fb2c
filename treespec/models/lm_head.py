"""The output layer: exact fp32 logits, and an exact greedy argmax that reads an fp16 copy of the head first.

Why: the head is most of the bytes a decode step reads (Gemma 3 270M: 262k x 640, 671 MB in fp32). The argmax
runs an fbgemm GEMM over fp16 weights (half the bytes, fp32 activations and accumulation), keeps every token
whose screened logit could still be the maximum under a proven error bound, and rescores those few in float64.
The answer is certified equal to `logits(h).argmax(-1)` (lowest id on ties); when the certificate fails (two
candidates closer than fp32 summation noise) it falls back to exactly that.

The bound, per token v and hidden state h (u = 2^-24, gamma_D = D u / (1 - D u), w~ = fp16(w), S = sum |w_j h_j|):
  reference r_v = fp32 GEMM:  |r_v - w.h|     <= gamma_D S(w)             (any summation order, FMA or not)
  screen    s_v = fbgemm:     |s_v - w~.h|    <= gamma_D S(w~)
  weights:                    |w~.h - w.h|    <= |w - w~| |h|             (Cauchy-Schwarz)
so |s_v - r_v| <= E = |h| * max_v (|w_v - w~_v| + gamma_D (|w_v| + |w~_v|)). Every token with r_v >= r_j (j = the
screen's argmax) has s_v >= max s - 2E. With a softcap (c tanh(z/c), monotonic but able to merge close values in
fp32) the same argument runs on capped values, widened by the fp32 evaluation error of the cap.
Assumes the reference logits are plain fp32 GEMMs (PyTorch's default CPU matmul precision).

With a Q8_0 head's blocks attached (weight_quantization "blocks": use_blocks_head), argmax() of 1-3 rows reads
those instead (kernels/q8_head.py, 179 MB against the screen's 335 MB): a row they certify is every fp32 product's
argmax, so this one's; the rows they leave uncertain (near-ties) take the path above. Where the CPU has
AVX512_BF16, argmax() of WIDE_SCREEN_FROM_ROWS or more rows (a verified tree) reads those blocks through
kernels/bf16_screen.py instead of the fp16 copy: the same candidates-and-rescoring argument with that screen's
own bound E(h), on each row's best few values. The fp16 copy stays (sampling, the rows either leaves uncertain,
CPUs without AVX512_BF16).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from treespec.models.matmul import few_rows_linear

if TYPE_CHECKING:
    from treespec.kernels.bf16_screen import Bf16Screen
    from treespec.kernels.q8_head import HeadChoice, Q8Head

_U32 = 2.0 ** -24                 # unit roundoff of fp32
_U64 = 2.0 ** -53                 # unit roundoff of fp64
_FP16_MAX = 65504.0               # fbgemm saturates weights to the fp16 range
MIN_SCREEN_VOCAB = 4096           # below this the fp32 GEMM is cheap and the screen does not pay
MAX_RESCORE = 4096                # more candidates than this in one row: the full fp32 GEMM is cheaper
_SLOPE_CHUNK = 16384              # rows per chunk when measuring the fp16 rounding error (bounds temp memory)
_BLOCK = 256                      # logits per block when looking for candidates: one vectorised max pass
# up to this many rows argmax() reads the Q8_0 head's blocks when it has them (179 MB vs the screen's 335 MB).
# Quiet machine, 2 threads, ms for 1/2/3/4 rows: blocks 4.5/6.3/8.4/10.6 (kernels/q8_head.py), fp16 screen
# ~10-12 throughout; from 4 rows fp32 multiply-adds bind and the screens are as fast or faster
BLOCKS_HEAD_MAX_ROWS = 3
# from this many rows argmax() takes the bf16 screen over the blocks when it has one (kernels/bf16_screen.py).
# In the engine (auto, 4-node trees, interleaved runs) a 4-row head took 11.2-11.5 ms through it against 12.4-12.6
# through the fp16 copy; benchmarks/q8_head.py, ms at 8 / 16 rows: bf16 15.5 / 25.5, fp16 16.4 / 32.4
WIDE_SCREEN_FROM_ROWS = 4


def gamma(n: int, u: float = _U32) -> float:
    """Higham's gamma_n: relative error bound of an n-term dot product in precision u."""
    return n * u / (1.0 - n * u)


def cap_tolerance(softcap: float | None) -> float:
    """Bound on |fp32 evaluation of c*tanh(z/c) - exact value|: z/c rounding (<= 0.45 u c), tanh (<= 2 ulp), the
    product (<= u c); doubled for margin."""
    return 0.0 if softcap is None else 8.0 * _U32 * softcap


def capped(x: torch.Tensor, softcap: float | None) -> torch.Tensor:  # x: any shape and float dtype
    """The softcap (exact in float64, as the Gumbel draws use it); identity without one."""
    return x if softcap is None else softcap * torch.tanh(x / softcap)


def screen_slope(weight: torch.Tensor) -> float:  # weight: [V, D] fp32
    """max_v |w_v - fp16(w_v)| + gamma_D (|w_v| + |fp16(w_v)|): the screen error per unit of |h|.

    fp16(w) is computed the way fbgemm packs it (saturate, round to nearest even); tests check the two agree.
    Infinite or NaN when the weights are, which disables the screen."""
    g = gamma(weight.shape[1])
    slope = 0.0
    for start in range(0, weight.shape[0], _SLOPE_CHUNK):
        w = weight[start:start + _SLOPE_CHUNK]
        w16 = w.clamp(-_FP16_MAX, _FP16_MAX).half().float()
        d = (w.double() - w16.double()).norm(dim=1) + g * (w.double().norm(dim=1) + w16.double().norm(dim=1))
        worst = d.max().item()
        if not math.isfinite(worst):  # checked before max(): max(x, nan) is x
            return math.inf
        slope = max(slope, worst)
    return slope * (1.0 + 1e-9)  # covers the float64 rounding of the norms themselves


def candidate_threshold(top: torch.Tensor, err: torch.Tensor,
                        softcap: float | None) -> torch.Tensor:  # top, err: [T] float64 -> [T] float64
    """Screen value below which a token is certainly beaten by the screen's argmax (after the softcap, if any)."""
    if softcap is None:
        thr = top - 2.0 * err
    else:
        y = torch.tanh((top - err) / softcap) - 2.0 * cap_tolerance(softcap) / softcap
        thr = softcap * torch.atanh(y.clamp(min=-1.0)) - err - 1e-8 * softcap  # atanh(-1) = -inf keeps everyone
    return thr - 1e-12 * (thr.abs() + 1.0)


def round_down_f32(x: torch.Tensor) -> torch.Tensor:  # x: [T] float64 -> [T] float32, <= x
    """Largest fp32 value not above x, so an fp32 comparison never drops a candidate."""
    y = x.float()
    return torch.where(y.double() > x, torch.nextafter(y, torch.full_like(y, -math.inf)), y)


def block_maxima(s: torch.Tensor) -> torch.Tensor:  # s: [T, V] -> [T, ceil(V / _BLOCK)]
    """Max of each run of _BLOCK consecutive logits (the last run may be shorter). A value-only max over a
    blocked view is ~20x faster on CPU than max(dim) with indices over the whole row."""
    t, v = s.shape
    full = v // _BLOCK * _BLOCK
    parts = [s[:, :full].view(t, -1, _BLOCK).amax(dim=2)]
    if full < v:
        parts.append(s[:, full:].amax(dim=1, keepdim=True))
    return torch.cat(parts, dim=1)


def entries_at_least(s: torch.Tensor, maxima: torch.Tensor,
                     thr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # s: [T, V], maxima: [T, B], thr: [T]
    """All (row, id) with s[row, id] >= thr[row], sorted by row then id; only blocks whose max reaches thr are read."""
    v = s.shape[1]
    hit_row, hit_block = (maxima >= thr.unsqueeze(1)).nonzero().unbind(1)           # [H] each, sorted
    cols = hit_block.unsqueeze(1) * _BLOCK + torch.arange(_BLOCK)                   # [H, _BLOCK]
    vals = s[hit_row.unsqueeze(1), cols.clamp(max=v - 1)]
    keep = (vals >= thr[hit_row].unsqueeze(1)) & (cols < v)
    hit, offset = keep.nonzero().unbind(1)
    return hit_row[hit], cols[hit, offset]


def certified_winner(w: torch.Tensor, h: torch.Tensor, ids: torch.Tensor,
                     softcap: float | None) -> int | None:  # w: [C, D] float64 (exact weights), h: [D], ids: [C]
    """The candidate whose fp32 logit is certainly the largest in any fp32 summation order, from float64
    rescoring; None on a near-tie. Shared by the fp16 screen here and the Q8_0 head (kernels/q8_head.py)."""
    hd = h.double()
    exact = w @ hd                                                     # error <= gamma64 * S: negligible
    radius = (gamma(w.shape[1]) + gamma(w.shape[1], _U64)) * (w.abs() @ hd.abs()) * (1.0 + 1e-9)
    best = int(exact.argmax())
    tol = cap_tolerance(softcap)
    low = capped(exact[best] - radius[best], softcap) - tol
    high = capped(exact + radius, softcap) + tol
    high[best] = -math.inf
    return int(ids[best]) if bool(low > high.max()) else None


@dataclass
class HeadStats:
    """Which path each argmax() row took; read by tests and benchmarks."""
    screened: int = 0      # rows decided through a screen (the fp16 copy, or bf16 over the Q8_0 blocks)
    rescored: int = 0      # of those, rows with more than one candidate (rescored in float64)
    candidates: int = 0    # candidate tokens rescored in total
    fallbacks: int = 0     # batches answered by the full fp32 logits (near-tie, non-finite values, huge sets)
    exact: int = 0         # rows answered by the full fp32 logits (fallbacks, small vocab, no fbgemm)
    blocks: int = 0        # rows decided from the quantized head's blocks (certified, see use_blocks_head)
    wide: int = 0          # of the screened rows, those through the bf16 screen over the blocks


@dataclass(frozen=True)
class Fp16Screen:
    """The fbgemm-packed fp16 copy of the head and its error slope (screen error <= slope * |h|)."""
    packed: torch.ScriptObject
    slope: float

    @classmethod
    def build(cls, weight: torch.Tensor) -> "Fp16Screen | None":  # weight: [V, D] fp32
        """None when fbgemm's fp16 ops are missing or the weights are not finite."""
        if not fp16_ops_available():
            return None
        slope = screen_slope(weight)
        if not math.isfinite(slope):
            return None
        return cls(torch.ops.quantized.linear_prepack_fp16(weight, None), slope)

    def __call__(self, h: torch.Tensor) -> torch.Tensor:  # h: [T, D] -> [T, V] fp32
        return torch.ops.quantized.linear_dynamic_fp16(h, self.packed)

    def scan(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # h: [T, D] -> [T, V], [T, B]
        s = self(h)
        return s, block_maxima(s)

    def error(self, h: torch.Tensor) -> torch.Tensor:  # h: [T, D] -> [T] float64
        return self.slope * h.double().norm(dim=1)


def fp16_ops_available() -> bool:
    """fbgemm (x86) provides the fp16-weight GEMM; other builds (ARM: qnnpack only) do not."""
    engines = torch.backends.quantized.supported_engines
    return ("fbgemm" in engines or "x86" in engines) and hasattr(torch.ops.quantized, "linear_dynamic_fp16")


class LMHead:
    """Logits and greedy choice over a [V, D] output matrix (possibly the tied input embedding; never copied)."""

    def __init__(self, weight: torch.Tensor, softcap: float | None = None,
                 portable: bool = False) -> None:  # weight: [V, D] fp32 (any float dtype when portable)
        """portable: plain products only (models/device_kernels.py): F.linear logits, their argmax, no fp16 screen."""
        if weight.dim() != 2 or not (weight.dtype == torch.float32 or portable and weight.is_floating_point()):
            raise ValueError(f"LMHead wants a 2-D fp32 weight, got {tuple(weight.shape)} {weight.dtype}")
        if softcap is not None and not softcap > 0:
            raise ValueError(f"softcap must be positive, got {softcap}")
        self.weight = weight
        self.softcap = softcap
        self.portable = portable
        self.stats = HeadStats()
        self.screen: Fp16Screen | None = None  # the fp16 copy, built by prepare(); None = exact fp32 path
        self.blocks_head: Q8Head | None = None  # set by use_blocks_head(): argmax of few rows from the blocks
        self.wide_screen: Bf16Screen | None = None  # set by use_blocks_head(): argmax of more rows over the blocks
        self.wide_screen_from_rows = WIDE_SCREEN_FROM_ROWS
        self._prepared = False

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    @property
    def screen_wanted(self) -> bool:
        """Whether argmax() goes through the fp16 screen (big enough vocabulary and fbgemm present)."""
        return not self.portable and self.vocab_size >= MIN_SCREEN_VOCAB and fp16_ops_available()

    def prepare(self) -> bool:
        """Pack the fp16 copy now (seconds and +V*D*2 bytes for a big head) instead of on the first argmax().
        Call it only once the weights are final: the copy and its bound are not refreshed. Returns whether the
        screen is in use."""
        if not self._prepared:
            self.screen = Fp16Screen.build(self.weight) if self.screen_wanted else None
            self._prepared = True
        return self.screen is not None

    def use_blocks_head(self, blocks_head: Q8Head, screen: Bf16Screen | None = None) -> None:
        """Let argmax() of few rows read these blocks: they must hold exactly this head's weights (checked on a
        sample of rows), so a certified choice from them is this head's argmax. screen: the bf16 screen over the
        same blocks (kernels/bf16_screen.py) for argmax() of wide_screen_from_rows rows or more."""
        rows = torch.arange(0, self.vocab_size, max(1, self.vocab_size // 256))
        if blocks_head.q.shape != self.weight.shape or blocks_head.softcap != self.softcap or \
                not torch.equal(blocks_head.rows_f64(rows).float(), self.weight[rows]):
            raise ValueError("the blocks head does not hold this head's weights")
        self.blocks_head = blocks_head
        self.wide_screen = screen

    def bytes_per_step(self) -> int:
        """Weight bytes one argmax() of one row reads: the blocks (either screen of them), the fp16 copy (screen)
        or the fp32 head."""
        if self.blocks_head is not None:
            return self.blocks_head.nbytes
        return self.weight.numel() * (2 if self.screen_wanted else self.weight.element_size())

    def logits(self, h: torch.Tensor) -> torch.Tensor:  # h: [T, D] -> [T, V] fp32
        """Exact fp32 logits (softcapped if configured), through `few_rows_linear` (2-4x faster than F.linear on
        the CPU); portable: F.linear in the weights' dtype, then fp32."""
        if self.portable:
            return capped(torch.nn.functional.linear(h, self.weight).float(), self.softcap)
        return capped(few_rows_linear(self.weight, h).contiguous(), self.softcap)

    def rows(self, h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:  # h: [T, D], ids: [T, K] or [K] -> [T, K]
        """fp32 logits of selected token ids only (equal to logits(h) up to fp32 summation order)."""
        if ids.dim() == 1:  # index_select gathers rows ~4x faster than weight[ids]
            z = torch.mm(torch.index_select(self.weight, 0, ids), h.t()).t()
        else:
            z = torch.bmm(self.weight[ids], h.unsqueeze(-1)).squeeze(-1)
        return capped(z.float(), self.softcap)

    def screen_logits(self, h: torch.Tensor) -> torch.Tensor | None:  # h: [T, D] -> [T, V] fp32 or None
        """The fp16 screen's logits (one GEMM over half the head's bytes); None when there is no screen."""
        if not self.prepare() or h.shape[0] == 0:
            return None
        return self.screen(h.contiguous())

    def argmax(self, h: torch.Tensor, screened: torch.Tensor | None = None) -> torch.Tensor:  # h: [T, D] -> [T]
        """Exactly logits(h).argmax(-1) (lowest id on ties), through the Q8_0 blocks (few rows, when attached)
        or the fp16 screen when they pay.
        screened: screen_logits(h) if the caller has them already (then the screen decides, as it is paid for)."""
        rows = h.shape[0]
        if self.wide_screen is not None and screened is None and rows >= self.wide_screen_from_rows:
            return self._blocks_argmax(h, self.wide_screen)
        if self.blocks_head is not None and screened is None and 0 < rows <= BLOCKS_HEAD_MAX_ROWS:
            return self._blocks_argmax(h, self.blocks_head)
        return self._screened_or_exact_argmax(h, screened)

    def _screened_or_exact_argmax(self, h: torch.Tensor,
                                  screened: torch.Tensor | None) -> torch.Tensor:  # h: [T, D] -> [T]
        """Through the fp16 copy (`screened`: its logits, if the caller has them)."""
        screen = self.screen if self.prepare() else None
        if screen is None or h.shape[0] == 0:
            return self._exact_argmax(h)
        h = h.contiguous()
        s, maxima = screen.scan(h) if screened is None else (screened, block_maxima(screened))
        picked = self._screened_argmax(h, s, maxima, screen)
        if picked is None:
            self.stats.fallbacks += 1
            return self._exact_argmax(h)
        self.stats.screened += h.shape[0]
        return picked

    def _blocks_argmax(self, h: torch.Tensor, chooser: Q8Head | Bf16Screen) -> torch.Tensor:  # h: [T, D] -> [T]
        """The choice from the blocks (the Q8_0 kernel or the bf16 screen over them) where it is certain (every
        fp32 product's argmax), the fp16 screen's (or the exact logits') elsewhere."""
        choice: HeadChoice = chooser.argmax(h)
        settled = h.shape[0]
        picked = choice.ids
        if not bool(choice.certain.all()):
            picked = choice.ids.clone()
            unsure = (~choice.certain).nonzero()[:, 0]
            picked[unsure] = self._screened_or_exact_argmax(h[unsure], None)
            settled -= unsure.numel()
        if chooser is self.wide_screen:
            self.stats.screened += settled
            self.stats.wide += settled
            self.stats.rescored += choice.rescored
            self.stats.candidates += choice.candidates
        else:
            self.stats.blocks += settled
        return picked

    def _exact_argmax(self, h: torch.Tensor) -> torch.Tensor:  # h: [T, D] -> [T]
        self.stats.exact += h.shape[0]
        return self.logits(h).argmax(dim=-1)

    def _screened_argmax(self, h: torch.Tensor, s: torch.Tensor, maxima: torch.Tensor,
                         screen: Fp16Screen) -> torch.Tensor | None:  # h: [T, D], s: [T, V], maxima: [T, B]
        """[T] argmax from screen's logits s, or None if uncertified."""
        err = screen.error(h)                                          # [T]
        thr = candidate_threshold(maxima.amax(dim=1).double(), err, self.softcap)
        if not bool(torch.isfinite(thr).all()):
            return None
        rows, ids = entries_at_least(s, maxima, round_down_f32(thr))   # the screen's max always qualifies
        counts = torch.bincount(rows, minlength=h.shape[0])
        if bool((counts > MAX_RESCORE).any()) or not bool((counts > 0).all()):
            return None
        picked = ids[counts.cumsum(0) - counts]                        # the only candidate where count == 1
        rescore = (counts > 1).nonzero()[:, 0].tolist()
        per_row = ids.split(counts.tolist()) if rescore else ()
        for t in rescore:
            winner = certified_winner(self.weight[per_row[t]].double(), h[t], per_row[t], self.softcap)
            if winner is None:
                return None
            picked[t] = winner
        self.stats.rescored += len(rescore)
        self.stats.candidates += int(counts[rescore].sum())
        return picked

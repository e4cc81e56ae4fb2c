"""Self-speculative drafting (Draft & Verify, DEL): the target itself, running a subset of its layers, drafts.

No extra weights and no training. Each candidate is a `LayerSkipView` of the target: its embedding, the chosen
decoder layers (the target's own, or fp16 / int8 copies of them: `quantization`) and its final norm. A view
drafts on the target's own KV cache: the committed context is the target's exact K/V, the draft's tree nodes
occupy pending slots that are dropped before the target verifies, so there is never anything to catch up and the
committed cache is always the target's own. The tree machinery is ModelDrafter's, one per candidate.

Dynamic choice, from observed acceptance only:
- which subset: a UCB1 bandit over the candidates, rewarded by (1 + accepted) / (1 + draft forwards x cost)
  (tokens per unit of target-forward time), a draft forward's cost being the weight bytes it reads (its layers
  and its head) over those of a target step. With automatic candidates one more arm drafts nothing (reward 1):
  where skipping layers does not pay (small models lose most acceptance), the bandit settles there and only
  re-probes the subsets. Explicit `layers` always draft.
  Each request re-picks every `RECHOOSE_STEPS` steps;
- how deep: per request, HF assisted generation's rule: +2 when the whole drafted depth was accepted, else -1.
With `draft_vocab_size` the views share a TruncatedHead (treespec.models.truncated_head).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from treespec.attention.metadata import SeqAttention
from treespec.config import DrafterConfig, WeightQuantization
from treespec.drafters.base import ConfiguredDrafter, DraftRequest
from treespec.drafters.model import ModelDrafter
from treespec.errors import ConfigError
from treespec.kv.cache import KVCache
from treespec.models.lm_head import fp16_ops_available
from treespec.models.quant import QuantLinear, quantized_copy
from treespec.models.truncated_head import TruncatedHead, VocabSubset, load_token_counts
from treespec.tree.token_tree import TokenTree
from treespec.verify import VerifyResult

RECHOOSE_STEPS = 16  # steps a request keeps its layer subset before the bandit picks again
UCB_EXPLORE = 0.5    # UCB1 exploration weight, relative to the best mean reward


class LayerSkipView:
    """The target restricted to `layers` (ascending target indices), with an optional truncated head: a draft model
    (models/draft_model.py) that drafts on the target's own cache, each block writing the cache layer of its own
    index.

    With `quantization` the view runs its own fp16 / int8 copies of those layers (a quantized self-draft: all
    layers, half or a quarter of the weight bytes, and nearly the target's own next-token distribution)."""

    shares_target_cache = True

    def __init__(self, target: torch.nn.Module, layers: tuple[int, ...], head: TruncatedHead | None = None,
                 quantization: WeightQuantization = WeightQuantization.NONE) -> None:
        self.target, self.layers, self.truncated_head = target, layers, head
        self.config = target.config
        self.blocks = [target.layers[i] if quantization is WeightQuantization.NONE
                       else quantized_copy(target.layers[i], quantization) for i in layers]

    @property
    def cost(self) -> float:
        """A draft forward's cost as a fraction of a target step's: weight bytes read (decoding is memory-bound)."""
        layers = sum(_nbytes(layer) for layer in self.target.layers)
        head = self.target.lm_head
        truncated = self.truncated_head
        draft_head = head.weight.numel() * 4 if truncated is None else truncated.bytes_per_forward()
        return (sum(_nbytes(b) for b in self.blocks) + draft_head) / (layers + head.bytes_per_step())

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, seqs: list[SeqAttention]) -> torch.Tensor:
        return self.target(tokens, positions, seqs, blocks=self.blocks)  # tokens, positions: [T] -> [T, D]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:  # hidden: [T, D] -> [T, V] fp32
        return self.target.logits(hidden) if self.truncated_head is None else self.truncated_head.logits(hidden)

    def new_cache(self, max_len: int) -> KVCache:
        """A cache of the target's layout (the view's blocks write the target's layer indices); drafting uses the
        target's own request cache instead (shares_target_cache)."""
        return self.target.new_cache(max_len)


def _nbytes(module: torch.nn.Module) -> int:
    """Weight bytes a forward of `module` reads: parameters, buffers (block-quantized linears keep their codes
    and scales there) and quantized linears' packed weights (held outside both)."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers())) + \
        sum(m.weight_nbytes for m in module.modules() if isinstance(m, QuantLinear))


def auto_layer_sets(num_layers: int) -> list[tuple[int, ...]]:
    """Default candidates: skip every other / two of three middle layers (first and last kept), early exit at half."""
    last = num_layers - 1
    sets = [tuple(i for i in range(num_layers) if i in (0, last) or i % stride == 0) for stride in (2, 3)]
    sets.append(tuple(range(max(1, num_layers // 2))))
    unique = [s for k, s in enumerate(sets) if s not in sets[:k]]
    return [s for s in unique if len(s) < num_layers] or unique


def layer_sets(cfg: DrafterConfig, num_layers: int) -> list[tuple[int, ...]]:
    """The candidates cfg.layers names (one list, or a list of lists), or the automatic ones (a quantized draft:
    every layer)."""
    if cfg.layers is None:
        if cfg.quantization is not WeightQuantization.NONE:
            return [tuple(range(num_layers))]
        return auto_layer_sets(num_layers)
    sets = cfg.layers if isinstance(cfg.layers[0], list) else [cfg.layers]
    for s in sets:
        if any(not 0 <= i < num_layers for i in s):
            raise ConfigError(f"layers: {s} names a layer outside 0..{num_layers - 1}")
    return [tuple(s) for s in sets]


@dataclass
class ArmStats:
    picks: int = 0       # times chosen (an arm is tried once before any is chosen twice)
    steps: int = 0       # rewards received
    reward: float = 0.0  # their sum


class LayerBandit:
    """UCB1 over the candidate subsets; reward = tokens per step per unit of (1 target + draft) forward time."""

    def __init__(self, costs: list[float]) -> None:
        self.costs = costs
        self.arms = [ArmStats() for _ in costs]

    def choose(self) -> int:
        arm = self._best()
        self.arms[arm].picks += 1
        return arm

    def _best(self) -> int:
        untried = [a for a, s in enumerate(self.arms) if s.picks == 0]
        if untried:
            return untried[0]
        if any(s.steps == 0 for s in self.arms):  # tried but not rewarded yet: spread the picks
            return min(range(len(self.arms)), key=lambda a: (self.arms[a].steps, a))
        total = sum(s.steps for s in self.arms)
        means = [s.reward / s.steps for s in self.arms]
        scale = UCB_EXPLORE * max(means)
        ucb = [m + scale * math.sqrt(2.0 * math.log(total) / s.steps) for m, s in zip(means, self.arms)]
        return max(range(len(ucb)), key=lambda a: (ucb[a], -a))

    def update(self, arm: int, accepted: int, forwards: int) -> None:
        self.arms[arm].steps += 1
        self.arms[arm].reward += (1 + accepted) / (1 + forwards * self.costs[arm])


@dataclass
class RequestPlan:
    """One request's adaptive choices."""
    arm: int
    depth: int
    steps_on_arm: int = 0
    counted: int = 0  # tokens of request.all_ids already counted into the vocabulary subset


class LayerSkipDrafter(ConfiguredDrafter):
    """Drafter protocol over one ModelDrafter per candidate layer subset."""

    def __init__(self, cfg: DrafterConfig, drafter_id: int, target: torch.nn.Module) -> None:
        self.cfg, self.drafter_id = cfg, drafter_id
        if cfg.quantization is not WeightQuantization.NONE and not fp16_ops_available():
            raise ConfigError(f"quantization: {cfg.quantization.value} drafts need fbgemm, which this torch build lacks")
        vocab = target.config.vocab_size
        self.vocab: VocabSubset | None = None
        head = None
        if cfg.draft_vocab_size is not None:
            counts = None if cfg.draft_vocab_counts is None else load_token_counts(cfg.draft_vocab_counts, vocab)
            self.vocab = VocabSubset(vocab, cfg.draft_vocab_size, counts)
            head = TruncatedHead(target.lm_head, self.vocab)
        self.views = [LayerSkipView(target, s, head, cfg.quantization)
                      for s in layer_sets(cfg, target.config.num_layers)]
        inner = dataclasses.replace(cfg, num_speculative_tokens=64)  # depth comes from the plan
        self.arms = [ModelDrafter(inner, drafter_id, v, vocab) for v in self.views]
        self.off = len(self.arms)  # with automatic candidates, the bandit's last arm: no draft
        self.bandit = LayerBandit([v.cost for v in self.views] + ([0.0] if cfg.layers is None else []))
        self.plans: dict[str, RequestPlan] = {}
        self._last: dict[str, tuple[int, int]] = {}  # request -> (arm, depth) of the step being verified

    # ---- protocol -------------------------------------------------------------------------------------------
    def propose(self, batch: list[DraftRequest]) -> list[TokenTree]:
        trees: list[TokenTree] = [TokenTree.root(d.request.root_token) for d in batch]
        planned: list[DraftRequest] = []
        by_arm: dict[int, list[int]] = {}
        for i, d in enumerate(batch):
            plan = self._plan(d.request)
            self._count(d.request, plan)
            depth = min(plan.depth, d.max_depth) if d.max_nodes > 0 else 0
            self._last[d.request.request_id] = (plan.arm, depth)
            if plan.arm != self.off:
                by_arm.setdefault(plan.arm, []).append(i)
            planned.append(dataclasses.replace(d, max_depth=depth))
        for arm, idx in by_arm.items():
            for i, tree in zip(idx, self.arms[arm].propose([planned[i] for i in idx])):
                trees[i] = tree
        return trees

    def observe(self, batch: list[DraftRequest], trees: list[TokenTree], results: list[VerifyResult]) -> None:
        """Each arm commits its requests' caches; the bandit and the per-request depth learn from the result."""
        by_arm: dict[int, list[int]] = {}
        for i, (d, res) in enumerate(zip(batch, results)):
            last = self._last.pop(d.request.request_id, None)
            plan = self.plans.get(d.request.request_id)
            if last is None or plan is None:
                continue
            arm, depth = last
            if arm == self.off:
                self.bandit.update(arm, 0, 0)
                continue
            by_arm.setdefault(arm, []).append(i)
            if depth == 0:  # nothing was drafted (no node budget): nothing learned
                continue
            verified, accepted = self._own_depths(trees[i], res)
            self.bandit.update(arm, accepted, depth)
            plan.depth = min(self.cfg.num_speculative_tokens, plan.depth + 2) if accepted >= verified > 0 \
                else max(1, plan.depth - 1)
        for arm, idx in by_arm.items():
            self.arms[arm].observe([batch[i] for i in idx], [trees[i] for i in idx], [results[i] for i in idx])

    def release(self, request) -> None:
        self.plans.pop(request.request_id, None)
        self._last.pop(request.request_id, None)
        for arm in self.arms:
            arm.release(request)

    # ---- planning -------------------------------------------------------------------------------------------
    def _own_depths(self, tree: TokenTree, res: VerifyResult) -> tuple[int, int]:
        """(deepest node this drafter proposed in the tree as verified, accepted nodes it proposed): a merged
        tree also holds other drafters' nodes, and the engine may have pruned ours."""
        own = [u for u in range(1, tree.n) if any(p.drafter == self.drafter_id for p in tree.proposals[u])]
        deepest = int(tree.depth[own].max()) if own else 0
        return deepest, sum(1 for u in res.path[1:] if u in own)

    def _plan(self, request) -> RequestPlan:
        plan = self.plans.get(request.request_id)
        if plan is None:
            plan = self.plans[request.request_id] = RequestPlan(self.bandit.choose(), self.cfg.num_speculative_tokens)
        elif plan.steps_on_arm >= RECHOOSE_STEPS:
            plan.arm, plan.steps_on_arm = self.bandit.choose(), 0
        plan.steps_on_arm += 1
        return plan

    def _count(self, request, plan: RequestPlan) -> None:
        """Count the request's committed tokens not counted yet (its prompt first, then its outputs)."""
        if self.vocab is not None:
            ids = request.all_ids
            self.vocab.count(ids[plan.counted:])
            plan.counted = len(ids)

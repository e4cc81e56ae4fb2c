"""Draft-model drafting: a smaller LM sharing the target's tokenizer (SpecInfer's small speculative model, SSM).

The draft keeps one KV cache per request holding the committed context except the root. A step:
1. catch up: the committed tokens the draft has not seen yet (last step's bonus token, accepted tokens it did
   not draft) go in as a chain, long ones in committed chunks; the last piece carries the root and stays pending;
2. grow: the tree grows from the root one level per draft forward (static expansion <k1..km> or best-first
   under the node budget), every request of the batch in the same forward; each level's nodes attend to the
   pending slots of their ancestors through a tree mask;
3. observe: the catch-up piece, the root and the accepted nodes the draft fed are committed, the rest dropped.
A self-draft (the target's own layers) shares the target's cache instead: step 1 is only the root, and step 3 is
the target's own commit.
q rows go through the same penalties and `logits_to_probs` as the target's p (greedy requests rank children by
the softmax of the penalised logits: their verification only needs the draft's top-k to be good guesses).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from treespec.attention.metadata import SeqAttention
from treespec.config import DrafterConfig, DraftSampling
from treespec.device import Placement
from treespec.drafters.base import ConfiguredDrafter, DraftRequest
from treespec.drafters.growth import BestFirstGrowth, Coupling, Growth, StaticGrowth, SubsetQ
from treespec.errors import ConfigError, ModelLoadError
from treespec.kv.cache import KVCache
from treespec.models.draft_model import DraftModel
from treespec.models.truncated_head import TruncatedHead
from treespec.sampling import apply_penalties, logits_to_probs
from treespec.tree.token_tree import DraftKind, TokenTree
from treespec.verify import VerifyResult

_CHUNK = 256  # catch-up tokens per request per draft forward
COUPLED_RATE_EMA = 0.05  # weight of one observation in the running acceptance rate of coupled drafts


@dataclass
class DraftState:
    """The draft's view of one request: its cache and, during a step, where each fed tree node's K/V sits."""
    cache: KVCache
    tail: int = 0                  # pending slots before the root's: committed tokens fed along with it
    tree: TokenTree | None = None  # this step's grown tree (before pruning)
    coupled: bool = False          # this step's children were coupled draws
    slots: dict[int, int] = field(default_factory=dict)         # fed node -> its pending slot
    seen: dict[int, torch.Tensor] = field(default_factory=dict)  # fed node -> [slots] bool: pending slots it sees
    out: dict[int, torch.Tensor] = field(default_factory=dict)   # fed node -> its output hidden state [D]

    def discard_step(self) -> None:
        self.cache.truncate(self.cache.length)
        self.tail, self.tree, self.coupled, self.slots, self.seen, self.out = 0, None, False, {}, {}, {}


@dataclass
class _Job:
    """One request being drafted this step."""
    draft: DraftRequest
    state: DraftState
    growth: Growth


@dataclass
class _Feed:
    """One request's rows in a ragged draft forward."""
    cache: KVCache
    tokens: list[int]
    positions: torch.Tensor       # [n]
    mask: torch.Tensor | None     # [n, pending] bool over the pending slots; None: a chain
    q_rows: list[int]             # rows (from this feed's first) whose logits give the frontier's q
    features: torch.Tensor | None = None  # [n, D] per-row input features (drafters that read the target's)


class ModelDrafter(ConfiguredDrafter):
    """Drafts trees with a draft model (models/draft_model.py); one KV cache per request, committed along the
    accepted path.

    Subclasses may draft over another view of the context (`_context`), feed per-row features
    (`_chain_features`, `_tree_features`, `_run`) and re-feed accepted tokens instead of keeping them
    (`keep_accepted`). A self-draft (the model's `shares_target_cache`) reads the target's own cache instead of
    keeping one: nothing to catch up, and its pending slots are dropped before the target verifies (the committed
    K/V are always the target's).
    """

    keep_accepted = True

    def __init__(self, cfg: DrafterConfig, drafter_id: int, model: DraftModel, vocab_size: int) -> None:
        self.cfg, self.drafter_id, self.model = cfg, drafter_id, model
        self.vocab_size = vocab_size  # the target's: q rows span the target's vocabulary
        self.max_len = model.config.max_position_embeddings
        self.states: dict[str, DraftState] = {}
        self.coupled_rate = 0.5  # see Coupling; learned from verification results

    @classmethod
    def load(cls, cfg: DrafterConfig, drafter_id: int, target: torch.nn.Module, tokenizer,
             placement: Placement | None = None) -> "ModelDrafter":
        """Load the SSM at cfg.model (with the target's placement); refuse one whose vocabulary differs."""
        from treespec.models.registry import build_model
        from treespec.weights.loader import load_checkpoint
        try:
            ckpt = load_checkpoint(cfg.model)
            model = build_model(ckpt.config, ckpt.tensors, placement=placement)
        except ModelLoadError as e:
            raise ConfigError(f"model: cannot load the draft model {cfg.model!r}: {e}") from None
        check_vocabulary(tokenizer, ckpt.tokenizer, target.config.vocab_size, model.config.vocab_size)
        return cls(cfg, drafter_id, model, target.config.vocab_size)

    # ---- protocol -------------------------------------------------------------------------------------------
    def propose(self, batch: list[DraftRequest]) -> list[TokenTree]:
        trees = [TokenTree.root(d.request.root_token) for d in batch]
        try:
            jobs = {i: _Job(d, self._state(d.request), self._growth(d, depth))
                    for i, d in enumerate(batch) if (depth := self._depth(d)) > 0}
            with torch.no_grad():
                self._catch_up(list(jobs.values()))
                while live := [j for j in jobs.values() if j.growth.frontier]:
                    for job, q in zip(live, self._feed(live)):
                        job.growth.extend(q)
        finally:  # a self-draft's slots never reach the target's verify, even when drafting fails half-way
            if self.model.shares_target_cache:
                for d in batch:
                    d.request.cache.truncate(d.request.cache.length)
        for i, j in jobs.items():
            j.state.tree, j.state.coupled = j.growth.tree, j.growth.coupling is not None
            trees[i] = j.growth.result()
        return trees

    def observe(self, batch: list[DraftRequest], trees: list[TokenTree], results: list[VerifyResult]) -> None:
        """Commit the catch-up piece, the root and the accepted nodes this draft fed; drop the other slots."""
        for d, tree, res in zip(batch, trees, results):
            st = self.states.get(d.request.request_id)
            if st is None or st.tree is None:
                continue
            if st.coupled:
                self._learn_coupled_rate(tree, res)
            if self.model.shares_target_cache:
                continue
            keep = list(range(st.tail + 1))
            node: int | None = 0
            for tok in tree.tokens[res.path[1:]].tolist() if self.keep_accepted else []:
                node = st.tree.find_child(node, tok)
                if node is None or node not in st.slots:
                    break
                keep.append(st.slots[node])
            st.cache.commit(keep)
            st.discard_step()

    def release(self, request) -> None:
        self.states.pop(request.request_id, None)

    def _learn_coupled_rate(self, tree: TokenTree, res: VerifyResult) -> None:
        """Running P(the verified path enters one of our coupled children | it reached their parent)."""
        own = {u for u in range(1, tree.n) if any(p.drafter == self.drafter_id for p in tree.proposals[u])}
        for k, u in enumerate(res.path):
            kids = [c for c in tree.children(u) if c in own]
            if not kids:
                return
            hit = k + 1 < len(res.path) and res.path[k + 1] in kids
            self.coupled_rate += COUPLED_RATE_EMA * (float(hit) - self.coupled_rate)
            if not hit:
                return

    # ---- planning -------------------------------------------------------------------------------------------
    def _state(self, request) -> DraftState:
        st = self.states.get(request.request_id)
        if self.model.shares_target_cache:
            st = self.states[request.request_id] = DraftState(request.cache)
        elif st is None:
            st = self.states[request.request_id] = DraftState(self.model.new_cache(self.max_len))
        st.discard_step()  # a step that was never observed leaves nothing behind
        committed = len(self._context(request)) - 1
        if st.cache.length > committed:
            st.cache.truncate(committed)
        return st

    def _depth(self, d: DraftRequest) -> int:
        """Deepest level this request may draft: config, engine limits and the draft's own context length."""
        if d.max_nodes <= 0:
            return 0
        depth = min(d.max_depth, self.cfg.num_speculative_tokens)
        if self.cfg.expansion is not None:
            depth = min(depth, len(self.cfg.expansion))
        room = self.max_len - len(self._context(d.request))
        while depth > 0 and self._max_fed(depth) > room:
            depth -= 1
        return depth

    def _max_fed(self, depth: int) -> int:
        """Most tree nodes below the root a tree of this depth feeds through the draft (leaves are not fed)."""
        if self.cfg.expansion is None:
            return (depth - 1) * self.cfg.branch
        width, total = 1, 0
        for k in self.cfg.expansion[: depth - 1]:
            width *= k
            total += width
        return total

    def _growth(self, d: DraftRequest, depth: int) -> Growth:
        r = d.request
        one_hot = r.params.greedy or d.sampling in (DraftSampling.DETERMINISTIC, DraftSampling.COUPLED)
        kind = DraftKind.DETERMINISTIC if one_hot else DraftKind(d.sampling.value)
        coupling = None
        if d.sampling is DraftSampling.COUPLED and r.params.temperature_only:
            coupling = Coupling(d.noise, self.coupled_rate)
        args = (r.root_token, kind, r.generator, self.drafter_id, d.max_nodes, coupling)
        if self.cfg.expansion is not None:
            return StaticGrowth(*args, expansion=self.cfg.expansion[:depth])
        return BestFirstGrowth(*args, max_depth=depth, branch=self.cfg.branch)

    # ---- draft forwards -------------------------------------------------------------------------------------
    def _catch_up(self, jobs: list[_Job]) -> None:
        """Commit all but the last `_CHUNK` unseen tokens of each request (root included), a chunk per forward."""
        while long := [j for j in jobs if len(self._context(j.draft.request)) - j.state.cache.length > _CHUNK]:
            feeds = []
            for j in long:
                cache = j.state.cache
                ids = self._context(j.draft.request)[cache.length:cache.length + _CHUNK]
                feeds.append(_Feed(cache, ids, torch.arange(cache.length, cache.length + len(ids)), None, [],
                                   self._chain_features(j.draft.request, cache.length, len(ids))))
            self._forward(feeds)
            for f in feeds:
                f.cache.commit()

    def _feed(self, jobs: list[_Job]) -> list[torch.Tensor | SubsetQ]:
        """One draft forward over every job's frontier; returns each job's q rows [len(frontier), V]
        (a SubsetQ when the draft has a truncated vocabulary and every job drafts one-hot without penalties)."""
        feeds = [self._frontier_feed(j) for j in jobs]
        hidden = self._forward(feeds)
        starts = itertools.accumulate((len(f.tokens) for f in feeds), initial=0)
        rows = [s + i for f, s in zip(feeds, starts) for i in f.q_rows]
        head = self.model.truncated_head
        if compact := (head is not None
                       and all(j.growth.kind is DraftKind.DETERMINISTIC and not j.draft.request.params.has_penalties
                               for j in jobs)):
            logits, ids = head.subset_logits(hidden[rows]), head.ids()
        else:
            logits = fit_vocabulary(self.model.logits(hidden[rows]), self.vocab_size)
        qs, at = [], 0
        for j in jobs:
            n = len(j.growth.frontier)
            out = hidden[rows[at:at + n]]
            j.state.out.update(zip(j.growth.frontier, out))
            if compact and j.growth.coupling is not None:
                qs.append([self._with_noise_tail(head, j, u, z, ids, h) for u, z, h in
                           zip(j.growth.frontier, logits[at:at + n], out)])
            elif compact:  # one-hot proposals: q only ranks the children and scores them for tree sizing
                params = j.draft.request.params
                t = 1.0 if params.greedy else params.temperature
                qs.append(SubsetQ(torch.softmax(logits[at:at + n] / t, dim=-1), ids))
            else:
                qs.append(self._probs(j, logits[at:at + n]))
            at += n
        return qs

    def _with_noise_tail(self, head: TruncatedHead, job: _Job, node: int, z: torch.Tensor, ids: torch.Tensor,
                         hidden: torch.Tensor) -> SubsetQ:  # z: [N] logits over ids, hidden: [D]
        """A coupled node's q over the draft vocabulary plus the ids whose noise at the node's position is high
        enough to win from outside it (truncated_head.noise_tail): most target draws outside the subset are those."""
        u = job.growth.coupling.noise.gumbel_uniforms(int(job.growth.tree.depth[node]))
        tail, z_tail = head.noise_tail_logits(hidden, u)
        t = job.draft.request.params.temperature
        return SubsetQ(torch.softmax(torch.cat([z, z_tail]) / t, dim=-1), torch.cat([ids, tail]))

    def _frontier_feed(self, job: _Job) -> _Feed:
        """Feed a job's frontier: at the root, the unseen committed tokens then the root (a chain); below it, the
        frontier nodes, each seeing the catch-up slots and its ancestors' pending slots."""
        st, tree, nodes = job.state, job.growth.tree, job.growth.frontier
        cache = st.cache
        if nodes == [0]:
            ids = self._context(job.draft.request)[cache.length:]
            st.tail = len(ids) - 1
            st.slots[0] = st.tail
            st.seen[0] = torch.ones(st.tail + 1, dtype=torch.bool)
            return _Feed(cache, ids, torch.arange(cache.length, cache.length + len(ids)), None, [st.tail],
                         self._chain_features(job.draft.request, cache.length, len(ids)))
        first = cache.pending
        mask = torch.zeros(len(nodes), first + len(nodes), dtype=torch.bool)
        for k, u in enumerate(nodes):
            seen = st.seen[int(tree.parents[u])]
            mask[k, : seen.numel()] = seen
            mask[k, first + k] = True
            st.seen[u], st.slots[u] = mask[k], first + k
        positions = cache.length + st.tail + tree.depth[nodes]
        return _Feed(cache, tree.tokens[nodes].tolist(), positions, mask, list(range(len(nodes))),
                     self._tree_features(st, tree, nodes))

    def _forward(self, feeds: list[_Feed]) -> torch.Tensor:
        """One ragged draft forward over every feed; returns hidden states [T, D]."""
        seqs, start = [], 0
        for f in feeds:
            f.cache.reserve(len(f.tokens), f.positions)
            seqs.append(SeqAttention(f.cache, start, len(f.tokens), f.mask))
            start += len(f.tokens)
        tokens = torch.tensor([t for f in feeds for t in f.tokens], dtype=torch.long)
        positions = torch.cat([f.positions for f in feeds])
        features = None if feeds[0].features is None else torch.cat([f.features for f in feeds])
        return self._run(tokens, positions, seqs, features)

    # ---- hooks ----------------------------------------------------------------------------------------------
    def _run(self, tokens: torch.Tensor, positions: torch.Tensor, seqs: list[SeqAttention],
             features: torch.Tensor | None) -> torch.Tensor:  # tokens, positions: [T], features: [T, D] -> [T, D]
        """The draft forward (features: None unless `_chain_features` / `_tree_features` give some)."""
        return self.model(tokens, positions, seqs)

    def _context(self, request) -> list[int]:
        """The token sequence this draft reads: the committed context and the root (its last element)."""
        return request.all_ids

    def _chain_features(self, request, start: int, n: int) -> torch.Tensor | None:
        """Input features [n, D] of context rows start..start+n-1 (None: this draft reads tokens only)."""
        return None

    def _tree_features(self, state: DraftState, tree: TokenTree, nodes: list[int]) -> torch.Tensor | None:
        """Input features [len(nodes), D] of tree nodes fed below the root."""
        return None

    def _probs(self, job: _Job, logits: torch.Tensor) -> torch.Tensor:
        """q at the job's frontier nodes: logits [n, V] processed like the target's p."""
        r, tree = job.draft.request, job.growth.tree
        params = r.params
        if params.has_penalties:
            histories = [r.output_ids + tree.tokens[tree.path_to(u)[1:]].tolist() for u in job.growth.frontier]
            logits = apply_penalties(logits, params, r.prompt_ids, histories)
        if params.greedy:
            return torch.softmax(logits.float(), dim=-1)
        return logits_to_probs(logits, params)


# ---- vocabulary -------------------------------------------------------------------------------------------
def check_vocabulary(target_tokenizer, draft_tokenizer, target_rows: int, draft_rows: int) -> None:
    """Refuse a draft whose token ids name other tokens than the target's (ConfigError naming `model`).

    The embedding tables may differ in padding rows (Qwen2.5 0.5B vs 7B) as long as every real token has a
    row in both; without tokenizers to compare, the tables must have the same size.
    """
    if target_tokenizer is None or draft_tokenizer is None:
        if target_rows != draft_rows:
            raise ConfigError(f"model: the draft's vocabulary has {draft_rows} tokens, the target's {target_rows}")
        return
    n_target, n_draft = target_tokenizer.vocab_size, draft_tokenizer.vocab_size
    if n_target != n_draft:
        raise ConfigError(f"model: the draft's tokenizer has {n_draft} tokens, the target's {n_target}; "
                          "a draft model must share the target's tokenizer")
    for i in range(n_target):
        if target_tokenizer.id_to_token(i) != draft_tokenizer.id_to_token(i):
            raise ConfigError(f"model: token {i} is {draft_tokenizer.id_to_token(i)!r} for the draft but "
                              f"{target_tokenizer.id_to_token(i)!r} for the target; they must share a tokenizer")
    if n_target > min(target_rows, draft_rows):
        raise ConfigError(f"model: the tokenizer has {n_target} tokens but the draft's embedding only "
                          f"{draft_rows} rows and the target's {target_rows}")


def fit_vocabulary(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Draft logits [n, V_draft] -> [n, vocab_size]: padding rows beyond the tokenizer cut, or never proposed."""
    have = logits.shape[-1]
    if have >= vocab_size:
        return logits[:, :vocab_size]
    pad = logits.new_full((logits.shape[0], vocab_size - have), float("-inf"))
    return torch.cat([logits, pad], dim=-1)

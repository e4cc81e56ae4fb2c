"""N-gram / hierarchical-database drafter: lookups, trie building, scores and database order."""
from dataclasses import dataclass, field

from treespec.config import DrafterConfig, DraftSampling
from treespec.drafters.base import DraftRequest
from treespec.drafters.ngram import NgramDrafter, NgramIndex
from treespec.verify import VerifyResult


def test_index_prefers_longest_match_then_most_recent():
    idx = NgramIndex(1, 3)
    idx.extend([1, 2, 3, 9, 5, 2, 3, 7, 8, 1, 2, 3])
    conts = idx.continuations(idx.tokens, depth=2, limit=4)
    # suffix [1,2,3] occurs once before (followed by 9,5); then [2,3] adds (7,8); then [3] adds nothing new
    assert conts == [([9, 5], 3), ([7, 8], 2)]


@dataclass
class _Req:
    request_id: str
    prompt_ids: list[int]
    output_ids: list[int] = field(default_factory=list)
    finished: bool = False

    @property
    def all_ids(self):
        return self.prompt_ids + self.output_ids

    @property
    def root_token(self):
        return self.all_ids[-1]


def _draft(drafter, req, max_nodes=16, depth=4):
    return drafter.propose([DraftRequest(req, max_nodes, depth, DraftSampling.DETERMINISTIC, None)])[0]  # no noise read


def test_trie_shares_prefixes_scores_fall_and_budget_holds():
    d = NgramDrafter(DrafterConfig("ngram", prompt_lookup_min=1, prompt_lookup_max=2), 0)
    req = _Req("a", [5, 1, 2, 3, 5, 1, 2, 4, 5, 1])
    tree = _draft(d, req)
    tree.validate()
    assert tree.tokens[0] == 1 and tree.tokens[1:].tolist()[:1] == [2]  # both matches continue with 2
    kids_of_2 = sorted(int(tree.tokens[c]) for c in tree.children(1))
    assert kids_of_2 == [3, 4]
    s = tree.scores.tolist()
    assert all(s[c] <= s[int(tree.parents[c])] for c in range(1, tree.n))
    small = _draft(d, req, max_nodes=2)
    assert small.n - 1 <= 2


def test_generated_text_database_after_release_and_acceptance_statistics():
    d = NgramDrafter(DrafterConfig("ngram"), 0)
    done = _Req("old", [40, 41], output_ids=[42, 43, 44, 45], finished=True)
    d.release(done)  # never drafted for, but its text joins database (2) once it has output
    fresh = _Req("new", [7, 42, 43])
    tree = _draft(d, fresh)
    assert tree.tokens[1:3].tolist() == [44, 45]
    before = list(d.depth_rate[:2])
    d.observe([], [tree], [VerifyResult(path=[0, 1], bonus_token=0)])  # depth 1 accepted, depth 2 rejected
    assert d.depth_rate[0] > before[0] and d.depth_rate[1] < before[1]


def test_corpus_database(tmp_path):
    class Tok:
        def encode(self, text, add_special_tokens=False):
            return [int(w) for w in text.split()]
    f = tmp_path / "corpus.txt"
    f.write_text("9 8 7 6 5")
    d = NgramDrafter(DrafterConfig("ngram", corpus=str(f)), 0, Tok())
    assert _draft(d, _Req("x", [1, 8])).tokens[1:].tolist() == [7, 6, 5]


def test_a_tree_cut_to_its_root_still_teaches_depth_one():
    """The cost model may keep none of the drafted nodes (the rate fell too low to pay); the drafter then checks
    its first choice against the target's token, so the rate can recover instead of staying low for good."""
    from treespec.tree.token_tree import TokenTree
    d = NgramDrafter(DrafterConfig("ngram", prompt_lookup_min=1, prompt_lookup_max=2), 0)
    req = _Req("a", [5, 1, 2, 3, 5, 1])
    batch = [DraftRequest(req, 16, 4, DraftSampling.DETERMINISTIC, None)]
    d.depth_rate[0] = 0.05
    assert d.propose(batch)[0].tokens[1] == 2  # first choice after [5, 1]: 2
    d.observe(batch, [TokenTree.root(1)], [VerifyResult(path=[0], bonus_token=2)])  # the target emitted it
    assert abs(d.depth_rate[0] - (0.9 * 0.05 + 0.1)) < 1e-9
    d.observe(batch, [TokenTree.root(1)], [VerifyResult(path=[0], bonus_token=2)])  # each proposal counts once
    assert abs(d.depth_rate[0] - (0.9 * 0.05 + 0.1)) < 1e-9
    d.propose(batch)
    d.observe(batch, [TokenTree.root(1)], [VerifyResult(path=[0], bonus_token=7)])  # a miss
    assert abs(d.depth_rate[0] - 0.9 * (0.9 * 0.05 + 0.1)) < 1e-9

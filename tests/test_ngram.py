"""N-gram / hierarchical-database drafter: lookups, trie building, scores and database order."""
from dataclasses import dataclass, field

from treespec.config import DrafterConfig, DraftSampling
from treespec.drafters.base import DraftRequest
from treespec.drafters.ngram import NgramDrafter, NgramIndex


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
    before = list(d.match_rate[2:4])  # matched [42 43]: the chain's match lengths are 2 and 3
    fresh.output_ids += [44, 9]  # the target went on with the first drafted token, not the second
    _draft(d, fresh)
    assert d.match_rate[2] > before[0] and d.match_rate[3] < before[1]


def test_corpus_database(tmp_path):
    class Tok:
        def encode(self, text, add_special_tokens=False):
            return [int(w) for w in text.split()]
    f = tmp_path / "corpus.txt"
    f.write_text("9 8 7 6 5")
    d = NgramDrafter(DrafterConfig("ngram", corpus=str(f)), 0, Tok())
    assert _draft(d, _Req("x", [1, 8])).tokens[1:].tolist() == [7, 6, 5]


def test_rates_learn_every_drafted_node_from_the_text_that_followed():
    """The cost model may verify none of a trie's nodes (rates too low to pay); the drafter still checks the whole
    unpruned trie against the tokens the target went on to generate, so rates of nodes the verified trees never
    reached can rise and trees can grow. Rates are kept by match length: suffix match + drafted tokens above."""
    d = NgramDrafter(DrafterConfig("ngram", prompt_lookup_min=1, prompt_lookup_max=2), 0)
    req = _Req("a", [5, 1, 2, 3, 4, 5, 1])
    d.match_rate[:] = [0.05] * len(d.match_rate)
    assert _draft(d, req).tokens[1:].tolist() == [2, 3, 4, 5]  # one chain after the match [5, 1]: lengths 2..5
    req.output_ids += [2, 3]  # two tokens so far: the nodes of match lengths 2 and 3 observed, 4 still waiting
    _draft(d, req)
    assert d.match_seen[2:6] == [1, 1, 0, 0] and d.match_rate[2] > 0.5 and d.match_rate[4] == 0.05
    seen = list(d.match_seen)
    _draft(d, req)  # no new tokens: nothing observed twice
    assert d.match_seen == seen
    req.output_ids += [7]  # the first trie's next token, 4 (match length 4), misses; so do the later tries' first
    _draft(d, req)
    assert d.match_seen[4] >= 1 and d.match_rate[4] < 0.05
    d.release(req)
    assert "a" not in d.pending


def test_a_longer_match_scores_higher():
    d = NgramDrafter(DrafterConfig("ngram", prompt_lookup_min=1, prompt_lookup_max=3), 0)
    d.match_rate[:] = [0.1 * m for m in range(len(d.match_rate))]
    long = _draft(d, _Req("a", [9, 8, 7, 1, 6, 9, 8, 7]), depth=2)  # [9 8 7] matched: 1 then 6
    short = _draft(d, _Req("b", [5, 7, 1, 6, 9, 8, 7]), depth=2)   # only [7] matched: 1 then 6
    assert long.tokens[1:].tolist() == short.tokens[1:].tolist() == [1, 6]
    assert [round(x, 6) for x in long.scores[1:].tolist()] == [0.3, round(0.3 * 0.4, 6)]  # lengths 3, then 3 + 1
    assert [round(x, 6) for x in short.scores[1:].tolist()] == [0.1, round(0.1 * 0.2, 6)]
    two = _draft(d, _Req("c", [9, 8, 7, 1, 5, 7, 2, 9, 8, 7]), depth=1)  # 1 after [9 8 7], 2 after [7]
    assert two.tokens[1:].tolist() == [1, 2]  # the children share their parent's rate, split by weight 9 : 1
    assert [round(x, 6) for x in two.scores[1:].tolist()] == [round(0.9 * 0.3, 6), round(0.1 * 0.3, 6)]


def test_rates_are_a_running_mean_then_a_moving_average():
    d = NgramDrafter(DrafterConfig("ngram"), 0)
    for _ in range(3):
        d._observe(1, True)
    assert abs(d.match_rate[1] - (0.5 + 3) / 4) < 1e-12  # the prior counts as one observation
    for _ in range(100):
        d._observe(1, False)
    assert d.match_rate[1] < 1e-3  # a window of ~10: old observations fade

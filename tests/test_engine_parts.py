"""Engine pieces without a model: stop handling, streaming hold-back, scheduler chunking and admission."""
import pytest

from treespec.engine.emit import apply_stop_strings, emit_tokens, stream_delta
from treespec.engine.request import FinishReason, Request
from treespec.engine.scheduler import Scheduler
from treespec.errors import QueueFullError
from treespec.sampling import SamplingParams


_ids = iter(range(10**6))


def _req(max_tokens=10, prompt=(5, 6, 7), **kw):
    return Request(f"r{next(_ids)}", list(prompt), SamplingParams(max_tokens=max_tokens, **kw))


def test_emit_stops_at_eos_and_keeps_it():
    r = _req()
    assert emit_tokens(r, [4, 1, 9], eos_ids={1}, max_len=100) == [4, 1]
    assert r.output_ids == [4, 1] and r.finish_reason is FinishReason.STOP


def test_emit_ignore_eos_and_stop_token_ids():
    r = _req(ignore_eos=True, stop_token_ids=[9])
    assert emit_tokens(r, [1, 2, 9, 3], eos_ids={1}, max_len=100) == [1, 2, 9]
    assert r.finish_reason is FinishReason.STOP


def test_emit_max_tokens_cuts_accepted_tokens():
    r = _req(max_tokens=3)
    emit_tokens(r, [1, 2], eos_ids=set(), max_len=100)
    assert emit_tokens(r, [3, 4, 5], eos_ids=set(), max_len=100) == [3]
    assert r.output_ids == [1, 2, 3] and r.finish_reason is FinishReason.LENGTH


def test_emit_context_length():
    r = _req(max_tokens=10)
    emit_tokens(r, [1, 2], eos_ids=set(), max_len=5)
    assert r.finish_reason is FinishReason.LENGTH


def test_stop_string_cut_and_hold_back():
    r = _req(stop=["END"])
    apply_stop_strings(r, "hello E")
    assert stream_delta(r) == "hello "  # "E" may start "END": held back
    apply_stop_strings(r, "Nx")
    assert stream_delta(r) == "ENx" and not r.finished
    apply_stop_strings(r, " then EN")
    apply_stop_strings(r, "D more")
    assert r.finished and r.finish_reason is FinishReason.STOP
    assert r.text == "hello ENx then " and stream_delta(r) == " then "


def test_stop_string_spanning_two_pushes_found_once():
    r = _req(stop=["ab", "zzz"])
    apply_stop_strings(r, "xa")
    apply_stop_strings(r, "bq")
    assert r.text == "x" and r.finished


def test_scheduler_chunks_prefill_and_reserves_decode_budget():
    s = Scheduler(max_num_seqs=4, max_num_batched_tokens=64, max_waiting=8)
    long_req = _req(prompt=range(200))
    s.add(long_req)
    plan = s.schedule()
    assert [(c.start, c.end) for c in plan.prefills] == [(0, 64)] and not plan.decodes
    long_req.num_prefilled = 64
    short = _req(prompt=[1])  # a one-token prompt needs no prefill: it decodes at once
    s.add(short)
    plan = s.schedule()
    assert plan.decodes == [short]
    assert [(c.start, c.end) for c in plan.prefills] == [(64, 64 + 31)]  # half of what the decode leaves
    assert plan.node_budget == 64 - 31


def test_scheduler_bounds():
    s = Scheduler(max_num_seqs=1, max_num_batched_tokens=64, max_waiting=1)
    a, b, c = _req(prompt=[1]), _req(prompt=[1]), _req(prompt=[1])
    s.add(a)
    s.schedule()
    s.add(b)
    with pytest.raises(QueueFullError):
        s.add(c)
    assert s.schedule().decodes == [a]  # b waits: one running at most
    assert s.abort(b.request_id) is b and b.finish_reason is FinishReason.ABORT
    assert b not in s.waiting and s.abort(b.request_id) is None


def test_waiting_bound_counts_only_requests_that_must_wait():
    s = Scheduler(max_num_seqs=2, max_num_batched_tokens=64, max_waiting=0)
    a, b, c = _req(prompt=[1]), _req(prompt=[1]), _req(prompt=[1])
    s.add(a)
    s.add(b)  # free running slots: both start at once, nothing waits
    assert s.running == [a, b] and not s.waiting
    with pytest.raises(QueueFullError):
        s.add(c)  # c would have to wait, and no request may
    assert not s.waiting and s.schedule().decodes == [a, b]
    assert s.capacity(10) == 2  # an idle engine holds at most 2 such requests: n = 3 can never be taken
    kv = Scheduler(max_num_seqs=8, max_num_batched_tokens=64, max_waiting=1, kv_budget_tokens=100, tree_slots=5)
    assert kv.capacity(50) == 1 + 1  # the KV budget runs one request of 55 slots; one more may wait


def test_kv_budget_is_never_overcommitted():
    s = Scheduler(max_num_seqs=8, max_num_batched_tokens=64, max_waiting=8, kv_budget_tokens=100, tree_slots=5)
    a, b = _req(max_tokens=40, prompt=range(10)), _req(max_tokens=40, prompt=range(10))  # 55 slots each
    s.add(a)
    s.add(b)
    assert s.schedule().prefills[0].request is a and s.running == [a] and list(s.waiting) == [b]
    a.finish(FinishReason.STOP)
    s.collect_finished()
    s.schedule()
    assert s.running == [b]
    from treespec.errors import ConfigError
    with pytest.raises(ConfigError, match="KV budget"):
        s.add(_req(max_tokens=200))

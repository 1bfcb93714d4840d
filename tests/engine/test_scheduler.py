"""Token budget, sequence limit, chunked prefill and preemption."""

from __future__ import annotations

from engine.core.scheduler import Scheduler, SchedulerConfig
from engine.kv_cache import KVCacheManager, PagedCacheSpec
from engine.request import Request
from engine.sampling_params import SamplingParams


def make(num_blocks=64, budget=16, max_seqs=4, chunked=True):
    kv = KVCacheManager(PagedCacheSpec(4, 1), num_blocks, enable_prefix_caching=False)
    return Scheduler(SchedulerConfig(max_seqs, budget, 128, chunked), kv)


def add(s, rid, n, max_tokens=4):
    s.add_request(Request(rid, list(range(n)), SamplingParams(max_tokens=max_tokens)))


def test_budget_chunks_long_prompts_and_decodes_first():
    s = make(budget=16)
    add(s, "a", 40)
    out = s.schedule()
    assert out.num_scheduled_tokens == {"a": 16}
    add(s, "b", 4)
    out = s.schedule()
    assert out.num_scheduled_tokens == {"a": 16}
    out = s.schedule()
    assert out.num_scheduled_tokens == {"a": 8, "b": 4}
    s.update_from_output({"a": 1, "b": 1})
    out = s.schedule()
    assert out.num_scheduled_tokens == {"a": 1, "b": 1}


def test_without_chunking_a_prompt_waits_for_a_whole_budget():
    s = make(budget=16, chunked=False)
    add(s, "a", 10)
    add(s, "b", 10)
    assert s.schedule().num_scheduled_tokens == {"a": 10}


def test_max_num_seqs_caps_the_batch():
    s = make(max_seqs=2)
    for i in range(3):
        add(s, str(i), 2)
    assert list(s.schedule().num_scheduled_tokens) == ["0", "1"]


def test_preemption_frees_blocks_and_requeues_first():
    s = make(num_blocks=4, budget=64)
    add(s, "a", 8, max_tokens=20)
    add(s, "b", 7, max_tokens=20)
    s.schedule()
    s.update_from_output({"a": 1, "b": 1})      # a: 9 tokens (3 blocks), b: 8 tokens
    out = s.schedule()
    assert "b" in out.finished_req_ids and out.num_scheduled_tokens == {"a": 1}
    assert s.waiting[0].request_id == "b" and s.requests["b"].num_computed_tokens == 0
    assert s.num_preemptions == 1


def test_abort_frees_everything():
    s = make()
    add(s, "a", 10)
    s.schedule()
    s.abort("a")
    assert s.kv.num_free_blocks == 64 and s.num_unfinished == 0


def test_async_placeholders_schedule_ahead_and_stop_on_length():
    """With one step in flight the scheduler counts the token being sampled as known
    (a placeholder) and schedules its decode; it schedules nothing that the pending
    tokens already finish."""
    s = make(budget=16)
    add(s, "a", 4, max_tokens=3)
    assert s.schedule().num_scheduled_tokens == {"a": 4}
    assert s.schedule().num_scheduled_tokens == {"a": 1}      # the placeholder's decode
    assert s.pending == {"a": 2}
    s.update_from_output({"a": 7})
    assert s.schedule().num_scheduled_tokens == {"a": 1}
    s.update_from_output({"a": 8})
    assert s.schedule().num_scheduled_tokens == {}              # its last token is pending
    changed = s.update_from_output({"a": 9})
    assert changed[0].output_token_ids == [7, 8, 9] and changed[0].finish_reason() == "length"
    assert s.pending == {} and s.num_unfinished == 0
    assert s.update_from_output({"a": 10}) == []                # a discarded extra step's token


def test_preemption_drops_the_placeholder():
    s = make(num_blocks=4, budget=64)
    add(s, "a", 8, max_tokens=20)
    add(s, "b", 7, max_tokens=20)
    s.schedule()
    s.update_from_output({"a": 1, "b": 1})
    s.schedule()                       # b preempted; a's decode is in flight
    assert "b" not in s.pending and s.pending == {"a": 1}
    assert s.update_from_output({"b": 5}) == []                 # b's late token is dropped


def test_full_blocks_reach_the_prefix_cache_under_async_placeholders():
    """Blocks are registered as they fill with known tokens (never with a placeholder),
    once each: a later request with the same tokens hits every full block."""
    kv = KVCacheManager(PagedCacheSpec(4, 1), 64, enable_prefix_caching=True)
    s = Scheduler(SchedulerConfig(4, 64, 128, True), kv)
    s.add_request(Request("a", list(range(6)), SamplingParams(max_tokens=9, ignore_eos=True)))
    s.schedule()
    token = 100
    while s.num_unfinished:
        out = s.schedule()                      # one step ahead of the outputs
        s.update_from_output({"a": token})
        token += 1
        assert out.num_scheduled_tokens.get("a", 0) <= 1
    tokens = list(range(6)) + list(range(100, 109))     # 15 known tokens: 3 full blocks
    b = Request("b", tokens + [7], SamplingParams(max_tokens=1))
    hit, n = kv.find_cached_prefix(b)
    assert n == 12 and len(hit) == 3

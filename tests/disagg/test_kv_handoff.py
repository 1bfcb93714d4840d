"""Prefill on one engine, decode on another, KV through real NIXL (UCX, DRAM): the
answer equals one engine's, and both block pools return to full."""

from __future__ import annotations

import pytest

from engine.kv_transfer_params import KVTransferParams
from engine.request import Request
from tests.disagg.handoff import decode, greedy, make_core, pool_is_full, prefill, run_to_end, settle

BLOCK = 16
# Around block boundaries (15/16/17, 31/32/33), tiny, and a few blocks long.
LENGTHS = [1, 5, 15, 16, 17, 31, 32, 33, 70]


def prompt_of(n: int, salt: int = 0) -> list[int]:
    return [(7 * i + 3 + 11 * salt) % 200 + 10 for i in range(n)]


@pytest.fixture(scope="module")
def engines():
    ref = make_core(connector=False)
    p, d = make_core(), make_core()
    yield ref, p, d
    for core in (p, d):
        core.scheduler.kv_transfer.close()


def colocated(ref, rid: str, prompt: list[int], n: int) -> list[int]:
    ref.add_request(Request(rid, prompt, greedy(n)))
    return run_to_end(ref, rid)[0]


def handoff(p, d, rid: str, prompt: list[int], n: int) -> list[int]:
    first, params = prefill(p, rid, prompt)
    tokens, out = decode(d, p, rid, prompt, first, params.handle, n)
    assert out.error is None, out.error
    return tokens


@pytest.mark.parametrize("n", LENGTHS)
def test_handoff_equals_colocated(engines, n):
    ref, p, d = engines
    prompt = prompt_of(n)
    want = colocated(ref, f"ref-{n}", prompt, 10)
    assert handoff(p, d, f"r-{n}", prompt, 10) == want
    settle(p, d)
    assert pool_is_full(p) and pool_is_full(d)
    assert not p.scheduler.held and not d.scheduler.loading


def test_prefix_hits_on_either_side(engines):
    ref, p, d = engines
    prompt = prompt_of(40, salt=3)
    want = colocated(ref, "ref-hit", prompt, 8)
    # First pass fills both prefix caches (the decode side caches what it read).
    assert handoff(p, d, "hit-1", prompt, 8) == want
    assert handoff(p, d, "hit-2", prompt, 8) == want
    assert p.kv.paged.pool.hits > 0 and d.kv.paged.pool.hits > 0
    # A decode-side hit with a producer miss: the producer's cache lost the prompt.
    prompt2 = prompt_of(56, salt=4)
    want2 = colocated(ref, "ref-hit2", prompt2, 8)
    d.add_request(Request("warm", prompt2, greedy(1)))
    run_to_end(d, "warm")
    connector = d.scheduler.kv_transfer
    before = connector.stats.bytes_total
    assert handoff(p, d, "hit-3", prompt2, 8) == want2
    # Three full blocks were local hits: only the partial fourth moved.
    assert connector.stats.bytes_total - before == connector.layout.block_bytes
    settle(p, d)
    assert pool_is_full(p) and pool_is_full(d)


def test_many_requests_in_flight(engines):
    ref, p, d = engines
    prompts = {f"many-{i}": prompt_of(10 + 9 * i, salt=i) for i in range(6)}
    want = {rid: colocated(ref, "ref-" + rid, pr, 6) for rid, pr in prompts.items()}
    handles = {}
    for rid, pr in prompts.items():
        p.add_request(Request(rid, pr, greedy(1), kv_transfer_params=KVTransferParams(do_remote_decode=True)))
    while len(handles) < len(prompts):
        for out in p.step():
            handles[out.request_id] = (out.new_token_ids, out.kv_transfer_params.handle)
    for rid, pr in prompts.items():
        first, handle = handles[rid]
        d.add_request(Request(rid, pr, greedy(6), kv_transfer_params=KVTransferParams(
            do_remote_prefill=True, handle=handle, first_token_ids=first)))
    got = {rid: [] for rid in prompts}
    while d.has_unfinished():
        for out in d.step():
            got[out.request_id] += out.new_token_ids
        p.step()
    assert got == want
    settle(p, d)
    assert pool_is_full(p) and pool_is_full(d)


def test_consumer_without_connector_is_refused():
    core = make_core(connector=False)
    with pytest.raises(ValueError, match="no KV-transfer connector"):
        core.add_request(Request("x", [1, 2, 3], greedy(4), kv_transfer_params=KVTransferParams(
            do_remote_prefill=True, handle={}, first_token_ids=[5])))
    with pytest.raises(ValueError, match="first_token_ids"):
        core.add_request(Request("y", [1, 2, 3], greedy(4), kv_transfer_params=KVTransferParams(
            do_remote_prefill=True, handle={}, first_token_ids="5")))


def test_handoff_with_async_scheduling(engines):
    """One step in flight on both sides (the GPU default) gives the same tokens."""
    ref = engines[0]
    p, d = make_core(async_scheduling=True), make_core(async_scheduling=True)
    try:
        for n in (16, 17, 33):
            prompt = prompt_of(n, salt=7)
            assert handoff(p, d, f"async-{n}", prompt, 9) == colocated(ref, f"ref-async-{n}", prompt, 9)
        settle(p, d)
        assert pool_is_full(p) and pool_is_full(d)
    finally:
        p.scheduler.kv_transfer.close()
        d.scheduler.kv_transfer.close()

"""When the hand-off breaks (bad handle, layout mismatch, unreachable or dead producer,
abort mid-load), the request still completes by recomputing (or fails cleanly under
the fail policy), the answer stays the same, and no block leaks on either side."""

from __future__ import annotations

import multiprocessing as mp
import time

import pytest

from engine.kv_transfer_params import KVTransferParams
from engine.request import Request
from tests.disagg.handoff import decode, greedy, make_core, pool_is_full, prefill, run_to_end, settle
from tests.disagg.prefill_process import serve_prefills

PROMPT = [(5 * i + 1) % 190 + 20 for i in range(37)]
N = 8


@pytest.fixture(scope="module")
def want():
    ref = make_core(connector=False)
    ref.add_request(Request("ref", PROMPT, greedy(N)))
    return run_to_end(ref, "ref")[0]


@pytest.fixture(scope="module")
def producer():
    p = make_core(connector_args={"lease_s": 3.0})
    yield p
    p.scheduler.kv_transfer.close()


@pytest.fixture(scope="module")
def consumer():
    d = make_core(connector_args={"handshake_timeout_s": 1.0})
    yield d
    d.scheduler.kv_transfer.close()


def failures(core) -> dict:
    return dict(core.scheduler.kv_transfer.stats.failures)


@pytest.mark.parametrize("corrupt, reason", [
    (lambda h: {**h, "block_ids": h["block_ids"][:-1]}, "bad_handle"),
    (lambda h: {**h, "block_ids": [10**6] * len(h["block_ids"])}, "bad_handle"),
    (lambda h: {**h, "layout_hash": "0" * 16}, "layout"),
    (lambda h: {**h, "port": "not a port"}, "bad_handle"),
    (lambda h: {**h, "engine_id": "nobody", "port": 1}, "handshake"),
])
def test_corrupt_handle_recomputes(producer, consumer, want, corrupt, reason):
    p, d = producer, consumer
    before = failures(d).get(reason, 0)
    recomputed = d.scheduler.num_recomputed
    first, params = prefill(p, "bad", PROMPT)
    tokens, out = decode(d, p, "bad", PROMPT, first, corrupt(params.handle), N)
    assert out.error is None and tokens == want
    assert failures(d)[reason] == before + 1
    assert d.scheduler.num_recomputed == recomputed + 1
    settle(p, d)     # the producer frees on a notice or when its 3 s lease ends
    assert pool_is_full(p) and pool_is_full(d)


def test_lease_running_out_before_the_read_recomputes(consumer, want):
    """The request waited on the consumer longer than half the producer's lease: its
    blocks may be gone, so it is not read (that could read reused blocks), but recomputed."""
    p = make_core(connector_args={"lease_s": 0.6})
    d = consumer
    try:
        first, params = prefill(p, "late", PROMPT)
        d.add_request(Request("late", PROMPT, greedy(N), kv_transfer_params=KVTransferParams(
            do_remote_prefill=True, handle=params.handle, first_token_ids=first)))
        time.sleep(0.4)                    # e.g. queued behind other requests for blocks
        before = failures(d).get("lease", 0)
        tokens, out = run_to_end(d, "late", others=(p,))
        assert tokens == want and failures(d)["lease"] == before + 1
        settle(p, d)
        assert pool_is_full(p) and pool_is_full(d)
    finally:
        p.scheduler.kv_transfer.close()


def test_fail_policy_fails_cleanly(producer, want):
    d = make_core(kv_load_failure_policy="fail")
    try:
        first, params = prefill(producer, "fail", PROMPT)
        _, out = decode(d, producer, "fail", PROMPT, first, {**params.handle, "layout_hash": "x"}, N)
        assert out.error is not None and "layout" in out.error
        assert out.finish_reason == "abort"
        settle(producer, d)
        assert pool_is_full(producer) and pool_is_full(d)
        assert d.scheduler.num_recomputed == 0
    finally:
        d.scheduler.kv_transfer.close()


def test_layout_mismatch_is_refused_at_handshake(producer, want):
    d = make_core(block_size=8)     # same model, different block size
    try:
        first, params = prefill(producer, "layout", PROMPT)
        tokens, out = decode(d, producer, "layout", PROMPT, first, params.handle, N)
        assert tokens == want
        assert failures(d) == {"layout": 1}
        settle(producer, d)
        assert pool_is_full(producer) and pool_is_full(d)
    finally:
        d.scheduler.kv_transfer.close()


def test_abort_while_loading_frees_both_sides(producer, consumer):
    p, d = producer, consumer
    first, params = prefill(p, "abort", PROMPT)
    d.add_request(Request("abort", PROMPT, greedy(N), kv_transfer_params=KVTransferParams(
        do_remote_prefill=True, handle=params.handle, first_token_ids=first)))
    d.step()                       # allocates blocks and starts the handshake/READ
    assert "abort" in d.scheduler.loading
    d.abort_requests(["abort"])
    assert not d.scheduler.loading
    settle(p, d)
    assert pool_is_full(p) and pool_is_full(d)


def test_dead_producer_mid_handoff(consumer, want):
    """The producer process dies after handing out its KV handle: the READ fails
    against a dead agent, and the consumer recomputes."""
    d = consumer
    ctx = mp.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    proc = ctx.Process(target=serve_prefills, args=(child_conn,), daemon=True)
    proc.start()
    try:
        assert conn.poll(120), "the prefill process did not start"
        assert conn.recv() == "ready"
        # One good hand-off first, so the consumer is connected to the producer's agent.
        conn.send(("ok", PROMPT))
        first, handle = conn.recv()
        tokens, out = decode(d, None, "live", PROMPT, first, handle, N)
        assert tokens == want
        conn.send(("dying", PROMPT))
        first, handle = conn.recv()
        proc.kill()
        proc.join(10)
        before = sum(failures(d).values())
        tokens, out = decode(d, None, "dead", PROMPT, first, handle, N)
        assert out.error is None and tokens == want
        assert sum(failures(d).values()) == before + 1
        settle(d)
        assert pool_is_full(d)
    finally:
        if proc.is_alive():
            proc.kill()

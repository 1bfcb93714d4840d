"""A hybrid model's hand-off (NemotronH, Super layout: Mamba-2 + attention + LatentMoE;
Nano layout: plain MoE):
the producer, in another process, keeps the request's Mamba state slot with its KV
blocks; the consumer READs both through real NIXL (UCX on DRAM), the slot as one more
descriptor, and decodes on from them: the same greedy tokens as one engine, and both
sides' block pools and state slots free afterwards."""

from __future__ import annotations

import multiprocessing as mp

import pytest

from engine.request import Request
from tests.disagg.handoff import decode, greedy, make_core, pool_is_full, run_to_end, settle
from tests.disagg.prefill_process import serve_prefills
from tests.engine.tiny_models import build

BLOCK = 16
# Mamba chunk 8, block 16: inside a chunk, on chunk and block boundaries, a few blocks.
LENGTHS = [1, 8, 17, 40]
N = 10


def prompt_of(n: int, salt: int = 0) -> list[int]:
    return [(7 * i + 3 + 11 * salt) % 200 + 10 for i in range(n)]


@pytest.fixture(scope="module", params=["nemotron_h_super", "nemotron_h_nano"])
def engines(tmp_path_factory, request):
    folder = tmp_path_factory.mktemp(request.param)
    build(request.param, folder)
    ctx = mp.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    proc = ctx.Process(target=serve_prefills, args=(child_conn, str(folder)), daemon=True)
    proc.start()
    ref, d = make_core(str(folder), connector=False), make_core(str(folder))
    try:
        assert conn.poll(120), "the prefill process did not start"
        assert conn.recv() == "ready"
        yield ref, d, conn
    finally:
        d.scheduler.kv_transfer.close()
        proc.kill()
        proc.join(10)


def test_the_layout_covers_the_state_slots(engines):
    _, d, _ = engines
    layout = d.scheduler.kv_transfer.layout
    runner = d.runner
    assert layout.state is not None and layout.num_state_slots == runner.state_cache.shape[0]
    assert layout.state["conv_shape"] == list(runner.conv_state.shape[2:])
    assert layout.state["ssm_shape"] == list(runner.ssm_state.shape[2:])
    assert layout.state["ssm_dtype"] == "float32" and layout.state["layers"] == 2
    assert layout.state_bytes == runner.state_cache.shape[1]


@pytest.mark.parametrize("n", LENGTHS)
def test_hybrid_handoff_equals_colocated(engines, n):
    ref, d, conn = engines
    prompt = prompt_of(n)
    ref.add_request(Request(f"ref-{n}", prompt, greedy(N)))
    want = run_to_end(ref, f"ref-{n}")[0]

    conn.send(("ok", prompt))
    assert conn.poll(60), "the producer did not answer"
    first, handle = conn.recv()
    assert first == want[:1]
    assert isinstance(handle["state_slot"], int), "the producer holds the request's state slot"
    connector = d.scheduler.kv_transfer
    before_bytes, before_descs = connector.stats.bytes_total, connector.stats.descriptors_total
    tokens, out = decode(d, None, f"r-{n}", prompt, first, handle, N)
    assert out.error is None, out.error
    assert d.scheduler.num_recomputed == 0, "the prompt was not recomputed here"
    assert tokens == want
    # Every block of the prompt and the slot moved; the slot in one descriptor of its own.
    blocks = -(-n // BLOCK)
    assert connector.stats.bytes_total - before_bytes == blocks * connector.layout.block_bytes + \
        connector.layout.state_bytes
    assert connector.stats.descriptors_total - before_descs >= 2
    settle(d)
    assert pool_is_full(d) and not d.scheduler.loading
    conn.send(("pools", None))
    assert conn.poll(30) and conn.recv() is True, "the producer freed its blocks and its slot"

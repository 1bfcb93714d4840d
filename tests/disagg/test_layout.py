"""The pieces of the hand-off that need no engine: layouts, fingerprints, handles,
descriptor runs, and the side channel's answers to good and bad requests."""

from __future__ import annotations

import json

import msgpack
import pytest
import torch
import zmq
from transformers import LlamaConfig

from disagg.handle import KVHandle
from disagg.layout import BlockLayout, block_runs, model_fingerprint
from disagg.side_channel import SideChannelError, SideChannelServer, fetch_metadata


def test_block_runs_merge_only_runs_adjacent_on_both_sides():
    assert block_runs([4, 5, 6], [10, 11, 12]) == [(4, 10, 3)]
    assert block_runs([4, 5, 6], [10, 12, 13]) == [(4, 10, 1), (5, 12, 2)]
    assert block_runs([7, 3], [1, 2]) == [(7, 1, 1), (3, 2, 1)]
    assert block_runs([], []) == []


def test_layout_hash_ignores_pool_size_and_names_differences():
    a = BlockLayout.of(torch.zeros(8, 2, 2, 16, 4, 32), "m")
    b = BlockLayout.of(torch.zeros(20, 2, 2, 16, 4, 32), "m")
    c = BlockLayout.of(torch.zeros(8, 2, 2, 8, 4, 32), "m")
    assert a.hash == b.hash and a.mismatch(b) is None
    assert a.hash != c.hash
    why = a.mismatch(c)
    assert "block_size: ours 16, theirs 8" in why and "block_shape" in why
    assert BlockLayout.from_dict(a.to_dict()) == a
    with pytest.raises(ValueError, match="contiguous"):
        BlockLayout.of(torch.zeros(8, 2, 2, 16, 4, 32).transpose(0, 1), "m")


def test_layout_hash_covers_the_state_slots():
    """A hybrid model's Mamba state slots are part of the layout: shapes and dtypes."""
    import torch as t

    from engine.kv_cache.state_layout import StateLayout
    kv = torch.zeros(8, 2, 2, 16, 4, 32)
    f32 = StateLayout(2, (3, 192), (8, 16, 16), t.float32)
    layouts = {}
    for name, sl in [("f32", f32), ("bf16", StateLayout(2, (3, 192), (8, 16, 16), t.bfloat16)),
                     ("heads", StateLayout(2, (3, 192), (4, 32, 16), t.float32))]:
        buf, conv, ssm = sl.allocate(5, t.float32, t.device("cpu"))
        assert conv.shape == (5, 2, 3, 192) and ssm.shape == (5, 2) + sl.ssm_shape
        assert conv.data_ptr() == buf.data_ptr() and ssm.data_ptr() - buf.data_ptr() >= conv[0].nbytes
        layouts[name] = BlockLayout.of(kv, "m", buf, sl.describe(t.float32))
    plain = BlockLayout.of(kv, "m")
    a = layouts["f32"]
    assert a.num_state_slots == 5 and a.state_bytes == f32.bytes_per_slot(t.float32)
    assert BlockLayout.from_dict(a.to_dict()) == a
    assert len({x.hash for x in [plain, *layouts.values()]}) == 4
    assert "state slots" in a.mismatch(layouts["bf16"]) and "bfloat16" in a.mismatch(layouts["bf16"])
    assert "state slots" in a.mismatch(layouts["heads"]) and "state slots" in a.mismatch(plain)
    with pytest.raises(ValueError, match="state cache"):
        BlockLayout.of(kv, "m", torch.zeros(5, 10, dtype=torch.uint8), f32.describe(t.float32))


def test_handle_state_slot_is_checked():
    d = dict(engine_id="e", host="h", port=1, request_id="r", block_ids=[1], num_tokens=3, layout_hash="x",
             lease_s=1.0)
    assert KVHandle.from_dict(d).state_slot is None
    assert KVHandle.from_dict({**d, "state_slot": 2}).state_slot == 2
    assert KVHandle.from_dict(KVHandle.from_dict({**d, "state_slot": 2}).to_dict()).state_slot == 2
    for bad in (-1, "2", True):
        with pytest.raises(ValueError, match="state_slot"):
            KVHandle.from_dict({**d, "state_slot": bad})


def test_model_fingerprint_is_about_the_model_not_its_folder(tmp_path):
    cfg = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    fps = []
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
        fps.append(model_fingerprint(LlamaConfig.from_pretrained(folder)))
    assert fps[0] == fps[1]
    assert model_fingerprint(LlamaConfig(**{**cfg, "num_hidden_layers": 3})) != fps[0]


def test_handle_round_trip_and_clear_errors():
    h = KVHandle("e", "127.0.0.1", 5600, "r", [3, 4], 20, "abc", 30.0)
    assert KVHandle.from_dict(msgpack.unpackb(msgpack.packb(h.to_dict()))) == h
    for bad, field in [({**h.to_dict(), "port": "x"}, "port"), ({**h.to_dict(), "block_ids": [1, -2]}, "block_ids"),
                       ({k: v for k, v in h.to_dict().items() if k != "engine_id"}, "engine_id"),
                       ({**h.to_dict(), "num_tokens": True}, "num_tokens"),
                       ({**h.to_dict(), "lease_s": "long"}, "lease_s")]:
        with pytest.raises(ValueError, match=field):
            KVHandle.from_dict(bad)
    with pytest.raises(ValueError, match="dict"):
        KVHandle.from_dict([1, 2])


def test_side_channel_answers_metadata_and_refuses_garbage():
    server = SideChannelServer({"engine_id": "e1", "blob": b"\x00\x01"})
    try:
        meta = fetch_metadata("127.0.0.1", server.port, timeout_s=5)
        assert meta["engine_id"] == "e1" and meta["blob"] == b"\x00\x01"
        sock = zmq.Context.instance().socket(zmq.REQ)
        sock.setsockopt(zmq.RCVTIMEO, 5000)
        sock.connect(f"tcp://127.0.0.1:{server.port}")
        sock.send(b"\xc1 not msgpack")
        assert msgpack.unpackb(sock.recv())["ok"] is False
        sock.close(0)
        assert fetch_metadata("127.0.0.1", server.port, timeout_s=5)["engine_id"] == "e1"   # still serving
    finally:
        server.close()
    with pytest.raises(SideChannelError, match="no answer"):
        fetch_metadata("127.0.0.1", server.port, timeout_s=0.3)


def test_blocks_freed_together_come_back_as_one_run():
    """The pool hands out ascending ids, so a request's blocks freed tail first (as the
    KV manager frees them) return as one adjacent run: one transfer descriptor."""
    from engine.kv_cache.block_pool import BlockPool
    pool = BlockPool(32, enable_caching=True)
    first = pool.allocate(8)
    pool.allocate(4)                      # a neighbour that stays
    pool.free(list(reversed(first)))
    pool.allocate(20)                     # drains the never-used blocks first
    again = pool.allocate(8)
    assert again == sorted(again) and len(block_runs(again, list(range(8)))) == 1

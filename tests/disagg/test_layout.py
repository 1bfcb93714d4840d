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

"""The hand-off's messages (kv_transfer_params, the prefill request and its result): one
plain-dict encoding each, which survives msgpack, and bad maps refused with the field.
The orchestration and the ZeroMQ prefill service import no transport package."""

from __future__ import annotations

import ast
from pathlib import Path

import msgpack
import pytest

from disagg.prefill_messages import PrefillRequest, PrefillResult
from engine.kv_transfer_params import KVTransferParams
from engine.sampling_params import SamplingParams


def through_msgpack(d: dict) -> dict:
    return msgpack.unpackb(msgpack.packb(d), strict_map_key=False)


def test_round_trips_through_msgpack():
    kv = KVTransferParams(do_remote_prefill=True, handle={"engine_id": "e", "block_ids": [3, 4]},
                          first_token_ids=[7], first_logprobs=[{7: -0.5, 9: -1.25}])
    assert kv.to_dict() == {"do_remote_prefill": True, "handle": {"engine_id": "e", "block_ids": [3, 4]},
                            "first_token_ids": [7], "first_logprobs": [{7: -0.5, 9: -1.25}]}
    assert KVTransferParams.from_dict(through_msgpack(kv.to_dict())) == kv
    assert KVTransferParams().to_dict() == {}

    req = PrefillRequest("r1", [1, 2, 3], SamplingParams(max_tokens=1, temperature=0.0, stop=["x"]), True)
    assert PrefillRequest.from_dict(through_msgpack(req.to_dict())) == req

    res = PrefillResult([5], "five", "length", [{5: -0.1}], 16, kv, None)
    assert PrefillResult.from_dict(through_msgpack(res.to_dict())) == res
    assert PrefillResult.from_dict(PrefillResult([5], "", "stop").to_dict()).kv_transfer_params is None


@pytest.mark.parametrize(("bad", "message"), [
    ("not a map", "must be a map"),
    ({"do_remote_prefill": True, "remote_engine_id": "x"}, "unknown kv_transfer_params fields: remote_engine_id"),
    ({"do_remote_prefill": "yes"}, "'do_remote_prefill' has the wrong type"),
    ({"handle": [1, 2]}, "'handle' has the wrong type"),
])
def test_bad_kv_transfer_params_name_the_field(bad, message):
    with pytest.raises(ValueError, match=message):
        KVTransferParams.from_dict(bad)


def test_bad_prefill_request_is_a_value_error():
    with pytest.raises(ValueError, match="prefill request is a map"):
        PrefillRequest.from_dict({"request_id": "r", "prompt_token_ids": [1]})
    with pytest.raises(ValueError, match="unknown sampling fields in the prefill request: temp"):
        PrefillRequest.from_dict({"request_id": "r", "prompt_token_ids": [1], "sampling": {"temp": 1}})


def imports_of(module: str) -> set[str]:
    """Modules `module` imports, following disagg's own (engine/ imports no disagg)."""
    root = Path(__file__).resolve().parents[2]
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = root / (name.replace(".", "/") + ".py")
        if not name.startswith("disagg.") or not path.is_file():
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                todo.append(node.module)
            elif isinstance(node, ast.Import):
                todo += [alias.name for alias in node.names]
    return seen


def test_orchestration_and_prefill_service_import_no_transport():
    for module in ("disagg.prefill_decode", "disagg.prefill_service", "disagg.connector"):
        found = imports_of(module)
        assert "engine.async_engine" in found or module == "disagg.connector"     # the walk sees imports
        assert not [m for m in found if m.split(".")[0] == "nixl" or m == "disagg.nixl_connector"], module

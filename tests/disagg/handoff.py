"""Drive a prefill engine core and a decode engine core by hand, in one thread: the
smallest real hand-off (NIXL over UCX on DRAM) the tests build on."""

from __future__ import annotations

import time

from disagg.nixl_connector import NixlConnector
from engine.config import EngineConfig
from engine.core.engine_core import EngineCore
from engine.engine_client import resolve_model_path
from engine.kv_transfer_params import KVTransferParams
from engine.models.loader import load_config
from engine.request import Request
from engine.sampling_params import SamplingParams


def make_core(model: str = "default", connector: bool = True, **kwargs) -> EngineCore:
    connector_args = kwargs.pop("connector_args", {})
    cfg = EngineConfig(model=model, max_model_len=256, max_num_seqs=8, num_kv_blocks=64, **kwargs)
    path = resolve_model_path(model)
    core = EngineCore(cfg, load_config(path), str(path))
    if connector:
        core.set_kv_transfer(NixlConnector.for_engine(core, **connector_args))
    return core


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def run_to_end(core: EngineCore, rid: str, others: tuple[EngineCore, ...] = (), timeout_s: float = 30):
    """Step `core` (and `others`, so their connectors see notifications) until `rid`
    finishes; returns (token ids, the final output)."""
    tokens, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for out in core.step():
            if out.request_id != rid:
                continue
            if out.error is not None:
                return tokens, out
            tokens += out.new_token_ids
            if out.finish_reason is not None:
                return tokens, out
        for other in others:
            other.step()
    raise TimeoutError(f"request {rid} did not finish in {timeout_s} s")


def prefill(p: EngineCore, rid: str, prompt: list[int]):
    p.add_request(Request(rid, prompt, greedy(1), kv_transfer_params=KVTransferParams(do_remote_decode=True)))
    tokens, out = run_to_end(p, rid)
    return tokens, out.kv_transfer_params


def decode(d: EngineCore, p: EngineCore | None, rid: str, prompt: list[int], first: list[int], handle: dict,
           max_tokens: int):
    """Continue `rid` on `d` from a producer's first token and KV handle; `p`, when in
    this process, is stepped alongside so it sees the consumer's notices."""
    kv = KVTransferParams(do_remote_prefill=True, handle=handle, first_token_ids=first)
    d.add_request(Request(rid, prompt, greedy(max_tokens), kv_transfer_params=kv))
    return run_to_end(d, rid, others=(p,) if p is not None else ())


def settle(*cores: EngineCore, timeout_s: float = 10) -> None:
    """Step until no core holds blocks for a reader (notifications or leases)."""
    deadline = time.monotonic() + timeout_s
    while any(c.scheduler.held or c.has_unfinished() for c in cores) and time.monotonic() < deadline:
        for c in cores:
            c.step()
        time.sleep(0.01)


def pool_is_full(core: EngineCore) -> bool:
    """Every block (and, for a hybrid model, every state slot) is free."""
    return all(g.pool.num_free == g.pool.num_blocks for g in core.kv.groups)

"""The NIXL connector: a KV connector (disagg/connector.py) over the `nixl` package (UCX).

Each engine registers its whole KV cache once (DRAM on CPU, VRAM on GPU) and serves its
agent metadata and block layout on a side channel. A producer keeps a finished
prefill's blocks under a lease and hands out a KVHandle. A consumer fetches the
producer's metadata once per peer (in a background thread, so a dead peer never stalls
the engine loop), checks the layouts match, then pulls the blocks with one NIXL READ
per request, in as few descriptors as there are runs of adjacent blocks. A hybrid
model's engine registers its Mamba state slots too: the producer keeps the request's
slot under the blocks' lease and the same READ copies it, one more descriptor. The
READ carries a notification that tells the producer to free the blocks (and the slot);
an unread lease expires on its own.

Every hook method runs on the engine-core thread: NIXL is not called concurrently.
"""

from __future__ import annotations

import logging
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from nixl._api import nixl_agent, nixl_agent_config

from disagg.connector import KVConnector
from disagg.handle import KVHandle
from disagg.layout import BlockLayout, block_runs, model_fingerprint
from disagg.side_channel import SideChannelServer, fetch_metadata
from engine.core.engine_core import EngineCore
from engine.kv_transfer import TransferObserver
from engine.request import Request

log = logging.getLogger(__name__)

_DONE = b"done:"    # consumer -> producer: this request's blocks may be freed


class LayoutMismatch(ValueError):
    """The producer's KV cache is laid out differently (block size, dtype, heads, model)."""


@dataclass
class _Peer:
    agent_name: str
    base: int
    dev_id: int
    mem_type: str
    layout: BlockLayout
    state_base: int = 0


@dataclass
class _Load:
    req_id: str
    handle: KVHandle | None
    local: list[int]
    remote: list[int]
    deadline: float
    trust_until: float = float("inf")   # past this the producer's blocks may be reused
    num_tokens: int = 0
    first_block: int = 0
    state_slot: int | None = None       # the local slot the producer's state goes into
    descriptors: int = 0
    started: float = 0.0
    xfer: object | None = None
    nbytes: int = 0
    peer: _Peer | None = None


class NixlConnector(KVConnector):
    def __init__(self, kv_cache: torch.Tensor, model: str, host: str = "127.0.0.1", port: int = 0,
                 lease_s: float = 30.0, handshake_timeout_s: float = 5.0, transfer_timeout_s: float = 30.0,
                 observer: TransferObserver | None = None, progress_thread: bool | None = None,
                 state_cache: torch.Tensor | None = None, state: dict | None = None) -> None:
        """state_cache [slots, bytes_per_slot] and its description (StateLayout.describe):
        a hybrid model's Mamba state slots, registered and read along with the blocks."""
        super().__init__(lease_s, observer)
        self.engine_id = f"tandem-{uuid.uuid4().hex[:12]}"
        self.layout = BlockLayout.of(kv_cache, model, state_cache, state)
        self.transfer_timeout_s = transfer_timeout_s
        self.handshake_timeout_s = handshake_timeout_s
        self.mem_type = "VRAM" if kv_cache.is_cuda else "DRAM"
        self.dev_id = (kv_cache.device.index or 0) if kv_cache.is_cuda else 0
        self.base = kv_cache.data_ptr()
        self.state_base = state_cache.data_ptr() if state_cache is not None else 0
        self._kv_cache, self._state_cache = kv_cache, state_cache     # keep the registered memory alive
        # NIXL's progress thread polls UCX on a core of its own, busy even when idle: worth
        # it beside a GPU, ruinous on a small CPU host, where the engine loop's own calls
        # (polling loads and notifications) drive progress instead.
        if progress_thread is None:
            progress_thread = kv_cache.is_cuda
        self.agent = nixl_agent(self.engine_id, nixl_agent_config(enable_prog_thread=progress_thread,
                                                                   backends=["UCX"]))
        self._registration = self.agent.register_memory(
            [kv_cache] if state_cache is None else [kv_cache, state_cache.view(torch.uint8)])
        self.side_channel = SideChannelServer(
            {"engine_id": self.engine_id, "agent_metadata": self.agent.get_agent_metadata(), "base": self.base,
             "state_base": self.state_base, "dev_id": self.dev_id, "mem_type": self.mem_type,
             "layout": self.layout.to_dict()}, host, port)
        self.host, self.port = host, self.side_channel.port
        self._peers: dict[str, _Peer] = {}              # consumer: engine id -> connected peer
        self._handshakes: dict[str, Future] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="kv-handshake")
        self._loads: dict[str, _Load] = {}
        self._done: list[str] = []
        self._failed: dict[str, str] = {}

    @classmethod
    def for_engine(cls, core: EngineCore, **kwargs) -> NixlConnector:
        """A connector over an engine core's KV cache (and state slots, for a hybrid
        model); plug it in with core.set_kv_transfer."""
        runner = core.runner
        state = None
        if runner.state_cache is not None:
            state = runner.state_layout.describe(runner.conv_state.dtype)
        return cls(runner.kv_cache, model_fingerprint(core.model.config), state_cache=runner.state_cache,
                   state=state, **kwargs)

    # -- producer ------------------------------------------------------------------------
    def _handle(self, req: Request, block_ids: list[int], state_slot: int | None) -> KVHandle:
        if (state_slot is None) != (self.layout.state is None):
            raise ValueError("a hybrid model's request is held with its state slot, any other without one")
        return KVHandle(self.engine_id, self.host, self.port, req.request_id, block_ids,
                        req.num_prompt_tokens, self.layout.hash, self.lease_s, state_slot)

    def _reader_notices(self) -> list[str]:
        return [msg[len(_DONE):].decode(errors="replace") for msgs in self.agent.get_new_notifs().values()
                for msg in msgs if msg.startswith(_DONE)]

    # -- consumer ------------------------------------------------------------------------
    def start_load(self, req: Request, block_ids: list[int], num_local_tokens: int,
                   state_slot: int | None = None) -> None:
        rid = req.request_id
        load = _Load(rid, None, [], [], time.monotonic() + self.handshake_timeout_s + self.transfer_timeout_s,
                     state_slot=state_slot)
        self._loads[rid] = load
        try:
            load.handle = handle = KVHandle.from_dict(req.kv_transfer_params.handle)
        except ValueError as e:
            return self._fail(load, "bad_handle", str(e))
        # The lease started when the producer made the handle, a little before the request
        # reached this engine: trust only its first half, counted from arrival here.
        received = req.kv_transfer_params.received or time.monotonic()
        load.trust_until = received + handle.lease_s / 2
        load.num_tokens = req.num_prompt_tokens
        load.first_block = num_local_tokens // self.layout.block_size   # blocks before it are prefix hits
        load.local = block_ids[load.first_block:]
        if handle.engine_id not in self._peers:
            self._handshake(handle)

    def finished_loads(self) -> tuple[list[str], dict[str, str]]:
        for load in list(self._loads.values()):
            if load.xfer is None:
                self._try_start(load)
            else:
                self._check(load)
        done, failed = self._done, self._failed
        self._done, self._failed = [], {}
        return done, failed

    def cancel_load(self, req_id: str) -> None:
        load = self._loads.pop(req_id, None)
        if load is None:
            return
        self._release_xfer(load)
        self._notify_done(load)

    def close(self) -> None:
        for load in list(self._loads.values()):
            self._release_xfer(load)
        self._loads.clear()
        self.side_channel.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        for peer in self._peers.values():
            self._forget_agent(peer.agent_name)
        self.agent.deregister_memory(self._registration)
        self.agent = None       # the agent's threads stop when it is destroyed

    # -- the life of one load ------------------------------------------------------------
    def _try_start(self, load: _Load) -> None:
        """Issue the READ once the producer's metadata is here."""
        if time.monotonic() > load.trust_until:
            return self._fail(load, "lease", "the producer's lease ran out before the READ could start")
        eid = load.handle.engine_id
        peer = self._peers.get(eid)
        if peer is None:
            fut = self._handshake(load.handle)     # again, if the peer was dropped meanwhile
            if not fut.done():
                if time.monotonic() > load.deadline:
                    self._fail(load, "timeout", "handshake did not finish in time")
                return
            del self._handshakes[eid]
            try:
                peer = self._connect(fut.result())
            except Exception as e:      # unreachable, refused, malformed or incompatible peer
                reason = "layout" if isinstance(e, LayoutMismatch) else "handshake"
                self._fail(load, reason, str(e))
                for other in [x for x in self._loads.values() if x.xfer is None and x.handle.engine_id == eid]:
                    self._fail(other, reason, str(e))
                return
        load.peer = peer
        if load.handle.layout_hash != peer.layout.hash:
            return self._fail(load, "layout", "the handle's layout hash does not match its engine's layout")
        # Layouts match, so block counts are comparable.
        handle = load.handle
        n_blocks = -(-handle.num_tokens // self.layout.block_size)
        if handle.num_tokens != load.num_tokens or len(handle.block_ids) != n_blocks:
            return self._fail(load, "bad_handle", f"the handle covers {handle.num_tokens} tokens in "
                              f"{len(handle.block_ids)} blocks; the prompt has {load.num_tokens} tokens")
        if any(b >= peer.layout.num_blocks for b in handle.block_ids):
            return self._fail(load, "bad_handle", f"block ids beyond the producer's {peer.layout.num_blocks} blocks")
        hybrid = self.layout.state is not None
        if hybrid and (handle.state_slot is None or load.state_slot is None):
            return self._fail(load, "bad_handle", "a hybrid model's hand-off needs the producer's state slot "
                              "and a local one")
        if not hybrid and handle.state_slot is not None:
            return self._fail(load, "bad_handle", "the handle names a state slot; this model has none")
        if hybrid and handle.state_slot >= peer.layout.num_state_slots:
            return self._fail(load, "bad_handle", f"state slot beyond the producer's {peer.layout.num_state_slots}")
        load.remote = handle.block_ids[load.first_block:]
        if not load.local and not hybrid:    # every block was a local prefix-cache hit
            self._notify_done(load)
            self._finish(load)
            return
        size = self.layout.block_bytes
        runs = block_runs(load.local, load.remote)
        local_descs = [(self.base + lo * size, n * size, self.dev_id) for lo, _, n in runs]
        remote_descs = [(peer.base + ro * size, n * size, peer.dev_id) for _, ro, n in runs]
        load.nbytes = len(load.local) * size
        if hybrid:
            # The state after the prompt: one more descriptor, the whole slot.
            slot = self.layout.state_bytes
            local_descs.append((self.state_base + load.state_slot * slot, slot, self.dev_id))
            remote_descs.append((peer.state_base + handle.state_slot * slot, slot, peer.dev_id))
            load.nbytes += slot
        load.started = time.monotonic()
        load.deadline = load.started + self.transfer_timeout_s
        try:
            local = self.agent.get_xfer_descs(local_descs, self.mem_type)
            remote = self.agent.get_xfer_descs(remote_descs, peer.mem_type)
            load.xfer = self.agent.initialize_xfer("READ", local, remote, peer.agent_name,
                                                   _DONE + load.handle.request_id.encode())
            state = self.agent.transfer(load.xfer)
        except Exception as e:   # NIXL raises typed errors (remote disconnect, backend)
            return self._fail(load, "transfer", f"{type(e).__name__}: {e}", drop_peer=True)
        load.descriptors = len(local_descs)
        self.stats.descriptors_total += len(local_descs)
        if state == "ERR":
            return self._fail(load, "transfer", "NIXL refused the READ")
        self._check(load)

    def _check(self, load: _Load) -> None:
        try:
            state = self.agent.check_xfer_state(load.xfer)
        except Exception as e:
            return self._fail(load, "transfer", f"{type(e).__name__}: {e}", drop_peer=True)
        if state == "DONE" and time.monotonic() > load.trust_until:
            self._fail(load, "lease", "the READ ended after the producer's lease; its blocks may have been reused")
        elif state == "DONE":
            self._count_transfer(load.nbytes, time.monotonic() - load.started, load.descriptors)
            self._release_xfer(load)
            self._finish(load)
        elif state == "ERR":
            self._fail(load, "transfer", "the READ ended in error", drop_peer=True)
        elif time.monotonic() > load.deadline:
            self._fail(load, "timeout", f"the READ took over {self.transfer_timeout_s} s")
        elif time.monotonic() > load.trust_until:
            self._fail(load, "lease", "the READ outlasted the producer's lease")

    def _handshake(self, handle: KVHandle) -> Future:
        """The producer's metadata, fetched once per engine in a background thread."""
        fut = self._handshakes.get(handle.engine_id)
        if fut is None:
            fut = self._handshakes[handle.engine_id] = self._pool.submit(
                fetch_metadata, handle.host, handle.port, self.handshake_timeout_s)
        return fut

    def _connect(self, meta: dict) -> _Peer:
        layout = BlockLayout.from_dict(meta["layout"])
        why = self.layout.mismatch(layout)
        if why is not None:
            raise LayoutMismatch(f"refusing KV from engine {meta['engine_id']}: {why}")
        name = self.agent.add_remote_agent(meta["agent_metadata"])
        name = name.decode() if isinstance(name, bytes) else name
        peer = _Peer(name, meta["base"], meta["dev_id"], meta["mem_type"], layout, meta.get("state_base", 0))
        self._peers[meta["engine_id"]] = peer
        return peer

    def _finish(self, load: _Load) -> None:
        del self._loads[load.req_id]
        self._done.append(load.req_id)

    def _fail(self, load: _Load, reason: str, detail: str, drop_peer: bool = False) -> None:
        log.warning("KV load of request %s failed (%s): %s", load.req_id, reason, detail)
        self._release_xfer(load)
        self._notify_done(load)
        if drop_peer and load.peer is not None:
            # A disconnected agent stays broken; the next request handshakes afresh.
            self._peers.pop(load.handle.engine_id, None)
            self._forget_agent(load.peer.agent_name)
        self._loads.pop(load.req_id, None)
        self._count_failure(reason)
        self._failed[load.req_id] = f"KV transfer failed ({reason}): {detail}"

    def _release_xfer(self, load: _Load) -> None:
        if load.xfer is not None:
            try:
                self.agent.release_xfer_handle(load.xfer)   # cancels a READ still in flight
            except Exception as e:
                log.warning("releasing the READ of request %s: %s", load.req_id, e)
            load.xfer = None

    def _notify_done(self, load: _Load) -> None:
        """Best effort: tell the producer to free its blocks now (else its lease does)."""
        if load.peer is None or load.handle is None:
            return
        try:
            self.agent.send_notif(load.peer.agent_name, _DONE + load.handle.request_id.encode())
        except Exception as e:
            log.info("could not notify engine %s: %s", load.handle.engine_id, e)

    def _forget_agent(self, name: str) -> None:
        try:
            self.agent.remove_remote_agent(name)
        except Exception as e:
            log.info("removing remote agent %s: %s", name, e)

"""One rank of a multi-rank EP engine: a process that runs its own EngineCore (its share
of the requests: attention data-parallel) whose MoE layers hold only this rank's expert
slots and exchange tokens with the other ranks (expert-parallel).

The rank does what the coordinator's messages say, one at a time, and answers each.
Every rank runs a forward on every step, even without work of its own (a dummy MoE
pass), because the MoE collectives need every rank of the group.

Extensions (e.g. EPLB's load statistics and weight migration) plug in by name, so the
engine layer imports none of the layers above it. An extension is a class built with
the worker; its `name` (if any) is the key of its payload in the messages' `ext` maps
(the coordinator-side plugin of the same name writes and reads them). Optional
methods: on_regroup(msg, payload), before_step(msg, payload), after_step(msg, payload)
-> payload of the answer (or None), on_reset(); msg is the Regroup or Step message.
"""

from __future__ import annotations

import os
import traceback
from typing import Any

import torch
import zmq

from engine.core.engine_core import EngineCore
from engine.distributed.peer_memory import allocate_peer_memory
from engine.distributed.process_group import EPGroups, backend_for, join_generation, leave_group
from engine.distributed.protocol import (Done, Error, Hello, Init, RankOutput, Ready, Regroup, RegroupDone, Reset,
                                         ResetAnswer, SetKVConnector, Shutdown, Step, StepAnswer, pack, unpack)
from engine.distributed.rank_kv_transfer import RankKVTransfer
from engine.layers.ep_dispatch import ExpertParallel, attach_expert_parallel, dummy_moe_pass, regroup_layer
from engine.layers.ep_low_latency import LowLatencyBuffers
from engine.layers.expert_map import ExpertMap
from engine.models.loader import load_config
from engine.plugins import load_class
from engine.request import Request


class EPWorker:
    def __init__(self, init: Init) -> None:
        config = init.engine_config()
        path = init.model_path
        if config.device.startswith("cuda"):
            torch.cuda.set_device(torch.device(config.device))   # NCCL uses the current device
        model_config = load_config(path)
        if init.slot_experts is not None:
            # Build and load only this rank's expert slots (FusedMoE(slot_experts=...)).
            model_config.ep_slot_experts = list(init.slot_experts)
        self.core = EngineCore(config, model_config, path)
        self.model = self.core.model
        self.top_k = int(model_config.num_experts_per_tok)
        self.eos = frozenset(init.eos_token_ids)
        self.backend = backend_for(config.device)
        self.store = (init.store_host, init.store_port)
        self.timeout_s = float(init.timeout_s)
        self.ep: ExpertParallel | None = None
        self.groups: EPGroups | None = None
        self.extensions = [load_class(spec)(self) for spec in init.extensions]
        self.kv: RankKVTransfer | None = None
        if init.kv_connector:
            self.set_kv_connector(SetKVConnector(init.kv_connector))

    def set_kv_connector(self, msg: SetKVConnector) -> Done:
        """Build this rank's KV connector (a KVConnectorSpec's wire form)."""
        if self.kv is None:
            self.kv = RankKVTransfer(self.core, msg.kv_connector, self.store[0])
        return Done()

    def close(self) -> None:
        if self.kv is not None:
            self.kv.close()
            self.kv = None

    @property
    def moe_layers(self) -> list[torch.nn.Module]:
        return self.model.moe_layers()

    def describe(self) -> Ready:
        layers = self.moe_layers
        if not layers:
            raise ValueError("this model has no MoE layers; expert parallelism has nothing to split")
        w13 = layers[0].w13
        return Ready(moe_layers=len(layers), num_experts=layers[0].num_experts, slots_loaded=w13.shape[0],
                     dispatch_width=w13.shape[2],
                     bytes_per_expert=(w13[0].numel() + layers[0].w2[0].numel()) * w13.element_size())

    def local_expert_map(self) -> list[list[int]]:
        """phy2log of this rank's slots, per MoE layer (the rank's own maps are the truth)."""
        lo, hi = self.ep.first_slot, self.ep.first_slot + self.ep.slots_per_rank
        return [moe.phy2log[lo:hi].tolist() for moe in self.moe_layers]

    # -- group changes ------------------------------------------------------------------
    def regroup(self, msg: Regroup) -> RegroupDone:
        """Join generation msg.generation as msg.rank of msg.world_size and take the
        expert map msg.phy2log ([moe layers, world * slots], -1 = empty slot).
        dispatch 'low_latency' maps peer buffers for the low-latency MoE path;
        cuda_graphs then captures the decode graphs, which hold those buffers'
        addresses (every rank captures the same sizes, so their warm-up passes pair up)."""
        self._drop_low_latency()
        self.groups = join_generation(*self.store, msg.generation, msg.rank, msg.world_size, self.backend,
                                      self.timeout_s)
        expert_map = ExpertMap.from_phy2log(msg.phy2log, self.moe_layers[0].num_experts)
        first = self.ep is None
        self.ep = ExpertParallel(msg.rank, msg.world_size, msg.slots_per_rank, group=self.groups.dispatch)
        if first:
            attach_expert_parallel(self.moe_layers, self.ep, expert_map, weights_from_model=msg.weights == "model")
        else:
            for i, moe in enumerate(self.moe_layers):
                regroup_layer(moe, self.ep, expert_map.layer(i))
        low_latency = msg.dispatch == "low_latency"
        if low_latency:
            self.ep.low_latency = self._low_latency_buffers()
        self._call("on_regroup", msg)      # extensions may rebind buffers a graph would hold
        if low_latency and msg.cuda_graphs:
            self.core.runner.capture_cuda_graphs()
        graphs = self.core.runner.graphs
        return RegroupDone(list(graphs.sizes) if graphs is not None else [])

    def _low_latency_buffers(self) -> LowLatencyBuffers:
        c = self.core.config
        capacity = max(c.max_num_batched_tokens, c.max_num_seqs)    # the largest step, graphs included
        w2 = self.moe_layers[0].w2
        shape = (self.ep.world_size, capacity, w2.shape[1], self.top_k, w2.dtype)
        memory = allocate_peer_memory(LowLatencyBuffers.nbytes(*shape), w2.device, self.groups.peer,
                                      self.timeout_s)
        return LowLatencyBuffers(memory, *shape[1:])

    def _drop_low_latency(self) -> None:
        """Before a new generation: graphs and buffers of the old one go (after the device
        finished any step still in flight, which may write into them)."""
        if self.ep is None or self.ep.low_latency is None:
            return
        if self.core.device.type == "cuda":
            torch.cuda.synchronize(self.core.device)
        self.core.runner.graphs = None
        self.ep.low_latency.close()
        self.ep.low_latency = None

    def reset(self, msg: Reset) -> ResetAnswer:
        """Drop every request (after a failed collective the survivors restart them) and
        report which expert each local slot holds."""
        ids = list(self.core.scheduler.requests)
        self.core.abort_requests(ids)
        for ext in self.extensions:
            if hasattr(ext, "on_reset"):
                ext.on_reset()
        return ResetAnswer(len(ids), self.local_expert_map())

    # -- steps ----------------------------------------------------------------------
    def step(self, msg: Step) -> StepAnswer:
        if self.ep is None:
            raise RuntimeError("step before the rank joined an EP group")
        rejected = []
        if msg.abort:
            self.core.abort_requests(list(msg.abort))
        for add in msg.add:
            try:
                self.core.add_request(Request(add.request_id, list(add.prompt_token_ids), add.params, self.eos,
                                              kv_transfer_params=add.kv_transfer_params))
            except ValueError as e:
                rejected.append((add.request_id, str(e)))
        self._call("before_step", msg)
        forwards = self.core.runner.num_forwards
        outputs = self.core.step()
        ran_forward = self.core.runner.num_forwards > forwards
        if not ran_forward:
            dummy_moe_pass(self.model)
        sched = self.core.scheduler
        answer = StepAnswer(
            outputs=[RankOutput(o.request_id, o.new_token_ids, o.finish_reason, o.new_logprobs, o.num_cached_tokens,
                                o.prompt_logprobs, o.kv_transfer_params and o.kv_transfer_params.to_dict(), o.error)
                     for o in outputs],
            rejected=rejected, unfinished=sched.num_unfinished, num_running=len(sched.running),
            num_waiting=len(sched.waiting), kv_usage=self.core.kv.usage, ran_forward=ran_forward)
        if self.kv is not None:
            kv = self.kv.step_answer()
            answer.kv_calls, answer.kv_held = kv["kv_calls"], kv["kv_held"]
        for name, payload in self._call("after_step", msg):
            if payload is not None:
                answer.ext[name] = payload
        return answer

    def _call(self, hook: str, msg: Regroup | Step) -> list[tuple[str, Any]]:
        """Each extension's hook with its own payload of msg; (name, what it returned)."""
        results = []
        for ext in self.extensions:
            fn = getattr(ext, hook, None)
            if fn is not None:
                name = getattr(ext, "name", "")
                results.append((name, fn(msg, msg.ext.get(name))))
        return results


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def worker_main(address: str, name: str, num_threads: int = 0, coordinator_pid: int | None = None) -> None:
    """Entry point of a rank process: connect to the coordinator and serve it. With
    coordinator_pid (same host), exit when that process is gone."""
    if num_threads:
        torch.set_num_threads(num_threads)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, name.encode())
    sock.setsockopt(zmq.LINGER, 1000)
    sock.connect(address)
    sock.send(pack(Hello(os.getpid())))
    worker: EPWorker | None = None
    try:
        while True:
            if not sock.poll(1000):
                if coordinator_pid is not None and not _alive(coordinator_pid):
                    return
                continue
            msg, seq = unpack(sock.recv())
            try:
                if isinstance(msg, Shutdown):
                    sock.send(pack(Done(), seq))
                    return
                if isinstance(msg, Init):
                    worker = EPWorker(msg)
                    sock.send(pack(worker.describe(), seq))
                    continue
                if worker is None:
                    raise RuntimeError(f"{msg.TYPE!r} before init")
                handler = {Regroup: worker.regroup, Step: worker.step, Reset: worker.reset,
                           SetKVConnector: worker.set_kv_connector}.get(type(msg))
                if handler is None:
                    raise ValueError(f"unexpected message {msg.TYPE!r}")
                with torch.inference_mode():
                    answer = handler(msg)
                sock.send(pack(answer, seq))
            except Exception as e:  # the coordinator decides what a failed rank means
                sock.send(pack(Error(f"{type(e).__name__}: {e}", traceback.format_exc()), seq))
    finally:
        if worker is not None:
            worker.close()
        leave_group()
        sock.close()
        ctx.term()

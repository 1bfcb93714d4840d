"""The coordinator of a multi-rank expert-parallel engine.

`EPEngine(config, ep_size)` starts one process per rank (engine/distributed/ep_worker),
gives each rank its share of the requests (attention data-parallel: the rank with
the fewest unfinished requests gets the next one) and drives all ranks in lockstep:
each `step()` sends every rank its new requests, aborts and extension fields over
pyzmq, and gathers what each rank produced. The ranks' MoE layers hold a slice of the
expert slots each and exchange tokens among themselves (torch.distributed).

Generations: a change of the rank set (start, grow, shrink, a lost rank) forms a new
torch.distributed group through the coordinator's TCPStore. The primitives for that
(`_spawn`, `_regroup`, `_retire`) are here; policies that use them (elastic scaling,
EPLB) live in eplb/. A lost rank is handled here: the survivors drop their requests,
regroup with the expert slots they hold, and every unfinished request restarts from
its prompt plus the tokens it already produced; if some expert had all its replicas
on the lost rank, the engine says so (RankLostError) and refuses further work.
"""

from __future__ import annotations

import itertools
import random
import time
from collections import deque
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import zmq

from engine.config import EngineConfig
from engine.core.engine_core import EngineCoreOutput
from engine.distributed.launcher import RankLauncher, SpawnLauncher
from engine.distributed.protocol import config_to_wire, pack, params_to_wire, unpack
from engine.engine_client import ModelFiles, Prompt, pair_prompts, routed_experts
from engine.engine_stats import EngineStats
from engine.kv_transfer import (KVConnectorSpec, RecordedTransfers, TransferObserver, check_consumer, is_consumer,
                                is_producer)
from engine.kv_transfer_params import KVTransferParams
from engine.output_processor import apply_output, new_output
from engine.outputs import RequestOutput
from engine.request import Request, RequestStatus
from engine.request_limits import RequestLimits
from engine.sampling_params import SamplingParams
from engine.tokenizer import IncrementalDetokenizer


class EPEngineError(RuntimeError):
    """The EP engine cannot go on; it refuses further work."""


class RankLostError(EPEngineError):
    """A rank died and the survivors cannot serve without it."""


class _RanksDied(Exception):
    def __init__(self, names: list[str]) -> None:
        super().__init__(f"ranks {names} died")
        self.names = names


@dataclass
class _Tracked:
    """One user request as the coordinator follows it."""
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    result: RequestOutput
    detok: IncrementalDetokenizer
    internal_id: str = ""
    owner: str = ""
    finished: bool = False
    error: str | None = None
    # Added through the engine-client interface: the caller folds the outputs (text,
    # stop strings) and keeps the result, so the engine forgets it once finished.
    client: bool = False
    kv_transfer_params: KVTransferParams | None = None    # a KV hand-off, done on the owning rank


@dataclass
class _Rank:
    name: str
    process: Any
    device: str = ""
    pending_add: list = field(default_factory=list)
    pending_abort: list = field(default_factory=list)


class EPEngine:
    """Attention-DP / MoE-EP engine over `ep_size` rank processes; an engine client
    (engine/engine_client.py), so LLM and AsyncEngine drive it as they drive EngineCore.

    num_redundant_experts: extra physical slots per MoE layer (total slots must split
        evenly over the ranks; slots per rank stay fixed when the world changes).
    extensions: worker extensions ('module:Class') loaded in every rank.
    worker_threads: torch threads per rank process (0 leaves torch's default).
    timeout_s: how long a collective or a rank's answer may take before it counts as lost.
    start_timeout_s: how long a new rank may take to start and load the model.
    host: the address ranks reach the coordinator (pyzmq) and its TCPStore at.
    dispatch: how MoE layers exchange tokens. "normal": all-to-alls sized per step (any
        step size; the counts come back to the host, so no CUDA graphs). "low_latency":
        writes into peer-mapped buffers for up to max(max_num_batched_tokens,
        max_num_seqs) tokens per rank and step, no host sync, and decode steps replay
        CUDA graphs when the config has them on. DeepEP's split: normal for prefill
        pools, low-latency for decode pools (keep max_num_batched_tokens small there).
    """

    def __init__(self, config: EngineConfig, ep_size: int, *, num_redundant_experts: int = 0,
                 extensions: tuple[str, ...] = (), worker_threads: int = 1, timeout_s: float = 120.0,
                 start_timeout_s: float = 900.0, host: str = "127.0.0.1",
                 launcher: RankLauncher | None = None, dispatch: str = "normal",
                 files: ModelFiles | None = None) -> None:
        if ep_size < 1:
            raise ValueError(f"ep_size must be >= 1, got {ep_size}")
        if dispatch not in ("normal", "low_latency"):
            raise ValueError(f"dispatch must be 'normal' or 'low_latency', got {dispatch!r}")
        self.dispatch = dispatch
        self.config = config
        self.files = files or ModelFiles.load(config)
        self.path, model_config = self.files.path, self.files.model_config
        self.tokenizer, self.eos_token_ids = self.files.tokenizer, self.files.eos_token_ids
        self.limits = RequestLimits.for_model(config, model_config)   # as each rank's core checks
        self._stats = EngineStats(0, 0, 0.0)     # replaced after each step: other threads read it
        self._closed = False
        self.extensions = tuple(extensions)
        self.worker_threads = worker_threads
        self.timeout_s = timeout_s
        self.start_timeout_s = start_timeout_s
        self.num_redundant_experts = num_redundant_experts

        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self.host = host
        port = self._sock.bind_to_random_port(f"tcp://{host}")
        self.address = f"tcp://{host}:{port}"
        self._store = dist.TCPStore(host, 0, None, True, wait_for_workers=False,
                                    timeout=timedelta(seconds=timeout_s))
        self._inbox: dict[str, deque] = {}
        self._seq = 0
        self._expect: dict[str, int] = {}
        self._names = (f"rank-{i}" for i in itertools.count())
        self._internal_ids = (f"q{i}" for i in itertools.count())
        self._user_ids = itertools.count()
        self.launcher = launcher or SpawnLauncher()
        self._rng = random.Random(config.seed)

        self._known: dict[str, _Rank] = {}    # every started, not yet retired rank process
        self.ranks: list[_Rank] = []          # the current group, in rank order
        self.accepting: set[str] = set()      # ranks that take new requests
        self.generation = -1
        self.step_index = 0
        self.requests: dict[str, _Tracked] = {}        # user id -> request, until popped
        self._by_internal: dict[str, _Tracked] = {}
        self._undelivered: list[EngineCoreOutput] = []
        self.failed: EPEngineError | None = None
        self.num_recoveries = 0
        self.events: list[str] = []               # what happened to the rank set, in words
        self.graph_sizes: dict[str, list[int]] = {}  # per rank: decode batch sizes it replays as CUDA graphs
        # KV hand-off (disaggregated prefill/decode): each rank runs its own connector.
        self.kv_connector: KVConnectorSpec | None = None
        self.kv_observer: TransferObserver | None = None
        self._kv_held: dict[str, int] = {}   # per rank: finished prefills whose blocks wait for a reader

        # Knowing the expert count up front lets each rank build and load only its own
        # slots; random weights are drawn for the whole model so every rank agrees.
        self.num_experts = routed_experts(model_config)
        self.slots_per_rank = 0
        self._load_own_slots = self.num_experts is not None and config.load_format != "random"
        try:
            if self.num_experts is not None:
                self._set_layout(ep_size)
            ranks, layout = self._spawn(ep_size, keep_serving=False)
            self.num_moe_layers = layout["moe_layers"]
            self.bytes_per_expert = layout["bytes_per_expert"]
            self.slots_loaded = layout["slots_loaded"]
            # Values per token row a dispatch carries (a LatentMoE's latent size).
            self.dispatch_width = layout["dispatch_width"]
            if self.num_experts is None:
                self.num_experts = layout["num_experts"]
                self._set_layout(ep_size)
            elif layout["num_experts"] != self.num_experts:
                raise ValueError(f"the model config says {self.num_experts} experts, the ranks built "
                                 f"{layout['num_experts']}")
            self.phy2log = self._initial_slots(0, ep_size).repeat(self.num_moe_layers, 1)
            self._regroup(ranks, self.phy2log, weights={r.name: "model" for r in ranks})
            self.accepting = {r.name for r in ranks}
        except BaseException:
            self.shutdown()
            raise

    def _set_layout(self, ep_size: int) -> None:
        total = self.num_experts + self.num_redundant_experts
        if self.num_redundant_experts < 0 or total % ep_size:
            raise ValueError(f"{self.num_experts} experts + {self.num_redundant_experts} redundant slots do not "
                             f"split evenly over {ep_size} ranks; pick num_redundant_experts so they do")
        self.slots_per_rank = total // ep_size

    def _initial_slots(self, first_rank: int, count: int) -> torch.Tensor:
        """Experts of the slots of ranks [first_rank, first_rank + count) before any load
        is known: slot s holds expert s mod E."""
        s = self.slots_per_rank
        return torch.arange(first_rank * s, (first_rank + count) * s) % self.num_experts

    # -- requests -----------------------------------------------------------------------
    def add_request(self, prompt: Request | Prompt, params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Queue a request: an engine-client `Request` (the caller folds the outputs), or
        a prompt with params (this engine keeps the result: `requests`, `pop_finished`)."""
        self._check_usable()
        if isinstance(prompt, Request):
            return self._add_client_request(prompt)
        params = params or SamplingParams()
        if params.seed is None:     # fixed here, so a restarted request samples the same way
            params = replace(params, seed=self._rng.getrandbits(63))
        ids = self._encode(prompt)
        rid = request_id if request_id is not None else str(next(self._user_ids))
        self._check_new_id(rid)
        tracked = _Tracked(rid, ids, params, new_output(rid, prompt, ids, params),
                           IncrementalDetokenizer(self.tokenizer, params.stop))
        self.requests[rid] = tracked
        self._submit(tracked, ids, params)
        return rid

    def _add_client_request(self, req: Request) -> str:
        self._check_new_id(req.request_id)
        self.validate(req)
        if req.kv_transfer_params and self.kv_connector is None:
            raise ValueError("this engine has no KV-transfer connector; send the request without kv_transfer_params")
        if is_consumer(req):
            check_consumer(req, self.limits.vocab_size)
        params = req.sampling_params
        if params.seed is None:
            params = replace(params, seed=self._rng.getrandbits(63))
        # The ranks take prompts only: tokens already generated elsewhere (a resumed
        # stream) are recomputed as prompt, as a restart after a lost rank does.
        if req.output_token_ids:
            params = replace(params, max_tokens=max(params.max_tokens - len(req.output_token_ids), 1))
        ids = list(req.prompt_token_ids) + list(req.output_token_ids)
        # The caller detokenizes and applies stop strings: no detokenizer here.
        tracked = _Tracked(req.request_id, ids, params, new_output(req.request_id, None, ids, params),
                           IncrementalDetokenizer(None, []), client=True, kv_transfer_params=req.kv_transfer_params)
        self.requests[req.request_id] = tracked
        self._submit(tracked, ids, params)
        return req.request_id

    def set_kv_connector(self, spec: KVConnectorSpec, observer: TransferObserver | None = None) -> None:
        """Give every rank (and every rank started later) its own KV connector built from
        `spec`; the ranks' transfers are reported to `observer` here. Returns nothing:
        the connectors live in the rank processes."""
        self._check_usable()
        self.kv_connector, self.kv_observer = spec, observer
        for r in self.ranks:
            self._send(r.name, {"type": "kv_connector", "kv_connector": spec.to_wire()})
        self._gather([r.name for r in self.ranks])

    def _check_new_id(self, rid: str) -> None:
        if rid in self.requests and not self.requests[rid].finished:
            raise ValueError(f"request id {rid!r} is already in use")

    def validate(self, req: Request) -> None:
        """Raise ValueError for a request the ranks would refuse (the same checks as
        EngineCore.validate); reads only settings."""
        self.limits.check(req.prompt_token_ids, req.sampling_params)
        if req.output_token_ids:
            self.limits.check_output_prefix(req.output_token_ids, req.sampling_params)

    def abort_requests(self, request_ids: list[str], status: RequestStatus = RequestStatus.FINISHED_ABORTED) -> None:
        for rid in request_ids:
            t = self.requests.get(rid)
            if t is None or t.finished:
                continue
            self._rank(t.owner).pending_abort.append(t.internal_id)
            t.result.outputs[0].finish_reason = t.result.outputs[0].finish_reason or status.value
            self._finish(t)

    def _finish(self, t: _Tracked) -> None:
        t.finished = True
        t.result.finished = True
        if t.client:
            self.requests.pop(t.request_id, None)

    def has_unfinished(self) -> bool:
        return any(not t.finished for t in self.requests.values())

    @property
    def has_pending_work(self) -> bool:
        # Aborts reach the ranks with a step: until then they hold the blocks. Outputs of
        # steps taken on the engine's own (scaling, a rebalance) go out with the next step.
        # Held prefill blocks are polled (by stepping) for their reader's notice.
        return (self.has_unfinished() or any(r.pending_abort for r in self.ranks) or bool(self._undelivered)
                or self.has_held_blocks)

    @property
    def has_held_blocks(self) -> bool:
        """Some rank holds finished prefills' blocks for a reader (as of the last step)."""
        return any(self._kv_held.values())

    def holds_kv_on(self, name: str) -> bool:
        """Rank `name` holds blocks for a reader (a shrink waits for them to be read)."""
        return bool(self._kv_held.get(name))

    def poll_interval(self) -> float | None:
        """None while there are requests to step; else how long a loop may wait."""
        if self.has_unfinished() or any(r.pending_abort for r in self.ranks) or self._undelivered:
            return None
        return 0.02 if self.has_held_blocks else 0.5

    def engine_stats(self) -> EngineStats:
        """Summed over the ranks as of the last step (KV usage: their mean)."""
        return self._stats

    def pop_finished(self) -> list[RequestOutput]:
        """Results of finished requests, which the engine then forgets (a caller that
        drives step() itself collects them here; generate() does it for its own)."""
        done = [rid for rid, t in self.requests.items() if t.finished]
        return [self.requests.pop(rid).result for rid in done]

    def num_unfinished_on(self, name: str) -> int:
        return sum(1 for t in self.requests.values() if not t.finished and t.owner == name)

    def generate(self, prompts: Prompt | list[Prompt],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        prompts, params = pair_prompts(prompts, sampling_params)
        rids = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        while any(not self.requests[r].finished for r in rids):
            self.step()
            bad = [(i, self.requests[r].error) for i, r in enumerate(rids) if self.requests[r].error is not None]
            if bad:     # a rank refused one: stop the others, leave the engine as it was
                self.abort_requests(rids)
                for r in rids:
                    self.requests.pop(r)
                raise ValueError(f"prompt {bad[0][0]}: {bad[0][1]}")
        return [self.requests.pop(r).result for r in rids]

    # -- the step -------------------------------------------------------------------------
    def step(self) -> list[EngineCoreOutput]:
        """One forward on every rank; returns the updates of user requests (with any
        produced by steps the engine took on its own, e.g. while scaling)."""
        self._step_internal()
        out, self._undelivered = self._undelivered, []
        return out

    def _step_internal(self) -> dict[str, dict]:
        self._check_usable()
        try:
            answers = self._step_once()
        except _RanksDied as e:
            self._recover(e.names)
            return {}
        self.step_index += 1
        return answers

    def _step_once(self) -> dict[str, dict]:
        self._check_alive()
        extra = self._step_fields(self.step_index)
        for r in self.ranks:
            msg = {"type": "step", "step": self.step_index, "add": r.pending_add, "abort": r.pending_abort, **extra}
            self._send(r.name, msg)
            r.pending_add, r.pending_abort = [], []
        answers = self._gather([r.name for r in self.ranks], allow_errors=True)
        errors = {n: a for n, a in answers.items() if a["type"] == "error"}
        for name, a in answers.items():
            if a["type"] == "done":
                self._apply(name, a)
        if errors:
            self._check_alive()   # a dead peer explains failed collectives
            # A rank failed on its own: the others may have left collectives half done, so
            # the ranks are out of step for good.
            name, a = next(iter(errors.items()))
            self.failed = EPEngineError(f"{name} failed step {self.step_index} ({a['error']}); the ranks are out "
                                        f"of step, restart the engine\n{a.get('traceback', '')}")
            self.events.append(f"{name} failed step {self.step_index}: {a['error']}")
            raise self.failed
        self._stats = _stats_of(answers.values())
        for a in answers.values():
            RecordedTransfers.replay(a.get("kv_calls", []), self.kv_observer)
        self._kv_held = {n: a.get("kv_held", 0) for n, a in answers.items()}
        self._on_step_answers(self.step_index, answers)
        return answers

    def _apply(self, name: str, answer: dict) -> None:
        for iid, error in answer.get("rejected", []):
            t = self._by_internal.pop(iid, None)
            if t is not None:
                t.result.outputs[0].finish_reason = "error"
                t.error = error
                self._finish(t)
                self._undelivered.append(EngineCoreOutput(t.request_id, [], "error", error=error))
        for iid, tokens, reason, logprobs, kv_params, error in answer["outputs"]:
            t = self._by_internal.get(iid)
            if t is None or t.finished:
                continue
            out = EngineCoreOutput(t.request_id, list(tokens), reason, [dict(lp) for lp in logprobs],
                                   kv_transfer_params=KVTransferParams.from_dict(kv_params) if kv_params else None,
                                   error=error)
            if error is not None:       # a failed KV load under the fail policy
                t.error = error
                t.result.outputs[0].finish_reason = reason
                self._finish(t)
                self._by_internal.pop(iid, None)
                self._undelivered.append(out)
                continue
            apply_output(self, t.result, t.detok, out)
            if t.result.finished:
                self._finish(t)
                self._by_internal.pop(iid, None)
            self._undelivered.append(out)

    # Hooks for layers above (EPLB): fields added to every step message, and what to do
    # with the ranks' answers.
    def _step_fields(self, step_index: int) -> dict[str, Any]:
        return {}

    def _on_step_answers(self, step_index: int, answers: dict[str, dict]) -> None:
        """Nothing by default; EPLB reads the ranks' load windows here."""

    def _regroup_fields(self) -> dict[str, Any]:
        return {}

    # -- ranks and generations --------------------------------------------------------------
    def _spawn(self, count: int, keep_serving: bool = True) -> tuple[list[_Rank], dict]:
        """Start `count` rank processes (the next ranks of the group) and wait until each
        has loaded the model; with keep_serving the current ranks go on stepping meanwhile."""
        if self.ranks and self.dispatch == "low_latency" and self.config.device.startswith("cuda"):
            # Seen on two H200s (torch 2.11): symmetric memory numbers its rendezvous per
            # process group name, so a rank started now never meets the running ones.
            raise EPEngineError("adding ranks to a running group is not supported with the low-latency dispatch "
                                "on GPUs (its symmetric memory cannot re-form with newly started ranks); "
                                "use dispatch='normal' for pools that grow, or restart with the new size")
        first_rank = len(self.ranks)
        names = [next(self._names) for _ in range(count)]
        new = [_Rank(name, proc) for name, proc in
               zip(names, self.launcher.launch(names, self.address, self.worker_threads))]
        for r in new:
            self._known[r.name] = r
        try:
            self._gather(names, serve=keep_serving, timeout_s=self.start_timeout_s)      # hello
            for k, r in enumerate(new):
                init = {"type": "init", "config": config_to_wire(self._rank_config(r)), "model_path": str(self.path),
                        "eos_token_ids": sorted(self.eos_token_ids), "store_host": self.host,
                        "store_port": self._store.port, "timeout_s": self.timeout_s,
                        "extensions": list(self.extensions),
                        "kv_connector": self.kv_connector.to_wire() if self.kv_connector else None}
                if self._load_own_slots:
                    init["slot_experts"] = self._initial_slots(first_rank + k, 1).tolist()
                self._send(r.name, init)
            ready = self._gather(names, serve=keep_serving, timeout_s=self.start_timeout_s)
        except (_RanksDied, RuntimeError) as e:    # the running ranks are untouched
            self._retire(names)
            raise EPEngineError(f"new ranks {names} did not start: {e}") from e
        return new, ready[names[0]]

    def _rank_config(self, rank: _Rank) -> EngineConfig:
        """A rank's engine settings: its own GPU, and no CUDA graphs at start-up (the
        graphs need the group: the low-latency dispatch captures them at each regroup,
        the normal one reads receive counts on the host, which a graph cannot replay)."""
        changes = {}
        if self.config.device.startswith("cuda") and self.launcher.isolated_devices:
            rank.device = changes["device"] = "cuda:0"     # the one GPU this rank sees
        elif self.config.device.startswith("cuda"):
            used = {r.device for r in self._known.values() if r is not rank}
            rank.device = next(f"cuda:{i}" for i in range(len(self._known) + 1) if f"cuda:{i}" not in used)
            changes["device"] = rank.device
        if getattr(self.config, "enable_cuda_graphs", None):
            changes["enable_cuda_graphs"] = False
        return replace(self.config, **changes)

    def _regroup(self, ranks: list[_Rank], phy2log: torch.Tensor, weights: dict[str, str] | None = None) -> None:
        """Form the next generation from `ranks` (in rank order) with expert map phy2log
        [moe layers, len(ranks) * slots]; weights says, per new rank, where its slots'
        weights come from: 'model' (its own loaded checkpoint) or 'none' (migration)."""
        self.generation += 1
        if phy2log.shape != (self.num_moe_layers, len(ranks) * self.slots_per_rank):
            raise ValueError(f"phy2log {tuple(phy2log.shape)} does not fit {len(ranks)} ranks of "
                             f"{self.slots_per_rank} slots")
        for i, r in enumerate(ranks):
            self._send(r.name, {"type": "regroup", "generation": self.generation, "rank": i,
                                "world_size": len(ranks), "slots_per_rank": self.slots_per_rank,
                                "phy2log": phy2log.tolist(), "weights": (weights or {}).get(r.name, "keep"),
                                "dispatch": self.dispatch, "cuda_graphs": self._use_graphs,
                                **self._regroup_fields()})
        try:
            answers = self._gather([r.name for r in ranks])
        except (_RanksDied, RuntimeError) as e:
            self.failed = EPEngineError(f"forming generation {self.generation} failed ({e}); restart the engine")
            raise self.failed from e
        self.graph_sizes = {n: a.get("graph_sizes", []) for n, a in answers.items()}
        self.ranks = list(ranks)
        self.phy2log = phy2log.clone()
        self.events.append(f"generation {self.generation}: {len(ranks)} ranks")

    def _retire(self, names: list[str]) -> None:
        """Stop rank processes that are no longer in the group."""
        for n in names:
            if self._known[n].process.is_alive():
                self._send(n, {"type": "shutdown"})
        deadline = time.monotonic() + 30
        for n in names:
            r = self._known.pop(n)
            r.process.join(max(0.0, deadline - time.monotonic()))
            if r.process.is_alive():
                r.process.kill()
            self._inbox.pop(n, None)

    # -- lost ranks ---------------------------------------------------------------------
    def _recover(self, lost: list[str]) -> None:
        survivors = [r for r in self.ranks if r.name not in lost]
        self.events.append(f"lost {lost} at step {self.step_index}")
        # Each survivor drops its requests and says which expert each of its slots holds
        # (its own map is the truth: a commit may have landed in the failed step).
        for r in survivors:
            self._send(r.name, {"type": "reset"})
        held = self._gather([r.name for r in survivors]) if survivors else {}
        for n in lost:
            r = self._known.pop(n)
            r.process.join(1)
            self._inbox.pop(n, None)
        keep = [torch.tensor(held[r.name]["local_phy2log"], dtype=torch.long) for r in survivors]
        phy2log = torch.cat(keep, dim=1) if keep else self.phy2log[:, :0]
        missing = []
        for layer in range(self.num_moe_layers):
            present = set(phy2log[layer].tolist())
            gone = [e for e in range(self.num_experts) if e not in present]
            if gone:
                missing.append(f"MoE layer {layer}: experts {gone}")
        if missing or not survivors:
            self.failed = RankLostError(
                f"rank(s) {lost} died and held the only copies of " + "; ".join(missing or ["everything"]) +
                ". The survivors cannot serve these experts: restart the engine (or give the placement "
                "redundant replicas on different ranks so it survives a lost rank).")
            self.events.append(str(self.failed))
            for r in survivors:
                self._send(r.name, {"type": "shutdown"})
            raise self.failed
        self.accepting = {n for n in self.accepting if n not in lost}
        if not self.accepting:
            self.accepting = {r.name for r in survivors}
        self._regroup(survivors, phy2log)
        self.num_recoveries += 1
        self._on_regrouped()
        for t in list(self.requests.values()):
            if t.finished:
                continue
            done = t.result.outputs[0].token_ids
            left = t.params.max_tokens - len(done)
            self._by_internal.pop(t.internal_id, None)
            # A lost consumer's load is recomputed; a prefill for another engine still
            # hands out its KV (from its new rank) unless it had already finished.
            if not (t.kv_transfer_params and is_producer(t) and not done):
                t.kv_transfer_params = None
            self._submit(t, t.prompt_ids + done, replace(t.params, max_tokens=max(left, 1)))
        self.events.append(f"recovered on {[r.name for r in survivors]}; unfinished requests restarted")

    def _on_regrouped(self) -> None:
        """Called after a generation change the engine made on its own (a lost rank)."""

    # -- plumbing -----------------------------------------------------------------------
    def _submit(self, t: _Tracked, prompt_ids: list[int], params: SamplingParams) -> None:
        candidates = [r for r in self.ranks if r.name in self.accepting]
        owner = min(candidates, key=lambda r: (self.num_unfinished_on(r.name), self.ranks.index(r)))
        t.internal_id, t.owner = next(self._internal_ids), owner.name
        self._by_internal[t.internal_id] = t
        kv = t.kv_transfer_params.to_dict() if t.kv_transfer_params is not None else None
        owner.pending_add.append([t.internal_id, prompt_ids, params_to_wire(params), kv])

    def _encode(self, prompt: Prompt) -> list[int]:
        if not isinstance(prompt, str) and (not prompt or not all(isinstance(t, int) for t in prompt)):
            raise ValueError("a prompt must be a string or a non-empty list of token ids")
        return self.files.encode(prompt)

    def _rank(self, name: str) -> _Rank:
        return self._known[name]

    def _send(self, name: str, msg: dict) -> None:
        # Each answer echoes its message's seq: answers to messages a failure left
        # behind are told apart from the answer awaited now, and dropped.
        self._seq += 1
        self._expect[name] = self._seq
        self._sock.send_multipart([name.encode(), pack({**msg, "seq": self._seq})])

    def _gather(self, names: list[str], allow_errors: bool = False, serve: bool = False,
                timeout_s: float | None = None) -> dict[str, dict]:
        """One message from each of `names`. With serve, the current ranks take steps while
        waiting (for slow starters). Raises _RanksDied if one of them exits."""
        want = set(names)
        got: dict[str, dict] = {}
        procs = {n: r.process for n, r in self._known.items()}
        # Collectives time out after timeout_s inside the ranks, which then answer with
        # the error; give them that long and more before counting a rank as hung.
        limit = timeout_s or 2 * self.timeout_s + 5
        deadline = time.monotonic() + limit
        while want - got.keys():
            for n in list(want - got.keys()):
                box = self._inbox.get(n)
                while box and n not in got:
                    msg = box.popleft()
                    if msg.get("seq") == self._expect.get(n):
                        got[n] = msg
            if not want - got.keys():
                break
            if serve and self.has_unfinished() and self.ranks and not (want & {r.name for r in self.ranks}):
                self._step_internal()
                continue
            if self._sock.poll(200):
                name, data = self._sock.recv_multipart()
                self._inbox.setdefault(name.decode(), deque()).append(unpack(data))
                continue
            dead = [n for n in want - got.keys() if n in procs and not procs[n].is_alive()]
            dead += [r.name for r in self.ranks if not r.process.is_alive() and r.name not in dead]
            if dead:
                raise _RanksDied(sorted(set(dead)))
            if time.monotonic() > deadline:
                self.failed = EPEngineError(f"no answer from {sorted(want - got.keys())} within {limit:.0f} s; "
                                            f"a rank hangs, restart the engine")
                raise self.failed
        for n, a in got.items():
            if a["type"] == "error" and not allow_errors:
                raise RuntimeError(f"{n}: {a['error']}\n{a.get('traceback', '')}")
        return got

    def _check_alive(self) -> None:
        dead = [r.name for r in self.ranks if not r.process.is_alive()]
        if dead:
            raise _RanksDied(dead)

    def _check_usable(self) -> None:
        if self.failed is not None:
            raise self.failed

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        for r in self._known.values():
            if r.process.is_alive():
                self._send(r.name, {"type": "shutdown"})
        for r in self._known.values():
            r.process.join(10)
            if r.process.is_alive():
                r.process.kill()
        self._known, self.ranks = {}, []
        self.launcher.close()
        self._sock.close()
        self._ctx.term()

    def __enter__(self) -> EPEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    @property
    def _use_graphs(self) -> bool:
        return bool(self.config.enable_cuda_graphs) and self.dispatch == "low_latency"


def _stats_of(answers) -> EngineStats:
    answers = [a for a in answers if "num_running" in a]
    usage = sum(a["kv_usage"] for a in answers) / len(answers) if answers else 0.0
    return EngineStats(sum(a["num_running"] for a in answers), sum(a["num_waiting"] for a in answers), usage)

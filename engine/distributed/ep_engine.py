"""The coordinator of a multi-rank expert-parallel engine.

`EPEngine(config, ep_size)` starts one process per rank (engine/distributed/ep_worker),
gives each rank its share of the requests (attention data-parallel: the rank with the
fewest unfinished requests gets the next one) and drives all ranks in lockstep: each
`step()` sends every rank its new requests and aborts, and gathers what each produced.
The ranks' MoE layers hold a slice of the expert slots each and exchange tokens among
themselves (torch.distributed). Transport: rank_group.py; bookkeeping of requests:
request_tracker.py; components riding along (EPLB): ep_plugin.py.

Generations: a change of the rank set (start, grow, shrink, a lost rank) forms a new
torch.distributed group. The primitives for that (`spawn_ranks`, `regroup`,
`retire`, `move_requests`) are here; policies that use them (elastic scaling, EPLB)
live in eplb/. A lost rank is handled here (rank_loss.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from engine.config import EngineConfig
from engine.core.engine_core import EngineCoreOutput
from engine.distributed.ep_plugin import EPPlugin
from engine.distributed.launcher import RankLauncher
from engine.distributed.protocol import Error, Init, SetKVConnector, Step, StepAnswer
from engine.distributed.rank_group import EPEngineError, Rank, RankFailed, RankGroup, RanksDied
from engine.distributed.rank_loss import RankLostError, recover
from engine.distributed.request_tracker import RequestTracker, stats_of
from engine.engine_client import ModelFiles, Prompt, pair_prompts, routed_experts
from engine.engine_stats import EngineStats
from engine.kv_transfer import KVConnectorSpec, RecordedTransfers, TransferObserver, check_consumer, is_consumer
from engine.layers.expert_map import ExpertMap
from engine.outputs import RequestOutput
from engine.request import Request, RequestStatus
from engine.request_limits import RequestLimits
from engine.sampling_params import SamplingParams

__all__ = ["EPEngine", "EPEngineError", "RankLostError"]


class EPEngine:
    """Attention-DP / MoE-EP engine over `ep_size` rank processes; an engine client
    (engine/engine_client.py), so LLM and AsyncEngine drive it as they drive EngineCore.

    num_redundant_experts: extra physical slots per MoE layer (total slots must split
        evenly over the ranks; slots per rank stay fixed when the world changes).
    plugins: components riding along with the steps (ep_plugin.EPPlugin; eplb's controller).
    extensions: more worker extensions ('module:Class') loaded in every rank.
    worker_threads: torch threads per rank process (0 leaves torch's default).
    timeout_s / start_timeout_s: how long a rank's answer (a collective) / a new rank's
        start may take before it counts as lost; host: where ranks reach the coordinator.
    dispatch: "normal" (all-to-alls sized per step, counts read on the host) or
        "low_latency" (peer-mapped buffers of max(max_num_batched_tokens, max_num_seqs)
        tokens per rank, no host sync, decode steps as CUDA graphs when enabled): DeepEP's
        split, normal for prefill pools, low-latency for decode pools.
    """

    def __init__(self, config: EngineConfig, ep_size: int, *, num_redundant_experts: int = 0,
                 plugins: tuple[EPPlugin, ...] = (), extensions: tuple[str, ...] = (), worker_threads: int = 1,
                 timeout_s: float = 120.0, start_timeout_s: float = 900.0, host: str = "127.0.0.1",
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
        self.plugins = tuple(plugins)
        self.extensions = tuple(p.worker_extension for p in self.plugins) + tuple(extensions)
        self.timeout_s = timeout_s
        self.num_redundant_experts = num_redundant_experts
        self.group = RankGroup(config, host=host, launcher=launcher, timeout_s=timeout_s,
                               start_timeout_s=start_timeout_s, worker_threads=worker_threads)
        # The group's own lists (updated in place): the current ranks in rank order, what
        # happened to them in words, per rank the decode batch sizes it replays as graphs.
        self.ranks, self.events, self.graph_sizes = self.group.ranks, self.group.events, self.group.graph_sizes
        self.launcher = self.group.launcher
        self.tracker = RequestTracker(config.seed)
        # Where updates of steps taken outside step() go at once (AsyncEngine sets it, so
        # tokens reach their streams while a scale runs on its loop).
        self.output_sink: Callable[[EngineCoreOutput], None] | None = None
        # Called before each of those steps and while new ranks load: the caller takes in
        # the requests and aborts sent meanwhile (AsyncEngine sets it, so a scale does not
        # hold up admission); it may call add_request and abort_requests.
        self.command_pump: Callable[[], None] | None = None
        self.requests = self.tracker.requests            # user id -> request, until popped
        self.accepting: set[str] = set()      # ranks that take new requests
        self.step_index = 0
        self.failed: EPEngineError | None = None
        self.num_recoveries = 0
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
                self.slots_per_rank = self.slots_for(ep_size)
            ranks, layout = self.spawn_ranks(ep_size, keep_serving=False)
            self.num_moe_layers = layout.moe_layers
            self.bytes_per_expert = layout.bytes_per_expert
            self.slots_loaded = layout.slots_loaded
            # Values per token row a dispatch carries (a LatentMoE's latent size).
            self.dispatch_width = layout.dispatch_width
            if self.num_experts is None:
                self.num_experts = layout.num_experts
                self.slots_per_rank = self.slots_for(ep_size)
            elif layout.num_experts != self.num_experts:
                raise ValueError(f"the model config says {self.num_experts} experts, the ranks built "
                                 f"{layout.num_experts}")
            self.expert_map = ExpertMap.initial(self.num_moe_layers, ep_size * self.slots_per_rank, self.num_experts)
            self.regroup(ranks, self.expert_map, weights={r.name: "model" for r in ranks})
            self.accepting = {r.name for r in ranks}
            for p in self.plugins:
                p.attach(self)
        except BaseException:
            self.shutdown()
            raise

    def slots_for(self, ep_size: int) -> int:
        """Slots per rank for `ep_size` ranks; ValueError if the slots do not split evenly."""
        total = self.num_experts + self.num_redundant_experts
        if ep_size < 1 or self.num_redundant_experts < 0 or total % ep_size:
            raise ValueError(f"{self.num_experts} experts + {self.num_redundant_experts} redundant slots do not "
                             f"split evenly over {ep_size} ranks; pick a size that divides {total} (or "
                             f"num_redundant_experts so it does)")
        return total // ep_size

    # -- the expert-map interface -------------------------------------------------------
    @property
    def phy2log(self) -> torch.Tensor:
        return self.expert_map.phy2log

    def commit_layer_map(self, layer: int, row: list[int]) -> None:
        """Record that the ranks route MoE layer `layer` by `row` now (a plugin moved
        the weights and swapped the ranks' maps in a step)."""
        self.expert_map = self.expert_map.with_layer(layer, row)

    # -- requests -----------------------------------------------------------------------
    def add_request(self, prompt: Request | Prompt, params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Queue a request: an engine-client `Request` (the caller folds the outputs), or
        a prompt with params (this engine keeps the result: `requests`, `pop_finished`)."""
        self._check_usable()
        if isinstance(prompt, Request):
            self.validate(prompt)
            t = self.tracker.client_request(prompt)
        else:
            t = self.tracker.prompt_request(prompt, params or SamplingParams(), request_id, self.files, self.limits)
        self.tracker.add(t, self._accepting_ranks())
        return t.request_id

    def validate(self, req: Request) -> None:
        """Raise ValueError for a request the ranks would refuse (the same checks as
        EngineCore.validate); reads only settings."""
        self.limits.check(req.prompt_token_ids, req.sampling_params)
        if req.output_token_ids:
            self.limits.check_output_prefix(req.output_token_ids, req.sampling_params)
        if req.kv_transfer_params and self.kv_connector is None:
            raise ValueError("this engine has no KV-transfer connector; send the request without kv_transfer_params")
        if is_consumer(req):
            check_consumer(req, self.limits.vocab_size)

    def set_kv_connector(self, spec: KVConnectorSpec, observer: TransferObserver | None = None) -> None:
        """Give every rank (and every rank started later) its own KV connector built from
        `spec`; the ranks' transfers are reported to `observer` here. Returns nothing:
        the connectors live in the rank processes."""
        self._check_usable()
        self.kv_connector, self.kv_observer = spec, observer
        for r in self.ranks:
            self.group.send(r.name, SetKVConnector(spec.to_wire()))
        self.group.gather(self.group.names())

    def abort_requests(self, request_ids: list[str], status: RequestStatus = RequestStatus.FINISHED_ABORTED) -> None:
        for rid in request_ids:
            t = self.requests.get(rid)
            if t is None or t.finished:
                continue
            if t.owner in self.group.known:
                self.group.known[t.owner].pending_abort.append(t.internal_id)
            t.result.outputs[0].finish_reason = t.result.outputs[0].finish_reason or status.value
            self.tracker.finish(t)

    def has_unfinished(self) -> bool:
        return bool(self.tracker.unfinished())

    @property
    def has_pending_work(self) -> bool:
        # Aborts reach the ranks with a step: until then they hold the blocks. Outputs of
        # steps taken on the engine's own (scaling, a rebalance) go out with the next step.
        # Held prefill blocks are polled (by stepping) for their reader's notice.
        return self._has_work() or self.has_held_blocks

    def _has_work(self) -> bool:
        return self.has_unfinished() or any(r.pending_abort for r in self.ranks) or bool(self.tracker.undelivered)

    @property
    def has_held_blocks(self) -> bool:
        """Some rank holds finished prefills' blocks for a reader (as of the last step)."""
        return any(self._kv_held.values())

    def holds_kv_on(self, name: str) -> bool:
        """Rank `name` holds blocks for a reader (a shrink waits for them to be read)."""
        return bool(self._kv_held.get(name))

    def poll_interval(self) -> float | None:
        """None while there are requests to step; else how long a loop may wait."""
        if self._has_work():
            return None
        return 0.02 if self.has_held_blocks else 0.5

    def engine_stats(self) -> EngineStats:
        """Summed over the ranks as of the last step (KV usage: their mean)."""
        return self._stats

    def pop_finished(self) -> list[RequestOutput]:
        """Results of finished requests, which the engine then forgets (a caller that
        drives step() itself collects them here; generate() does it for its own)."""
        return self.tracker.pop_finished()

    def num_unfinished_on(self, name: str) -> int:
        return self.tracker.num_unfinished_on(name)

    def generate(self, prompts: Prompt | list[Prompt],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        prompts, params = pair_prompts(prompts, sampling_params)
        rids = []
        try:
            for p, sp in zip(prompts, params):
                rids.append(self.add_request(p, sp))
        except ValueError as e:
            self.abort_requests(rids)
            for r in rids:
                self.requests.pop(r)
            raise ValueError(f"prompt {len(rids)}: {e}") from e
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
        produced by steps the engine took on its own and not yet handed out)."""
        self._advance()
        return self.tracker.take_outputs()

    def step_internal(self) -> None:
        """A step the engine or a plug-in takes on its own (while scaling, migrating):
        its updates go to output_sink at once when one is set, else with the next step().
        The caller's pending requests and aborts (command_pump) go with it."""
        self._pump()
        self._advance()
        if self.output_sink is not None:
            for out in self.tracker.take_outputs():
                self.output_sink(out)

    def _advance(self) -> None:
        self._check_usable()
        try:
            self._step_once()
        except RanksDied as e:
            recover(self, e.names)
            return
        except EPEngineError as e:
            self.failed = self.failed or e
            raise
        self.step_index += 1

    def _step_once(self) -> None:
        self.group.check_alive()
        ext = {p.name: payload for p in self.plugins if (payload := p.step_payload(self.step_index)) is not None}
        for r in self.ranks:
            self.group.send(r.name, Step(self.step_index, r.pending_add, r.pending_abort, ext))
            r.pending_add, r.pending_abort = [], []
        answers = self.group.gather(self.group.names(), allow_errors=True)
        errors = {n: a for n, a in answers.items() if isinstance(a, Error)}
        for a in answers.values():
            if isinstance(a, StepAnswer):
                self.tracker.apply(a, self)
        if errors:
            self.group.check_alive()   # a dead peer explains failed collectives
            # A rank failed on its own: the others may have left collectives half done, so
            # the ranks are out of step for good.
            name, a = next(iter(errors.items()))
            self.failed = EPEngineError(f"{name} failed step {self.step_index} ({a.error}); the ranks are out "
                                        f"of step, restart the engine\n{a.traceback}")
            self.events.append(f"{name} failed step {self.step_index}: {a.error}")
            raise self.failed
        self._stats = stats_of(list(answers.values()))
        stepped = {n: a for n, a in answers.items() if isinstance(a, StepAnswer)}
        for a in stepped.values():
            RecordedTransfers.replay(a.kv_calls, self.kv_observer)
        self._kv_held = {n: a.kv_held for n, a in stepped.items()}
        for p in self.plugins:
            p.on_step(self.step_index, {n: a.ext[p.name] for n, a in answers.items() if p.name in a.ext})

    def _step_while_waiting(self) -> bool:
        """While new ranks load: take in the caller's requests and aborts, and step the
        current ranks if there is work (aborts to send count: they free blocks)."""
        self._pump()
        if not ((self.has_unfinished() or any(r.pending_abort for r in self.ranks)) and self.ranks):
            return False
        self.step_internal()
        return True

    def _pump(self) -> None:
        if self.command_pump is not None:
            self.command_pump()

    # -- ranks and generations --------------------------------------------------------------
    def spawn_ranks(self, count: int, keep_serving: bool = True) -> tuple[list[Rank], object]:
        """Start `count` rank processes (the next ranks of the group), each loading only
        its own expert slots when it can, and wait until each has loaded the model; with
        keep_serving the current ranks go on stepping meanwhile. Raises EPEngineError
        (the running group untouched) if one does not start."""
        first_rank = len(self.ranks)
        s = self.slots_per_rank
        # The new ranks' slots start as in the load-oblivious map over the grown group.
        initial = ExpertMap.initial(1, (first_rank + count) * s, self.num_experts).phy2log[0] if s else None
        slots = [initial[(first_rank + k) * s:(first_rank + k + 1) * s].tolist() if s else [] for k in range(count)]

        def init_for(k: int) -> Init:
            return Init({}, str(self.path), sorted(self.eos_token_ids), self.group.host, self.group.store.port,
                        self.timeout_s, list(self.extensions), slots[k] if self._load_own_slots else None,
                        self.kv_connector.to_wire() if self.kv_connector else None)
        ranks, ready = self.group.spawn(count, init_for, self._step_while_waiting if keep_serving else None)
        for r, own in zip(ranks, slots):
            r.slot_experts = own
        return ranks, ready

    def regroup(self, ranks: list[Rank], expert_map: ExpertMap, weights: dict[str, str] | None = None) -> None:
        """Form the next generation from `ranks` (in rank order) with `expert_map`
        [moe layers, len(ranks) * slots]; weights: per new rank, 'model' (its own loaded
        slots) or 'none' (filled by migration)."""
        ext = {p.name: payload for p in self.plugins if (payload := p.regroup_payload()) is not None}
        try:
            self.group.regroup(ranks, expert_map, self.slots_per_rank, dispatch=self.dispatch,
                               cuda_graphs=self._use_graphs, weights=weights, ext=ext)
        except (RanksDied, RankFailed, EPEngineError) as e:
            self.failed = EPEngineError(f"forming generation {self.group.generation} failed ({e}); "
                                        f"restart the engine")
            raise self.failed from e
        self.expert_map = expert_map

    def retire(self, names: list[str]) -> None:
        """Stop rank processes that are no longer in the group."""
        self.accepting -= set(names)
        self.group.retire(names)

    def move_requests(self, names: list[str]) -> int:
        """Restart the unfinished requests of ranks `names` on the accepting ranks, from
        prompt + tokens so far (their old runs are aborted with the next step). Returns
        how many moved."""
        targets = self._accepting_ranks(exclude=set(names))
        moved = 0
        for t in self.tracker.unfinished():
            if t.owner in names:
                self.group.known[t.owner].pending_abort.append(t.internal_id)
                self.tracker.restart(t, targets)
                moved += 1
        return moved

    def _accepting_ranks(self, exclude: set[str] = frozenset()) -> list[Rank]:
        ranks = [r for r in self.ranks if r.name in self.accepting and r.name not in exclude]
        if not ranks:
            raise EPEngineError("no rank accepts requests")
        return ranks

    # -- plumbing -----------------------------------------------------------------------
    def _check_usable(self) -> None:
        if self.failed is not None:
            raise self.failed

    def shutdown(self) -> None:
        self.group.shutdown()

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


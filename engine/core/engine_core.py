"""The engine core: owns the model, KV cache, scheduler and runner, and turns one
call of `step()` into one forward pass and the tokens it produced."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from engine.config import EngineConfig
from engine.core.scheduler import Scheduler, SchedulerConfig
from engine.engine_stats import EngineStats
from engine.kv_cache import KVCacheManager, PagedCacheSpec
from engine.kv_cache.state_layout import state_slots_for
from engine.kv_transfer import KVConnectorSpec, KVTransferHook, TransferObserver, check_consumer, is_consumer
from engine.kv_transfer_params import KVTransferParams
from engine.models.loader import load_model
from engine.request import Request, RequestStatus
from engine.request_limits import RequestLimits
from engine.runner.model_runner import ModelRunner, PendingOutput
from engine.spec.checkpoint import load_head
from engine.spec.config import check_fits_target
from engine.spec.settings import MAX_SPECULATIVE_TOKENS, SpecDecodeSettings
from engine.spec.stats import SpecDecodeStats


@dataclass
class EngineCoreOutput:
    request_id: str
    new_token_ids: list[int]
    finish_reason: str | None = None
    new_logprobs: list[dict[int, float]] = field(default_factory=list)
    num_cached_tokens: int = 0
    kv_transfer_params: KVTransferParams | None = None   # producer: what a consumer needs (the handle)
    error: str | None = None                 # why the request failed (KV transfer, fail policy)
    # With the first token of a request that asked for them: one entry per prompt token
    # (None for the first, which nothing scores).
    prompt_logprobs: list[dict[int, float] | None] | None = None


class EngineCore:
    def __init__(self, config: EngineConfig, model_config, model_path: str | None) -> None:
        self.config = config
        self.device = torch.device(config.device)
        self.dtype = config.torch_dtype(model_config)
        self.limits = RequestLimits.for_model(config, model_config)
        self.max_model_len = self.limits.max_model_len
        self.model = load_model(model_path, model_config, self.dtype, config.device, config.load_format, config.seed)
        # The draft head (weights first, then its KV per block) comes out of the same budget.
        self._spec_rule: tuple[tuple[int, int], ...] = ()
        self._spec = self._load_spec(model_config) if config.speculative_config is not None else None
        layout = self.model.cache_layout()
        bytes_per_block = layout.bytes_per_block(config.block_size, self.dtype)
        # Hybrid models: per-request Mamba state slots, taken from the same memory budget first.
        self.state_slots = state_slots_for(self.model, config.max_num_seqs, self.dtype)
        head_bytes = self._head_bytes_per_block() if self._spec is not None else 0
        self.num_blocks = self._num_blocks(bytes_per_block + head_bytes,
                                           self.state_slots.total_bytes if self.state_slots else 0)
        self.kv = KVCacheManager(PagedCacheSpec(config.block_size, bytes_per_block), self.num_blocks,
                                 config.enable_prefix_caching, *(self.state_slots or ()))
        self.scheduler = Scheduler(SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens,
                                                   self.max_model_len, config.enable_chunked_prefill,
                                                   config.kv_load_failure_policy,
                                                   self._spec[1] if self._spec is not None else 0,
                                                   self._spec_rule), self.kv)
        self.runner = self._make_runner(bytes_per_block)
        self.spec_stats = SpecDecodeStats()
        # Async scheduling: the step the device runs, with the drafts it verifies per request.
        self._in_flight: tuple[PendingOutput, dict[str, int]] | None = None
        self._rng = random.Random(config.seed)
        self._prompt_lps: dict[str, list] = {}   # prompt logprobs gathered until the first token

    def _num_blocks(self, bytes_per_block: int, reserved: int = 0) -> int:
        c = self.config
        per_seq = -(-self.max_model_len // c.block_size)
        if c.num_kv_blocks is not None:
            n = c.num_kv_blocks
        else:
            if self.device.type == "cuda":
                free, total = torch.cuda.mem_get_info(self.device)
                budget = free - (1 - c.gpu_memory_utilization) * total - reserved
            else:
                budget = c.kv_cache_memory_gb * 2**30 - reserved
            # Never more than every sequence at full length needs.
            n = min(int(budget // bytes_per_block), c.max_num_seqs * per_seq + 1)
        if n < per_seq:
            where = ("" if c.num_kv_blocks is not None or self.device.type != "cuda" else
                     f" ({max(budget, 0) / 2**30:.2f} GiB left for it after the model, at "
                     f"gpu_memory_utilization={c.gpu_memory_utilization})")
            raise ValueError(f"the KV cache holds {max(n, 0)} blocks of {c.block_size} tokens{where}, fewer than one "
                             f"sequence of max_model_len={self.max_model_len} needs ({per_seq}); lower "
                             f"max_model_len or give the cache more memory (raise gpu_memory_utilization / "
                             f"kv_cache_memory_gb)")
        return n

    def _load_spec(self, model_config) -> tuple:
        """Load the P-EAGLE head and check it fits the target: -> (head, K, layers to tap,
        parallel drafting, every K the per-batch rule gives); the rule goes to `_spec_rule`."""
        settings = SpecDecodeSettings.from_dict(self.config.speculative_config)
        m = self.model
        head = load_head(settings.model, self.dtype, self.device, shared_embedding=m.embed_tokens,
                         shared_lm_head=m.embed_tokens if m.tie_word_embeddings else m.lm_head)
        layers = check_fits_target(head.cfg, model_config, settings.num_speculative_tokens, MAX_SPECULATIVE_TOKENS)
        self._spec_rule = settings.num_speculative_tokens_per_batch
        return head, settings.num_speculative_tokens, layers, settings.parallel_drafting, settings.draft_counts

    def _head_bytes_per_block(self) -> int:
        cfg = self._spec[0].cfg
        elem = torch.empty((), dtype=self.dtype).element_size()
        return cfg.num_layers * 2 * self.config.block_size * cfg.num_key_value_heads * cfg.head_dim * elem

    def _make_runner(self, bytes_per_block: int) -> ModelRunner:
        """The runner with its KV cache, and its CUDA graphs when on; running out of device
        memory here says how much KV fits and what to lower."""
        c = self.config
        try:
            runner = ModelRunner(self.model, self.num_blocks, c.block_size, c.max_num_seqs,
                                 self.max_model_len, self.dtype, self.device, attention_backend=c.attention_backend)
            if self._spec is not None:
                runner.enable_spec(*self._spec)     # its graphs verify and draft
            if c.enable_cuda_graphs:
                runner.capture_cuda_graphs()
            return runner
        except torch.cuda.OutOfMemoryError as e:
            tokens = self.num_blocks * c.block_size
            raise ValueError(
                f"out of device memory at start-up: the KV cache was sized at {self.num_blocks} blocks "
                f"({tokens} tokens, {self.num_blocks * bytes_per_block / 2**30:.2f} GiB) and the rest did not fit "
                f"({'capturing CUDA graphs' if c.enable_cuda_graphs else 'allocating it'}); lower "
                f"gpu_memory_utilization (now {c.gpu_memory_utilization}) or set num_kv_blocks below "
                f"{self.num_blocks}, lower max_num_seqs (now {c.max_num_seqs}, the largest graph batch), "
                f"or turn CUDA graphs off (enable_cuda_graphs=False)") from e

    # -- requests --------------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        """Validate and queue a request; a bad one raises ValueError and changes nothing."""
        if req.request_id in self.scheduler.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        self.validate(req)
        if is_consumer(req):
            # The producer sampled the first token; this engine continues after it.
            check_consumer(req, self.model.config.vocab_size)
            req.output_token_ids = list(req.kv_transfer_params.first_token_ids)
        req.seed = req.sampling_params.seed if req.sampling_params.seed is not None else self._rng.getrandbits(63)
        self.scheduler.add_request(req)
        if req.sampling_params.prompt_logprobs is not None and not is_consumer(req):
            self._prompt_lps[req.request_id] = [None] * req.num_prompt_tokens

    def validate(self, req: Request) -> None:
        """Raise ValueError, saying what to change, for a request this engine cannot run.
        Reads only settings, so any thread may call it."""
        self.limits.check(req.prompt_token_ids, req.sampling_params)
        if req.output_token_ids:    # a resumed request's tokens so far
            self.limits.check_output_prefix(req.output_token_ids, req.sampling_params)

    def set_kv_transfer(self, hook: KVTransferHook) -> None:
        """Plug in a KV-transfer connector (disaggregated prefill/decode)."""
        if self._spec is not None and self.runner.state_layout is not None:
            # A handed-off request's first step computes the last prompt position again
            # (spec_step.py), which a Mamba state, already past it, cannot take twice.
            raise ValueError("KV transfer with speculative decoding is not supported for hybrid (Mamba) models "
                             "yet: drop speculative_config from this engine, or serve it without disaggregation")
        self.scheduler.kv_transfer = hook

    def set_kv_connector(self, spec: KVConnectorSpec, observer: TransferObserver | None = None) -> KVTransferHook:
        """Build the connector `spec` names over this core's KV cache and plug it in."""
        hook = spec.build(self, observer)
        self.set_kv_transfer(hook)
        return hook

    def abort_requests(self, req_ids: list[str], status: RequestStatus = RequestStatus.FINISHED_ABORTED) -> None:
        for rid in req_ids:
            self.scheduler.finish(rid, status)
            self._prompt_lps.pop(rid, None)

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0

    @property
    def has_held_blocks(self) -> bool:
        """Finished prefills whose blocks wait for a reader (need polling, not compute)."""
        return bool(self.scheduler.held)

    @property
    def has_pending_work(self) -> bool:
        # Held prefill blocks are polled for release even when nothing computes.
        return self.has_unfinished() or self.has_held_blocks

    def engine_stats(self) -> EngineStats:
        s = self.scheduler
        spec = self.spec_stats.snapshot() if self._spec is not None else None
        return EngineStats(len(s.running), len(s.waiting), self.kv.usage, spec)

    def shutdown(self) -> None:
        """Nothing to stop: the engine lives in this process (the interface's EPEngine has ranks)."""

    def poll_interval(self) -> float | None:
        """How long a serving loop may wait for new requests before the next step: None
        when there is compute to do; short while only KV transfers need polling (so the
        loop does not spin on empty steps)."""
        s = self.scheduler
        if s.waiting or s.running:
            return None
        if s.loading:
            return 0.001
        if s.held:
            return 0.02
        return None if self.has_unfinished() else 0.5

    # -- the step --------------------------------------------------------------------
    def step(self) -> list[EngineCoreOutput]:
        sched_out = self.scheduler.schedule()
        outputs = self._remote_prefill_outputs()
        pending = (self.runner.execute(sched_out), sched_out.spec_token_counts)
        if self.config.async_scheduling:
            # One step in flight: the device runs this step while the previous one's
            # tokens (copied without blocking) are applied and the next is scheduled.
            pending, self._in_flight = self._in_flight, pending
        if pending is None:
            return outputs
        pending, drafted = pending
        result = pending.result()
        for rid, entries in result.prompt_logprobs.items():
            acc = self._prompt_lps.get(rid)     # None once delivered (a recompute after preemption)
            for pos, entry in entries if acc is not None else ():
                acc[pos] = entry
        self.spec_stats.observe(drafted, result.spec_tokens)
        changed = self.scheduler.update_from_output(result.sampled, result.spec_tokens, drafted)
        for req in changed:
            rid = req.request_id
            num_new = self.scheduler.num_new_tokens.get(rid, 1)
            lps = result.spec_logprobs.get(rid, [])[:num_new] or ([result.logprobs[rid]] if rid in result.logprobs
                                                                  else [])
            new = req.output_token_ids[-num_new:]
            outputs.append(EngineCoreOutput(rid, new, req.finish_reason(), lps,
                                            req.num_cached_tokens, req.kv_transfer_params if rid in self.scheduler.held
                                            else None, prompt_logprobs=self._prompt_lps.pop(rid, None)))
        return outputs

    def _remote_prefill_outputs(self) -> list[EngineCoreOutput]:
        """The producer's first token, emitted once its KV is here (or is being
        recomputed); failed loads under the fail policy finish with an error."""
        s = self.scheduler
        outputs = [EngineCoreOutput(r.request_id, list(r.output_token_ids), None,
                                    list(r.kv_transfer_params.first_logprobs), r.num_cached_tokens)
                   for r in s.remote_admitted]
        outputs += [EngineCoreOutput(r.request_id, [], r.finish_reason(), error=reason)
                    for r, reason in s.remote_failed]
        s.remote_admitted, s.remote_failed = [], []
        return outputs

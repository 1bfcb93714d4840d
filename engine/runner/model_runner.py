"""Runs one scheduled step: update the state table, build inputs on the device,
run the model, sample, and write the sampled tokens back into the table.

`execute` only launches work: it returns a `PendingOutput` whose tokens arrive through
a non-blocking copy, so the engine core can schedule the next step while this one
runs. Pure decode steps replay a CUDA graph when graphs are on (cuda_graphs.py).
Per-step host work is a handful of numpy operations over the batch, no Python loop
per request beyond the row lookup.
"""

from __future__ import annotations

import logging
from functools import partial

import numpy as np
import torch

from engine.core.scheduler_output import SchedulerOutput
from engine.kv_cache.state_layout import state_layout_of
from engine.layers.mamba import HybridMetadata
from engine.layers.mamba_spec import commit_states, verify_steps
from engine.models.base import CausalLM
from engine.ops.attention import AttentionMetadata
from engine.ops.penalties import apply_penalties, count_sampled
from engine.ops.router import counting_tokens
from engine.ops.sampling import sample, topn_logprobs
from engine.runner.cuda_graphs import DecodeGraphs, EagerPaddedSteps, GraphUnsafe, graph_batch_sizes
from engine.runner.host_copy import to_device
from engine.runner.inputs import commit_step, prepare_inputs
from engine.runner.spec_step import SpecDecoder
from engine.runner.state import RequestStateTable
from engine.runner.step_output import PendingOutput, RunnerOutput

__all__ = ["ModelRunner", "RunnerOutput", "PendingOutput"]
log = logging.getLogger("engine.runner")


def prompt_positions(rows: np.ndarray, nsched: np.ndarray, seq_lens: np.ndarray, num_prompt: np.ndarray,
                     want: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The step's tokens whose logits give prompt logprobs: position p's logits score
    prompt token p + 1, for requests that want them (want >= 0). Returns (batch entry
    of each, [3, N] int64: index in the step's tokens, state-table row, position p + 1),
    or None when there are none."""
    start = seq_lens - nsched
    count = np.where(want >= 0, np.clip(np.minimum(seq_lens, num_prompt - 1) - start, 0, None), 0)
    total = int(count.sum())
    if total == 0:
        return None
    entry = np.repeat(np.arange(rows.shape[0]), count)
    offset = np.arange(total) - np.repeat(np.cumsum(count) - count, count)
    first_token = np.concatenate(([0], np.cumsum(nsched)[:-1]))
    return entry, np.stack([first_token[entry] + offset, rows[entry], start[entry] + offset + 1])


class ModelRunner:
    def __init__(self, model: CausalLM, num_blocks: int, block_size: int, max_num_seqs: int,
                 max_model_len: int, dtype: torch.dtype, device: torch.device,
                 kv_cache: torch.Tensor | None = None, attention_backend: str | None = None) -> None:
        self.model = model
        self.block_size = block_size
        self.device = device
        self.max_model_len = max_model_len
        max_blocks = -(-max_model_len // block_size)
        self.table = RequestStateTable(max_num_seqs, max_model_len, max_blocks, device, model.config.vocab_size)
        layout = model.cache_layout()
        # [blocks, layers, entries, block_size, heads, dim]: a block's data for every
        # layer is contiguous, so a request's KV moves in few large transfers.
        if kv_cache is None:
            kv_cache = torch.zeros(num_blocks, layout.num_layers, layout.entries, block_size,
                                   layout.kv_heads, layout.dim, dtype=dtype, device=device)
        self.kv_cache = kv_cache
        for i, attn in enumerate(model.attention_layers()):
            attn.k_cache = self.kv_cache[:, i, 0]
            attn.v_cache = self.kv_cache[:, i, 1] if layout.entries == 2 else attn.k_cache[..., :attn.v_head_dim]
        self.attention = self._attention_backend(attention_backend, layout.entries != 2, max_blocks, dtype)
        model.reserve_positions(max_model_len)
        # Hybrid models: each request's Mamba state in a fixed-size slot (the state-slot
        # cache group's id), [slots, layers, ...] so a slot's layers sit together; one
        # scratch slot past the real ones takes the writes of padded graph entries.
        self.state_layout = state_layout_of(model)
        # state_cache [slots, bytes]: each slot's conv and SSM states in one run of bytes
        # (a hand-off moves it as one piece); conv_state and ssm_state are views of it.
        self.state_cache = self.conv_state = self.ssm_state = None
        if self.state_layout is not None:
            self.state_cache, self.conv_state, self.ssm_state = self.state_layout.allocate(max_num_seqs + 1, dtype,
                                                                                           device)
            for i, layer in enumerate(model.mamba_layers()):
                layer.conv_state, layer.ssm_state = self.conv_state[:, i], self.ssm_state[:, i]
        self.graphs: DecodeGraphs | None = None
        # Speculative decoding: the decode graphs of each draft count the per-batch rule
        # can give (self.graphs is the one of the full K).
        self.spec_graphs: dict[int, DecodeGraphs] = {}
        self.spec: SpecDecoder | None = None     # P-EAGLE drafting (enable_spec)
        self.num_forwards = 0     # steps that ran the model (graph replays included)
        # When a list, each step appends (start, end) CUDA events around its launch
        # (benchmarks measure the idle time between steps with them).
        self.step_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] | None = None

    def _attention_backend(self, name: str | None, latent_cache: bool, max_blocks: int, dtype: torch.dtype):
        """The FlashInferAttention bound to the model's layers when FLASHINFER is chosen
        and fits (else None, with a log line); TRITON_ATTN turns SDPA for prompts off."""
        layers = self.model.attention_layers()
        if name == "TRITON_ATTN":
            for attn in layers:
                attn.sdpa_prompts = False
        if name != "FLASHINFER":
            return None
        from engine.layers.flashinfer_attention import make_flashinfer_attention
        return make_flashinfer_attention(layers, self.block_size, max_blocks, dtype, self.device, latent_cache)

    # -- speculative decoding -----------------------------------------------------------
    def enable_spec(self, head, num_spec: int, aux_layer_ids: list[int], parallel: bool = True,
                    draft_counts: list[int] | None = None) -> None:
        """Draft K tokens per request with a P-EAGLE head (before capture_cuda_graphs:
        the graphs then cover verification and drafting). draft_counts: every number of
        drafts a decode step may verify per request (num_speculative_tokens_per_batch)."""
        self.model.aux_layer_ids = tuple(aux_layer_ids)
        self.spec = SpecDecoder(head, num_spec, self.kv_cache.shape[0], self.block_size, self.max_model_len,
                                self.device, self.kv_cache.dtype, parallel)
        self.spec_draft_counts = sorted(set(draft_counts or [num_spec]))

    def _execute_spec(self, out: SchedulerOutput) -> PendingOutput:
        t, K = self.table, self.spec.k
        req_ids = list(out.num_scheduled_tokens)
        batch = len(req_ids)
        rows = np.fromiter((t.rows[r] for r in req_ids), dtype=np.int64, count=batch)
        nsched = np.fromiter(out.num_scheduled_tokens.values(), dtype=np.int64, count=batch)
        ndraft = np.array([out.spec_token_counts.get(r, 0) for r in req_ids], dtype=np.int64)
        seq_lens = t.num_computed_cpu[rows] + nsched
        samples = seq_lens >= t.num_tokens_cpu[rows]
        want = np.array([-1 if t.logprobs_cpu[r] is None else t.logprobs_cpu[r] for r in rows], dtype=np.int64)
        prompt = prompt_positions(rows, nsched, seq_lens, t.num_prompt_cpu[rows], t.prompt_logprobs_cpu[rows])
        # Decode steps verifying the same k drafts each (K, or a k of the per-batch rule)
        # replay that k's graph (verification + drafting).
        penalties = bool(t.penalized_cpu[rows].any())
        graphs = (self.spec_graphs.get(int(ndraft[0])) if self.graphs is not None and (ndraft == ndraft[0]).all()
                  and samples.all() and want.max() < 0 and prompt is None and not penalties else None)
        size = graphs.size_for(batch) if graphs is not None else None
        lp = plp = None
        self._mark_start()
        if size is not None:
            tokens, _ = graphs.replay(rows, samples, size, seq_lens)
            tokens = tokens[:batch]
        else:
            dev = to_device(np.stack([rows, nsched, samples.astype(np.int64), ndraft]), self.device)
            tokens, _, logits, hidden = self._spec_forward(
                dev[0], dev[1], dev[2], dev[3], int(nsched.sum()), nsched.tolist(), seq_lens,
                int(batch + ndraft.sum()), nsched + K - 1, penalties=penalties, ndraft_cpu=ndraft)
            lp = self._spec_logprobs(tokens, logits, ndraft, want[samples])
            if prompt is not None:
                extra = to_device(prompt[1], self.device)
                plp = self._prompt_logprobs(rows, prompt, extra, self.model.compute_logits(hidden[extra[0]]))
        # Host mirrors are optimistic (every draft accepted) until the output arrives.
        t.num_computed_cpu[rows] = seq_lens
        t.num_tokens_cpu[rows] += samples + ndraft * samples

        def reconcile(result: RunnerOutput) -> None:
            for i, rid in enumerate(req_ids):
                got = result.spec_tokens.get(rid)
                # Under async scheduling the row may have been freed (and taken) since.
                if got is not None and ndraft[i] and t.rows.get(rid) == rows[i]:
                    rejected = int(ndraft[i]) - (len(got) - 1)
                    t.num_computed_cpu[rows[i]] -= rejected
                    t.num_tokens_cpu[rows[i]] -= rejected

        first_row = np.cumsum(ndraft + 1) - (ndraft + 1)    # each request's first logits row
        return PendingOutput(req_ids, samples, want, tokens, lp, on_result=reconcile,
                             prompt_logprobs=plp, logprob_rows=first_row)

    def _spec_logprobs(self, tokens: torch.Tensor, logits: torch.Tensor, ndraft: np.ndarray, wanted: np.ndarray):
        """Logprobs (raw target distribution) of every token a verification may emit: row
        j of a request scores its j-th emitted token. None when no request wants them."""
        if not wanted.size or wanted.max() < 0:
            return None
        n = ndraft + 1
        req = np.repeat(np.arange(n.shape[0]), n)
        j = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
        idx = to_device(np.stack([req, j]), self.device)
        return topn_logprobs(logits, tokens[idx[0], idx[1]].clamp(min=0), int(wanted.max()))

    def _prompt_logprobs(self, rows: np.ndarray, prompt: tuple[np.ndarray, np.ndarray], idx: torch.Tensor,
                         logits: torch.Tensor):
        """(batch entry, prompt position, top-n, device tensors) of the prompt tokens this
        step scores; idx: prompt_positions' [3, N] on the device, logits: at idx[0]."""
        t = self.table
        entry, host_idx = prompt
        targets = t.token_ids[idx[1], idx[2]].long()   # the prompt token after each position
        n = t.prompt_logprobs_cpu[rows[entry]]
        return entry, host_idx[2], n, (targets, *topn_logprobs(logits, targets, int(n.max())))

    def _spec_forward(self, rows: torch.Tensor, nsched: torch.Tensor, samples: torch.Tensor, ndraft: torch.Tensor,
                      num_tokens: int, query_lens_cpu: list[int], seq_lens_host: np.ndarray, num_logits: int,
                      head_rows_cpu: np.ndarray, num_splits: int | None = None, penalties: bool = False,
                      ndraft_cpu: np.ndarray | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Target forward, verification and drafting of one step (engine/runner/spec_step.py)
        -> (tokens [B, K+1], emitted [B], verified logits, target hidden states). Every
        size argument is host-known (ndraft_cpu: the drafts, for hybrid targets)."""
        t, spec = self.table, self.spec
        inp = prepare_inputs(t, rows, nsched, num_tokens, self.block_size)
        states = self._states(rows, inp) if self.state_layout is not None else {}
        if states and ndraft_cpu.max() > 0:
            # Hybrid target: drafting requests keep each verified token's Mamba state
            # (engine/layers/mamba_spec.py); the accepted one goes to the slot below.
            states["verify"] = verify_steps(inp.query_start_loc, ndraft, states["state_slots"],
                                            states["has_initial_state"], self.table.max_reqs,
                                            int(ndraft_cpu.max()), bool((ndraft_cpu == 0).any()))
        meta = (HybridMetadata if states else AttentionMetadata)(
            num_reqs=rows.shape[0], query_start_loc=inp.query_start_loc, seq_lens=inp.seq_lens,
            block_table=inp.block_table, slot_mapping=inp.slot_mapping, block_size=self.block_size,
            query_lens_cpu=query_lens_cpu, seq_lens_cpu=spec.exact_lengths(inp.seq_lens, seq_lens_host),
            num_splits=num_splits, **states)
        with counting_tokens(inp.query_start_loc[-1:]):     # padding is no expert load
            hidden = self.model(inp.input_ids, inp.positions, meta)
        tokens, emitted, logits = spec.verify(t, rows, nsched, ndraft, samples, inp.seq_lens, inp.query_start_loc,
                                              hidden, self.model, num_logits, penalties)
        if "verify" in states:
            commit_states(self.model.mamba_layers(), states["verify"], states["state_slots"], emitted,
                          self.table.max_reqs)
        spec.propose(t, rows, nsched, head_rows_cpu, ndraft, samples, emitted, inp.seq_lens, inp.query_start_loc,
                     self.model.aux_hidden)
        return tokens, emitted, logits, hidden

    def _spec_graph_step(self, rows: torch.Tensor, nsched: torch.Tensor, mask: torch.Tensor, num_tokens: int,
                         size: int, seq_lens_cpu: list[int] | None = None, k: int | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """One padded decode step verifying k drafts per request (K unless the per-batch
        rule gives fewer; padding: 0 tokens, and k drafts that nothing reads, so every
        size is fixed). The head drafts K per request either way: k + K - 1 rows each."""
        K = self.spec.k
        k = K if k is None else k
        lens = np.full(size, self.max_model_len) if seq_lens_cpu is None else np.asarray(seq_lens_cpu)
        query_lens = [k + 1] * size if seq_lens_cpu is None else [k + 1 if n > 0 else 0 for n in seq_lens_cpu]
        return self._spec_forward(rows, nsched, mask, torch.full_like(nsched, k), num_tokens, query_lens,
                                  lens, size * (k + 1), np.full(size, k + K), num_splits=self._graph_splits(size))[:2]

    # -- CUDA graphs ------------------------------------------------------------------
    def capture_cuda_graphs(self, sizes: list[int] | None = None, eager: bool = False) -> None:
        """Capture the decode graphs; eager=True runs the same padded steps without
        graphs (any device: how CPU tests check the padding)."""
        if self.device.type != "cuda" and not eager:
            raise ValueError("CUDA graphs need a CUDA device")
        if self.spec is not None and self.state_layout is not None:
            # Verification of a hybrid target runs its Mamba layers token by token over
            # per-step state buffers (engine/layers/mamba_spec.py): not captured yet.
            log.warning("CUDA graphs are off for speculative decoding on a hybrid (Mamba) target; decode steps "
                        "run eagerly")
            return
        sizes = sizes or graph_batch_sizes(self.table.max_reqs)
        cls = EagerPaddedSteps if eager else DecodeGraphs
        if self.spec is not None:
            by_k = {k: cls(partial(self._spec_graph_step, k=k), sizes, self.table.pad_row, self.device,
                           query_len=k + 1, attention=self.attention) for k in reversed(self.spec_draft_counts)}
        else:
            by_k = {0: cls(self._graph_step, sizes, self.table.pad_row, self.device, attention=self.attention)}
        try:
            with torch.inference_mode():
                for graphs in by_k.values():
                    graphs.capture()
        except GraphUnsafe as e:
            torch.cuda.synchronize(self.device)
            log.warning("CUDA graphs are off for this model: %s; decode steps run eagerly", e)
            return
        self.spec_graphs = by_k if self.spec is not None else {}
        self.graphs = by_k[self.spec.k if self.spec is not None else 0]

    def _graph_step(self, rows: torch.Tensor, nsched: torch.Tensor, mask: torch.Tensor, num_tokens: int,
                    size: int, seq_lens_cpu: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One padded decode step. Captured, it sees only upper bounds of the lengths
        (max_model_len); run eagerly, the real ones (pad entries: 0 tokens)."""
        splits = self._graph_splits(size)
        if seq_lens_cpu is None:
            query_lens, seq_lens_cpu = [1] * size, [self.max_model_len] * size
        else:
            query_lens = [int(n > 0) for n in seq_lens_cpu]
        # Penalties are in every graph: rows without them leave their kernel at once.
        return self._forward_sample(rows, nsched, mask, num_tokens, query_lens, seq_lens_cpu, num_splits=splits,
                                    penalties=True)[:2]

    def _graph_splits(self, size: int) -> int | None:
        """The attention split count of a captured batch of `size` requests (CUDA only)."""
        if self.device.type != "cuda":
            return None
        from engine.kernels.attention import graph_num_splits
        attn = self.model.attention_layers()[0]
        return graph_num_splits(size, attn.num_heads, attn.num_kv_heads,
                                max(attn.head_dim, attn.v_head_dim) > 256, self.device)

    # -- one step ---------------------------------------------------------------------
    def _update_table(self, out: SchedulerOutput) -> None:
        for rid in out.finished_req_ids:
            self.table.remove(rid)
        for new in out.new_reqs:
            self.table.add(new)
        for rid, blocks in out.new_block_ids.items():
            self.table.append_blocks(rid, blocks[0])
        self.table.flush()

    def _forward_sample(self, rows: torch.Tensor, nsched: torch.Tensor, mask: torch.Tensor, num_tokens: int,
                        query_lens_cpu: list[int], seq_lens_cpu: list[int], num_splits: int | None = None,
                        penalties: bool = False, prompt_idx: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Returns the logits of the sampled positions (with any bias and penalties
        applied), the sampled tokens, and the logits of the tokens at `prompt_idx`."""
        t = self.table
        inp = prepare_inputs(t, rows, nsched, num_tokens, self.block_size)
        states = self._states(rows, inp) if self.state_layout is not None else {}
        meta = (HybridMetadata if states else AttentionMetadata)(
            num_reqs=rows.shape[0], query_start_loc=inp.query_start_loc, seq_lens=inp.seq_lens,
            block_table=inp.block_table, slot_mapping=inp.slot_mapping, block_size=self.block_size,
            query_lens_cpu=query_lens_cpu, seq_lens_cpu=seq_lens_cpu, num_splits=num_splits, **states)
        with counting_tokens(inp.query_start_loc[-1:]):     # padding is no expert load
            hidden = self.model(inp.input_ids, inp.positions, meta)
        logits = self.model.compute_logits(hidden[inp.logits_indices])
        prompt_logits = self.model.compute_logits(hidden[prompt_idx]) if prompt_idx is not None else None
        if penalties:
            apply_penalties(logits, rows, t.penalties)
        sampled = sample(logits, t.temperature[rows], t.top_k[rows], t.top_p[rows], t.min_p[rows],
                         t.seeds[rows], inp.seq_lens.long())
        if penalties:
            count_sampled(rows, sampled, mask, t.penalties)
        commit_step(t, rows, nsched, sampled, mask)
        return logits, sampled, prompt_logits

    def _states(self, rows: torch.Tensor, inp) -> dict[str, torch.Tensor]:
        """A hybrid model's state metadata: each request's slot, and whether it continues
        from it (it computed tokens before this step)."""
        qsl = inp.query_start_loc
        return dict(state_slots=self.table.state_slot[rows],
                    has_initial_state=(inp.seq_lens - (qsl[1:] - qsl[:-1])) > 0)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> PendingOutput:
        self._update_table(out)
        if out.is_empty:
            return PendingOutput()
        self.num_forwards += 1
        pending = self._execute_spec(out) if self.spec is not None else self._execute_plain(out)
        if self.step_events is not None and self.device.type == "cuda":
            self.step_events[-1][1].record()
        return pending

    def _mark_start(self) -> None:
        """Record the start of the step's device work, right before its launch (with
        step_events on): a host that launches late shows as idle between steps."""
        if self.step_events is not None and self.device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self.step_events.append((start, torch.cuda.Event(enable_timing=True)))

    def _execute_plain(self, out: SchedulerOutput) -> PendingOutput:
        t = self.table
        batch = len(out.num_scheduled_tokens)
        req_ids = list(out.num_scheduled_tokens)
        rows = np.fromiter((t.rows[r] for r in req_ids), dtype=np.int64, count=batch)
        nsched = np.fromiter(out.num_scheduled_tokens.values(), dtype=np.int64, count=batch)
        seq_lens = t.num_computed_cpu[rows] + nsched
        samples = seq_lens >= t.num_tokens_cpu[rows]
        t.num_computed_cpu[rows] = seq_lens          # rows are distinct
        t.num_tokens_cpu[rows] += samples
        num_tokens = int(nsched.sum())
        want = np.array([-1 if t.logprobs_cpu[r] is None else t.logprobs_cpu[r] for r in rows], dtype=np.int64)
        prompt = prompt_positions(rows, nsched, seq_lens, t.num_prompt_cpu[rows], t.prompt_logprobs_cpu[rows])

        size = (self.graphs.size_for(batch) if self.graphs is not None and num_tokens == batch and prompt is None
                else None)
        prompt_logits = None
        self._mark_start()
        if size is not None:
            logits, sampled = self.graphs.replay(rows, samples, size, seq_lens)
            logits, sampled = logits[:batch], sampled[:batch]
        else:
            dev = to_device(np.stack([rows, nsched, samples.astype(np.int64)]), self.device)
            extra = None
            if prompt is not None:
                extra = to_device(prompt[1], self.device)
            # Without bias or penalties in the batch, neither of their kernels runs.
            logits, sampled, prompt_logits = self._forward_sample(
                dev[0], dev[1], dev[2], num_tokens, nsched.tolist(), seq_lens.tolist(),
                penalties=bool(t.penalized_cpu[rows].any()), prompt_idx=None if extra is None else extra[0])
        lp = None
        wanted = want[samples]
        if wanted.size and wanted.max() >= 0:
            lp = topn_logprobs(logits, sampled, int(wanted.max()))
        plp = None if prompt is None else self._prompt_logprobs(rows, prompt, extra, prompt_logits)
        return PendingOutput(req_ids, samples, want, sampled, lp, prompt_logprobs=plp)

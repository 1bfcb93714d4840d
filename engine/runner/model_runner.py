"""Runs one scheduled step: update the state table, build inputs on the device,
run the model, sample, and write the sampled tokens back into the table."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.core.scheduler_output import SchedulerOutput
from engine.models.base import CausalLM
from engine.ops.attention import AttentionMetadata
from engine.ops.sampling import sample, topn_logprobs
from engine.runner.inputs import commit_step, prepare_inputs
from engine.runner.state import RequestStateTable


@dataclass
class RunnerOutput:
    sampled: dict[str, int] = field(default_factory=dict)          # requests that produced a token
    logprobs: dict[str, dict[int, float]] = field(default_factory=dict)


class ModelRunner:
    def __init__(self, model: CausalLM, num_blocks: int, block_size: int, max_num_seqs: int,
                 max_model_len: int, dtype: torch.dtype, device: torch.device) -> None:
        self.model = model
        self.block_size = block_size
        self.device = device
        max_blocks = -(-max_model_len // block_size)
        self.table = RequestStateTable(max_num_seqs, max_model_len, max_blocks, device)
        layout = model.cache_layout()
        # [blocks, layers, entries, block_size, heads, dim]: a block's data for every
        # layer is contiguous, so a request's KV moves in few large transfers.
        self.kv_cache = torch.zeros(num_blocks, layout.num_layers, layout.entries, block_size,
                                    layout.kv_heads, layout.dim, dtype=dtype, device=device)
        for i, attn in enumerate(model.attention_layers()):
            attn.k_cache = self.kv_cache[:, i, 0]
            attn.v_cache = self.kv_cache[:, i, 1] if layout.entries == 2 else attn.k_cache[..., :attn.v_head_dim]

    def _update_table(self, out: SchedulerOutput) -> None:
        for rid in out.finished_req_ids:
            self.table.remove(rid)
        for new in out.new_reqs:
            self.table.add(new)
        for rid, blocks in out.new_block_ids.items():
            self.table.append_blocks(rid, blocks[0])

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        self._update_table(out)
        if out.is_empty:
            return RunnerOutput()
        t = self.table
        req_ids = list(out.num_scheduled_tokens)
        rows_cpu = [t.rows[r] for r in req_ids]
        nsched_cpu = [out.num_scheduled_tokens[r] for r in req_ids]
        seq_lens_cpu = [t.num_computed_cpu[row] + n for row, n in zip(rows_cpu, nsched_cpu)]
        samples_cpu = [s >= t.num_tokens_cpu[row] for row, s in zip(rows_cpu, seq_lens_cpu)]

        rows = torch.tensor(rows_cpu, dtype=torch.long, device=self.device)
        nsched = torch.tensor(nsched_cpu, dtype=torch.int32, device=self.device)
        num_tokens = sum(nsched_cpu)
        inp = prepare_inputs(t, rows, nsched, num_tokens, self.block_size)
        meta = AttentionMetadata(
            num_reqs=len(req_ids), query_start_loc=inp.query_start_loc, seq_lens=inp.seq_lens,
            block_table=inp.block_table, slot_mapping=inp.slot_mapping, block_size=self.block_size,
            query_lens_cpu=nsched_cpu, seq_lens_cpu=seq_lens_cpu)

        hidden = self.model(inp.input_ids, inp.positions, meta)
        logits = self.model.compute_logits(hidden[inp.logits_indices])
        sampled = sample(logits, t.temperature[rows], t.top_k[rows], t.top_p[rows], t.min_p[rows],
                         t.seeds[rows], inp.seq_lens.long())
        mask = torch.tensor(samples_cpu, device=self.device)
        commit_step(t, rows, nsched, sampled, mask)

        for row, n, s in zip(rows_cpu, nsched_cpu, samples_cpu):
            t.num_computed_cpu[row] += n
            t.num_tokens_cpu[row] += int(s)
        return self._collect(req_ids, rows_cpu, samples_cpu, logits, sampled)

    def _collect(self, req_ids: list[str], rows_cpu: list[int], samples_cpu: list[bool],
                 logits: torch.Tensor, sampled: torch.Tensor) -> RunnerOutput:
        result = RunnerOutput()
        tokens = sampled.tolist()
        want = [self.table.logprobs_cpu[row] for row in rows_cpu]
        n_max = max((w for w, s in zip(want, samples_cpu) if w is not None and s), default=None)
        if n_max is not None:
            lp, top_ids, top_lps = (x.tolist() for x in topn_logprobs(logits, sampled, n_max))
        for i, (rid, s) in enumerate(zip(req_ids, samples_cpu)):
            if not s:
                continue
            result.sampled[rid] = tokens[i]
            if want[i] is not None:
                entry = dict(zip(top_ids[i][:want[i]], top_lps[i][:want[i]]))
                entry[tokens[i]] = lp[i]
                result.logprobs[rid] = entry
        return result


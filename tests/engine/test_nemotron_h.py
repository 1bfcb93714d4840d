"""NemotronH (Mamba-2 + attention without positions + MoE / LatentMoE) against
transformers: greedy tokens and log-probabilities over a batch of prompts of different
lengths, with chunked prefill on and off, async scheduling, padded decode steps (the
CUDA-graph path, run eagerly) and forced preemption; the hybrid cache frees every
block and state slot; bad configs and checkpoints fail with errors that say what to fix.

Float32 tolerance: log-softmax values within 2e-4 (absolute), as for the other families.
The data keep every Mamba step size dt well above transformers' prefill clamp
(time_step_min), where its prefill and decode paths agree (reference/models.md).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import LLM, SamplingParams
from engine.kv_transfer import KVTransferHook
from engine.kv_transfer_params import KVTransferParams
from engine.request import Request
from tests.engine.tiny_models import HYBRID_CONFIGS, assert_logprobs_match, build, hf_greedy

NEW_TOKENS = 32
LOGPROB_ATOL = 2e-4
PROMPTS = [[5, 17, 99, 3], list(range(40, 77)), [200, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 250]]
VARIANTS = {
    "chunked-async": dict(block_size=16, enable_chunked_prefill=True, max_num_batched_tokens=24,
                          async_scheduling=True),
    "unchunked-padded-decode": dict(block_size=4, enable_chunked_prefill=False, max_num_batched_tokens=256),
    "tiny-pool-preempt": dict(block_size=4, num_kv_blocks=24, max_num_batched_tokens=64, max_model_len=96),
}


@pytest.fixture(scope="module", params=list(HYBRID_CONFIGS))
def family(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf = build(request.param, folder)
    assert min(p.min().item() for n, p in hf.named_parameters() if n.endswith("dt_bias")) >= -3.0
    refs = [hf_greedy(hf, p, NEW_TOKENS) for p in PROMPTS]
    return request.param, folder, refs


def _assert_all_freed(llm: LLM) -> None:
    kv = llm.engine.kv
    assert kv.num_free_blocks == llm.engine.num_blocks, "blocks leaked"
    slots = kv.groups[1].pool
    assert slots.num_free == slots.num_blocks == llm.config.max_num_seqs, "state slots leaked"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_tokens_and_logprobs_match_transformers(family, variant):
    name, folder, refs = family
    llm = LLM(str(folder), max_logprobs=256, **VARIANTS[variant])
    assert not llm.engine.kv.enable_prefix_caching, "prefix caching must be off for hybrid models"
    if variant == "unchunked-padded-decode":
        llm.engine.runner.capture_cuda_graphs(sizes=[2, 4, 8], eager=True)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, logprobs=256)
    outs = llm.generate(PROMPTS, params)
    assert_logprobs_match(outs, refs, LOGPROB_ATOL, f"{name}/{variant}")
    if variant == "tiny-pool-preempt":
        assert llm.engine.scheduler.num_preemptions > 0, "the tiny pool should force preemption"
    _assert_all_freed(llm)


def test_abort_frees_blocks_and_state_slot_and_a_reused_slot_starts_clean(family):
    name, folder, refs = family
    llm = LLM(str(folder), max_num_seqs=2, block_size=4)
    core = llm.engine
    sp = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    core.add_request(Request("a", PROMPTS[1], sp))
    for _ in range(3):
        core.step()
    core.abort_requests(["a"])
    core.step()
    _assert_all_freed(llm)
    # The aborted request's slot holds its state; the next request must not see it.
    out = llm.generate([PROMPTS[0]], sp)[0]
    assert out.token_ids == refs[0][0]


def test_state_cache_dtype_and_budget(family):
    name, folder, _ = family
    cfg = json.loads((folder / "config.json").read_text())
    runner = LLM(str(folder), max_num_seqs=3, max_model_len=64, block_size=4).engine.runner
    assert runner.ssm_state.dtype == torch.float32 and cfg["mamba_ssm_cache_dtype"] == "float32"
    # One slot per sequence plus the scratch slot, taken from the one budget before the blocks.
    state_bytes = runner.ssm_state.nbytes + runner.conv_state.nbytes
    block_bytes = runner.kv_cache[0].nbytes
    llm = LLM(str(folder), max_num_seqs=3, max_model_len=64, block_size=4,
              kv_cache_memory_gb=(state_bytes + 30.5 * block_bytes) / 2**30)
    assert llm.engine.runner.ssm_state.shape[0] == 4
    assert llm.engine.kv.groups[1].spec.bytes_per_slot * 4 == state_bytes
    assert llm.engine.num_blocks == 30


def _copy_checkpoint(src, dst, edit_config=None, edit_tensors=None):
    dst.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    if edit_config:
        edit_config(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(str(src / "model.safetensors"))
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, str(dst / "model.safetensors"))


@pytest.fixture(scope="module")
def nano_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("nano_bad")
    build("nemotron_h_nano", folder)
    return folder


def test_unknown_layer_type_names_the_key(nano_folder, tmp_path):
    def edit(cfg):
        cfg["layers_block_type"][1] = "cross_attention"
    _copy_checkpoint(nano_folder, tmp_path / "m", edit)
    with pytest.raises(ValueError, match="layers_block_type has unknown layer types.*cross_attention.*use 'linear_"):
        LLM(str(tmp_path / "m"))

    def legacy(cfg):    # the released configs' form
        del cfg["layers_block_type"]
        cfg["hybrid_override_pattern"] = "ME*XM-E"
    _copy_checkpoint(nano_folder, tmp_path / "legacy", legacy)
    with pytest.raises(ValueError, match=r"hybrid_override_pattern 'ME\*XM-E' has unknown layer letters \['X'\]"):
        LLM(str(tmp_path / "legacy"))


def test_mamba_heads_not_dividing_groups_names_both_keys(nano_folder, tmp_path):
    def edit(cfg):
        cfg["n_groups"] = 3
    _copy_checkpoint(nano_folder, tmp_path / "m", edit)
    with pytest.raises(ValueError, match="mamba_num_heads=8 is not a multiple of n_groups=3"):
        LLM(str(tmp_path / "m"))


@pytest.mark.parametrize("missing", ["conv1d.weight", "A_log"])
def test_missing_conv_or_ssm_weights_name_the_tensor(nano_folder, tmp_path, missing):
    def edit(tensors):
        del tensors[f"backbone.layers.4.mixer.{missing}"]
    _copy_checkpoint(nano_folder, tmp_path / "m", edit_tensors=edit)
    with pytest.raises(ValueError, match=rf"missing from the checkpoint.*layers\.4\.mixer\.{missing}.*incomplete"):
        LLM(str(tmp_path / "m"))


def test_mtp_weights_are_skipped(nano_folder, tmp_path):
    """Super's checkpoints carry multi-token-prediction layers (mtp.*); the main model
    does not use them and loads the same."""
    def edit(tensors):
        tensors["mtp.layers.0.eh_proj.weight"] = torch.zeros(64, 128)
        tensors["mtp.layers.1.mixer.experts.0.up_proj.weight"] = torch.zeros(32, 64)
    _copy_checkpoint(nano_folder, tmp_path / "m", edit_tensors=edit)
    sp = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    assert (LLM(str(tmp_path / "m")).generate([PROMPTS[0]], sp)[0].token_ids
            == LLM(str(nano_folder)).generate([PROMPTS[0]], sp)[0].token_ids)


class _FailingHook(KVTransferHook):
    """A connector that records what the scheduler asks of it and fails every load."""

    def __init__(self) -> None:
        self.loads: list[tuple[str, int | None]] = []

    def hold(self, req, block_ids, state_slot=None):
        return {}

    def released(self):
        return []

    def start_load(self, req, block_ids, num_local_tokens, state_slot=None):
        self.loads.append((req.request_id, state_slot))

    def finished_loads(self):
        return [], {rid: "test: no transfer" for rid, _ in self.loads}

    def cancel_load(self, req_id):
        pass


def test_failed_remote_load_on_a_hybrid_model_is_recomputed_here(family):
    """A consumer request on a hybrid model loads its KV with its state slot (the
    hand-off itself: tests/disagg/test_hybrid_handoff.py); when the load fails, the
    prompt and the producer's first token are prefilled locally: same tokens, and the
    slot is freed with the blocks."""
    name, folder, refs = family
    llm = LLM(str(folder))
    hook = _FailingHook()
    llm.engine.set_kv_transfer(hook)
    ref_tokens = refs[2][0]
    sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    llm.engine.add_request(Request("r", PROMPTS[2], sp, kv_transfer_params=KVTransferParams(
        do_remote_prefill=True, handle={}, first_token_ids=[ref_tokens[0]])))
    tokens = []
    while llm.engine.has_unfinished():
        tokens += [t for o in llm.engine.step() for t in o.new_token_ids]
    assert tokens == ref_tokens[:8]
    assert len(hook.loads) == 1 and hook.loads[0][0] == "r" and isinstance(hook.loads[0][1], int)
    assert llm.engine.scheduler.num_recomputed == 1
    _assert_all_freed(llm)


@pytest.mark.gpu
def test_gpu_kernels_graphs_and_async_match_transformers(family):
    """On the device: every Mamba op through its Triton kernel, decode steps replayed as
    CUDA graphs, async scheduling. Float32 log-probabilities within 1e-3."""
    name, folder, refs = family
    llm = LLM(str(folder), device="cuda", dtype="float32", max_num_seqs=8, max_logprobs=256)
    assert llm.engine.runner.graphs is not None, "decode graphs were not captured"
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, logprobs=256)
    assert_logprobs_match(llm.generate(PROMPTS, params), refs, 1e-3, name)
    _assert_all_freed(llm)

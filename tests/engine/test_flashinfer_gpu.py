"""On the device, with flashinfer-python installed: the FLASHINFER attention backend
against the torch reference and the Triton kernel (eager and inside a CUDA graph planned
per replay), and the engine's outputs with it on and off.

Tolerances (bf16: FlashInfer's kernels take float16/bfloat16 only): kernel outputs
within the bf16 band of the kernel tests (||out - ref|| / ||ref|| < 1e-2 against a
float32 reference); engine logprobs within LOGPROB_TOL nats; greedy tokens identical,
except at a near-tie: where the runs first differ, both tokens must be within
LOGPROB_TOL of each other's top logprob, and the sequence is not compared past it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine import LLM, SamplingParams
from engine.kernels.attention import paged_attention_triton
from engine.ops.attention import AttentionMetadata, paged_attention_ref
from tests.engine.kernels.cases import TOL, attention_case, rel_err
from tests.engine.test_async_and_graphs import PROMPTS
from tests.engine.tiny_models import build

pytestmark = pytest.mark.gpu
pytest.importorskip("flashinfer")    # an optional install: skipped without it
from engine.layers.flashinfer_attention import FlashInferAttention  # noqa: E402  (after the skip)

HQ, HKV, D, SCALE = 16, 4, 128, 128 ** -0.5      # the compiled variant: head dim 128, bf16
LOGPROB_TOL = 0.05


def _backend(block_size: int, max_blocks: int) -> FlashInferAttention:
    layer = type("Layer", (), dict(num_heads=HQ, num_kv_heads=HKV, head_dim=D, scale=SCALE))
    return FlashInferAttention(layer, block_size, max_blocks, torch.bfloat16, torch.device("cuda"))


def _ref(q, k, v, meta):
    return paged_attention_ref(q.float(), k.float(), v.float(), meta, SCALE)


@pytest.mark.parametrize("block_size", [16, 4])
def test_matches_the_reference_and_the_triton_kernel(block_size):
    # Whole prompts, chunked prefill over cached context, decode; blocks shuffled, the
    # cache the engine's strided [blocks, layers, 2, bs, heads, dim] views.
    reqs = [(0, 37), (20, 1), (100, 5), (0, 1), (47, 16), (300, 1)]
    q, k, v, meta = attention_case(reqs, HQ, HKV, D, D, block_size, False, torch.bfloat16, "cuda")
    fi = _backend(block_size, meta.block_table.shape[1])
    out = fi.attend(q, k, v, meta)
    ref = _ref(q, k, v, meta)
    assert rel_err(out, ref) < TOL[torch.bfloat16]
    tri = paged_attention_triton(q, k, v, meta, SCALE)
    assert rel_err(out, tri.float()) < TOL[torch.bfloat16]


def test_a_captured_graph_follows_the_lengths_planned_before_each_replay():
    size, bs = 4, 16
    q, k, v, meta = attention_case([(150, 1)] * size, HQ, HKV, D, D, bs, False, torch.bfloat16, "cuda")
    width = meta.block_table.shape[1]
    fi = _backend(bs, width)
    seq_lens = torch.zeros(size, dtype=torch.int32, device="cuda")     # the graph's static inputs
    qsl = torch.arange(size + 1, dtype=torch.int32, device="cuda")

    def step_meta(lens: list[int]) -> AttentionMetadata:
        return AttentionMetadata(size, qsl, seq_lens, meta.block_table, meta.slot_mapping, bs, [1] * size, lens)
    fi.capturing = (size, 1)
    fi.attend(q, k, v, step_meta([width * bs] * size))        # warm-up: plans for the upper bound
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fi.attend(q, k, v, step_meta([width * bs] * size))
    fi.capturing = None
    for real in ([31, 151, 6], [1, 17], [151, 151, 151, 151]):
        seq_lens.copy_(torch.tensor(real + [0] * (size - len(real)), dtype=torch.int32))
        fi.before_replay(size, 1, np.array(real))
        graph.replay()
        n = len(real)
        sub = AttentionMetadata(n, qsl[:n + 1], seq_lens[:n], meta.block_table[:n], meta.slot_mapping[:n], bs,
                                [1] * n, real)
        assert rel_err(out[:n], _ref(q[:n], k, v, sub)) < TOL[torch.bfloat16], real


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def folder(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    build(request.param, path, head_dim=D)
    return path


def _generate(folder, backend):
    llm = LLM(str(folder), device="cuda", dtype="bfloat16", block_size=4, max_num_batched_tokens=16,
              max_num_seqs=8, attention_backend=backend)
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=3)
    return llm, llm.generate(PROMPTS, params)


def _assert_same_up_to_near_ties(ref, outs):
    for a, b in zip(ref, outs):
        ta, tb = a.outputs[0].token_ids, b.outputs[0].token_ids
        for i, (x, y) in enumerate(zip(ta, tb)):
            la, lb = a.outputs[0].logprobs[i], b.outputs[0].logprobs[i]
            if x != y:      # a near-tie: each run's token is close to the other's best
                assert y in la and abs(la[x] - la[y]) < LOGPROB_TOL, (ta, tb)
                assert x in lb and abs(lb[x] - lb[y]) < LOGPROB_TOL, (ta, tb)
                break
            for t in la.keys() & lb.keys():
                assert abs(la[t] - lb[t]) < LOGPROB_TOL, (i, t, la[t], lb[t])


def test_engine_outputs_are_the_same_with_flashinfer_on_and_off(folder):
    _, ref = _generate(folder, None)
    llm, outs = _generate(folder, "FLASHINFER")
    fi = llm.engine.runner.attention
    assert fi is not None and fi.eager.copied is not None, "FlashInfer did not run the prefill steps"
    assert fi.num_replays > 0, "no decode step replayed a graph planned for FlashInfer"
    _assert_same_up_to_near_ties(ref, outs)
    assert llm.engine.kv.num_free_blocks == llm.engine.num_blocks

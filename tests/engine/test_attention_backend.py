"""Choosing the attention backend (vLLM's names, TANDEM_ATTENTION_BACKEND), the fall-back
when FlashInfer cannot run, and FlashInfer's host and device inputs built from the
engine's metadata (tests/engine/test_flashinfer_gpu.py runs FlashInfer itself)."""

from __future__ import annotations

import logging
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from engine import LLM, SamplingParams
from engine.config import EngineConfig
from engine.layers import flashinfer_attention as fia
from tests.engine.tiny_models import build

PROMPTS = [[5, 17, 99, 3], list(range(40, 61)), [7] * 9]
GREEDY = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3")
    build("qwen3", path)
    return path


def test_the_setting_takes_vllms_names_in_any_case_and_the_environment(monkeypatch):
    monkeypatch.delenv("TANDEM_ATTENTION_BACKEND", raising=False)
    assert EngineConfig().attention_backend is None
    assert EngineConfig(attention_backend="flashinfer").attention_backend == "FLASHINFER"
    monkeypatch.setenv("TANDEM_ATTENTION_BACKEND", "TRITON_ATTN")
    assert EngineConfig().attention_backend == "TRITON_ATTN"
    assert EngineConfig(attention_backend="FLASHINFER").attention_backend == "FLASHINFER"   # the argument wins
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        EngineConfig(attention_backend="FLASH_ATTN_MAGIC")


def _layer(**kw):
    base = dict(num_heads=8, num_kv_heads=2, head_dim=128, v_head_dim=128, scale=128 ** -0.5)
    return SimpleNamespace(**{**base, **kw})


def test_layers_flashinfer_cannot_take_are_named(monkeypatch):
    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    assert "CUDA" in fia.layer_problem([_layer()], bf16, torch.device("cpu"), False)
    assert "MLA" in fia.layer_problem([_layer()], bf16, cuda, True)
    assert "float32" in fia.layer_problem([_layer()], torch.float32, cuda, False)
    assert "head dims 96" in fia.layer_problem([_layer(head_dim=96, v_head_dim=96)], bf16, cuda, False)
    assert "different shapes" in fia.layer_problem([_layer(), _layer(num_kv_heads=4)], bf16, cuda, False)
    monkeypatch.setitem(sys.modules, "flashinfer", None)     # not installed
    fia.import_problem.cache_clear()
    try:
        assert "flashinfer does not import" in fia.layer_problem([_layer()], bf16, cuda, False)
    finally:
        fia.import_problem.cache_clear()


def test_flashinfer_on_cpu_falls_back_with_a_log_line_and_the_same_tokens(folder, caplog):
    ref = LLM(str(folder), block_size=4, max_num_batched_tokens=16).generate(PROMPTS, GREEDY)
    with caplog.at_level(logging.WARNING, logger="engine.attention"):
        llm = LLM(str(folder), block_size=4, max_num_batched_tokens=16, attention_backend="FLASHINFER")
    assert "attention backend FLASHINFER is not used: it needs a CUDA device" in caplog.text
    assert llm.engine.runner.attention is None
    assert all(a.flashinfer is None for a in llm.engine.model.attention_layers())
    outs = llm.generate(PROMPTS, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in ref]


def test_triton_attn_turns_sdpa_for_prompts_off(folder):
    llm = LLM(str(folder), block_size=4, attention_backend="TRITON_ATTN")
    assert not any(a.sdpa_prompts for a in llm.engine.model.attention_layers())
    assert all(a.sdpa_prompts for a in LLM(str(folder), block_size=4).engine.model.attention_layers())


def test_plan_arrays_count_pages_and_the_last_pages_fill():
    qo, kv, last = fia.plan_arrays([3, 1, 1, 0], [19, 16, 1, 0], 8)
    assert qo.tolist() == [0, 3, 4, 5, 5]
    assert kv.tolist() == [0, 3, 5, 6, 6]          # 3, 2, 1 and 0 pages
    assert last.tolist() == [3, 8, 1, 0]
    assert qo.dtype == kv.dtype == last.dtype == torch.int32 and not qo.is_cuda


def test_page_indices_lists_each_requests_pages_in_order():
    g = torch.Generator().manual_seed(0)
    bs, width = 4, 6
    table = torch.randperm(40, generator=g)[:5 * width].view(5, width).to(torch.int32)
    seq_lens = torch.tensor([9, 0, 24, 1, 4], dtype=torch.int32)
    out = fia.page_indices(table, seq_lens, bs)
    assert out.shape == (5 * width + 1,) and out.dtype == torch.int32
    expect = np.concatenate([table[i, :-(-int(n) // bs)].numpy() for i, n in enumerate(seq_lens)])
    assert out[:len(expect)].tolist() == expect.tolist()
    # Into a fixed buffer (a CUDA graph's), entries past the pages are left alone.
    buf = torch.full((5 * width + 1,), -7, dtype=torch.int32)
    fia.page_indices(table, seq_lens, bs, out=buf)
    assert buf[:len(expect)].tolist() == expect.tolist()
    assert (buf[len(expect):-1] == -7).all()

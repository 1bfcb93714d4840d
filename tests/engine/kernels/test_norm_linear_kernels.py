"""The decode-size projection kernel (RMSNorm and residual add fused in front) against
its torch reference."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.kernels import kernel_backend
from engine.ops.norm_linear import MAX_FUSED_TOKENS, decode_fusion, norm_linear, norm_linear_ref
from tests.engine.kernels.cases import TOL, interpreted, rel_err
from tests.engine.tiny_models import build, hf_greedy

# (rows, K, N): one row (multiply-and-sum path) and 3 / 16 rows (dot path); K and N
# not multiples of the tiles.
SHAPES = ((1, 300, 37), (3, 300, 37), (16, 160, 48))


def _check(device, shapes=SHAPES):
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for M, K, N in shapes:
            x, r = torch.randn(M, K, generator=g) * 3, torch.randn(M, K, generator=g)
            w, b = torch.randn(N, K, generator=g) / K ** 0.5, torch.randn(N, generator=g)
            nw = 1 + torch.randn(K, generator=g) / 4
            dev = lambda t: t.to(dtype).to(device)  # noqa: E731
            cases = [dict(norm_weight=nw, residual=r, store_normed=True),       # post-attention norm + router
                     dict(norm_weight=nw, residual=r, out_dtype=torch.float32),  # DeepSeek's float32 logits
                     dict(norm_weight=nw),                                       # norm, no residual
                     dict(bias=b)]                                               # plain GEMV
            for case in cases:
                ours = norm_linear(dev(x), dev(w), **{k: dev(v) if torch.is_tensor(v) else v for k, v in case.items()},
                                   eps=1e-6, backend="triton")
                ref = norm_linear_ref(dev(x).double(), dev(w).double(), eps=1e-6, **{
                    k: dev(v).double() if torch.is_tensor(v) else v for k, v in case.items() if k != "out_dtype"})
                y, res, normed = ours
                assert y.dtype == case.get("out_dtype", dtype) and y.shape == (M, N)
                assert rel_err(y, ref[0]) < TOL[dtype], (dtype, M, K, N, case.keys())
                assert (res is None) == (ref[1] is None) and (normed is None) == (ref[2] is None)
                if res is not None and (device == "cuda" or dtype == torch.float32):
                    assert torch.equal(res, dev(x) + dev(r))     # rounded to the activation dtype
                if normed is not None:
                    assert rel_err(normed, ref[2]) < TOL[dtype]


@interpreted
def test_norm_linear():
    _check("cpu")


@interpreted
def test_too_many_rows_fall_back_to_the_reference():
    x, w = torch.randn(17, 8), torch.randn(4, 8)
    y, _, _ = norm_linear(x, w, backend="triton")
    assert torch.allclose(y, x @ w.T)


@interpreted
def test_interpreted_decode_fusions_match_transformers(tmp_path, monkeypatch):
    """DeepSeek-V3's path through the fusions (the other families run them in
    test_engine_with_kernels.py): the input norm inside q_a_proj with the latent
    projection on the stored rows, the post-attention norm inside the float32 router
    before the grouped sigmoid top-k; every step small enough to fuse."""
    from engine.models import base
    hf = build("deepseek_v3", tmp_path)
    calls = []
    real = base.decode_fused
    monkeypatch.setattr(base, "decode_fused", lambda x: calls.append(real(x)) or calls[-1])
    prompt, n = [5, 17, 99, 3, 41, 8], 3
    with kernel_backend("triton"), decode_fusion(True):
        llm = LLM(str(tmp_path), block_size=4, max_num_batched_tokens=MAX_FUSED_TOKENS)
        out = llm.generate([prompt], SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=3))[0]
    assert calls and all(calls), "every decoder layer should have taken the fused path"
    ref_tokens, ref_lp = hf_greedy(hf, prompt, n)
    assert out.token_ids == ref_tokens
    for step, (tok, lps) in enumerate(zip(out.token_ids, out.logprobs)):
        assert abs(lps[tok] - ref_lp[step, tok].item()) < 1e-4


@pytest.mark.gpu
def test_norm_linear_gpu():
    # Also the engine's shapes: Qwen3-30B-A3B's qkv and router, DeepSeek-V2-Lite's router.
    _check("cuda", SHAPES + ((1, 2048, 5120), (8, 2048, 5120), (1, 2048, 128), (8, 2048, 64)))

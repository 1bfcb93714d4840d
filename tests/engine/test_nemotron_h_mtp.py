"""NemotronH's multi-token-prediction block (`mtp.*`, Super's "*E" step): loaded into
`model.mtp` when config.json asks for it, never run by the main forward; its forward
against a plain-torch computation of the same formula (vLLM's NemotronH MTP):

    out = final_layernorm(MoE-block(attention-block(eh_proj(cat(enorm(e), hnorm(h))))))

The checkpoint is the tiny Super layout saved by transformers (which has no MTP) plus
`mtp.*` tensors with the released names and random values.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from engine import LLM, SamplingParams
from engine.ops.attention import AttentionMetadata
from tests.engine.tiny_models import HYBRID_CONFIGS, build, hf_greedy

PROMPTS = [[5, 17, 99, 3], list(range(40, 61))]
NEW_TOKENS = 12
ATTN, MOE = 2, 1        # layers of the tiny pattern "ME*EM-E" whose tensors show the MTP blocks' names and shapes
CFG = HYBRID_CONFIGS["nemotron_h_super"][2]


def _mtp_tensors(main: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    h = CFG["hidden_size"]

    def rand(*shape, std=0.08, mean=0.0):
        return torch.randn(*shape, generator=g) * std + mean

    out = {f"mtp.layers.0.{n}.weight": rand(h, std=0.1, mean=1.0) for n in ("enorm", "hnorm", "norm")}
    out["mtp.layers.0.eh_proj.weight"] = rand(h, 2 * h)
    out["mtp.layers.1.norm.weight"] = rand(h, std=0.1, mean=1.0)
    out["mtp.layers.1.final_layernorm.weight"] = rand(h, std=0.1, mean=1.0)
    for layer, src in ((0, ATTN), (1, MOE)):
        prefix = f"backbone.layers.{src}.mixer."
        for name, t in main.items():
            if name.startswith(prefix):
                std = 0.1 if name.endswith("e_score_correction_bias") else 0.08
                out[f"mtp.layers.{layer}.mixer." + name.removeprefix(prefix)] = rand(*t.shape, std=std)
    return out


def _write(folder, cfg: dict, tensors: dict[str, torch.Tensor]) -> None:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    base = tmp_path_factory.mktemp("super")
    hf = build("nemotron_h_super", base)
    refs = [hf_greedy(hf, p, NEW_TOKENS)[0] for p in PROMPTS]
    main = load_file(str(base / "model.safetensors"))
    mtp = _mtp_tensors(main)
    cfg = json.loads((base / "config.json").read_text())
    cfg.update(num_nextn_predict_layers=1, mtp_hybrid_override_pattern="*E")    # the released configs' form
    cfg.pop("mtp_layers_block_type", None)
    folder = tmp_path_factory.mktemp("ckpt") / "with_mtp"
    _write(folder, cfg, {**main, **mtp})
    llm = LLM(str(folder))
    return base, folder, cfg, main, mtp, refs, llm


def _engine_view(model, name: str) -> torch.Tensor:
    """The engine's copy of checkpoint tensor `name`, found by the layout the engine
    documents (q/k/v rows of qkv_proj, expert e of w13/w2), not by its resolver."""
    params = dict(model.named_parameters())
    block, _, rest = name.partition(".mixer.")
    c = CFG
    q, kv = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    for i, (proj, lo, hi) in enumerate((("q_proj", 0, q), ("k_proj", q, q + kv), ("v_proj", q + kv, q + 2 * kv))):
        if rest == f"{proj}.weight":
            return params[f"{block}.mixer.qkv_proj.weight"][lo:hi]
    if rest.startswith("experts."):
        e, kind = rest.split(".")[1:3]
        return params[f"{block}.mixer.experts.{'w13' if kind == 'up_proj' else 'w2'}"][int(e)]
    return params[name]


def test_every_mtp_tensor_loads_and_main_tokens_match_transformers(ckpt):
    base, _, _, _, mtp, refs, llm = ckpt
    model = llm.engine.model
    assert model.mtp is not None and [b.kind for b in model.mtp.layers] == ["full_attention", "moe"]
    covered = 0
    for name, t in mtp.items():
        ours = _engine_view(model, name)
        assert ours.dtype == torch.float32 and torch.equal(ours, t), name
        covered += t.numel()
    assert covered == sum(p.numel() for n, p in model.named_parameters() if n.startswith("mtp."))
    # The main model runs without the MTP block: the same greedy tokens as transformers.
    assert model.moe_layers() == [b.mixer.experts for b in model.layers if b.kind == "moe"]
    sp = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    assert [o.token_ids for o in llm.generate(PROMPTS, sp)] == refs
    assert LLM(str(base)).engine.model.mtp is None      # no num_nextn_predict_layers: no block


# -- plain-torch reference of the MTP step -----------------------------------------------
def _rms(x, w, eps=CFG["layer_norm_epsilon"]):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _attention(x, t, lens):
    c = CFG
    nh, nkv, hd = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    q = (x @ t["q_proj.weight"].T).view(-1, nh, hd)
    k = (x @ t["k_proj.weight"].T).view(-1, nkv, hd).repeat_interleave(nh // nkv, dim=1)
    v = (x @ t["v_proj.weight"].T).view(-1, nkv, hd).repeat_interleave(nh // nkv, dim=1)
    outs = []
    for qs, ks, vs in zip(q.split(lens), k.split(lens), v.split(lens)):    # no positional encoding
        s = torch.einsum("qhd,khd->hqk", qs, ks) * hd ** -0.5
        s = s.masked_fill(torch.ones_like(s[0], dtype=torch.bool).triu(1), float("-inf"))
        outs.append(torch.einsum("hqk,khd->qhd", s.softmax(-1), vs).reshape(len(qs), -1))
    return torch.cat(outs) @ t["o_proj.weight"].T


def _latent_moe(x, t):
    c = CFG
    E, k, groups = c["n_routed_experts"], c["num_experts_per_tok"], c["n_group"]
    s = torch.sigmoid(x @ t["gate.weight"].T)
    biased = s + t["gate.e_score_correction_bias"]
    group_score = biased.view(-1, groups, E // groups).topk(2, dim=-1)[0].sum(-1)
    keep = torch.zeros_like(group_score).scatter(1, group_score.topk(c["topk_group"], dim=-1)[1], 1.0)
    allowed = keep.repeat_interleave(E // groups, dim=1).bool()
    ids = biased.masked_fill(~allowed, float("-inf")).topk(k, dim=-1)[1]
    w = s.gather(1, ids)
    w = w / (w.sum(-1, keepdim=True) + 1e-20) * c["routed_scaling_factor"]
    z = x @ t["fc1_latent_proj.weight"].T
    routed = torch.zeros_like(z)
    for row in range(x.shape[0]):
        for j in range(k):
            e = int(ids[row, j])
            up = F.relu(z[row] @ t[f"experts.{e}.up_proj.weight"].T).square()
            routed[row] += w[row, j] * (up @ t[f"experts.{e}.down_proj.weight"].T)
    shared = F.relu(x @ t["shared_experts.up_proj.weight"].T).square() @ t["shared_experts.down_proj.weight"].T
    return routed @ t["fc2_latent_proj.weight"].T + shared


def _reference(mtp, embeds, hidden, lens):
    def mixer(i):
        return {n.removeprefix(f"mtp.layers.{i}.mixer."): t for n, t in mtp.items()
                if n.startswith(f"mtp.layers.{i}.mixer.")}
    w = {n.removeprefix("mtp.layers."): t for n, t in mtp.items()}
    h = torch.cat([_rms(embeds, w["0.enorm.weight"]), _rms(hidden, w["0.hnorm.weight"])], -1) @ w["0.eh_proj.weight"].T
    h = h + _attention(_rms(h, w["0.norm.weight"]), mixer(0), lens)
    h = h + _latent_moe(_rms(h, w["1.norm.weight"]), mixer(1))
    return _rms(h, w["1.final_layernorm.weight"])


def _meta(rows_per_req, starts, block_size=4, blocks_per_req=4):
    """Rows for each request at positions start..start+n-1, block table i*blocks_per_req+j."""
    table = torch.arange(len(rows_per_req) * blocks_per_req, dtype=torch.int32).view(len(rows_per_req), -1)
    pos = torch.cat([torch.arange(s, s + n) for n, s in zip(rows_per_req, starts)])
    req = torch.repeat_interleave(torch.arange(len(rows_per_req)), torch.tensor(rows_per_req))
    slots = table[req, pos // block_size].long() * block_size + pos % block_size
    seq = [s + n for n, s in zip(rows_per_req, starts)]
    return AttentionMetadata(num_reqs=len(seq), query_start_loc=torch.tensor([0] + rows_per_req).cumsum(0).int(),
                             seq_lens=torch.tensor(seq).int(), block_table=table, slot_mapping=slots,
                             block_size=block_size, query_lens_cpu=list(rows_per_req), seq_lens_cpu=seq), pos


@torch.no_grad()
def test_mtp_forward_equals_plain_torch(ckpt):
    """Two requests (5 and 3 tokens): a prefill of all but each one's last token, then one
    decode row each, which reads the first rows' K/V from the MTP block's own cache."""
    _, _, _, main, mtp, _, llm = ckpt
    model = llm.engine.model
    g = torch.Generator().manual_seed(2)
    lens = [5, 3]
    next_ids = torch.randint(0, CFG["vocab_size"], (sum(lens),), generator=g)
    hidden = torch.randn(sum(lens), CFG["hidden_size"], generator=g)
    want = _reference(mtp, main["backbone.embeddings.weight"][next_ids], hidden, lens)

    c = CFG
    attn = model.mtp.attention_layers()[0]
    attn.k_cache = torch.zeros(8, 4, c["num_key_value_heads"], c["head_dim"])
    attn.v_cache = torch.zeros_like(attn.k_cache)
    rows = torch.arange(sum(lens))
    last = torch.tensor([4, 7])
    first_rows = rows[~torch.isin(rows, last)]
    got = torch.empty_like(want)
    for sel, meta_args in ((first_rows, ([4, 2], [0, 0])), (last, ([1, 1], [4, 2]))):
        meta, pos = _meta(*meta_args)
        got[sel] = model.mtp(model.embed_tokens[next_ids[sel]], hidden[sel], pos, meta)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()
    # Shared LM head: the drafts are the main model's logits of the MTP state.
    assert torch.equal(model.compute_logits(got).argmax(-1), (want @ main["lm_head.weight"].T).argmax(-1))


@pytest.mark.parametrize("missing", ["mtp.layers.0.eh_proj.weight", "mtp.layers.1.final_layernorm.weight"])
def test_missing_mtp_tensor_names_it(ckpt, tmp_path, missing):
    _, _, cfg, main, mtp, _, _ = ckpt
    _write(tmp_path / "m", cfg, {**main, **{n: t for n, t in mtp.items() if n != missing}})
    with pytest.raises(ValueError, match=rf"missing from the checkpoint.*{missing.replace('.', '[.]')}.*incomplete"):
        LLM(str(tmp_path / "m"))


@pytest.mark.parametrize("edit, error", [
    ({"num_nextn_predict_layers": 2}, "num_nextn_predict_layers=2 is not supported"),
    ({"mtp_hybrid_override_pattern": "M*E"}, "mtp_layers_block_type has layer types .'linear_attention'."),
])
def test_unsupported_mtp_configs_say_why(ckpt, tmp_path, edit, error):
    _, _, cfg, main, mtp, _, _ = ckpt
    _write(tmp_path / "m", {**cfg, **edit}, {**main, **mtp})
    with pytest.raises(ValueError, match=error):
        LLM(str(tmp_path / "m"))


def test_random_load_format_builds_the_mtp_block(ckpt):
    _, folder, *_ = ckpt
    mtp = LLM(str(folder), load_format="random").engine.model.mtp
    assert torch.equal(mtp.layers[0].enorm.weight, torch.ones(CFG["hidden_size"]))
    assert mtp.layers[0].eh_proj.weight.std() > 0.01

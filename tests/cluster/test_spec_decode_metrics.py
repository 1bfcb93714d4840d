"""Speculative-decoding metrics through the real server: the OpenAI API over an
AsyncEngine that drafts with a P-EAGLE head (trained here, briefly, on the default
model's own greedy text) exports vLLM's spec-decode counters on /metrics, and the
dashboard's acceptance-length panel fills in."""

from __future__ import annotations

import re
import time

import httpx
import openai
import pytest
import torch

from cluster.metrics import Metrics
from cluster.openai_api import build_api
from cluster.request_metrics import SLO
from tests.cluster.conftest import Served

MODEL = "tandem-default"
PAD_ID = 258      # the default tokenizer's <|pad|>: the head's mask token


@pytest.fixture(scope="module")
def head_folder(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from engine.default_model import default_model_path
    from engine.spec.checkpoint import save_head
    from engine.spec.train import TrainConfig, generate_greedy, init_from_target, new_head, target_features, train_head
    target = AutoModelForCausalLM.from_pretrained(str(default_model_path())).eval()
    prompts = torch.randint(0, 256, (24, 6), generator=torch.Generator().manual_seed(0))
    tokens = generate_greedy(target, prompts, 18, banned=[PAD_ID])
    head = new_head(target.config, None, PAD_ID, depths=3)
    init_from_target(head, target)
    aux, logits = target_features(target, tokens, head.cfg.aux_layer_ids)
    train_head(head, tokens, aux, logits, TrainConfig(depths=3, steps=60, batch_size=4, lr=3e-3))
    return save_head(head, tmp_path_factory.mktemp("head"))


@pytest.fixture(scope="module")
def spec_url(head_folder):
    from engine.async_engine import AsyncEngine
    from engine.config import EngineConfig
    engine = AsyncEngine(EngineConfig(max_model_len=256, max_num_seqs=4, speculative_config={
        "method": "peagle", "model": str(head_folder), "num_speculative_tokens": 3}))
    metrics = Metrics(MODEL, "colocated")
    served = Served(build_api(engine, MODEL, metrics, SLO(ttft_ms=60000, itl_ms=60000)))
    yield served.url
    served.stop()
    engine.shutdown()


def _value(text: str, name: str, **labels: str) -> float:
    """The sum of a counter's samples whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"{name}\{{(.*)\}} (\S+)$", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            total += float(m.group(2))
    return total


def test_spec_decode_counters_and_panel(spec_url):
    client = openai.OpenAI(base_url=f"{spec_url}/v1", api_key="none", max_retries=0)
    for i in range(4):
        r = client.completions.create(model=MODEL, prompt="def f(x):" * (1 + i), max_tokens=24, temperature=0.0,
                                      extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 24
    text = httpx.get(f"{spec_url}/metrics").text
    drafts = _value(text, "tandem_spec_decode_num_drafts_total", pool="colocated")
    draft_tokens = _value(text, "tandem_spec_decode_num_draft_tokens_total")
    accepted = _value(text, "tandem_spec_decode_num_accepted_tokens_total")
    first = _value(text, "tandem_spec_decode_num_accepted_tokens_per_pos_total", position="0")
    assert drafts > 0 and drafts < 4 * 24          # fewer rounds than tokens: some rounds gave several
    assert drafts <= draft_tokens <= 3 * drafts
    assert 0 < accepted <= draft_tokens
    assert 0 < first <= accepted
    assert accepted == sum(_value(text, "tandem_spec_decode_num_accepted_tokens_per_pos_total", position=str(p))
                           for p in range(3))
    # Asked again, the counters only grow by new work (none here).
    assert _value(httpx.get(f"{spec_url}/metrics").text, "tandem_spec_decode_num_drafts_total") == drafts
    deadline = time.monotonic() + 20
    while True:
        panels = {p["id"]: p for p in httpx.get(f"{spec_url}/dashboard/data").json()["panels"]}
        if panels["spec_decode"]["points"]:
            break
        assert time.monotonic() < deadline, "the acceptance-length panel got no data"
        client.completions.create(model=MODEL, prompt="def g(y):", max_tokens=8, extra_body={"ignore_eos": True})
        time.sleep(0.5)
    values = [v for s in panels["spec_decode"]["series"] for v in s["values"] if v is not None]
    assert all(1.0 <= v <= 4.0 for v in values) and max(values) > 1.0

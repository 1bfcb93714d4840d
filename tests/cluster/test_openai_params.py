"""OpenAI parameters beyond the basics, through the served API with the official
client: penalties and logit_bias as the offline engine computes them (which
tests/engine/test_penalties.py holds to transformers), echo with prompt logprobs
(what lm-eval's local-completions sends for log-likelihoods), and a 400 naming every
parameter the server does not implement."""

from __future__ import annotations

import httpx
import openai
import pytest

from engine import SamplingParams

MODEL = "tandem-default"
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def client(api_server):
    return openai.OpenAI(base_url=f"{api_server[0]}/v1", api_key="sekret", max_retries=0)


def test_penalties_and_logit_bias_match_the_offline_engine(client, default_llm):
    extra = dict(presence_penalty=2.0, frequency_penalty=1.5, logit_bias={"65": 4.0, "66": -100})
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0.8, seed=5,
                                  extra_body={"ignore_eos": True, "repetition_penalty": 3.0}, **extra)
    sp = SamplingParams(max_tokens=12, temperature=0.8, seed=5, ignore_eos=True, repetition_penalty=3.0, **extra)
    ref = default_llm.generate([PROMPT], sp)[0]
    assert r.choices[0].text == ref.text
    plain = default_llm.generate([PROMPT], SamplingParams(max_tokens=12, temperature=0.8, seed=5, ignore_eos=True))
    assert plain[0].token_ids != ref.token_ids


def test_logit_bias_forces_and_bans_tokens(client, default_llm):
    tok = default_llm.tokenizer
    forced = tok.encode("z", add_special_tokens=False)[-1]
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=1.0, seed=1,
                                  logit_bias={str(forced): 100}, logprobs=1, extra_body={"ignore_eos": True})
    assert r.choices[0].text == tok.decode([forced] * 5)


@pytest.mark.parametrize("max_tokens", [0, 3])
def test_echo_with_logprobs_equals_the_engine_prompt_logprobs(client, default_llm, max_tokens):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=max_tokens, temperature=0, echo=True,
                                  logprobs=2, extra_body={"ignore_eos": True})
    ref = default_llm.generate([PROMPT], SamplingParams(max_tokens=max(max_tokens, 1), temperature=0,
                                                        ignore_eos=True, prompt_logprobs=2, logprobs=2))[0]
    c = r.choices[0]
    ids = ref.prompt_token_ids
    gen = ref.token_ids[:max_tokens]
    assert c.text == PROMPT + default_llm.tokenizer.decode(gen)
    lp = c.logprobs
    assert len(lp.tokens) == len(ids) + max_tokens and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(ref.prompt_logprobs[i][ids[i]], abs=1e-4)
        assert len(lp.top_logprobs[i]) in (2, 3)   # top 2, plus the prompt token when outside them
    for j, t in enumerate(gen):
        assert lp.token_logprobs[len(ids) + j] == pytest.approx(ref.logprobs[j][t], abs=1e-4)
    assert r.usage.completion_tokens == max_tokens and r.usage.prompt_tokens == len(ids)
    assert c.finish_reason == "length"


def test_echo_streams_the_prompt_first(client):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, echo=True, extra_body={"ignore_eos": True})
    whole = client.completions.create(**kw).choices[0].text
    chunks = [c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices]
    assert chunks[0].startswith(PROMPT) and "".join(chunks) == whole


@pytest.mark.parametrize("field, value", [
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    ("tool_choice", "auto"), ("response_format", {"type": "json_object"}), ("best_of", 2), ("suffix", "!"),
    ("guided_json", {"type": "object"}), ("min_tokens", 3), ("functions", [{"name": "f"}]),
    ("logit_bias", {"99999999": 1}), ("logit_bias", {"x": 1}), ("frequency_penalty", -2.5),
    ("repetition_penalty", 0.0),
])
def test_unsupported_or_out_of_range_parameters_get_a_400_naming_them(client, field, value):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=2, extra_body={field: value})
    assert field in e.value.body["message"] and (e.value.body["param"] or "").startswith(field)


def test_chat_refuses_tools_and_takes_penalties(client):
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=msgs, tools=[
            {"type": "function", "function": {"name": "f", "parameters": {}}}])
    assert "tools" in e.value.body["message"]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4, frequency_penalty=1.0,
                                       presence_penalty=-0.5, logit_bias={"7": 2.0})
    assert r.choices[0].finish_reason in ("stop", "length")


def test_harmless_fields_clients_send_still_work(api_server):
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2, "user": "u1", "stream_options": None,
            "response_format": {"type": "text"}, "tool_choice": "none", "metadata": {"k": "v"}, "store": False,
            "best_of": 1}
    r = httpx.post(f"{api_server[0]}/v1/completions", json=body, headers={"Authorization": "Bearer sekret"},
                   timeout=60)
    assert r.status_code == 200, r.text


def test_schema_states_the_new_fields_and_their_bounds(api_server):
    schema = httpx.get(f"{api_server[0]}/openapi.json").json()["components"]["schemas"]
    props = schema["CompletionRequest"]["properties"]
    assert props["presence_penalty"]["minimum"] == -2 and props["frequency_penalty"]["maximum"] == 2
    bias = next(o for o in props["logit_bias"]["anyOf"] if o.get("type") == "object")
    assert bias["additionalProperties"] is False and bias["maxProperties"] == 300
    assert props["tools"]["type"] == "null" and props["echo"]["type"] == "boolean"

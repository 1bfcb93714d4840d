"""The disaggregated topology with an expert-parallel decode pool, on a real local Ray
through the router with the official `openai` client: `tandem serve --mode pd
--data-parallel-size 2 --enable-expert-parallel`'s settings (pools.decode.parallel) give
the one-process (dp=1) greedy text, on the embedded default model and a tiny Qwen3-MoE.
The decode replica's two ranks each pull the KV with their own NIXL agent; their
transfers reach the replica's /metrics. With --enable-eplb the decode pool grows 2 -> 3
and shrinks back under a steady stream, answers unchanged. One Ray instance for the module."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
from ray import serve

from cluster.app import build_app
from cluster.cli import parser
from cluster.serve_args import app_args
from engine import LLM, SamplingParams
from tests.cluster.ep_serving_support import (
    MODEL,
    SteadyStream,
    created_groups,
    metric_lines,
    scale,
    served_app,
    wait_answering,
    wait_idle,
)
from tests.cluster.ep_serving_support import PROMPTS as STREAM_PROMPTS
from tests.engine.tiny_models import build
from tests.ray_cluster import wait_until

PROMPTS = ["Experts, spread out.", "a second, somewhat longer prompt for the other rank", "third", "4"]


def pd_ep_app_args(*extra: str) -> dict:
    args = app_args(parser().parse_args(["serve", *extra, "--mode", "pd", "--data-parallel-size", "2",
                                         "--enable-expert-parallel"]))
    args["engine"].update({"max_model_len": 256, "max_num_seqs": 4, "kv_cache_memory_gb": 0.05})
    assert args["pools"]["decode"]["parallel"]["data_parallel_size"] == 2
    args["pools"]["decode"].update({"replicas": 1, "num_cpus": 0.4})    # per rank, with 0.1 for the replica
    args["pools"]["prefill"].update({"replicas": 1, "num_cpus": 0.5})
    args["pools"]["router"] = {"replicas": 1, "num_cpus": 0}
    args["slo"] = {"ttft_ms": 60000, "itl_ms": 60000}
    return args


@pytest.fixture(scope="module")
def app():
    with served_app(pd_ep_app_args("--enable-eplb")) as url:
        yield url


def test_pd_with_an_ep_decode_pool_answers_as_one_process(app, default_llm):
    [group] = created_groups()      # the decode replica's own: bundle 0 and one per rank
    assert group["bundles"] == {0: {"CPU": 0.1}, 1: {"CPU": 0.4}, 2: {"CPU": 0.4}}
    params = SamplingParams(max_tokens=10, temperature=0.0)
    want = [o.outputs[0].text for o in default_llm.generate(PROMPTS, params)]
    c = openai.OpenAI(base_url=f"{app}/v1", api_key="none", max_retries=0, timeout=120)
    for prompt, text in zip(PROMPTS, want):
        r = c.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0)
        assert r.choices[0].text == text, prompt
    streamed = c.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=10, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed) == want[1]

    def counted():
        moved = metric_lines(app, "tandem_kv_transfer_bytes_total")
        decode = [v for labels, v in moved if 'pool="decode"' in labels]
        failed = [v for labels, v in metric_lines(app, "tandem_kv_transfer_failures_total") if v > 0]
        return bool(decode) and decode[0] > 0 and not failed, f"{moved} {failed}"
    wait_until(counted, "the decode ranks' KV transfers in /metrics", 30)
    assert httpx.get(f"{app}/health", timeout=30).status_code == 200


def test_pd_with_an_ep_decode_pool_answers_as_one_process_on_a_tiny_qwen3_moe(app, tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen3-moe")
    build("qwen3_moe", folder)
    prompts = [[5, 17, 42, 99, 3], [200, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]]
    offline = LLM(str(folder), max_model_len=256)
    want = [o.outputs[0].token_ids for o in offline.generate(prompts, SamplingParams(max_tokens=6, temperature=0))]
    serve.run(build_app(pd_ep_app_args(str(folder))), name="qwen", route_prefix="/qwen", blocking=False)
    try:
        url = f"{app}/qwen"
        wait_answering(url, folder.name, prompts[0])
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
        for prompt, tokens in zip(prompts, want):
            r = c.completions.create(model=folder.name, prompt=prompt, max_tokens=6, temperature=0, logprobs=0)
            assert [int(t) for t in r.choices[0].logprobs.tokens] == tokens
    finally:
        serve.delete("qwen")


def test_pd_decode_pool_scales_2_to_3_to_2_under_a_stream(app, default_llm):
    want = {p: o.outputs[0].text for p, o in
            zip(STREAM_PROMPTS, default_llm.generate(STREAM_PROMPTS, SamplingParams(max_tokens=8, temperature=0.0)))}
    stream = SteadyStream(app)
    spans = []
    try:
        stream.wait_more()                  # the stream flows
        for n in (3, 2):
            t0 = time.monotonic()
            r = scale(app, n)
            spans.append((t0, time.monotonic()))
            assert r.status_code == 200 and r.json()["data_parallel_size"] == n, r.text
        during = len(stream.results)
        stream.wait_more(1)                 # an answer from the shrunk group
    finally:
        stream.finish()
    stream.check(want, during, spans)
    wait_idle(app, pool="decode")

"""Expert-parallel pools served on a real local Ray (tests/ray_cluster.py), through the
router with the official `openai` client: `tandem serve --mode colocated
--data-parallel-size 2 --enable-expert-parallel --enable-eplb`'s settings give the
one-process greedy answers (embedded default model and a tiny Qwen3-MoE), the EPLB
series reach /metrics, and POST /scale_elastic_ep grows and shrinks the replica's group
under a steady stream of requests. One Ray instance and one app for the module."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from ray import serve

from cluster.app import build_app
from cluster.cli import parser
from cluster.serve_args import app_args
from engine import LLM, SamplingParams
from tests.cluster.ep_serving_support import (
    MODEL,
    PROMPTS,
    SteadyStream,
    client,
    created_groups,
    metric_lines,
    scale,
    served_app,
    wait_answering,
    wait_idle,
)
from tests.engine.tiny_models import build
from tests.ray_cluster import wait_until

EPLB = {"window_size": 8, "step_interval": 4, "min_gain": 0.0}
# Per rank a 0.4 CPU bundle: a replica (0.1 for its coordinator + 2 ranks) and the growth
# to 4 ranks fit the 3 logical CPUs of the module's Ray, on a 2-core machine.
POOL = {"replicas": 1, "num_cpus": 0.4}


def ep_app_args(*extra: str, **engine) -> dict:
    """What `tandem serve --mode colocated --data-parallel-size 2 --enable-expert-parallel
    --enable-eplb --eplb-config ...` deploys, with small engines."""
    args = app_args(parser().parse_args(["serve", *extra, "--mode", "colocated", "--data-parallel-size", "2",
                                         "--enable-expert-parallel", "--enable-eplb",
                                         "--eplb-config", json.dumps(EPLB)]))
    args["engine"].update({"max_model_len": 256, "max_num_seqs": 4, "kv_cache_memory_gb": 0.05, **engine})
    args["pools"]["colocated"].update(POOL)
    args["pools"]["router"] = {"replicas": 1, "num_cpus": 0}
    args["slo"] = {"ttft_ms": 60000, "itl_ms": 60000}
    return args


@pytest.fixture(scope="module")
def app():
    with served_app(ep_app_args()) as url:
        yield url


@pytest.fixture(scope="module")
def want(default_llm) -> dict[str, str]:
    params = SamplingParams(max_tokens=8, temperature=0.0)
    return {p: o.outputs[0].text for p, o in zip(PROMPTS, default_llm.generate(PROMPTS, params))}


def test_ep_pool_answers_as_one_process_on_the_default_model(app, want):
    [group] = created_groups()          # the replica's own: bundle 0 and one per rank
    assert group["bundles"] == {0: {"CPU": 0.1}, 1: {"CPU": 0.4}, 2: {"CPU": 0.4}}
    c = client(app)
    for prompt in PROMPTS:
        r = c.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
        assert r.choices[0].text == want[prompt]


def test_echo_with_logprobs_scores_the_prompt_on_the_ranks(app, default_llm):
    """Prompt logprobs (echo + logprobs) through an EP pool: the ranks compute them, as
    one process does (this was a 500)."""
    prompt = PROMPTS[1]
    r = client(app).completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0, echo=True,
                                       logprobs=1)
    [ref] = default_llm.generate([prompt], SamplingParams(max_tokens=2, temperature=0.0, logprobs=1,
                                                          prompt_logprobs=1))
    got = r.choices[0].logprobs.token_logprobs
    n = len(ref.prompt_token_ids)
    assert got[0] is None and len(got) == n + 2
    want = [lp[t] for lp, t in zip(ref.prompt_logprobs[1:], ref.prompt_token_ids[1:])]
    assert max(abs(a - b) for a, b in zip(got[1:n], want)) < 1e-3


def test_ep_pool_answers_as_one_process_on_a_tiny_qwen3_moe(app, tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen3-moe")
    build("qwen3_moe", folder)
    prompts = [[5, 17, 42, 99, 3], [200, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]]
    offline = LLM(str(folder), max_model_len=256)
    want = [o.outputs[0].token_ids for o in offline.generate(prompts, SamplingParams(max_tokens=6, temperature=0))]
    args = ep_app_args(str(folder))
    serve.run(build_app(args), name="qwen", route_prefix="/qwen", blocking=False)
    try:
        url = f"{app}/qwen"
        wait_answering(url, folder.name, prompts[0])
        for prompt, tokens in zip(prompts, want):
            r = client(url).completions.create(model=folder.name, prompt=prompt, max_tokens=6, temperature=0,
                                               logprobs=0)
            assert [int(t) for t in r.choices[0].logprobs.tokens] == tokens
    finally:
        serve.delete("qwen")


def test_an_ep_replica_that_cannot_start_says_why(app):
    """What `tandem serve` prints when a replica's constructor fails (here a rank's KV
    cache too small for max_model_len): Serve's report per deployment and its last error."""
    from cluster.serve_cli import failed_deployments, last_line

    args = ep_app_args(num_kv_blocks=1)
    with pytest.raises(RuntimeError):
        serve.run(build_app(args), name="bad", route_prefix="/bad", blocking=False)
    try:
        reports = failed_deployments("bad")
        assert list(reports) == ["Colocated"], reports
        assert last_line(reports["Colocated"]).startswith("ValueError: the KV cache holds 1 blocks"), reports
    finally:
        serve.delete("bad")


def test_eplb_series_reach_metrics_after_load_and_a_forced_rebalance(app, want):
    c = client(app)
    for prompt in PROMPTS * 2:      # enough steps for a few load windows (step_interval 4)
        assert c.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0).choices[0].text \
            == want[prompt]
    r = httpx.post(f"{app}/rebalance_experts", timeout=120)
    assert r.status_code == 200, r.text
    assert len(r.json()["balancedness"]) == 3           # the default model's MoE layers

    def served():
        balanced = metric_lines(app, "tandem_eplb_balancedness")
        moved = metric_lines(app, "tandem_eplb_bytes_moved_total")
        rebalances = metric_lines(app, "tandem_eplb_rebalance_seconds_count")
        done = (len(balanced) == 3 and all(0 < v <= 1 for _, v in balanced) and moved and moved[0][1] > 0
                and rebalances and rebalances[0][1] >= 1)
        return done, f"{balanced} {moved} {rebalances}"
    wait_until(served, "the EPLB series in /metrics", 30)
    assert all('replica="' in labels and 'pool="colocated"' in labels
               for labels, _ in metric_lines(app, "tandem_eplb_balancedness"))


def test_dashboard_draws_the_eplb_panel_in_a_browser(app, tmp_path):
    """The router's /dashboard in headless Chromium (tests/deploy/test_dashboard_browser.py's
    way) draws the EPLB panels (balancedness, load per rank) from the replica's series, after
    the load above."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "deploy"))
    from live_support import system_tool
    from test_dashboard_browser import PanelParser, chromium

    browser = system_tool("chromium", "chromium", ("/usr/bin/chromium",))

    def sampled():
        panels = {p["id"]: p for p in httpx.get(f"{app}/dashboard/data", timeout=30).json()["panels"]}
        return panels["eplb"]["points"] >= 6 and panels["eplb_ranks"]["points"] >= 4, str(panels["eplb"])
    wait_until(sampled, "the dashboard to sample the EPLB series", 30)
    page = PanelParser()
    page.feed(chromium(browser, tmp_path, f"{app}/dashboard", "--dump-dom").stdout)
    eplb, ranks = page.panels["eplb"], page.panels["eplb_ranks"]
    assert eplb["data-state"] == "data" and int(eplb["data-points"]) >= 6, eplb
    assert eplb["lines"] == int(eplb["data-series"]) == 2 and eplb["longest"] >= 1, eplb
    assert ranks["data-state"] == "data" and ranks["lines"] == int(ranks["data-series"]) == 2, ranks   # 2 ranks


def test_scale_2_to_4_to_2_and_a_forced_rebalance_under_a_steady_stream(app, want):
    stream = SteadyStream(app)
    scales = []
    try:
        stream.wait_more()                  # the stream flows
        holder = {}
        t0 = time.monotonic()
        grow = threading.Thread(target=lambda: holder.setdefault("r", scale(app, 4)), daemon=True)
        grow.start()
        wait_until(lambda: (httpx.get(f"{app}/is_scaling_elastic_ep", timeout=30).json()["is_scaling_elastic_ep"],
                            ""), "the scale to start", 60)
        busy = scale(app, 3)
        assert busy.status_code == 409 and busy.json()["error"]["code"] == 409, busy.text
        busy = httpx.post(f"{app}/rebalance_experts", timeout=60)
        assert busy.status_code == 409 and busy.json()["error"]["type"] == "conflict_error", busy.text
        grow.join(timeout=300)
        scales.append((t0, time.monotonic()))
        assert holder["r"].status_code == 200, holder["r"].text
        assert holder["r"].json()["data_parallel_size"] == 4
        assert sorted(len(g["bundles"]) for g in created_groups()) == [2, 3]   # the growth's own group
        during = len(stream.results)

        for bad, says in ((0, "new_data_parallel_size"), (100, "cannot place"), (1.5, "new_data_parallel_size")):
            r = scale(app, bad)
            assert r.status_code == 400 and says in r.text, r.text
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert sorted(len(g["bundles"]) for g in created_groups()) == [2, 3]   # refusals touched nothing

        t0 = time.monotonic()
        r = scale(app, 2)
        scales.append((t0, time.monotonic()))
        assert r.status_code == 200 and r.json()["data_parallel_size"] == 2, r.text
        wait_until(lambda: ([len(g["bundles"]) for g in created_groups()] == [3], str(created_groups())),
                   "the retired ranks' group to go", 30)
        stream.wait_more(1)                 # an answer from the shrunk group
    finally:
        stream.finish()
    stream.check(want, during, scales)
    wait_idle(app)

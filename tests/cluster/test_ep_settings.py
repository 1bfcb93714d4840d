"""Expert-parallel pool settings in vLLM's words (config keys and `tandem serve` flags),
the placement they make, and the start-up errors for settings the model cannot take.
No Ray: these are the checks made before anything is deployed."""

from __future__ import annotations

import json

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from cluster.api_errors import install_error_handlers
from cluster.cli import parser
from cluster.elastic_ep_api import elastic_ep_router
from cluster.parallel_settings import COORDINATOR_CPUS
from cluster.serve_args import app_args
from cluster.settings import parse_settings
from tests.engine.tiny_models import build


def serve_args(*argv: str) -> dict:
    return app_args(parser().parse_args(["serve", *argv]))


def ep(**parallel) -> dict:
    return {"enable_expert_parallel": True, **parallel}


def test_flags_set_the_served_pool_and_eplb():
    args = serve_args("--mode", "colocated", "--data-parallel-size", "2", "--enable-expert-parallel",
                      "--enable-eplb", "--eplb-config", json.dumps({"step_interval": 8, "num_redundant_experts": 2}))
    assert args["pools"]["colocated"]["parallel"] == {"data_parallel_size": 2, "enable_expert_parallel": True,
                                                      "enable_eplb": True}
    assert args["eplb"] == {"window_size": 128, "step_interval": 8, "min_gain": 0.05,   # over config.yaml's
                            "num_redundant_experts": 2}
    settings = parse_settings(args)
    parallel = settings.parallel_config("colocated")
    assert (parallel.data_parallel_size, parallel.enable_eplb, parallel.ep_dispatch) == (2, True, "normal")
    assert parallel.eplb_config == args["eplb"]
    settings.check_model()
    # In mode pd the flags set the decode pool, whose dispatch defaults to low_latency.
    pd = parse_settings(serve_args("--data-parallel-size", "2", "--enable-expert-parallel"))
    assert pd.parallel_config("decode").ep_dispatch == "low_latency"
    assert not pd.parallel_config("prefill").enable_expert_parallel
    explicit = parse_settings(serve_args("--data-parallel-size", "2", "--enable-expert-parallel",
                                         "--ep-dispatch", "normal"))
    assert explicit.parallel_config("decode").ep_dispatch == "normal"


def test_help_says_which_pool_the_parallel_flags_set():
    sub = next(a for a in parser()._actions if a.dest == "command" or getattr(a, "choices", None))
    text = " ".join(sub.choices["serve"].format_help().split())
    for flag in ("--data-parallel-size", "--enable-expert-parallel", "--enable-eplb", "--eplb-config",
                 "--ep-dispatch"):
        assert flag in text
    assert "colocated pool in mode colocated and the decode pool in mode pd" in text
    assert "pools.prefill.parallel" in text


def test_an_ep_replica_is_one_placement_group_bundle_0_the_replica():
    settings = parse_settings({"mode": "pd", "pools": {"decode": {"num_cpus": 2, "num_gpus": 1, "parallel": ep(
        data_parallel_size=4, placement_strategy="STRICT_PACK")}}})
    pool = settings.pool("decode")
    assert pool.placement_group_bundles() == [{"CPU": COORDINATOR_CPUS}] + [{"CPU": 2, "GPU": 1}] * 4
    assert pool.actor_options() == {"num_cpus": COORDINATOR_CPUS, "num_gpus": 0}
    assert settings.pool("prefill").placement_group_bundles() is None


@pytest.mark.parametrize("pools, eplb, says", [
    ({"parallel": ep(data_parallel_size=3)}, {}, "data_parallel_size=3 does not divide the 16 expert slots"),
    ({"parallel": ep(data_parallel_size=3)}, {"num_redundant_experts": 2}, None),     # 18 slots split over 3
    ({"parallel": ep(data_parallel_size=2)}, {"num_redundant_experts": 17}, "num_redundant_experts=17 is too large"),
    ({"parallel": ep(data_parallel_size=0)}, {}, "data_parallel_size must be >= 1"),
    ({"parallel": {"data_parallel_size": 2}}, {}, "needs enable_expert_parallel"),
    ({"parallel": ep(data_parallel_size=2, ep_dispatch="fast")}, {}, "ep_dispatch must be"),
    ({"parallel": ep(data_parallel_size=2, placement_strategy="NEAR")}, {}, "placement_strategy must be one of"),
    ({"parallel": ep(data_parallel_size=2, tensor_parallel_size=2)}, {}, "unknown keys tensor_parallel_size"),
    ({"parallel": ep(data_parallel_size=2)}, {"window": 3}, "unknown eplb_config keys ['window']"),
    ({"parallel": ep(data_parallel_size=2)}, {"min_gain": 2.0}, "min_gain must be in [0, 1]"),
])
def test_bad_parallel_settings_say_what_to_change(pools, eplb, says):
    def load():
        settings = parse_settings({"mode": "colocated", "eplb": eplb, "pools": {"colocated": pools}})
        settings.check_model()
    if says is None:
        load()
        return
    with pytest.raises(ValueError) as e:
        load()
    assert says in str(e.value)


def test_expert_parallel_on_a_dense_model_is_refused(tmp_path):
    build("qwen3", tmp_path)
    settings = parse_settings({"model": str(tmp_path), "mode": "colocated",
                               "pools": {"colocated": {"parallel": ep(data_parallel_size=2)}}})
    with pytest.raises(ValueError, match="is dense .* Set enable_expert_parallel: false"):
        settings.check_model()


@pytest.mark.parametrize("pools, status, says", [
    ({"colocated": {}}, 400, "pool colocated is not elastic expert-parallel"),
    ({"colocated": {"parallel": ep(data_parallel_size=2)}}, 400, "enable_eplb"),
    ({"colocated": {"replicas": 2, "parallel": ep(data_parallel_size=2, enable_eplb=True)}}, 400, "has 2 replicas"),
    ({"colocated": {"autoscaling": {}, "parallel": ep(data_parallel_size=2, enable_eplb=True)}}, 400,
     "has autoscaled"),
])
def test_scale_routes_refuse_pools_they_cannot_scale_before_asking_them(pools, status, says):
    """The router's checks, before any call to the pool (there is none here to call)."""
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(elastic_ep_router(None, parse_settings({"mode": "colocated", "pools": pools})))
    client = TestClient(app)
    for method, path, body in (("post", "/scale_elastic_ep", {"new_data_parallel_size": 2}),
                               ("post", "/rebalance_experts", None), ("get", "/is_scaling_elastic_ep", None)):
        r = getattr(client, method)(path, **({"json": body} if body else {}))
        assert r.status_code == status and says in r.json()["error"]["message"], r.text
    r = client.post("/scale_elastic_ep", json={"new_data_parallel_size": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "new_data_parallel_size"
    assert "/scale_elastic_ep" not in client.get("/openapi.json").json()["paths"]   # listed only where it works


def test_the_schema_lists_the_scale_routes_of_an_elastic_pool():
    app = FastAPI()
    app.include_router(elastic_ep_router(None, parse_settings(
        {"mode": "colocated", "pools": {"colocated": {"parallel": ep(data_parallel_size=2, enable_eplb=True)}}})))
    paths = TestClient(app).get("/openapi.json").json()["paths"]
    assert {"/scale_elastic_ep", "/is_scaling_elastic_ep", "/rebalance_experts"} <= set(paths)
    assert {"400", "409"} <= set(paths["/scale_elastic_ep"]["post"]["responses"])

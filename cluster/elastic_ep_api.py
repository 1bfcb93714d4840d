"""The router's routes that change the served pool's EP engines while they serve:
`POST /scale_elastic_ep` and `GET /is_scaling_elastic_ep` (vLLM's names and bodies) and
`POST /rebalance_experts` (a forced EPLB rebalance; no vLLM or SGLang route does this).

They act on the pool the router serves (colocated, or decode in mode pd), and only when
it has exactly one replica (and no autoscaling): a Serve handle cannot address each
replica of a pool, and replicas of one pool at different sizes would be a different
deployment, so a pool of several replicas is refused (400; scale it by replicas instead). The replica refuses a
second scale or rebalance while one runs (409) and checks that Ray can place the new
ranks before it touches the group (400). With an API key set, these routes need it too.
The routes are always there (a pool that cannot scale answers why), but the API schema
lists them only where they can work.
"""

from __future__ import annotations

from fastapi import APIRouter, Header
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError

from cluster.api_errors import ERROR_RESPONSES, APIError, error_response
from cluster.api_models import ErrorResponse
from cluster.settings import AppSettings

RESPONSES = {**{c: ERROR_RESPONSES[c] for c in (400, 401, 500, 503)},
             409: {"model": ErrorResponse, "description": "Another scale or rebalance of the pool is running"}}


class ScaleElasticEPRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    new_data_parallel_size: int = Field(ge=1, description="EP ranks of the pool's replica after the scale")
    drain_timeout: int | None = Field(None, ge=0, description="vLLM's; accepted and unused: requests on "
                                                               "retiring ranks are moved, not drained")


def elastic_ep_router(pool, settings: AppSettings) -> APIRouter:
    """`pool`: the Serve handle of the served pool's deployment."""
    name = "decode" if settings.mode == "pd" else "colocated"
    pool_settings = settings.pool(name)
    router = APIRouter()

    parallel = pool_settings.parallel
    elastic = (parallel.enable_expert_parallel and parallel.enable_eplb and pool_settings.replicas == 1
               and pool_settings.autoscaling is None)

    def check(authorization: str | None) -> None:
        if settings.api_key and authorization != f"Bearer {settings.api_key}":
            raise APIError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                           "authentication_error")
        if not (parallel.enable_expert_parallel and parallel.enable_eplb):
            raise APIError(400, f"pool {name} is not elastic expert-parallel: set pools.{name}.parallel."
                                "enable_expert_parallel and enable_eplb (tandem serve --enable-expert-parallel "
                                "--enable-eplb)")
        if pool_settings.replicas != 1 or pool_settings.autoscaling is not None:
            many = "autoscaled" if pool_settings.autoscaling is not None else f"{pool_settings.replicas} replicas"
            raise APIError(400, f"pool {name} has {many}; elastic EP changes one replica's ranks, so it needs "
                                f"pools.{name}.replicas: 1 without autoscaling (scale a pool of several replicas "
                                "by its replica count)")

    async def ask(call) -> dict:
        """The replica's answer; 503 when Serve cannot hand it the call now (its replica is
        full of requests, or being replaced)."""
        try:
            return await call
        except (BackPressureError, RayActorError) as e:
            raise APIError(503, f"the pool's replica cannot take the call now ({type(e).__name__}); retry",
                           "server_overloaded") from None

    def answer(result: dict) -> JSONResponse:
        status = result.pop("status")
        if status != 200:
            return error_response(status, result["message"], "conflict_error" if status == 409 else
                                  "invalid_request_error" if status < 500 else "server_error")
        return JSONResponse(result)

    @router.post("/scale_elastic_ep", responses=RESPONSES, include_in_schema=elastic)
    async def scale_elastic_ep(body: ScaleElasticEPRequest, authorization: str | None = Header(None)):
        """Grow or shrink the pool's EP engine to `new_data_parallel_size` ranks while it serves."""
        check(authorization)
        return answer(await ask(pool.scale_elastic_ep.remote(body.new_data_parallel_size)))

    @router.get("/is_scaling_elastic_ep", responses=RESPONSES, include_in_schema=elastic)
    async def is_scaling_elastic_ep(authorization: str | None = Header(None)):
        check(authorization)
        return {"is_scaling_elastic_ep": await ask(pool.is_scaling_elastic_ep.remote())}

    @router.post("/rebalance_experts", responses=RESPONSES, include_in_schema=elastic)
    async def rebalance_experts(authorization: str | None = Header(None)):
        """Rebalance the experts now, for the last measured load (EPLB otherwise does it
        every eplb.step_interval steps when the gain is worth it)."""
        check(authorization)
        return answer(await ask(pool.rebalance_experts.remote()))

    return router

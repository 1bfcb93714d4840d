"""The EPLB engine client, registered with engine/ (which may not import eplb/): with
`enable_eplb`, `LLM` and `AsyncEngine` build an ElasticEPEngine through it, the same
client offline and in a served pool."""

from __future__ import annotations

from dataclasses import fields

from engine.config import EngineConfig
from engine.engine_client import ModelFiles, ParallelConfig, register_client_factory
from eplb.controller import EplbConfig
from eplb.elastic import ElasticEPEngine


def eplb_settings(options: dict) -> tuple[EplbConfig, int]:
    """(EplbConfig, num_redundant_experts) from vLLM's --eplb-config keys; unknown keys
    and bad values raise ValueError."""
    options = dict(options)
    redundant = options.pop("num_redundant_experts", 0)
    unknown = set(options) - {f.name for f in fields(EplbConfig)}
    if unknown:
        raise ValueError(f"unknown eplb_config keys {sorted(unknown)}; known: num_redundant_experts, "
                         f"{', '.join(f.name for f in fields(EplbConfig))}")
    try:
        return EplbConfig(**options), redundant
    except TypeError as e:
        raise ValueError(f"eplb_config: {e}") from None


def build_elastic_client(config: EngineConfig, parallel: ParallelConfig, files: ModelFiles) -> ElasticEPEngine:
    """An EP engine of `data_parallel_size` ranks with the EPLB controller;
    `eplb_config`: EplbConfig fields plus num_redundant_experts (vLLM's --eplb-config)."""
    eplb, redundant = eplb_settings(parallel.eplb_config)
    return ElasticEPEngine(config, parallel.data_parallel_size, eplb=eplb, num_redundant_experts=redundant,
                           dispatch=parallel.ep_dispatch, files=files, launcher=parallel.launcher,
                           host=parallel.host)


register_client_factory("eplb", build_elastic_client)

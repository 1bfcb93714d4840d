"""The engine client: the one interface the front ends (`LLM`, `AsyncEngine`) drive.

`EngineCore` implements it for one process, `EPEngine` for an expert-parallel group of
rank processes. A front end adds `Request`s, calls `step()` and folds the
`EngineCoreOutput`s it returns into user outputs (detokenizing, stop strings); it never
looks inside the client. This module also holds the set-up every front end shares
(`ModelFiles`: model path, config, tokenizer, EOS ids) and `build_engine_client`, which
picks the client from the parallel settings.

EPLB lives above engine/ (in eplb/), so an EPLB-driven client is registered here by eplb
(`register_client_factory("eplb", ...)` when `eplb` is imported) instead of imported.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from engine.config import EngineConfig
from engine.core.engine_core import EngineCore, EngineCoreOutput
from engine.default_model import default_model_path
from engine.engine_stats import EngineStats
from engine.kv_transfer import KVConnectorSpec, TransferObserver
from engine.models.loader import load_config
from engine.request import Request, RequestStatus
from engine.request_limits import RequestLimits
from engine.sampling_params import SamplingParams
from engine.tokenizer import load_tokenizer

Prompt = str | list[int]


def resolve_model_path(model: str) -> Path:
    return default_model_path() if model == "default" else Path(model)


def routed_experts(model_config) -> int | None:
    """Routed experts per MoE layer as the Hugging Face config names them; None for a
    dense model."""
    for name in ("num_experts", "n_routed_experts"):
        value = getattr(model_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def eos_token_ids(path: Path, model_config, tokenizer) -> frozenset[int]:
    """EOS ids as generation_config.json states them, else config.json, else the tokenizer."""
    ids = None
    gen = path / "generation_config.json"
    if gen.is_file():
        ids = json.loads(gen.read_text()).get("eos_token_id")
    if ids is None:
        ids = getattr(model_config, "eos_token_id", None)
    if ids is None and tokenizer is not None:
        ids = tokenizer.eos_token_id
    if ids is None:
        return frozenset()
    return frozenset(ids if isinstance(ids, list) else [ids])


def pair_prompts(prompts: Prompt | list[Prompt], sampling_params: SamplingParams | list[SamplingParams] | None
                 ) -> tuple[list[Prompt], list[SamplingParams]]:
    """One prompt or many, with one SamplingParams for all or one each: as two lists."""
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    params = sampling_params or SamplingParams()
    params = params if isinstance(params, list) else [params] * len(prompts)
    if len(params) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
    return prompts, params


@dataclass(frozen=True)
class ModelFiles:
    """What a front end and an engine client read from the model folder, read once."""
    path: Path
    model_config: Any
    tokenizer: Any          # None when the folder has no tokenizer files
    eos_token_ids: frozenset[int]

    @classmethod
    def load(cls, config: EngineConfig) -> ModelFiles:
        path = resolve_model_path(config.model)
        model_config = load_config(path)
        tokenizer = load_tokenizer(config.tokenizer or path)
        return cls(path, model_config, tokenizer, eos_token_ids(path, model_config, tokenizer))

    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer; pass the prompt as a list of token ids")
            return self.tokenizer.encode(prompt)
        return list(prompt)     # the engine's limits check the ids


@runtime_checkable
class EngineClient(Protocol):
    """What `LLM` and `AsyncEngine` need from an engine. Calls come from one thread (the
    front end's loop), except `validate`, which reads only settings."""
    config: EngineConfig
    limits: RequestLimits

    def add_request(self, req: Request) -> None:
        """Queue a request; a bad one raises ValueError and changes nothing."""

    def validate(self, req: Request) -> None:
        """Raise ValueError for a request this engine would refuse, without queueing it."""

    def abort_requests(self, req_ids: list[str], status: RequestStatus = RequestStatus.FINISHED_ABORTED) -> None:
        ...

    def step(self) -> list[EngineCoreOutput]:
        """One forward pass (on every rank); the updates of the requests it advanced."""

    def has_unfinished(self) -> bool:
        ...

    @property
    def has_pending_work(self) -> bool:
        """Anything a loop must step for: unfinished requests, or held KV to poll."""

    def poll_interval(self) -> float | None:
        """How long a serving loop may wait for new requests before stepping again."""

    def engine_stats(self) -> EngineStats:
        ...

    def shutdown(self) -> None:
        ...

    def set_kv_connector(self, spec: KVConnectorSpec, observer: TransferObserver | None = None):
        """Build the KV connector `spec` names beside each engine core (disaggregated
        prefill/decode); returns it when it lives in this process, else None."""


@dataclass
class ParallelConfig:
    """How many engines one client spans, in vLLM's words. data_parallel_size > 1 with
    enable_expert_parallel: attention data-parallel over that many ranks, MoE experts
    spread over them (an EPEngine); enable_eplb adds the EPLB controller (eplb/)."""
    data_parallel_size: int = 1
    enable_expert_parallel: bool = False
    enable_eplb: bool = False
    ep_dispatch: str = "normal"                        # "normal" | "low_latency"
    eplb_config: dict = field(default_factory=dict)    # EplbConfig fields + num_redundant_experts
    # Where the ranks run and how they reach the coordinator (vLLM's
    # distributed_executor_backend and data_parallel_master_ip): a RankLauncher
    # (engine/distributed/launcher.py; None: local processes) and this host's address.
    launcher: Any = field(default=None, compare=False, repr=False)
    host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        if self.data_parallel_size < 1:
            raise ValueError(f"data_parallel_size must be >= 1, got {self.data_parallel_size}")
        if self.data_parallel_size > 1 and not self.enable_expert_parallel:
            # Plain data parallelism is more replicas of one engine: the pool's job.
            raise ValueError("data_parallel_size > 1 in one engine needs enable_expert_parallel=True; for "
                             "independent replicas raise the pool's replica count instead")
        if self.enable_eplb and not self.enable_expert_parallel:
            raise ValueError("enable_eplb needs enable_expert_parallel=True")
        if self.ep_dispatch not in ("normal", "low_latency"):
            raise ValueError(f"ep_dispatch must be 'normal' or 'low_latency', got {self.ep_dispatch!r}")


ClientFactory = Callable[[EngineConfig, ParallelConfig, ModelFiles], EngineClient]
_factories: dict[str, ClientFactory] = {}


def register_client_factory(name: str, factory: ClientFactory) -> None:
    """Layers above engine/ plug in clients built from their own parts (eplb: "eplb")."""
    _factories[name] = factory


def build_engine_client(config: EngineConfig, parallel: ParallelConfig | None = None,
                        files: ModelFiles | None = None) -> EngineClient:
    """The client the settings ask for: one EngineCore, an EPEngine of local rank
    processes, or (enable_eplb) the client eplb registered."""
    parallel = parallel or ParallelConfig()
    files = files or ModelFiles.load(config)
    if parallel.enable_eplb:
        if "eplb" not in _factories:
            raise ValueError("enable_eplb needs the EPLB controller: `import eplb` before building the engine "
                             "(it registers itself), or pass an engine client built by eplb")
        return _factories["eplb"](config, parallel, files)
    if parallel.enable_expert_parallel:
        # Imported when asked for: it brings in pyzmq and torch.distributed.
        from engine.distributed.ep_engine import EPEngine
        return EPEngine(config, parallel.data_parallel_size, dispatch=parallel.ep_dispatch, files=files,
                        launcher=parallel.launcher, host=parallel.host)
    return EngineCore(config, files.model_config, str(files.path))

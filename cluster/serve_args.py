"""`tandem serve`'s arguments, in `vllm serve`'s shape, and the app settings they make.

Settings come from three layers, each over the one before: the repository's config.yaml
(the app that `ray serve deploy config.yaml` runs), `--config FILE` (a YAML of the same
keys as config.yaml's app `args`), then the flags given on the command line. Engine flags
carry vLLM's names; each maps to one field of engine/config.py's EngineConfig.
"""

from __future__ import annotations

import argparse
import copy
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from disagg.connector import DEFAULT_CONNECTOR, connector_spec
from engine.config import ATTENTION_BACKENDS, EngineConfig

CONFIG = Path(__file__).resolve().parent.parent / "config.yaml"
GPU_POOLS = ("colocated", "prefill", "decode")   # pools that hold an engine (not the router)


@dataclass(frozen=True)
class EngineFlag:
    flag: str            # vLLM's spelling
    field: str           # EngineConfig's field
    help: str
    type: Any = None     # None: a --x/--no-x switch
    choices: tuple[str, ...] | None = None
    to_field: Any = None  # converts the flag's value to the field's (e.g. --enforce-eager)
    unset: str = "auto"   # what the field's None default means, for --help


ENGINE_FLAGS = (
    EngineFlag("--tokenizer", "tokenizer", "tokenizer folder", str, unset="the model folder"),
    EngineFlag("--device", "device", "cpu, cuda or cuda:N", str),
    EngineFlag("--dtype", "dtype", "weights and activations; auto: float32 on CPU, the checkpoint's on CUDA",
               str, ("auto", "float32", "float", "bfloat16", "float16", "half")),
    EngineFlag("--load-format", "load_format", "auto (safetensors) or random (real shapes, random weights)",
               str, ("auto", "safetensors", "random")),
    EngineFlag("--seed", "seed", "seed of the sampling noise for requests without their own", int),
    EngineFlag("--block-size", "block_size", "tokens per KV-cache block", int),
    EngineFlag("--max-num-seqs", "max_num_seqs", "most requests in one engine step", int),
    EngineFlag("--max-num-batched-tokens", "max_num_batched_tokens", "most tokens in one engine step", int),
    EngineFlag("--max-model-len", "max_model_len", "longest prompt plus output", int,
               unset="the model's max_position_embeddings"),
    EngineFlag("--enable-prefix-caching", "enable_prefix_caching", "reuse KV blocks of shared prompt prefixes"),
    EngineFlag("--enable-chunked-prefill", "enable_chunked_prefill", "split long prompts over steps"),
    EngineFlag("--num-gpu-blocks-override", "num_kv_blocks", "KV-cache blocks per engine, instead of sizing "
               "them from memory", int),
    EngineFlag("--kv-cache-memory-gb", "kv_cache_memory_gb", "CPU: memory for the KV cache, GB", float),
    EngineFlag("--gpu-memory-utilization", "gpu_memory_utilization", "CUDA: fraction of device memory an engine "
               "may hold", float),
    EngineFlag("--max-logprobs", "max_logprobs", "most logprobs a request may ask for", int),
    EngineFlag("--enforce-eager", "enable_cuda_graphs", "no CUDA graphs for decode steps",
               to_field=lambda eager: not eager, unset="off: graphs on CUDA, none on CPU"),
    EngineFlag("--async-scheduling", "async_scheduling", "schedule step N+1 while step N runs",
               unset="on for CUDA, off on CPU"),
    EngineFlag("--attention-backend", "attention_backend",
               "attention kernels: FLASHINFER (flashinfer-python, GQA layers, where it imports) or TRITON_ATTN; "
               "also TANDEM_ATTENTION_BACKEND", str, ATTENTION_BACKENDS,
               unset="SDPA (cuDNN) for whole prompts on CUDA, Triton otherwise"),
    EngineFlag("--speculative-config", "speculative_config",
               'speculative decoding, as in vLLM: {"method": "peagle", "model": HEAD_FOLDER, '
               '"num_speculative_tokens": K}', type=json.loads, unset="off"),
)
# EngineConfig fields with no flag of their own: the model is the positional argument,
# and kv_load_failure_policy sits in --kv-transfer-config, as in vLLM.
ENGINE_FIELDS_ELSEWHERE = {"model": "MODEL", "kv_load_failure_policy": "--kv-transfer-config"}


def base_args(config_file: str | Path | None = None) -> dict:
    """config.yaml's app args, with `config_file`'s keys over them (maps merge key by key)."""
    args = yaml.safe_load(CONFIG.read_text())["applications"][0]["args"] if CONFIG.is_file() else {}
    if config_file:
        override = yaml.safe_load(Path(config_file).read_text()) or {}
        if not isinstance(override, dict):
            raise SystemExit(f"--config {config_file}: expected a mapping of config.yaml's app settings")
        args = merge(args, override)
    return args


def merge(base: dict, override: dict) -> dict:
    """A copy of base with override laid over it key by key, as Helm coalesces values:
    maps merge, anything else (lists too) is replaced."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _shown_default(flag: EngineFlag, engine: dict) -> str:
    if flag.field in engine:
        value = engine[flag.field]
    else:
        value = next(f.default for f in fields(EngineConfig) if f.name == flag.field)
    if value is None:
        return flag.unset
    if flag.to_field is not None:      # --enforce-eager shows the switch, not the field
        return "off" if value else "on"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """Every option has a help line and its default (from config.yaml, or the engine's)."""
    args = base_args()
    engine = args.get("engine", {})
    p.add_argument("model", nargs="?", default=None, metavar="MODEL",
                   help="Hugging Face checkpoint folder, or 'default' for the embedded model "
                        f"(default: {args.get('model', 'default')})")
    p.add_argument("--model", dest="model_option", default=None, metavar="MODEL",
                   help="the same as the positional MODEL, vLLM's older spelling (default: none)")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="YAML of config.yaml's app settings (model, mode, engine, pools, slo, ...) "
                        "over config.yaml's; flags given here win (default: none)")
    g = p.add_argument_group("serving")
    g.add_argument("--served-model-name", default=None,
                   help="model name clients send and /v1/models lists "
                        f"(default: {args.get('served_model_name') or 'the model folder name'})")
    g.add_argument("--mode", default=None, choices=["pd", "colocated"],
                   help="pd: a prefill engine hands KV blocks to a decode engine over NIXL; colocated: "
                        f"one engine does both (default: {args.get('mode', 'pd')})")
    g.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on the API routes (default: none)")
    g.add_argument("--kv-transfer-config", default=None, metavar="JSON",
                   help='KV transfer between pd engines, as in vLLM: {"kv_connector": "NixlConnector", '
                        '"kv_load_failure_policy": "recompute"|"fail", "lease_s": 30, '
                        '"handshake_timeout_s": ..., "transfer_timeout_s": ...} (default: config.yaml\'s)')
    g.add_argument("--host", default="127.0.0.1", help="address the HTTP server binds (default: 127.0.0.1)")
    g.add_argument("--port", type=int, default=8000, help="port of the HTTP server (default: 8000)")
    g.add_argument("--address", default=None,
                   help="Ray cluster to join, e.g. HEAD:6379 or auto (default: $RAY_ADDRESS, else a new "
                        "local Ray instance that stops with this command)")
    add_parallel_arguments(p, args)
    add_autoscaling_arguments(p)
    e = p.add_argument_group("engine (vLLM's flag names)")
    for flag in ENGINE_FLAGS:
        text = f"{flag.help} (default: {_shown_default(flag, engine)})"
        dest = flag.field if flag.to_field is None else flag.flag.lstrip("-").replace("-", "_")
        if flag.type is None:
            e.add_argument(flag.flag, dest=dest, default=None, action=argparse.BooleanOptionalAction, help=text)
        else:
            e.add_argument(flag.flag, dest=dest, default=None, type=flag.type, choices=flag.choices, help=text,
                           metavar=None if flag.choices else flag.flag.lstrip("-").upper().replace("-", "_"))


def served_pool(mode: str) -> str:
    """The pool the router sends requests to, which the parallel flags set."""
    return "decode" if mode == "pd" else "colocated"


def add_parallel_arguments(p: argparse.ArgumentParser, args: dict) -> None:
    pool = (args.get("pools") or {}).get(served_pool(args.get("mode", "pd")), {})
    par = pool.get("parallel") or {}
    g = p.add_argument_group(
        "expert parallelism (vLLM's flag names)",
        "These set the colocated pool in mode colocated and the decode pool in mode pd "
        "(config keys pools.<pool>.parallel and eplb); an expert-parallel prefill pool is set "
        "in --config (pools.prefill.parallel).")
    g.add_argument("--data-parallel-size", "-dp", type=int, default=None, metavar="N",
                   help="EP ranks per replica: attention data-parallel, MoE experts spread over them; needs "
                        f"--enable-expert-parallel (default: {par.get('data_parallel_size', 1)})")
    g.add_argument("--enable-expert-parallel", default=None, action=argparse.BooleanOptionalAction,
                   help="make each replica an expert-parallel engine of --data-parallel-size ranks, Ray actors "
                        "in the replica's placement group; the pool's num_cpus and num_gpus then count per rank (default: "
                        f"{'on' if par.get('enable_expert_parallel') else 'off'})")
    g.add_argument("--enable-eplb", default=None, action=argparse.BooleanOptionalAction,
                   help="rebalance experts over the ranks from their measured load, and allow POST "
                        f"/scale_elastic_ep (default: {'on' if par.get('enable_eplb') else 'off'})")
    g.add_argument("--eplb-config", default=None, metavar="JSON",
                   help='EPLB settings, as in vLLM: {"window_size": 128, "step_interval": 64, '
                        '"num_redundant_experts": 0, "min_gain": 0.05, ...} (default: config.yaml\'s eplb)')
    g.add_argument("--ep-dispatch", default=None, choices=["normal", "low_latency"],
                   help="how MoE layers exchange tokens between ranks (DeepEP's modes) (default: "
                        f"{par.get('ep_dispatch') or 'normal in prefill/colocated pools, low_latency in decode'})")


def parallel_settings(ns: argparse.Namespace, args: dict) -> dict:
    """args with the parallel flags applied to the served pool's `parallel` and to `eplb`."""
    flags = {key: getattr(ns, key) for key in ("data_parallel_size", "enable_expert_parallel", "enable_eplb",
                                               "ep_dispatch") if getattr(ns, key) is not None}
    if flags:
        pools = args.setdefault("pools", {})
        pool = pools.setdefault(served_pool(args.get("mode", "pd")), {})
        pool["parallel"] = {**(pool.get("parallel") or {}), **flags}
    if ns.eplb_config:
        try:
            eplb = json.loads(ns.eplb_config)
        except json.JSONDecodeError as e:
            raise SystemExit(f"--eplb-config is not JSON: {e}") from None
        if not isinstance(eplb, dict):
            raise SystemExit("--eplb-config must be a JSON object")
        args["eplb"] = {**(args.get("eplb") or {}), **eplb}
    return args


AUTOSCALING_FLAGS = (("--autoscaling-config", None), ("--prefill-autoscaling-config", "prefill"),
                     ("--decode-autoscaling-config", "decode"))


def add_autoscaling_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "autoscaling (Ray Serve's autoscaling_config, SLO policy)",
        'JSON of pools.<pool>.autoscaling, e.g. {"min_replicas": 1, "max_replicas": 8, "upscale_delay_s": 30, '
        '"downscale_delay_s": 600}: the pool sizes itself from the SLOs within the bounds; without it the '
        "pool keeps its replicas (README: Autoscaling lists every key).")
    for flag, pool in AUTOSCALING_FLAGS:
        which = f"the {pool} pool" if pool else "every engine pool of the mode (colocated, or prefill and decode)"
        g.add_argument(flag, default=None, metavar="JSON",
                       help=f"autoscaling of {which}{', over --autoscaling-config' if pool else ''} "
                            "(default: config.yaml's, none there)")


def autoscaling_settings(ns: argparse.Namespace, args: dict) -> dict:
    """args with the autoscaling flags applied to their pools' `autoscaling`."""
    mode = args.get("mode", "pd")
    for flag, pool in AUTOSCALING_FLAGS:
        text = getattr(ns, flag.lstrip("-").replace("-", "_"))
        if not text:
            continue
        try:
            block = json.loads(text)
        except json.JSONDecodeError as e:
            raise SystemExit(f"{flag} is not JSON: {e}") from None
        if not isinstance(block, dict):
            raise SystemExit(f"{flag} must be a JSON object")
        pools = args.setdefault("pools", {})
        for name in [pool] if pool else (["prefill", "decode"] if mode == "pd" else ["colocated"]):
            target = pools.setdefault(name, {})
            target["autoscaling"] = {**(target.get("autoscaling") or {}), **block}
    return args


def kv_transfer_settings(text: str) -> tuple[dict, dict]:
    """(app kv_transfer settings, engine settings) from --kv-transfer-config's JSON."""
    from cluster.settings import KV_TRANSFER_KEYS

    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise SystemExit(f"--kv-transfer-config is not JSON: {e}") from None
    if not isinstance(config, dict):
        raise SystemExit("--kv-transfer-config must be a JSON object")
    config = {**config.pop("kv_connector_extra_config", {}), **config}
    try:
        connector_spec(config.get("kv_connector", DEFAULT_CONNECTOR))
    except ValueError as e:
        raise SystemExit(f"--kv-transfer-config: {e}") from None
    config.pop("kv_role", None)    # roles come from the pools in mode pd
    engine = {k: config.pop(k) for k in ("kv_load_failure_policy",) if k in config}
    unknown = set(config) - set(KV_TRANSFER_KEYS)
    if unknown:
        raise SystemExit(f"--kv-transfer-config: unknown keys {', '.join(sorted(unknown))} (known: kv_role, "
                         f"kv_load_failure_policy, {', '.join(KV_TRANSFER_KEYS)})")
    return config, engine


def app_args(ns: argparse.Namespace) -> dict:
    """The app settings `tandem serve` deploys: config.yaml < --config FILE < flags."""
    args = base_args(ns.config)
    engine = dict(args.get("engine") or {})
    model = ns.model or ns.model_option
    if model:
        args["model"] = model
        args["served_model_name"] = None if model == "default" else Path(model).name
    for key in ("served_model_name", "mode", "api_key"):
        if getattr(ns, key) is not None:
            args[key] = getattr(ns, key)
    for flag in ENGINE_FLAGS:
        dest = flag.field if flag.to_field is None else flag.flag.lstrip("-").replace("-", "_")
        value = getattr(ns, dest)
        if value is not None:
            engine[flag.field] = flag.to_field(value) if flag.to_field else value
    if ns.kv_transfer_config:
        kv, kv_engine = kv_transfer_settings(ns.kv_transfer_config)
        args["kv_transfer"] = {**(args.get("kv_transfer") or {}), **kv}
        engine.update(kv_engine)
    args["engine"] = engine
    args = parallel_settings(ns, args)
    args = autoscaling_settings(ns, args)
    if str(engine.get("device", "cpu")).startswith("cuda"):
        args["pools"] = gpu_pools(args.get("pools") or {})
    return args


def gpu_pools(pools: dict) -> dict:
    """Each engine pool asks Ray for a GPU per replica (where it asked for none), so Ray
    places engines on GPU nodes and sets CUDA_VISIBLE_DEVICES for them."""
    pools = copy.deepcopy(pools)
    for name in GPU_POOLS:
        pool = pools.setdefault(name, {})
        if not pool.get("num_gpus"):
            pool["num_gpus"] = 1
    return pools

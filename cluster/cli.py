"""`tandem` command line: `tandem serve` and `tandem bench serve`."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from pathlib import Path

import yaml

CONFIG = Path(__file__).resolve().parent.parent / "config.yaml"


def default_args() -> dict:
    """The application settings that config.yaml deploys (one source of truth)."""
    if CONFIG.is_file():
        return yaml.safe_load(CONFIG.read_text())["applications"][0]["args"]
    return {"model": "default"}


def serve_main(ns: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from cluster.app import build_app

    args = default_args()
    if ns.model:
        args["model"] = ns.model
        args["served_model_name"] = ns.served_model_name or Path(ns.model).name
    if ns.device:
        args.setdefault("engine", {})["device"] = ns.device
    args["mode"] = ns.mode
    if ns.api_key:
        args["api_key"] = ns.api_key
    started_ray = not ray.is_initialized()
    ray.init(address=ns.address, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    serve.start(http_options={"host": ns.host, "port": ns.port})
    serve.run(build_app(args), name="tandem", route_prefix="/", blocking=False)
    base = f"http://{ns.host}:{ns.port}"
    print(f"Tandem is serving {args.get('served_model_name') or 'tandem-default'} ({ns.mode}) on {base}\n"
          f"  OpenAI API : {base}/v1  (try: curl {base}/v1/models)\n"
          f"  metrics    : {base}/metrics\n"
          f"  API docs   : {base}/docs\n"
          f"Ctrl-C stops it.", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with contextlib.suppress(KeyboardInterrupt):   # Ctrl-C is the normal way to stop
        stop.wait()
    print("shutting down...", flush=True)
    serve.shutdown()
    if started_ray:
        ray.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tandem", description="Serve MoE language models on Ray")
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve the OpenAI-compatible API (the embedded default model if no --model)")
    s.add_argument("--model", help="Hugging Face checkpoint folder (default: the embedded default model)")
    s.add_argument("--served-model-name")
    s.add_argument("--device", choices=["cpu", "cuda"])
    s.add_argument("--mode", default="pd", choices=["pd", "colocated"],
                   help="pd: a prefill engine hands KV to a decode engine over NIXL (default); "
                        "colocated: one pool does prefill and decode")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes")
    s.add_argument("--address", default=None, help="Ray cluster address (default: start a local instance)")
    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench", required=True)
    from cluster.bench_serve import add_arguments
    add_arguments(bsub.add_parser("serve", help="load-test an OpenAI-compatible server"))
    ns = ap.parse_args(argv)
    if ns.command == "serve":
        return serve_main(ns)
    from cluster.bench_serve import run
    return run(ns)


if __name__ == "__main__":
    sys.exit(main())

"""`tandem` command line: `tandem serve` (vllm serve's shape) and `tandem bench serve`
(vllm bench serve's options)."""

from __future__ import annotations

import argparse
import sys


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Wider option column, so each option's help line (with its default) stays readable."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=40, width=110)


def parser() -> argparse.ArgumentParser:
    from cluster.bench_serve import add_arguments as add_bench_arguments
    from cluster.serve_args import add_serve_arguments

    ap = argparse.ArgumentParser(prog="tandem", description="Serve MoE language models on Ray",
                                 formatter_class=HelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve", formatter_class=HelpFormatter,
        help="serve the OpenAI-compatible API (like `vllm serve`)",
        description="Serve MODEL with the OpenAI-compatible API, on Ray Serve. Settings: config.yaml, "
                    "then --config FILE, then the flags below.",
        epilog="example: tandem serve /models/DeepSeek-V2-Lite --device cuda --max-model-len 8192")
    add_serve_arguments(serve)
    bench = sub.add_parser("bench", help="benchmarks", formatter_class=HelpFormatter)
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    add_bench_arguments(bench_sub.add_parser(
        "serve", formatter_class=HelpFormatter, help="load-test an OpenAI-compatible server (like `vllm bench serve`)",
        description="Load-test an OpenAI-compatible server with vllm bench serve's options."))
    return ap


def main(argv: list[str] | None = None) -> int:
    ns = parser().parse_args(argv)
    if ns.command == "serve":
        from cluster.serve_cli import serve_main
        return serve_main(ns)
    from cluster.bench_serve import run
    return run(ns)


if __name__ == "__main__":
    sys.exit(main())

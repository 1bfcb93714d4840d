"""The offline API: `LLM(model=...).generate(prompts, sampling_params)`.

`LLM` drives any engine client (engine/engine_client.py): one EngineCore by default;
`data_parallel_size=N, enable_expert_parallel=True` an EPEngine of N local rank
processes; `enable_eplb=True` the client eplb registers. Or pass `engine_client=`
built elsewhere (e.g. by eplb's factory): the same client a served pool drives.
"""

from __future__ import annotations

import itertools
from dataclasses import fields
from typing import Self

from engine.config import EngineConfig
from engine.engine_client import (
    EngineClient,
    ModelFiles,
    ParallelConfig,
    Prompt,
    build_engine_client,
    pair_prompts,
)
from engine.output_processor import apply_output, new_output
from engine.outputs import RequestOutput
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.tokenizer import IncrementalDetokenizer

__all__ = ["LLM", "Prompt"]


class LLM:
    def __init__(self, model: str = "default", *, engine_client: EngineClient | None = None,
                 **engine_args) -> None:
        if "cuda_graphs" in engine_args:        # short name for enable_cuda_graphs
            engine_args["enable_cuda_graphs"] = engine_args.pop("cuda_graphs")
        parallel_names = {f.name for f in fields(ParallelConfig)}
        parallel_args = {k: engine_args.pop(k) for k in list(engine_args) if k in parallel_names}
        unknown = set(engine_args) - {f.name for f in fields(EngineConfig)}
        if unknown:
            raise TypeError(f"unknown engine arguments: {', '.join(sorted(unknown))}")
        if engine_client is not None and (engine_args or parallel_args):
            raise TypeError("pass engine arguments or an engine_client, not both")
        self.config = engine_client.config if engine_client is not None else EngineConfig(model=model, **engine_args)
        self.files = ModelFiles.load(self.config)
        self.tokenizer = self.files.tokenizer
        self.eos_token_ids = self.files.eos_token_ids
        self.engine = engine_client or build_engine_client(self.config, ParallelConfig(**parallel_args), self.files)
        self._ids = itertools.count()

    def encode(self, prompt: Prompt) -> list[int]:
        return self.files.encode(prompt)

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def generate(self, prompts: Prompt | list[Prompt],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        prompts, params = pair_prompts(prompts, sampling_params)

        results: dict[str, RequestOutput] = {}
        detoks: dict[str, IncrementalDetokenizer] = {}
        for i, (prompt, sp) in enumerate(zip(prompts, params)):
            rid = str(next(self._ids))
            try:
                ids = self.encode(prompt)
                self.engine.add_request(Request(rid, ids, sp, self.eos_token_ids))
            except ValueError as e:
                self.engine.abort_requests(list(results))   # leave the engine as it was
                raise ValueError(f"prompt {i}: {e}") from e
            results[rid] = new_output(rid, prompt, ids, sp)
            detoks[rid] = IncrementalDetokenizer(self.tokenizer, sp.stop)

        while self.engine.has_unfinished():
            for out in self.engine.step():
                if out.request_id in results:
                    apply_output(self.engine, results[out.request_id], detoks[out.request_id], out)
        for rid, res in results.items():
            res.outputs[0].text = detoks[rid].text
        return list(results.values())

"""The offline API: `LLM(model=...).generate(prompts, sampling_params)`."""

from __future__ import annotations

import itertools
import json
from dataclasses import fields
from pathlib import Path

from engine.config import EngineConfig
from engine.core.engine_core import EngineCore, EngineCoreOutput
from engine.default_model import default_model_path
from engine.models.loader import load_config
from engine.outputs import CompletionOutput, RequestOutput
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.tokenizer import IncrementalDetokenizer, load_tokenizer

Prompt = str | list[int]


def resolve_model_path(model: str) -> Path:
    return default_model_path() if model == "default" else Path(model)


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


def apply_output(core: EngineCore, result: RequestOutput, detok: IncrementalDetokenizer,
                 out: EngineCoreOutput) -> str:
    """Fold one engine-core update into a request's output: tokens, logprobs, text, and
    stop strings (a stop string seen by the detokenizer finishes the request in the core).
    Returns the new text."""
    comp = result.outputs[0]
    comp.token_ids.extend(out.new_token_ids)
    if comp.logprobs is not None:
        comp.logprobs.extend(out.new_logprobs)
    delta = detok.add(out.new_token_ids, final=out.finish_reason is not None)
    reason = out.finish_reason
    if detok.stopped and reason is None:
        core.abort_requests([result.request_id], RequestStatus.FINISHED_STOPPED)
        reason = "stop"
    comp.text = detok.text
    comp.finish_reason = reason
    result.finished = reason is not None
    if out.kv_transfer_params is not None:
        result.kv_transfer_params = out.kv_transfer_params
    if out.prompt_logprobs is not None:
        result.prompt_logprobs = out.prompt_logprobs
    return delta


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


class LLM:
    def __init__(self, model: str = "default", **engine_args) -> None:
        if "cuda_graphs" in engine_args:        # short name for enable_cuda_graphs
            engine_args["enable_cuda_graphs"] = engine_args.pop("cuda_graphs")
        known = {f.name for f in fields(EngineConfig)}
        unknown = set(engine_args) - known
        if unknown:
            raise TypeError(f"unknown engine arguments: {', '.join(sorted(unknown))}")
        self.config = EngineConfig(model=model, **engine_args)
        path = resolve_model_path(model)
        model_config = load_config(path)
        self.tokenizer = load_tokenizer(self.config.tokenizer or path)
        self.eos_token_ids = eos_token_ids(path, model_config, self.tokenizer)
        self.engine = EngineCore(self.config, model_config, str(path))
        self._ids = itertools.count()

    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model folder has no tokenizer; pass prompts as token-id lists")
            return self.tokenizer.encode(prompt)
        if not all(isinstance(t, int) for t in prompt):
            raise ValueError("a prompt must be a string or a list of token ids")
        return list(prompt)

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
            results[rid] = RequestOutput(rid, prompt if isinstance(prompt, str) else None, ids,
                                         [CompletionOutput(0, "", [], None, [] if sp.logprobs is not None else None)])
            detoks[rid] = IncrementalDetokenizer(self.tokenizer, sp.stop)

        while self.engine.has_unfinished():
            for out in self.engine.step():
                apply_output(self.engine, results[out.request_id], detoks[out.request_id], out)
        for rid, res in results.items():
            res.outputs[0].text = detoks[rid].text
        return list(results.values())

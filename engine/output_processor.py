"""Folding an engine client's token updates into a user's `RequestOutput`: tokens,
logprobs, text and stop strings. Shared by every front end, so stop strings end a
request the same way offline and served."""

from __future__ import annotations

from engine.core.engine_core import EngineCoreOutput
from engine.outputs import CompletionOutput, RequestOutput
from engine.request import RequestStatus
from engine.sampling_params import SamplingParams
from engine.tokenizer import IncrementalDetokenizer


def apply_output(client, result: RequestOutput, detok: IncrementalDetokenizer, out: EngineCoreOutput) -> str:
    """Fold one update into a request's output; a stop string seen by the detokenizer
    finishes the request in `client` (an EngineClient). Returns the new text."""
    comp = result.outputs[0]
    comp.token_ids.extend(out.new_token_ids)
    if comp.logprobs is not None:
        comp.logprobs.extend(out.new_logprobs)
    delta = detok.add(out.new_token_ids, final=out.finish_reason is not None)
    reason = out.finish_reason
    if detok.stopped and reason is None:
        client.abort_requests([result.request_id], RequestStatus.FINISHED_STOPPED)
        reason = "stop"
    comp.text = detok.text
    comp.finish_reason = reason
    result.finished = reason is not None
    if out.kv_transfer_params is not None:
        result.kv_transfer_params = out.kv_transfer_params
    if out.prompt_logprobs is not None:
        result.prompt_logprobs = out.prompt_logprobs
    return delta


def new_output(request_id: str, prompt, prompt_ids: list[int], params: SamplingParams) -> RequestOutput:
    """The empty output a request's updates are folded into."""
    return RequestOutput(request_id, prompt if isinstance(prompt, str) else None, prompt_ids,
                         [CompletionOutput(0, "", [], None, [] if params.logprobs is not None else None)])

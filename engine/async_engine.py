"""AsyncEngine: the engine core loop in a background thread, streaming to asyncio.

`async for out in engine.generate(prompt, params, request_id)` yields a
`RequestOutput` per new token (text delta in `.outputs[0].text`, cumulative token ids).
Cancelling the consumer (a client disconnect) aborts the request and frees its
blocks. When the waiting queue is full, `generate` refuses at once with
`EngineOverloaded` instead of queueing without bound.

It drives any engine client (engine/engine_client.py): an EngineCore, or an EPEngine
whose ranks run in other processes; pass one built elsewhere (`engine_client=`) or let
the parallel settings pick it.

Failures are kept as small as they can be: an error while admitting or delivering one
request fails that request alone (its stream raises, its blocks are freed) and the loop
goes on. An error inside a step cannot be pinned on one request: every request in
flight gets `EngineDead`, the traceback is logged, and the engine refuses new work, so
`check_health()` fails and a supervisor (Ray Serve) replaces it; nothing waits forever.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import torch

from engine.config import EngineConfig
from engine.core.engine_core import EngineCoreOutput
from engine.engine_client import (
    EngineClient,
    ModelFiles,
    ParallelConfig,
    build_engine_client,
)
from engine.engine_stats import EngineStats
from engine.kv_transfer import KVConnectorSpec, KVTransferFailed, TransferObserver
from engine.kv_transfer_params import KVTransferParams
from engine.output_processor import apply_output, new_output
from engine.outputs import CompletionOutput, RequestOutput
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.tokenizer import IncrementalDetokenizer

log = logging.getLogger(__name__)


class EngineOverloaded(RuntimeError):
    """Too many requests are waiting; the caller should retry later (HTTP 503)."""


class EngineDead(RuntimeError):
    """The engine loop stopped on an internal error (or stalled); it takes no more work."""


class EngineDown(EngineDead):
    """The engine had already stopped when the request came: it never ran there, so it
    may go to another engine as it is."""


class RequestFailed(RuntimeError):
    """One request failed inside the engine for a reason other than its input; the
    engine goes on with the others."""


@dataclass
class StreamDelta:
    """One update of a streamed request, with the timings the metrics need."""
    output: RequestOutput
    text_delta: str
    new_token_ids: list[int]
    new_logprobs: list[dict[int, float]]
    num_cached_tokens: int = 0
    prompt_logprobs: list[dict[int, float] | None] | None = None   # on the first delta, when asked for


class _Stream:
    def __init__(self, loop: asyncio.AbstractEventLoop, detok: IncrementalDetokenizer, result: RequestOutput):
        self.loop, self.detok, self.result = loop, detok, result
        self.queue: asyncio.Queue = asyncio.Queue()


class AsyncEngine:
    def __init__(self, config: EngineConfig | None = None, max_waiting: int = 256,
                 kv_transfer: KVConnectorSpec | None = None,
                 stall_timeout_s: float = 120.0, *, engine_client: EngineClient | None = None,
                 parallel: ParallelConfig | None = None, kv_observer: TransferObserver | None = None) -> None:
        """kv_transfer: the KV connector for disaggregated prefill/decode, built beside
        each engine core (in this process, or in every rank of an expert-parallel engine);
        kv_observer is told of every transfer (metrics)."""
        if (config is None) == (engine_client is None):
            raise TypeError("pass an EngineConfig or an engine_client (one of them)")
        if engine_client is not None and parallel is not None:
            raise TypeError("parallel settings build a client; pass them or an engine_client, not both")
        self.config = config = engine_client.config if engine_client is not None else config
        self.files = ModelFiles.load(config)
        self.tokenizer = self.files.tokenizer
        self.eos_token_ids = self.files.eos_token_ids
        # The engine client; named core because a single-process engine's is its EngineCore.
        self.core: EngineClient = engine_client or build_engine_client(config, parallel, self.files)
        # The connector, where it lives in this process (an EngineCore's); None when the
        # ranks of an expert-parallel engine each run their own.
        self.kv_transfer = None
        self.kv_observer = kv_observer
        if kv_transfer is not None:
            try:
                self.kv_transfer = self.core.set_kv_connector(kv_transfer, kv_observer)
            except BaseException:
                self.core.shutdown()
                raise
        if hasattr(self.core, "output_sink"):    # an EP engine's own steps (a scale) stream at once
            self.core.output_sink = self._deliver
        if hasattr(self.core, "command_pump"):   # and take in new requests and aborts meanwhile
            self.core.command_pump = self._take_commands
        self.max_model_len = self.core.limits.max_model_len
        self.max_waiting = max_waiting
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._deferred: deque = deque()     # run_in_loop calls sent while one runs: after it
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self.error: BaseException | None = None
        # The loop's heartbeat: it beats at least every poll interval when idle and once
        # per step when busy; a step that never returns shows as a stale beat.
        self.stall_timeout_s = stall_timeout_s
        self.heartbeat = time.monotonic()
        self._in_call = False
        self._thread = threading.Thread(target=self._loop, name="engine-core", daemon=True)
        self._thread.start()

    # -- public --------------------------------------------------------------------
    def encode(self, prompt: str | list[int]) -> list[int]:
        return self.files.encode(prompt)

    async def generate(self, prompt: str | list[int], params: SamplingParams, request_id: str,
                       kv_transfer_params: KVTransferParams | None = None,
                       output_prefix: list[int] | None = None) -> AsyncIterator[StreamDelta]:
        """Stream the request's new tokens. `output_prefix`: tokens already generated for
        it elsewhere (a stream resumed after its engine was lost): they are recomputed as
        output, not prompt, so max_tokens and the penalties count them as before, and
        only the tokens after them are streamed."""
        if self.error is not None:
            raise EngineDown(f"the engine stopped: {self.error!r}")
        ids = self.encode(prompt)
        with self._lock:
            if len(self._streams) >= self.max_in_flight:
                raise EngineOverloaded(f"{len(self._streams)} requests in flight; retry later")
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            result = new_output(request_id, prompt, ids, params)
            stream = _Stream(asyncio.get_running_loop(), IncrementalDetokenizer(self.tokenizer, params.stop), result)
            self._streams[request_id] = stream
        req = Request(request_id, ids, params, self.eos_token_ids, arrival_time=time.monotonic(),
                      kv_transfer_params=kv_transfer_params, output_token_ids=list(output_prefix or []))
        added = asyncio.get_running_loop().create_future()
        self._commands.put(("add", req, added))
        try:
            await added      # validation errors surface here, before anything streams
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.output.finished:
                    return
        finally:
            if not stream.result.finished:
                self.abort(request_id)
            with self._lock:
                self._streams.pop(request_id, None)

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError for a request this engine would refuse, without running it."""
        self.core.validate(Request("check", prompt_token_ids, params))

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id, None))

    async def run_in_loop(self, fn: Callable[[EngineClient], Any]) -> Any:
        """Run `fn(client)` on the loop thread between two steps (the one thread that
        may touch the client, e.g. to scale an EP engine) and return its result, or
        raise its error. A client with `output_sink` / `command_pump` (an EP engine)
        streams the tokens of steps it takes itself at once and takes in requests and
        aborts sent meanwhile between those steps; with another client they wait until
        it returns. Another call sent meanwhile runs after it."""
        if self.error is not None:
            raise EngineDown(f"the engine stopped: {self.error!r}")
        done = asyncio.get_running_loop().create_future()
        self._commands.put(("call", fn, done))
        return await done

    def check_health(self) -> None:
        """Raise EngineDead if the loop stopped on an error or has not beaten for
        `stall_timeout_s` (a hung step); a supervisor replaces an engine that fails this."""
        if self.error is not None:
            raise EngineDead(f"the engine stopped: {self.error!r}")
        if not self._thread.is_alive():
            raise EngineDead("the engine loop is not running")
        silent = time.monotonic() - self.heartbeat
        # A run_in_loop call (scaling, loading new ranks) has its own time limits.
        if silent > self.stall_timeout_s and not self._in_call:
            raise EngineDead(f"the engine loop has not completed a step for {silent:.0f} s")

    @property
    def max_in_flight(self) -> int:
        """Requests the engine holds at once: running plus waiting, up to their limits."""
        return self.max_waiting + self.config.max_num_seqs

    def shutdown(self) -> None:
        self._stopped.set()
        self._commands.put(("wake", None, None))
        self._thread.join(timeout=10)
        if self.kv_transfer is not None:
            self.kv_transfer.close()
        self.core.shutdown()

    @property
    def limits(self):
        return self.core.limits

    def engine_stats(self) -> EngineStats:
        return self.core.engine_stats()

    def stats(self) -> dict[str, float]:
        """The engine's load, under the metric names (without the prefix) it feeds."""
        return self.engine_stats().as_metrics()

    @property
    def num_running(self) -> int:
        return self.core.engine_stats().num_running

    @property
    def num_waiting(self) -> int:
        return self.core.engine_stats().num_waiting

    # -- the loop thread ---------------------------------------------------------------
    def _loop(self) -> None:
        device = getattr(self.core, "device", None)    # an EP coordinator runs no kernels
        if device is not None and device.type == "cuda":
            torch.cuda.set_device(device)   # kernels launch on the thread's device
        try:
            while not self._stopped.is_set():
                self.heartbeat = time.monotonic()
                self._drain_commands(self.core.poll_interval())
                if self.core.has_pending_work:
                    for out in self.core.step():
                        self._deliver(out)
        except BaseException as e:  # report to every waiter instead of hanging them
            log.exception("engine step failed; failing %d requests in flight and refusing new work",
                          len(self._streams))
            self.error = e
            for stream in list(self._streams.values()):
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, EngineDead(f"engine stopped: {e!r}"))
            while True:     # requests and run_in_loop calls still waiting for their turn
                try:
                    _, fut = self._deferred.popleft()
                except IndexError:
                    try:
                        _, _, fut = self._commands.get_nowait()
                    except queue.Empty:
                        break
                if fut is not None:
                    fut.get_loop().call_soon_threadsafe(_settle, fut, EngineDead(f"engine stopped: {e!r}"))

    def _drain_commands(self, wait_s: float | None, calls: bool = True) -> None:
        """Carry out the commands sent; calls=False (from inside a run_in_loop call, between
        its steps) leaves other calls for after it."""
        while calls and self._deferred:
            self._call(*self._deferred.popleft())
        try:
            cmd = self._commands.get(timeout=wait_s) if wait_s else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, arg, fut = cmd
            if kind == "add":
                self._add(arg, fut)
            elif kind == "abort":
                self.core.abort_requests([arg])
            elif kind == "call" and calls:
                self._call(arg, fut)
            elif kind == "call":
                self._deferred.append((arg, fut))
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return

    def _take_commands(self) -> None:
        """The client's command_pump: new requests and aborts, between a call's steps."""
        self.heartbeat = time.monotonic()
        self._drain_commands(None, calls=False)

    def _add(self, req: Request, fut: asyncio.Future) -> None:
        stream = self._streams.get(req.request_id)
        if stream is None:      # the client went away before its request was added
            return
        try:
            self.core.add_request(req)
        except ValueError as e:
            stream.loop.call_soon_threadsafe(_settle, fut, e)
            return
        except Exception as e:      # admission never touched the batch: fail this request only
            log.exception("admitting request %s failed", req.request_id)
            self.core.abort_requests([req.request_id])
            stream.loop.call_soon_threadsafe(_settle, fut, RequestFailed(f"the engine could not admit it: {e!r}"))
            return
        stream.loop.call_soon_threadsafe(_settle, fut, None)

    def _call(self, fn: Callable[[EngineClient], Any], fut: asyncio.Future) -> None:
        self._in_call = True
        try:
            result, error = fn(self.core), None
        except Exception as e:  # noqa: BLE001  (the caller's error, handed to the caller)
            result, error = None, e
        finally:
            self._in_call = False
            self.heartbeat = time.monotonic()
        loop = fut.get_loop()
        loop.call_soon_threadsafe(_settle, fut, error, result)

    def _deliver(self, out: EngineCoreOutput) -> None:
        stream = self._streams.get(out.request_id)
        if stream is None:
            return
        try:
            self._deliver_to(stream, out)
        except Exception as e:      # e.g. detokenizing: this request fails, the batch goes on
            log.exception("delivering tokens of request %s failed", out.request_id)
            self.core.abort_requests([out.request_id])
            stream.result.finished = True
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, RequestFailed(repr(e)))

    def _deliver_to(self, stream: _Stream, out: EngineCoreOutput) -> None:
        if out.error is not None:
            stream.result.finished = True
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, KVTransferFailed(out.error))
            return
        delta = apply_output(self.core, stream.result, stream.detok, out)
        item = StreamDelta(_snapshot(stream.result), delta, list(out.new_token_ids), list(out.new_logprobs),
                           out.num_cached_tokens, out.prompt_logprobs)
        stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)


def _settle(fut: asyncio.Future, error: BaseException | None, result: Any = None) -> None:
    if fut.done():
        return
    if error is None:
        fut.set_result(result)
    else:
        fut.set_exception(error)


def _snapshot(r: RequestOutput) -> RequestOutput:
    c = r.outputs[0]
    comp = CompletionOutput(c.index, c.text, list(c.token_ids), c.finish_reason,
                            None if c.logprobs is None else list(c.logprobs))
    return RequestOutput(r.request_id, r.prompt, r.prompt_token_ids, [comp], r.finished, r.kv_transfer_params,
                         r.prompt_logprobs)

"""A prefill engine served over ZeroMQ, for deployments without Ray (and benchmarks):
`PrefillService` runs in the prefill process, `PrefillClient` is the decode side's
`PrefillFn`. Requests and replies are msgpack maps; many requests are in flight at once
over one socket, matched by a call id.
"""

from __future__ import annotations

import asyncio
import itertools

import msgpack
import zmq
import zmq.asyncio

from disagg.prefill_decode import prefill_request
from engine.async_engine import AsyncEngine, EngineOverloaded


def _pack(obj) -> bytes:
    return msgpack.packb(obj)


def _unpack(data: bytes):
    return msgpack.unpackb(data, strict_map_key=False)   # logprob maps have int keys


class PrefillService:
    """Answers prefill requests with `prefill_request` on one engine."""

    def __init__(self, engine: AsyncEngine, host: str = "127.0.0.1", port: int = 0) -> None:
        self.engine = engine
        self._sock = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self.port = self._sock.bind_to_random_port(f"tcp://{host}") if not port else port
        if port:
            self._sock.bind(f"tcp://{host}:{port}")
        self.address = f"tcp://{host}:{self.port}"
        self._tasks: set[asyncio.Task] = set()

    async def serve_forever(self) -> None:
        while True:
            ident, body = await self._sock.recv_multipart()
            task = asyncio.create_task(self._answer(ident, body))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _answer(self, ident: bytes, body: bytes) -> None:
        try:
            call_id, request = _unpack(body)
        except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
            return      # not ours; nothing to answer to
        try:
            reply = {"ok": await prefill_request(self.engine, request)}
        except ValueError as e:
            reply = {"error": str(e), "kind": "bad_request"}
        except EngineOverloaded as e:
            reply = {"error": str(e), "kind": "overloaded"}
        except Exception as e:      # tell the caller instead of leaving it waiting
            reply = {"error": f"{type(e).__name__}: {e}", "kind": "internal"}
        await self._sock.send_multipart([ident, _pack([call_id, reply])])


class PrefillError(RuntimeError):
    """The prefill service failed the request (not the caller's fault)."""


class PrefillClient:
    """Calls a PrefillService; one instance per event loop."""

    def __init__(self, address: str, timeout_s: float = 60.0) -> None:
        self._sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(address)
        self.timeout_s = timeout_s
        self._ids = itertools.count()
        self._waiting: dict[int, asyncio.Future] = {}
        self._reader: asyncio.Task | None = None

    async def __call__(self, request: dict) -> dict:
        if self._reader is None:
            self._reader = asyncio.create_task(self._read())
        call_id = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._waiting[call_id] = fut
        try:
            await self._sock.send(_pack([call_id, request]))
            reply = await asyncio.wait_for(fut, self.timeout_s)
        finally:
            self._waiting.pop(call_id, None)
        if "ok" in reply:
            return reply["ok"]
        if reply.get("kind") == "bad_request":
            raise ValueError(reply["error"])
        raise PrefillError(reply["error"])

    async def _read(self) -> None:
        while True:
            call_id, reply = _unpack(await self._sock.recv())
            fut = self._waiting.get(call_id)
            if fut is not None and not fut.done():
                fut.set_result(reply)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        self._sock.close(0)

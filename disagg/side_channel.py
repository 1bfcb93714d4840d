"""The side channel: a small ZeroMQ service through which a consumer engine fetches a
producer's NIXL agent metadata and KV layout before its first READ.

Messages are msgpack maps (never pickle: this crosses hosts). The server answers from a
daemon thread with data fixed at start-up, so it never touches the engine's state.
"""

from __future__ import annotations

import threading

import msgpack
import zmq


class SideChannelError(RuntimeError):
    """The peer did not answer, or answered with something we cannot use."""


class SideChannelServer:
    def __init__(self, metadata: dict, host: str = "127.0.0.1", port: int = 0) -> None:
        self._reply = msgpack.packb({"ok": True, **metadata})
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        if port:
            self._sock.bind(f"tcp://{host}:{port}")
            self.port = port
        else:
            self.port = self._sock.bind_to_random_port(f"tcp://{host}")
        self.host = host
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="kv-side-channel", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(100):
                continue
            ident, _, body = self._sock.recv_multipart()
            try:
                msg = msgpack.unpackb(body)
                ok = isinstance(msg, dict) and msg.get("op") == "metadata"
            except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
                ok = False
            reply = self._reply if ok else msgpack.packb({"ok": False, "error": "unknown request"})
            self._sock.send_multipart([ident, b"", reply])
        self._sock.close(0)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


def fetch_metadata(host: str, port: int, timeout_s: float) -> dict:
    """Ask a producer's side channel for its metadata; raises SideChannelError."""
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, int(timeout_s * 1000))
    sock.setsockopt(zmq.SNDTIMEO, int(timeout_s * 1000))
    try:
        sock.connect(f"tcp://{host}:{port}")
        sock.send(msgpack.packb({"op": "metadata"}))
        reply = msgpack.unpackb(sock.recv())
    except zmq.Again as e:
        raise SideChannelError(f"no answer from the side channel at {host}:{port} within {timeout_s} s") from e
    except (zmq.ZMQError, ValueError) as e:
        raise SideChannelError(f"side channel at {host}:{port}: {e}") from e
    finally:
        sock.close(0)
    if not isinstance(reply, dict) or not reply.get("ok"):
        raise SideChannelError(f"side channel at {host}:{port} refused: {reply!r:.200}")
    return reply

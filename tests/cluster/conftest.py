import socket
import threading
import time

import pytest
import uvicorn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """An ASGI app on a free loopback port, served by uvicorn in a thread."""

    def __init__(self, app) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def api_server():
    """The OpenAI API over a real AsyncEngine on the default model, served by uvicorn."""
    from cluster.metrics import Metrics
    from cluster.openai_api import build_api
    from cluster.request_metrics import SLO
    from engine.async_engine import AsyncEngine
    from engine.config import EngineConfig

    engine = AsyncEngine(EngineConfig(max_model_len=256, max_num_seqs=4), max_waiting=4)
    metrics = Metrics("tandem-default", "colocated")
    app = build_api(engine, "tandem-default", metrics, SLO(ttft_ms=60000, itl_ms=60000), api_key="sekret")
    served = Served(app)
    yield served.url, engine
    served.stop()
    engine.shutdown()

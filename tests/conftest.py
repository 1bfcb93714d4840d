import os

import pytest
import torch

# Tests write the embedded default model into a per-run cache, never the user's.
os.environ.setdefault("TANDEM_CACHE", os.path.join(os.path.dirname(__file__), "..", ".cache", "tandem-test"))
torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def default_llm():
    from engine import LLM
    return LLM("default", max_model_len=256, max_num_seqs=8)

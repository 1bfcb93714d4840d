import pytest


@pytest.fixture(scope="session")
def default_llm():
    from engine import LLM
    return LLM("default", max_model_len=256, max_num_seqs=8)

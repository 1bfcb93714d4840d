from collections.abc import Callable

import pytest
import torch
from torch import Tensor


def _zipf_load(layers: int, experts: int, exponent: float, seed: int, tokens: int = 2048, topk: int = 4) -> Tensor:
    """Token counts [layers, experts]: Zipf-like popularity (hot experts differ per
    layer), each token picking `topk` distinct experts (Gumbel top-k sampling)."""
    gen = torch.Generator().manual_seed(seed)
    rank = torch.rand(layers, experts, generator=gen).argsort(1).argsort(1) + 1
    logits = -exponent * rank.double().log()
    gumbel = -torch.rand(layers, tokens, experts, generator=gen).log().neg().log()
    chosen = (logits.unsqueeze(1) + gumbel).topk(topk, dim=-1).indices.flatten(1)
    return torch.zeros(layers, experts).scatter_add_(1, chosen, torch.ones(chosen.shape))


@pytest.fixture
def zipf_load() -> Callable[..., Tensor]:
    return _zipf_load

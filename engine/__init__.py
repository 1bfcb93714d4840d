"""Tandem's engine: one replica's scheduler, KV cache, model runner and models.

This layer knows nothing of Ray or of the layers above it.
"""

from engine.config import EngineConfig
from engine.engine_client import EngineClient, ParallelConfig
from engine.llm import LLM
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling_params import SamplingParams

__all__ = [
           "LLM",
           "CompletionOutput",
           "EngineClient",
           "EngineConfig",
           "ParallelConfig",
           "RequestOutput",
           "SamplingParams",
]

"""What an engine can take: the checks of a request against the model and settings.

One definition, used by the engine core when a request arrives and by a front end
(the router) before it sends one, so both refuse the same requests with the same words.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class RequestLimits:
    max_model_len: int
    vocab_size: int
    max_logprobs: int

    @classmethod
    def for_model(cls, config, model_config) -> "RequestLimits":
        """The limits of an engine with `config` (EngineConfig) serving `model_config`."""
        max_model_len = config.max_model_len or getattr(model_config, "max_position_embeddings", 4096)
        return cls(max_model_len, model_config.vocab_size, config.max_logprobs)

    def check(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError, saying what to change, for a request the engine cannot run."""
        n = len(prompt_token_ids)
        if n == 0:
            raise ValueError("the prompt is empty; send at least one token")
        if n >= self.max_model_len:
            raise ValueError(f"the prompt has {n} tokens but max_model_len is {self.max_model_len} (the "
                             f"prompt and at least one new token must fit); shorten the prompt")
        if n + params.max_tokens > self.max_model_len:
            raise ValueError(f"the prompt ({n} tokens) plus max_tokens ({params.max_tokens}) exceeds "
                             f"max_model_len {self.max_model_len}; lower max_tokens or shorten the prompt")
        vocab = self.vocab_size
        if any(type(t) is not int or not 0 <= t < vocab for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        if params.top_k > vocab:
            raise ValueError(f"top_k must be -1 (disabled) or in [1, {vocab}] (the vocabulary size), "
                             f"got {params.top_k}")
        for name in ("logprobs", "prompt_logprobs"):
            lp = getattr(params, name)
            if lp is not None and lp > self.max_logprobs:
                raise ValueError(f"{name}={lp} is above the engine's max_logprobs={self.max_logprobs}")
        if params.logit_bias and max(params.logit_bias) >= vocab:
            raise ValueError(f"logit_bias token ids must be in [0, {vocab}) (the vocabulary)")

    def check_output_prefix(self, output_token_ids: list[int], params: SamplingParams) -> None:
        """Tokens a resumed request generated before: valid ids, fewer than max_tokens."""
        if len(output_token_ids) >= params.max_tokens:
            raise ValueError(f"{len(output_token_ids)} tokens already generated, max_tokens is {params.max_tokens}")
        if any(type(t) is not int or not 0 <= t < self.vocab_size for t in output_token_ids):
            raise ValueError(f"generated token ids must be integers in [0, {self.vocab_size})")

"""Prompts for `tandem bench serve`: vLLM's `random` dataset (token lengths drawn around
--random-input-len/--random-output-len) and a local ShareGPT-format JSON file (the first
human turn is the prompt, the reply's length is the output length). Nothing is
downloaded."""

from __future__ import annotations

import json
import random
import string
from dataclasses import dataclass
from pathlib import Path

# Token ids a random prompt draws from: below every tokenizer's vocabulary size.
RANDOM_VOCAB = 256
SHAREGPT_MIN_TOKENS = 4           # vLLM's filter: skip replies and prompts shorter than this
SHAREGPT_MAX_PROMPT_TOKENS = 1024


@dataclass
class Prompt:
    prompt: str | list[int]       # text, or token ids (completions only)
    prompt_len: int | None        # None when only the server can count it (from usage)
    output_len: int


def lengths(mean: int, ratio: float, n: int, rng: random.Random) -> list[int]:
    """n lengths uniform in [mean * (1 - ratio), mean * (1 + ratio)], at least 1."""
    low, high = max(1, int(mean * (1 - ratio))), max(1, int(mean * (1 + ratio)))
    return [rng.randint(low, high) for _ in range(n)]


def random_prompts(n: int, input_len: int, output_len: int, ratio: float, prefix_len: int,
                   rng: random.Random, tokenizer=None, as_text: bool = False) -> list[Prompt]:
    """Random token ids; as text (a chat backend) decoded with `tokenizer`, or without
    one, random words whose token count the server reports."""
    if not 0 <= ratio < 1:
        raise SystemExit(f"--random-range-ratio must be in [0, 1), got {ratio}")
    prefix = [rng.randrange(RANDOM_VOCAB) for _ in range(prefix_len)]
    prompts = []
    for in_len, out_len in zip(lengths(input_len, ratio, n, rng), lengths(output_len, ratio, n, rng)):
        ids = prefix + [rng.randrange(RANDOM_VOCAB) for _ in range(in_len)]
        if not as_text:
            prompts.append(Prompt(ids, len(ids), out_len))
        elif tokenizer is not None:
            prompts.append(Prompt(tokenizer.decode(ids), None, out_len))
        else:
            words = " ".join("".join(rng.choices(string.ascii_lowercase, k=4)) for _ in range(len(ids)))
            prompts.append(Prompt(words, None, out_len))
    return prompts


def sharegpt_prompts(path: str | Path, n: int, rng: random.Random, tokenizer=None,
                     output_len: int | None = None) -> list[Prompt]:
    """`n` conversations of a ShareGPT JSON file (a list of {"conversations": [{"from",
    "value"}, ...]}), shuffled by the seed. The output length is the reply's token count
    (with a tokenizer) or --sharegpt-output-len."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"--dataset-path {path}: cannot read a ShareGPT JSON file: {e}") from None
    pairs = [(c["conversations"][0]["value"], c["conversations"][1]["value"])
             for c in data if len(c.get("conversations", [])) >= 2]
    rng.shuffle(pairs)
    if output_len is None and tokenizer is None:
        raise SystemExit("--dataset-name sharegpt needs a tokenizer to count reply tokens: pass --tokenizer "
                         "PATH, or --sharegpt-output-len N")
    prompts = []
    for prompt, reply in pairs:
        prompt_len = len(tokenizer.encode(prompt, add_special_tokens=False)) if tokenizer is not None else None
        out_len = output_len if output_len is not None else len(tokenizer.encode(reply, add_special_tokens=False))
        if output_len is None and (out_len < SHAREGPT_MIN_TOKENS
                                   or (prompt_len or SHAREGPT_MIN_TOKENS) < SHAREGPT_MIN_TOKENS):
            continue
        if prompt_len is not None and prompt_len > SHAREGPT_MAX_PROMPT_TOKENS:
            continue
        prompts.append(Prompt(prompt, prompt_len, out_len))
        if len(prompts) == n:
            break
    if len(prompts) < n:
        raise SystemExit(f"{path} has only {len(prompts)} usable conversations, --num-prompts asks for {n}")
    return prompts

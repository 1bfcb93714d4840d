"""Schemathesis hooks for the fault suite (loaded through SCHEMATHESIS_HOOKS).

The one limit no schema can state is that a text prompt, once tokenized, must leave
room in max_model_len for a token: it depends on the tokenizer. Bodies whose prompt
would not fit (the server rightly answers 400) are left out of generation; the
embedded default model's tokenizer makes one token per UTF-8 byte, which gives a safe
upper bound here."""

from __future__ import annotations

import os

import schemathesis

MAX_MODEL_LEN = int(os.environ.get("TANDEM_TEST_MAX_MODEL_LEN", "256"))
PER_MESSAGE = 16        # role tags and newline of the fallback chat template, generously


def _tokens(body: dict) -> int | None:
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        return len(prompt)
    if isinstance(prompt, str):
        return len(prompt.encode("utf-8", "surrogatepass"))
    messages = body.get("messages")
    if isinstance(messages, list):
        n = PER_MESSAGE
        for m in messages:
            content = m.get("content") if isinstance(m, dict) else None
            parts = content if isinstance(content, list) else [{"text": content}]
            for p in parts:
                text = p.get("text") if isinstance(p, dict) else None
                n += PER_MESSAGE + (len(text.encode("utf-8", "surrogatepass")) if isinstance(text, str) else 0)
        return n
    return None


@schemathesis.hook
def filter_body(context, body) -> bool:
    if not isinstance(body, dict):
        return True
    n = _tokens(body)
    return n is None or n < MAX_MODEL_LEN

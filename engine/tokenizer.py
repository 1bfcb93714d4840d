"""Tokenizer loading (local files only) and incremental detokenization with stop strings."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer


def load_tokenizer(path: str | Path):
    """The folder's tokenizer, or None when it has no tokenizer files (prompts must then
    be token ids, and outputs carry no text)."""
    path = Path(path)
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas. Text is only emitted once it
    stops changing (a multi-byte character may span tokens), and generation stops at
    the first stop string, which is cut from the text."""

    def __init__(self, tokenizer, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.text = ""
        self.stopped = False
        self._prefix = 0   # decoding restarts here, so earlier tokens cannot shift the text
        self._read = 0     # tokens up to here are already in self.text

    def add(self, new_ids: list[int], final: bool = False) -> str:
        """Append tokens; returns the new text (empty while a character is incomplete)."""
        if self.tokenizer is None or self.stopped:
            self.ids.extend(new_ids)
            return ""
        self.ids.extend(new_ids)
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        before = decode(self.ids[self._prefix:self._read])
        after = decode(self.ids[self._prefix:])
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return ""
        delta = after[len(before):]
        self._prefix, self._read = self._read, len(self.ids)
        return self._append(delta)

    def _append(self, delta: str) -> str:
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
        self.text += delta
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if not hits:
            return delta
        cut = min(hits)
        emitted = max(0, cut - (len(self.text) - len(delta)))
        self.text = self.text[:cut]
        self.stopped = True
        return delta[:emitted]

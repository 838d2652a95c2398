"""Streaming detokenization: each new token decodes only a short tail, not the whole generation."""


class IncrementalText:
    """The settled text of a growing token list; a token that ends mid-character waits for the next one."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self._prefix = self._read = 0  # ids[_prefix:_read] is context already turned into text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> None:
        self.ids.append(token)
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self._prefix, self._read = self._read, len(self.ids)

    def flush(self) -> str:
        """Everything, including a trailing partial character (as U+FFFD), at the end of a generation."""
        before = self._decode(self.ids[self._prefix : self._read])
        return self.text + self._decode(self.ids[self._prefix :])[len(before) :]

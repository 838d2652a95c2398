"""The kind of each model token of Python source (keyword, name, whitespace, ...), by Python's own tokenizer."""

import io
import keyword
import tokenize

KINDS = ("keyword", "name", "whitespace", "punctuation", "number", "string", "comment", "other")
_KIND_OF = {tokenize.NUMBER: "number", tokenize.STRING: "string", tokenize.COMMENT: "comment", tokenize.OP: "punctuation"}
for _name in ("FSTRING_START", "FSTRING_MIDDLE", "FSTRING_END"):  # Python 3.12+ splits f-strings
    if hasattr(tokenize, _name):
        _KIND_OF[getattr(tokenize, _name)] = "string"


def char_kinds(text: str) -> list[str]:
    """The kind of every character of `text`; where Python's tokenizer gives up, the rest is "other"."""
    kinds = ["whitespace" if c.isspace() else "other" for c in text]
    starts = [0]
    for line in io.StringIO(text).readlines():
        starts.append(starts[-1] + len(line))
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            kind = _token_kind(tok)
            if kind is None:
                continue
            begin, end = starts[tok.start[0] - 1] + tok.start[1], starts[tok.end[0] - 1] + tok.end[1]
            for i in range(begin, min(end, len(text))):
                if not text[i].isspace() or kind in ("string", "comment"):
                    kinds[i] = kind
    except (tokenize.TokenError, SyntaxError, IndexError):
        pass
    return kinds


def _token_kind(tok) -> str | None:
    if tok.type == tokenize.NAME:
        return "keyword" if keyword.iskeyword(tok.string) or keyword.issoftkeyword(tok.string) else "name"
    return _KIND_OF.get(tok.type)


def token_kinds(text: str, offsets: list[tuple[int, int]]) -> list[str]:
    """The kind of each model token (its character `offsets`): that of its first non-space character."""
    chars = char_kinds(text)
    out = []
    for begin, end in offsets:
        first = next((i for i in range(begin, end) if not text[i].isspace()), None)
        out.append("whitespace" if first is None else chars[first])
    return out

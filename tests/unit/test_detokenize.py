import itertools

from cluster.demo_model import build_tokenizer
from cluster.engine.detokenize import IncrementalText

TOKENIZER = build_tokenizer()


def test_streamed_text_equals_decoding_everything_and_never_splits_a_character():
    ids = TOKENIZER.encode("Héllo wörld ✓ — mixture of experts 🙂!")
    text, seen = IncrementalText(TOKENIZER), []
    for token in ids:
        text.add(token)
        seen.append(text.text)
        assert "\ufffd" not in text.text
    assert all(a == b[: len(a)] for a, b in itertools.pairwise(seen))  # it only ever grows
    assert text.flush() == TOKENIZER.decode(ids)


def test_flush_keeps_a_trailing_partial_character():
    ids = TOKENIZER.encode("✓")
    text = IncrementalText(TOKENIZER)
    for token in ids[:-1]:
        text.add(token)
    assert text.text == "" and text.flush() == TOKENIZER.decode(ids[:-1])

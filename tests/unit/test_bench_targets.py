import json

from cluster.tools.targets import TextRequest, completion_body, side_by_side, stream_tokens


def _events(*chunks: dict) -> list[str]:
    return [line for chunk in chunks for line in (f"data: {json.dumps(chunk)}", "")] + ["data: [DONE]"]


def _text(text: str, finish_reason=None) -> dict:
    return {"choices": [{"index": 0, "text": text, "finish_reason": finish_reason}]}


def test_each_chunk_with_text_is_a_token_as_it_comes_and_the_final_usage_settles_the_count():
    # moecluster and vLLM end with a chunk of usage and no choices; a token that decodes to nothing has no chunk
    lines = _events(_text("iv"), _text(""), _text("az", "length"), {"choices": [], "usage": {"completion_tokens": 4}})
    assert list(stream_tokens(lines)) == [1, 1, 2]


def test_a_final_chunk_with_both_text_and_usage_counts_once():
    # transformers serve puts the usage on its last choice chunk
    lines = _events(_text("iv"), {**_text("az", "length"), "usage": {"completion_tokens": 2}})
    assert list(stream_tokens(lines)) == [1, 1]


def test_a_stream_without_usage_counts_its_chunks():
    assert sum(stream_tokens(_events(_text("a"), _text("b"), _text("c", "stop")))) == 3


def test_every_server_gets_a_greedy_streamed_completion_of_the_prompt_text():
    body = completion_body("peer", TextRequest("Hello", 7))
    assert body == {"model": "peer", "prompt": "Hello", "max_tokens": 7, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}}


def test_side_by_side_is_each_target_over_the_first():
    results = {"http://a": {"output_tokens_per_s": 200.0}, "http://b": {"output_tokens_per_s": 50.0}}
    assert side_by_side(results) == {"http://a": 1.0, "http://b": 0.25}

"""The OpenAI-compatible request shapes: what they accept, and what they refuse by name."""

import pytest
from pydantic import ValidationError

from cluster.demo_model import build_tokenizer
from cluster.errors import InvalidRequest
from cluster.serving.chat import ChatRequest, Message, render
from cluster.serving.openai_api import CompletionRequest, validation_message


def refusal(model, **body) -> str:
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    return validation_message(info.value.errors())


def test_neutral_values_of_unimplemented_fields_are_accepted():
    CompletionRequest.model_validate({"prompt": "x", "n": 1, "echo": False, "logprobs": None, "user": "u-1",
                                      "best_of": 1, "suffix": "", "logit_bias": {}})
    ChatRequest.model_validate({"messages": [{"role": "user", "content": "x"}], "n": 1, "logprobs": False,
                                "tools": [], "tool_choice": "none", "response_format": {"type": "text"}})


@pytest.mark.parametrize("prompt, prompts", [
    ("hi", ["hi"]), ([5, 6], [[5, 6]]), (["a", "b"], ["a", "b"]), ([[5], [6, 7]], [[5], [6, 7]]), ([], []),
])
def test_every_prompt_form_is_a_list_of_prompts(prompt, prompts):
    assert CompletionRequest.model_validate({"prompt": prompt}).prompts() == prompts


def test_the_extensions_benchmark_tools_send_are_fields():
    body = CompletionRequest.model_validate({
        "prompt": "x", "ignore_eos": True, "min_tokens": 3, "top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1,
        "add_special_tokens": True, "logit_bias": {"7": -2}, "stream_options": {"continuous_usage_stats": True}})
    assert body.sampling()["logit_bias"] == {7: -2.0} and body.usage_in_stream() == (False, True)


def test_anything_else_is_refused_naming_the_field():
    assert refusal(CompletionRequest, prompt="x", best_of=2) == "best_of: not supported by this server"
    assert refusal(CompletionRequest, prompt="x", max_token=2) == "max_token: Extra inputs are not permitted"
    assert refusal(ChatRequest, messages=[{"role": "user", "content": "x"}], tools=[{"type": "function"}]).startswith("tools")
    assert "max_tokens, max_completion_tokens" in refusal(
        ChatRequest, messages=[{"role": "user", "content": "x"}], max_tokens=1, max_completion_tokens=2)
    assert refusal(ChatRequest, messages=[]).startswith("messages")
    assert refusal(CompletionRequest, prompt=["a", 1]).startswith("prompt")
    assert refusal(CompletionRequest, prompt="x", logit_bias={"a": 1}).startswith("logit_bias")


def test_messages_render_through_the_chat_template():
    tokenizer = build_tokenizer()
    ids = render(tokenizer, [Message(role="user", content=[{"type": "text", "text": "Hi"}])])
    assert tokenizer.decode(ids) == "<|user|>\nHi</s>\n<|assistant|>\n"
    tokenizer.chat_template = None
    with pytest.raises(InvalidRequest, match="no chat template"):
        render(tokenizer, [Message(role="user", content="Hi")])


def test_completion_logprobs_offsets_follow_the_tokens_text():
    from cluster.engine.sequence import TokenLogprob
    from cluster.serving.openai_api import completion_logprobs

    tokenizer = build_tokenizer()
    ids = tokenizer.encode("Pack my box", add_special_tokens=False)
    logprobs = [TokenLogprob(ids[0], None)] + [TokenLogprob(t, -1.0, ((t, -1.0),)) for t in ids[1:]]
    body = completion_logprobs(tokenizer, logprobs, text_offset=4)
    pieces = [tokenizer.decode([t]) for t in ids]
    assert body["tokens"] == pieces and body["top_logprobs"][0] is None
    assert body["text_offset"] == [4 + len("".join(pieces[:i])) for i in range(len(ids))]
    assert body["top_logprobs"][1] == {pieces[1]: -1.0}
    assert completion_logprobs(tokenizer, [])["text_offset"] == []

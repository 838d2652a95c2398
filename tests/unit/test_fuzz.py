"""Hostile input, generated: every request body and every Forward request is either served or refused with a
documented error naming what was wrong; nothing else escapes. MOECLUSTER_FUZZ_EXAMPLES runs longer."""

import os

import grpc
import torch
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from cluster.demo_model import build_tokenizer
from cluster.errors import InvalidRequest
from cluster.serving.chat import ChatRequest, render
from cluster.serving.openai_api import CompletionRequest, validation_message
from cluster.serving.requests import parse_prompt, parse_sampling
from protos import expert_pb2
from protos.wire.unix_stream import CallFailed

TOKENIZER = build_tokenizer()
FUZZ = settings(max_examples=int(os.environ.get("MOECLUSTER_FUZZ_EXAMPLES", "200")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])
scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text()
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner,
                                                                                                max_size=4),
                           max_leaves=8)


def fields(names):
    return st.fixed_dictionaries({}, optional={name: json_values for name in names})


SAMPLING = ["temperature", "top_p", "seed", "stop", "stream", "n", "user", "stream_options", "ignore_eos",
            "min_tokens", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "logit_bias"]
completion_bodies = fields(["model", "prompt", "max_tokens", "echo", "logprobs", "best_of", "suffix",
                            "add_special_tokens", *SAMPLING]) | st.dictionaries(
    st.text(), json_values, max_size=5)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", ""]),
                                           "content": json_values}), max_size=3)
chat_bodies = st.builds(lambda m, rest: {"messages": m, **rest}, messages,
                        fields(["model", "max_tokens", "max_completion_tokens", "tools", "logprobs", *SAMPLING]))


def served_or_refused(body_model, body, prompts):
    """The body's fate through the same steps as the server: refused (with a message) or parsed."""
    try:
        request = body_model.model_validate(body)
    except ValidationError as error:
        assert validation_message(error.errors())
        return
    try:
        for prompt in prompts(request):
            parse_prompt(prompt, tokenizer=TOKENIZER, vocab_size=len(TOKENIZER), context_len=1024)
        parse_sampling(**request.sampling(), max_tokens=getattr(request, "max_tokens", None),
                       vocab_size=len(TOKENIZER), context_len=1024, default_max_tokens=16)
    except InvalidRequest as error:
        assert str(error)


@FUZZ
@given(completion_bodies)
def test_any_completion_body_is_served_or_refused_by_name(body):
    served_or_refused(CompletionRequest, body, lambda r: r.prompts())


@FUZZ
@given(chat_bodies)
def test_any_chat_body_is_served_or_refused_by_name(body):
    served_or_refused(ChatRequest, body, lambda r: [render(TOKENIZER, r.messages)])


@FUZZ
@given(st.binary(max_size=256))
def test_any_forward_request_bytes_are_served_or_refused_with_a_status(data):
    from experts.service import ExpertServicer

    class Bank:  # the servicer's checks, before any expert math
        def forward(self, layer, experts, counts, hidden):
            return torch.zeros_like(hidden)

    try:
        request = expert_pb2.ExpertForwardRequest.FromString(data)
    except DecodeError:  # undecodable bytes never reach the servicer
        return
    try:
        ExpertServicer(Bank()).forward(request)
    except CallFailed as error:
        assert error.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND) and error.details

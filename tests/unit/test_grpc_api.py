"""The gRPC ingress's own parts: decoding hostile bytes, the fields of a GenerateRequest, the per-connection cap."""

import pytest

from cluster.engine.sequence import Event, TokenLogprob
from cluster.errors import InvalidRequest, Overloaded
from cluster.serving.grpc_api import ConnectionStreams, Undecodable, decode_request, generation, response
from protos import inference_pb2


@pytest.mark.parametrize("data, why", [(b"\x0a\x02\xff\xfe", "bad UTF-8"), (b"\xff\xff\xff", "corrupt")])
def test_bytes_that_are_no_request_become_invalid_argument(data, why):
    decoded = decode_request(data)
    assert isinstance(decoded, Undecodable) and why in decoded.error
    with pytest.raises(InvalidRequest, match="not a valid moecluster.v1.GenerateRequest"):
        generation(decoded)


def test_unset_optional_fields_are_none_and_n_defaults_to_one():
    asked = generation(decode_request(inference_pb2.GenerateRequest(prompt="hi").SerializeToString()))
    assert asked.prompts == ["hi"] and asked.n == 1 and not asked.add_special_tokens
    unset = {name for name, value in asked.sampling.items() if value is None}
    assert unset == {"max_tokens", "temperature", "top_p", "seed", "logprobs", "top_k", "min_p", "repetition_penalty",
                     "presence_penalty", "frequency_penalty", "min_tokens", "logit_bias"}
    asked = generation(inference_pb2.GenerateRequest(prompt="hi", logprobs=0, n=3, seed=0, top_k=0,
                                                     logit_bias={5: -1.5}))
    assert asked.sampling["logprobs"] == 0 and asked.n == 3 and asked.sampling["seed"] == 0
    assert asked.sampling["top_k"] == 0 and asked.sampling["logit_bias"] == {5: -1.5}


def test_prompts_win_over_the_single_prompt_and_ids_over_text():
    request = inference_pb2.GenerateRequest(prompt="ignored", prompts=[
        inference_pb2.Prompt(text="a"), inference_pb2.Prompt(text="ignored", token_ids=[3, 4])])
    assert generation(request).prompts == ["a", [3, 4]]
    assert generation(inference_pb2.GenerateRequest(prompt="x", prompt_token_ids=[9])).prompts == [[9]]


def test_a_response_carries_its_choice_and_logprobs():
    event = Event([7], "x", "length", logprobs=[TokenLogprob(7, -0.5, ((7, -0.5), (3, -2.0)))])
    reply = response(2, event)
    assert reply.index == 2 and reply.finish_reason == "length" and list(reply.token_ids) == [7]
    assert reply.logprobs[0].logprob == -0.5 and list(reply.logprobs[0].top_token_ids) == [7, 3]


def test_a_connection_past_its_streams_is_refused_until_one_ends():
    streams = ConnectionStreams(2)
    with streams.held("ipv4:1.2.3.4:5"), streams.held("ipv4:1.2.3.4:5"):
        with pytest.raises(Overloaded, match="limits.streams_per_connection"), streams.held("ipv4:1.2.3.4:5"):
            pass
        with streams.held("ipv4:1.2.3.4:6"):  # another connection has its own
            pass
    with streams.held("ipv4:1.2.3.4:5"):
        pass

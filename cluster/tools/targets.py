"""`moecluster bench --target-url URL ...`: the bench's seeded workload played over HTTP against OpenAI-compatible
servers side by side (moecluster's `serve`, transformers' `transformers serve`, vLLM), one after another.

Every server gets the same bodies: the fields all of them implement, each request a streamed /v1/completions of
its prompt as text (the workload's token ids decoded with the checkpoint's tokenizer), greedy, for the workload's
output length. Tokens are counted as the chunks come and settled by the usage the stream ends with; EOS is not
ignored (not every server takes `ignore_eos`), so each server is credited with the tokens it generated.
"""

import json
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

from cluster.tools.bench import closed_loop
from cluster.tools.workload import Request, Workload, describe


@dataclass(frozen=True)
class TextRequest:
    prompt: str
    output_tokens: int


def completion_body(model: str, request: TextRequest) -> dict:
    return {"model": model, "prompt": request.prompt, "max_tokens": request.output_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}


def stream_tokens(lines: Iterable[str]) -> Iterator[int]:
    """Token counts as a completion stream's server-sent events come: one per chunk with text, then what the
    final usage adds to them (a token may arrive with no text of its own)."""
    counted = 0
    for line in lines:
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[len("data: "):])
        if any(choice.get("text") for choice in chunk.get("choices") or []):
            counted += 1
            yield 1
        usage = (chunk.get("usage") or {}).get("completion_tokens", 0)
        if usage > counted:
            yield usage - counted
            counted = usage


def http_requester(url: str, model: str, headers: dict[str, str], timeout_s: float = 600):
    def request(r: TextRequest):
        data = json.dumps(completion_body(model, r)).encode()
        post = urllib.request.Request(f"{url}/v1/completions", data, {"content-type": "application/json", **headers})
        with urllib.request.urlopen(post, timeout=timeout_s) as reply:
            yield from stream_tokens(line.decode().rstrip("\r\n") for line in reply)

    return request


def served_model(url: str, headers: dict[str, str]) -> str:
    """The first model a server lists at /v1/models."""
    with urllib.request.urlopen(urllib.request.Request(f"{url}/v1/models", headers=headers), timeout=30) as reply:
        return json.load(reply)["data"][0]["id"]


def text_requests(requests: list[Request], tokenizer) -> list[TextRequest]:
    return [TextRequest(tokenizer.decode(r.prompt_ids), r.output_tokens) for r in requests]


def side_by_side(results: dict[str, dict]) -> dict[str, float]:
    """Each target's output tokens/s over the first target's."""
    first = next(iter(results.values()))["output_tokens_per_s"]
    return {url: result["output_tokens_per_s"] / first for url, result in results.items()}


def bench_targets(model_dir: str, workload: Workload, urls: list[str]) -> dict:
    """`workload` played through each server at `urls` in turn (one warm-up request each first)."""
    from transformers import AutoConfig, AutoTokenizer

    from cluster.serving.auth import client_metadata

    headers = dict(client_metadata())
    played = workload.requests(AutoConfig.from_pretrained(model_dir).vocab_size)  # the ids the gRPC bench plays
    requests = text_requests(played, AutoTokenizer.from_pretrained(model_dir))
    results = {}
    for url in urls:
        model = served_model(url.rstrip("/"), headers)
        request = http_requester(url.rstrip("/"), model, headers)
        list(request(TextRequest("Hello", 2)))
        results[url] = {"model": model, **closed_loop(workload, requests, request)}
    return {"model": model_dir, "workload": {**asdict(workload), "lengths": describe(played)}, "targets": results,
            "vs_first": side_by_side(results)}


def print_targets(report: dict) -> None:
    for url, result in report["targets"].items():
        print(f"{url} ({result['model']}): {result['output_tokens']} tokens, {result['output_tokens_per_s']:8.1f} tok/s"
              f"  TTFT p50 {result['ttft_ms']['p50']:.1f} p99 {result['ttft_ms']['p99']:.1f} ms"
              f"  TPOT p50 {result['tpot_ms']['p50']:.1f} p99 {result['tpot_ms']['p99']:.1f} ms"
              f"  {report['vs_first'][url]:.2f}x the first")

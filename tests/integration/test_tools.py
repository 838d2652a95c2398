"""The tools people point at an OpenAI server, as released, with their default request bodies, against one served
checkpoint: serving benchmarks (aiperf, guidellm) whose every request must succeed, and an evaluation harness's
completions backend (lm-eval's local-completions) whose scores and generations must be transformers'; and
`moecluster bench --target-url`, which plays the bench's workload against any such server.

The tools run from the `tools` extra's own venv (tests/extra_env.py), made once and kept in moecluster's cache.
"""

import json
import subprocess
from pathlib import Path

import pytest
import torch
from ray import serve
from transformers import AutoTokenizer

from cluster.cli import main
from cluster.demo_model import cache_dir
from tests.integration.conftest import deploy
from tests.reference import greedy, transformers_model
from tests.extra_env import extra_bin

APP = "tools"
REQUESTS, PROMPT_TOKENS, OUTPUT_TOKENS = 4, 16, 8
PAIRS = [("The capital of France is", " Paris"), ("The capital of France is", " Rome"),
         ("Two plus two equals", " four"), ("Pack my box with", " five dozen liquor jugs"),
         ("Hello, ", "world")]
CONTEXTS = ["Once upon a time", "The quick brown fox"]
UNTIL = ["\n\n", "."]
# aiperf's own processes, fewest: they change no request, and each costs seconds to start
AIPERF_LEAN = ["--workers-max", 1, "--record-processors", 1, "--no-server-metrics", "--no-gpu-telemetry"]


@pytest.fixture(scope="module")
def tools() -> Path:
    return extra_bin(cache_dir(), "tools")


@pytest.fixture(scope="module")
def app(checkpoints, serve_endpoints):
    deploy(APP, checkpoints["mixtral"], num_workers=2)
    yield f"{serve_endpoints[0]}/{APP}"
    serve.delete(APP)


def run(*command, cwd: Path) -> str:
    done = subprocess.run([str(part) for part in command], check=False, cwd=cwd, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"{command[0]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_aiperf_requests_all_succeed(tools, app, checkpoints, tmp_path):
    """aiperf on the completions endpoint, streamed (its default is chat, which guidellm's default covers)."""
    run(tools / "aiperf", "profile", "--model", APP, "--url", app, "--tokenizer", checkpoints["mixtral"],
        "--endpoint-type", "completions", "--streaming", "--request-count", REQUESTS, "--concurrency", 2,
        "--prompt-input-tokens-mean", PROMPT_TOKENS, "--prompt-output-tokens-mean", OUTPUT_TOKENS,
        *AIPERF_LEAN, "--ui", "none", "--output-artifact-dir", tmp_path, cwd=tmp_path)
    report = json.loads((tmp_path / "profile_export_aiperf.json").read_text())
    assert report["error_summary"] == [] and report["completed_request_count"]["avg"] == REQUESTS
    usage = report["usage_completion_tokens"]  # from the usage every stream's last chunk carries
    assert usage["count"] == REQUESTS and 0 < usage["max"] <= OUTPUT_TOKENS


def test_guidellm_requests_all_succeed_at_their_exact_lengths(tools, app, checkpoints, tmp_path):
    """guidellm as it comes: chat, streamed, ignore_eos with fixed lengths, usage in every chunk."""
    run(tools / "guidellm", "run", "--backend", f"kind=openai_http,target={app}",
        "--profile", "kind=concurrent,streams=2", "--constraint", f"kind=max_requests,count={REQUESTS}",
        "--data", f"kind=synthetic_text,prompt_tokens={PROMPT_TOKENS},output_tokens={OUTPUT_TOKENS}",
        "--tokenizer", f"kind=huggingface_auto,model={checkpoints['mixtral']}",
        "--output", f"kind=json,path={tmp_path / 'report.json'}", "--disable-progress", cwd=tmp_path)
    metrics = json.loads((tmp_path / "report.json").read_text())["benchmarks"][0]["metrics"]
    assert metrics["request_totals"] == {"successful": REQUESTS, "errored": 0, "incomplete": 0, "total": REQUESTS}
    assert metrics["output_token_count"]["successful"]["total_sum"] == REQUESTS * OUTPUT_TOKENS  # counted from usage


@pytest.mark.parametrize("batch_size", [1, 4])
def test_lm_eval_completions_scores_and_generates_as_transformers(tools, app, checkpoints, tmp_path, batch_size):
    job = dict(base_url=f"{app}/v1/completions", model=APP, tokenizer=str(checkpoints["mixtral"]),
               batch_size=batch_size, pairs=PAIRS, contexts=CONTEXTS, until=UNTIL, max_gen_toks=OUTPUT_TOKENS)
    out = json.loads(run(tools / "python", Path(__file__).with_name("lm_eval_client.py"), json.dumps(job),
                         cwd=tmp_path).splitlines()[-1])
    oracle, tokenizer = transformers_model(checkpoints["mixtral"]), AutoTokenizer.from_pretrained(checkpoints["mixtral"])
    for (logprob, is_greedy), (context, continuation) in zip(out["scored"], out["pairs"], strict=True):
        want, want_greedy = loglikelihood(oracle, context, continuation)
        assert logprob == pytest.approx(want, abs=1e-4) and is_greedy == want_greedy
    for text, context in zip(out["generated"], out["contexts"], strict=True):
        assert text == cut(tokenizer.decode(greedy(oracle, context, OUTPUT_TOKENS)), [*UNTIL, out["eos"]])


def loglikelihood(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """The log-probability of `continuation` after `context`, and whether each of its tokens is the argmax."""
    with torch.no_grad():
        logits = model(torch.tensor([context + continuation])).logits[0, len(context) - 1:-1]
    logprobs, target = torch.log_softmax(logits, -1), torch.tensor(continuation)
    return logprobs.gather(-1, target[:, None]).sum().item(), bool((logprobs.argmax(-1) == target).all())


def cut(text: str, stops: list[str]) -> str:
    for stop in stops:
        text = text.split(stop)[0]
    return text


def test_the_bench_plays_its_workload_against_a_served_url(app, checkpoints, tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", str(checkpoints["mixtral"]), "--target-url", app, "--streams", "2",
                 "--requests-per-stream", "2", "--prompt-lengths", "4:8:16", "--output-lengths", "2:4:8",
                 "--json-out", str(out)]) == 0
    report = json.loads(out.read_text())
    served, asked = report["targets"][app], report["workload"]["lengths"]["output_tokens"]["total"]
    assert served["model"] == APP and served["requests"] == 4 and 4 <= served["output_tokens"] <= asked
    assert served["ttft_ms"]["p50"] > 0 and report["vs_first"] == {app: 1.0}

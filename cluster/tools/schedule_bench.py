"""What the engine's schedule buys, measured on the in-process engine in one run: the gaps of decoding streams
while long prompts arrive, whole and in chunks; and the time to first token of a request whose long prefix an
earlier one left in the prefix cache. Latencies in ms."""

import statistics
import threading
import time

from cluster.engine.sequence import SamplingParams, Sequence


def stream_gaps(engine, streams: int, long_prompts: int, long_tokens: int, every_s: float, vocab: int) -> dict:
    """`streams` sequences decode while `long_prompts` prompts of `long_tokens` tokens arrive `every_s` apart:
    the decoding streams' gaps between tokens, and the tokens they made per second."""
    arrivals: list[list[float]] = [[] for _ in range(streams)]
    decoding = [Sequence([5 + i, 6, 7, 8], SamplingParams(max_tokens=engine.context_len, ignore_eos=True),
                         lambda event, i=i: arrivals[i].append(time.perf_counter())) for i in range(streams)]
    engine.submit_all(decoding)
    time.sleep(2 * every_s)  # the streams settle into decoding
    started = time.perf_counter()
    for n in range(long_prompts):
        prompt = [(3 + 7 * n + j) % vocab for j in range(long_tokens)]
        done = threading.Event()
        engine.submit(Sequence(prompt, SamplingParams(max_tokens=1), lambda event: done.set()))
        done.wait(120)
        time.sleep(every_s)
    ended = time.perf_counter()
    for seq in decoding:
        seq.cancelled = True
    gaps = sorted(b - a for times in arrivals for a, b in zip(times, times[1:]) if started <= a and b <= ended)
    tokens = sum(1 for times in arrivals for t in times if started <= t <= ended)
    p50 = statistics.median(gaps)
    return {"gap_p50_ms": 1e3 * p50, "gap_p99_ms": 1e3 * gaps[int(0.99 * (len(gaps) - 1))],
            "gap_max_ms": 1e3 * gaps[-1], "max_over_p50": gaps[-1] / p50, "decode_tok_s": tokens / (ended - started)}


def prefix_ttft(engine, prefix_tokens: int, vocab: int) -> dict:
    """Time to first token of two requests sharing a `prefix_tokens` prefix: the first computes it, the second
    finds it cached."""
    prefix = [(11 + 5 * j) % vocab for j in range(prefix_tokens)]
    times = []
    for tail in ([1, 2, 3], [4, 5, 6]):
        first = threading.Event()
        started = time.perf_counter()
        engine.submit(Sequence(prefix + tail, SamplingParams(max_tokens=1), lambda event: first.set()))
        first.wait(120)
        times.append(time.perf_counter() - started)
    return {"prefix_tokens": prefix_tokens, "first_ttft_ms": 1e3 * times[0], "cached_ttft_ms": 1e3 * times[1],
            "speedup": times[0] / times[1]}


def run_schedule(engine, chunk_tokens: int, streams: int = 8, long_tokens: int = 900, long_prompts: int = 4,
                 every_s: float = 1.0, prefix_tokens: int = 512) -> dict:
    """Both measurements on `engine` (in-process, stepping in the background), whole prefills against chunks of
    `chunk_tokens`."""
    vocab = engine.model.config.vocab_size
    report = {}
    for name, chunk in (("whole", None), ("chunked", chunk_tokens)):
        engine.schedule(chunk, None, 0)
        report[name] = stream_gaps(engine, streams, long_prompts, long_tokens, every_s, vocab)
    report["chunked_throughput_ratio"] = report["chunked"]["decode_tok_s"] / report["whole"]["decode_tok_s"]
    engine.schedule(chunk_tokens, None, 4 * prefix_tokens)
    report["prefix"] = prefix_ttft(engine, prefix_tokens, vocab)
    return report

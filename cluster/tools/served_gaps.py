"""The engine's schedule as a served model's clients see it: streams decoding over HTTP while long prompts arrive,
and the gaps between their tokens. `python -m cluster.tools.served_gaps URL` prints one JSON line (ms)."""

import json
import random
import statistics
import sys
import threading
import time

import httpx


def served_stream_gaps(url: str, streams: int = 8, long_prompts: int = 4, long_tokens: int = 900,
                       every_s: float = 1.5, vocab: int = 512) -> dict:
    arrivals: list[list[float]] = [[] for _ in range(streams)]
    stop = threading.Event()

    def stream(i: int) -> None:
        body = {"prompt": [5 + i, 6, 7, 8], "max_tokens": 1000, "ignore_eos": True, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=300) as reply:
            for line in reply.iter_lines():
                if line.startswith("data: {"):
                    tokens = len(json.loads(line[6:])["choices"][0]["token_ids"])
                    arrivals[i] += [time.perf_counter()] * tokens
                if stop.is_set():
                    return

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(streams)]
    for thread in threads:
        thread.start()
    time.sleep(4)  # the streams settle into decoding
    started = time.perf_counter()
    start = random.randrange(vocab)  # prompts no earlier run left in the prefix cache
    for n in range(long_prompts):
        prompt = [(start + 7 * n + j) % vocab for j in range(long_tokens)]
        httpx.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": 1}, timeout=300)
        time.sleep(every_s)
    ended = time.perf_counter()
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    gaps = sorted(b - a for times in arrivals for a, b in zip(times, times[1:]) if started <= a < b <= ended)
    tokens = sum(1 for times in arrivals for t in times if started <= t <= ended)
    p50 = statistics.median(gaps)
    return {"gap_p50_ms": 1e3 * p50, "gap_p99_ms": 1e3 * gaps[int(0.99 * (len(gaps) - 1))],
            "gap_max_ms": 1e3 * gaps[-1], "max_over_p50": gaps[-1] / p50, "decode_tok_s": tokens / (ended - started)}


if __name__ == "__main__":
    print(json.dumps(served_stream_gaps(sys.argv[1])))

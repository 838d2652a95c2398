"""What `moecluster bench` plays: seeded requests, either of equal lengths or of long-tailed ones like a chat
service's (most prompts and answers short, a few long), and how an offline user would batch them.

Lengths are in tokens; a request is (prompt ids, output tokens it generates exactly).
"""

import math
import random
import statistics
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Lengths:
    """A lognormal with median `median` and log-space spread `sigma`, rounded and clipped to [low, high]."""

    low: int
    median: int
    high: int
    sigma: float = 1.0

    def draw(self, rng: random.Random) -> int:
        return min(self.high, max(self.low, round(rng.lognormvariate(math.log(self.median), self.sigma))))


@dataclass(frozen=True)
class Request:
    prompt_ids: list[int]
    output_tokens: int


@dataclass(frozen=True)
class Workload:
    kind: str = "realistic"  # realistic: lengths drawn from prompt_lengths and output_lengths; equal: fixed
    streams: int = 32
    requests_per_stream: int = 4
    prompt_tokens: int = 32  # equal only
    output_tokens: int = 64  # equal only
    prompt_lengths: Lengths = field(default_factory=lambda: Lengths(16, 64, 512))
    output_lengths: Lengths = field(default_factory=lambda: Lengths(8, 32, 256))
    arrival: str = "closed"  # closed: back to back; poisson: exponential think time, mean streams / rate
    rate: float = 0.0
    seed: int = 0

    @property
    def count(self) -> int:
        return self.streams * self.requests_per_stream

    def lengths(self) -> list[tuple[int, int]]:
        """(prompt, output) tokens of every request, stream by stream; the same for the same seed."""
        if self.kind == "equal":
            return [(self.prompt_tokens, self.output_tokens)] * self.count
        rng = random.Random(self.seed)
        return [(self.prompt_lengths.draw(rng), self.output_lengths.draw(rng)) for _ in range(self.count)]

    def requests(self, vocab_size: int) -> list[Request]:
        rng = random.Random(self.seed + 1)  # ids apart from lengths: the lengths do not depend on the vocabulary
        return [Request([rng.randrange(3, vocab_size) for _ in range(p)], n) for p, n in self.lengths()]

    def think_s(self, rng: random.Random) -> float:
        return rng.expovariate(self.rate / self.streams) if self.arrival == "poisson" and self.rate > 0 else 0.0


def describe(requests: list[Request]) -> dict:
    """p50, p99, max and total of the prompt and output lengths."""
    return {"requests": len(requests),
            "prompt_tokens": _spread([len(r.prompt_ids) for r in requests]),
            "output_tokens": _spread([r.output_tokens for r in requests])}


def _spread(values: list[int]) -> dict:
    ordered = sorted(values)
    return {"p50": statistics.median(ordered), "p99": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
            "max": ordered[-1], "total": sum(ordered)}


def static_batches(requests: list[Request], size: int) -> list[list[Request]]:
    """Batches of `size` requests in arrival order, as an offline user feeds `generate`."""
    return [requests[i:i + size] for i in range(0, len(requests), size)]


def padded_steps(batches: list[list[Request]]) -> int:
    """Rows x decode steps a static batch computes: every row runs until its batch's longest output ends."""
    return sum(len(batch) * max(r.output_tokens for r in batch) for batch in batches)


def parse_lengths(text: str) -> Lengths:
    """`LOW:MEDIAN:HIGH`, e.g. 16:64:512."""
    low, median, high = (int(part) for part in text.split(":"))
    if not 1 <= low <= median <= high:
        raise ValueError(f"lengths {text!r} need 1 <= LOW <= MEDIAN <= HIGH")
    return Lengths(low, median, high)


def parse_counts(text: str) -> list[int]:
    """`1,2,4`: distinct positive counts, in the given order."""
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"counts {text!r} must be whole numbers separated by commas, e.g. 1,2,4") from None
    if min(counts) < 1 or len(set(counts)) < len(counts):
        raise ValueError(f"counts {text!r} must be distinct and at least 1")
    return counts

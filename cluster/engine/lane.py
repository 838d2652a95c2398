"""One running batch with its own KV cache. A step is one forward (cluster/engine/packed.py): a token for every
running sequence, and beside them prompt pieces, in the order the prompts came. While sequences decode, a step
prefills at most a budget of prompt tokens: prompts whole where they fit, and the last a chunk of it. Each prompt
fills a cache of its own, which joins the batch once the prompt is done. So running streams never wait for a whole
long prefill, and a step costs one pass through the model and its expert workers, however much it carries.

B = running sequences, S = cached positions (left-padded), V = vocabulary, n = a piece's tokens, T = a step's
tokens
"""

import logging

import torch
from transformers import DynamicCache

from cluster.engine import kv_batch
from cluster.engine.packed import PREPARED_MASK, Group, PackedStep
from cluster.engine.sampling import prompt_logprobs, token_logprob
from cluster.engine.sequence import Event, Sequence, TokenLogprob
from cluster.errors import ExpertUnavailable, as_serving_error

log = logging.getLogger(__name__)


class Lane:
    def __init__(self, engine, index: int):
        self.engine, self.model, self.index = engine, engine.model, index
        self.device = self.model.device
        self.running: list[Sequence] = []
        self.prefilling: list[Sequence] = []  # admitted, their prompts not yet wholly in a cache
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # [B, S]

    def cache_positions(self) -> int:
        """Positions this lane's caches hold or its admitted prompts will: padding counts, as it takes memory."""
        batch = self._mask.numel() if self._mask is not None else 0
        return batch + sum(s.prefill_len for s in self.prefilling)

    def step(self) -> bool:
        """Admit, then one forward: a token for every running sequence, and prompt pieces within the step's
        budget; False if there was nothing to do."""
        self.prefilling += self.engine.admit(self)
        self.prefilling = [s for s in self.prefilling if not s.cancelled]
        if not self.prefilling and not self.running:
            return False
        try:
            with torch.inference_mode():
                self._make_room()
                self._run(self._pieces(self.engine.prefill_chunk_tokens if self.running else None))
        except Exception as error:  # a failed step fails every sequence in it, never a wrong token
            if isinstance(as_serving_error(error), ExpertUnavailable):
                log.warning("engine step failed: %s", error)
            else:
                log.exception("engine step failed")
            self._fail(self.running + self.prefilling, error)
        return True

    def _pieces(self, budget: int | None) -> list[tuple[Sequence, int]]:
        """(prompt, its next positions to prefill) in the order the prompts came, within `budget` tokens (None:
        every prompt whole)."""
        left, pieces = float("inf") if budget is None else budget, []
        for seq in self.prefilling:
            if left <= 0:
                break
            self._reuse_prefix(seq)
            n = int(min(seq.prefill_len - seq.prefilled, left))
            pieces.append((seq, n))
            left -= n
        return pieces

    def _run(self, pieces: list[tuple[Sequence, int]]) -> None:
        """One forward of the running batch's next tokens and `pieces`; then each running sequence's token, and
        the first token of each prompt done."""
        ids, positions, groups, kept = [], [], [], []  # kept: the packed tokens whose logits are sampled or scored
        if self.running:
            ids = [s.generated[-1] for s in self.running]
            positions = [s.length - 1 for s in self.running]
            self._mask = torch.cat([self._mask, self._mask.new_ones(len(ids), 1)], dim=1)  # [B, S + 1]
            groups.append(Group(self._cache, self._mask, torch.tensor(positions, device=self.device)[:, None], 0))
            kept += range(len(ids))
        for seq, n in pieces:
            if seq.cache is None:
                seq.cache, seq.prefix_source = kv_batch.new_cache(self.model.config), self.engine.prefix_cache
            span = range(seq.prefilled, seq.prefilled + n)
            groups.append(Group(seq.cache, torch.ones(1, span.stop, dtype=torch.long, device=self.device),
                                torch.tensor([span], device=self.device), len(ids)))
            ids += seq.prefill_ids[span.start:span.stop]
            positions += span
            kept += range(len(ids) - n, len(ids)) if seq.scores_prompt else [len(ids) - 1]
        logits = self._forward(ids, positions, PackedStep(groups), kept)  # [len(kept), V]
        decoded, logits = logits[:len(self.running)], logits[len(self.running):]
        if self.running:
            self._sample(self.running, decoded)
            self._drop_finished()
        done = []
        for seq, n in pieces:
            rows, logits = (logits[:n], logits[n:]) if seq.scores_prompt else (logits[:1], logits[1:])
            if self._prefilled(seq, n, rows):
                done.append(seq)
        self._join(done)

    def _prefilled(self, seq: Sequence, n: int, rows: torch.Tensor) -> bool:
        """Account `n` more positions of `seq`'s prompt, with their kept logits `rows`; once the prompt is whole,
        its prompt logprobs and first token. Whether it joins the batch."""
        if seq.scores_prompt:
            seq.scored_rows.append(rows)
        seq.prefilled += n
        if seq.prefilled < seq.prefill_len:
            return False
        if seq.scores_prompt:
            seq.prompt_logprobs = prompt_logprobs(torch.cat(seq.scored_rows), seq.prompt_ids,
                                                  seq.params.prompt_logprobs)
        self._remember(seq, _kv(seq.cache), seq.prefix_source)
        self.prefilling.remove(seq)
        if not seq.generated:  # a preempted sequence has its next token already
            self._sample([seq], rows[-1:])
        if seq.done or seq.cancelled:
            seq.cache = None
        return seq.cache is not None

    def _reuse_prefix(self, seq: Sequence) -> None:
        """Start `seq`'s own cache from the longest cached prefix of its prompt, if any is cached; once."""
        prefixes = self.engine.prefix_cache
        if seq.prefix_checked or prefixes is None or seq.scores_prompt:  # scoring needs every position's logits
            return
        seq.prefix_checked = True
        length, kv = prefixes.lookup(seq.prefill_ids)
        if not length:
            return
        seq.cache, seq.prefix_source = kv_batch.new_cache(self.model.config), prefixes
        for layer, (keys, values) in enumerate(kv):
            seq.cache.update(keys, values, layer)
        seq.prefilled = length

    def _remember(self, seq: Sequence, kv, source) -> None:
        """Keep `seq`'s prompt KV in the prefix cache that was current when its prefill began (`source`), only if
        it still is: one forgotten since (a change of routing) would take KV of the old math."""
        if source is not None and source is self.engine.prefix_cache:
            source.insert(seq.prefill_ids, kv)

    # --- decode ---

    def _make_room(self) -> None:
        """Preempt the newest running sequences while the next decode step would pass the KV-cache budget: their
        cache is dropped and they wait again at the front, to be prefilled again (their streams only wait). The
        last running sequence is never preempted."""
        budget = self.engine.kv_cache_tokens
        while budget is not None and len(self.running) > 1 and (
                self.engine.cache_positions() + len(self.running) > budget):
            keep = list(range(len(self.running) - 1))
            victim = self.running[-1]
            self._mask = kv_batch.select_rows(self._cache, self._mask, keep)
            self.running = self.running[:-1]
            self.engine.preempted(victim)

    def _forward(self, ids: list[int], positions: list[int], step: PackedStep, kept: list[int]) -> torch.Tensor:
        """[len(kept), V] logits of the packed tokens `kept`."""
        ids = torch.tensor([ids], device=self.device)  # [1, T]
        with self.engine.step_tokens(ids):
            out = self.model(input_ids=ids, attention_mask=PREPARED_MASK, position_ids=torch.tensor(
                [positions], device=self.device), cache=step, packed_step=step, use_cache=True,
                logits_to_keep=torch.tensor(kept, device=self.device))
        return out.logits[0].float()

    def _join(self, seqs: list[Sequence]) -> None:
        """`seqs`, their prompts whole in their own caches, into the running batch."""
        if not seqs:
            return
        caches = ([self._cache] if self.running else []) + [s.cache for s in seqs]
        masks = ([self._mask] if self.running else []) + [
            torch.ones(1, s.prefill_len, dtype=torch.long, device=self.device) for s in seqs]
        self._cache, self._mask = kv_batch.join(caches, masks)
        self.running += seqs
        for seq in seqs:
            seq.cache, seq.scored_rows, seq.prefilled = None, [], 0

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """The next token of each of `seqs` from its logits [B, V], sent on."""
        greedy = logits.argmax(-1).tolist()  # [B], one call for every greedy row
        for seq, row, best in zip(seqs, logits, greedy):
            p, sampler = seq.params, seq.sampler
            if p.max_tokens == 0:  # scoring a prompt (echo): its logprobs are the whole answer
                seq.done = True
                seq.emit(Event(token_ids=[], text="", finish_reason="length", prompt_logprobs=seq.prompt_logprobs))
                continue
            if sampler.adjust or p.temperature or p.logprobs is not None:
                row = row.cpu()  # sampling on the host: a seeded draw is the same wherever the model runs
            if sampler.adjust:
                row = sampler.adjusted(row, seq.prompt_ids + seq.generated)
            token = best if p.temperature == 0 and not sampler.adjust else sampler.draw(row)
            logprob = None if p.logprobs is None else token_logprob(row, token, p.temperature, p.logprobs)
            self._append(seq, token, logprob)

    def _drop_finished(self) -> None:
        keep = [i for i, s in enumerate(self.running) if not (s.done or s.cancelled)]
        if len(keep) < len(self.running):
            self._mask = kv_batch.select_rows(self._cache, self._mask, keep) if keep else None
            self.running = [self.running[i] for i in keep]
            if not keep:
                self._cache = None

    def _append(self, seq: Sequence, token: int, logprob: TokenLogprob | None) -> None:
        seq.generated.append(token)
        seq.text.add(token)
        text = seq.text.text
        stop_at = min((i for i in (text.find(s) for s in seq.params.stop) if i >= 0), default=-1)
        finish = None
        if (token in self.engine.eos_ids and not seq.params.ignore_eos) or stop_at >= 0:
            finish, text = "stop", text[:stop_at] if stop_at >= 0 else seq.text.flush()
        elif len(seq.generated) >= seq.params.max_tokens or seq.length >= self.engine.context_len:
            finish, text = "length", seq.text.flush()
        end = len(text) if finish else len(text) - _unsettled_suffix(text, seq.params.stop)
        delta = text[seq.sent_chars:end] if end > seq.sent_chars else ""
        seq.sent_chars += len(delta)
        seq.done = finish is not None
        seq.emit(Event(token_ids=[token], text=delta, finish_reason=finish,
                       logprobs=None if logprob is None else [logprob], prompt_logprobs=seq.prompt_logprobs))
        seq.prompt_logprobs = None

    def _fail(self, seqs: list[Sequence], error: Exception) -> None:
        serving_error = as_serving_error(error)
        for seq in seqs:
            seq.done = True
            seq.cache = None
            seq.emit(Event(token_ids=[], text="", error=serving_error))
        self.running, self.prefilling, self._cache, self._mask = [], [], None, None


def _kv(cache: DynamicCache):
    """Each layer's (keys, values), [B, H, S, Dh]."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def _unsettled_suffix(text: str, stops: tuple[str, ...]) -> int:
    """Characters at the end of `text` that may still change: the start of a stop string."""
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)

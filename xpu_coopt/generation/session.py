"""A generation's cache session: its KV cache, its decode graph, the steps over them, and keeping them.

generate() and the forward API decode through a CacheSession: it runs decode steps (replaying a CUDA
graph where the model uses one), runs of several tokens (prompt lookup), beam reorders, and says how
much room is left, so generation never reads the cache's own state. When a generation ends, KeptSession
keeps a session that has a decode graph for the next generate() it fits, which then replays that graph
instead of capturing one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from xpu_coopt.cache import SegmentKVCache
from xpu_coopt.model.decode_graph import DecodeGraph

if TYPE_CHECKING:
    from xpu_coopt.cache.prefix_cache import PrefixCache


class CacheSession:
    """One generation's cache, and where the model replays decode steps as a CUDA graph, that graph.
    model: the OptimizedModel it decodes with."""

    def __init__(self, model: Any, cache: SegmentKVCache) -> None:
        self.model = model
        self.cache = cache
        self.graph: DecodeGraph | None = None

    @property
    def num_seqs(self) -> int:
        return self.cache.num_seqs

    @property
    def prompt_start(self) -> torch.Tensor:
        """int32 [R]: each prompt's first column after its left padding."""
        return self.cache.prompt_start

    def room(self) -> float:
        """Tokens it can still decode without growing the cache (inf for a ring)."""
        return self.cache.room()

    def run_limit(self) -> float:
        """Tokens a decode_run() step can take: any number where the cache grows, its room where a decode
        graph holds it in place."""
        return float("inf") if self.graph is None else self.cache.room()

    def nbytes(self) -> int:
        return self.cache.nbytes()

    def graph_captures(self) -> int:
        """Captures of its decode graph so far (0 without one)."""
        return 0 if self.graph is None else self.graph.captures

    @torch.inference_mode()
    def decode(self, next_tokens: torch.Tensor) -> torch.Tensor:
        """next_tokens: [S] (one per sequence) -> logits [S, vocab] in the model dtype (with a decode graph,
        its output buffer, which the next step overwrites)."""
        cache = self.cache
        self._cover(cache.prompt_len + cache.response_len + 1)
        if self.model.cuda_graph and self.graph is None:
            cache.use_device_lengths()
            self.graph = DecodeGraph(self.model.decoder, cache)
        cache.begin_decode_step()
        if self.graph is not None:
            logits = self.graph(cache, next_tokens)
        else:
            positions = cache.positions().view(-1, 1)
            logits = self.model.decoder.forward(next_tokens.long().view(-1, 1), positions, cache, True)
        cache.end_step()
        return logits

    @torch.inference_mode()
    def decode_run(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: [T], the next T tokens of the one sequence, decoded in one step (each attends to those
        before it) -> logits [T, vocab], row i for the token after tokens[i]. keep_run(kept) then says
        how many of them stand (prompt lookup decoding's check of its drafts)."""
        count, cache = tokens.shape[0], self.cache
        self._cover(cache.prompt_len + cache.response_len + count)
        cache.begin_token_run(count)
        positions = cache.run_positions().view(1, count)
        return self.model.decoder.forward(tokens.long().view(1, count), positions, cache, False)[0]

    def _cover(self, length: int) -> None:
        """Rotary positions up to `length`, where decoding goes past those the prefill covered."""
        if length > self.model.decoder.cos_sin_cache.shape[0]:
            self.model.cover_length(length)

    def in_run(self) -> bool:
        """Whether a decode_run() step's tokens wait for keep_run()."""
        return self.cache.run_length > 0

    def keep_run(self, kept: int) -> None:
        """After decode_run(): its first `kept` tokens stand; the rest are written over by later steps."""
        self.cache.end_token_run(kept)

    def reorder(self, parents: torch.Tensor) -> None:
        """Beam search: each sequence continues from slot parents[s] of its own request (unchecked: the
        parents come from the request's own top-k, and a check would wait for the device)."""
        self.cache.reorder(parents, check=False)

    def hold(self, prefix_cache: PrefixCache, sequence: torch.Tensor) -> None:
        """Gives a PrefixCache the K/V of `sequence` (one row of the output) that the cache holds."""
        prefix_cache.hold(self.cache, sequence)


class KeptSession:
    """The last generation's session, where it has a decode graph, kept for the next generation it fits:
    its cache is reset in place and its graph replays the new steps without another capture. The memory
    stays held until then, or until release()."""

    def __init__(self) -> None:
        self._session: CacheSession | None = None

    @property
    def session(self) -> CacheSession | None:
        """The session kept, if any."""
        return self._session

    def keep(self, session: CacheSession) -> None:
        if session.graph is not None:
            self._session = session

    def release(self) -> None:
        self._session = None

    def take(
        self, prompt_start: torch.Tensor, prompt_len: int, num_beams: int, max_new_tokens: int
    ) -> CacheSession | None:
        """The kept session, reset for this generation, if it fits; else None, the kept one freed before a
        new one is allocated."""
        session, self._session = self._session, None
        if session is None or not session.cache.fits(prompt_start, prompt_len, num_beams, max_new_tokens):
            return None
        session.cache.reset(prompt_start, prompt_len)
        return session

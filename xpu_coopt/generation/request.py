"""One generate() call: what every search loop reads, and the steps they all begin and end with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from xpu_coopt.cache.prefix_cache import PrefixCache
from xpu_coopt.generation.output import GenerateOutput, StepRecord
from xpu_coopt.generation.session import CacheSession
from xpu_coopt.generation.settings import GenerationSettings
from xpu_coopt.generation.token_rules import TokenRules


@dataclass
class GenerationRequest:
    """The model, the left-padded prompts [N, P], the resolved settings, and what generate() passes along:
    a streamer (one sequence), a torch.Generator for the draws, a PrefixCache."""

    model: Any
    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    settings: GenerationSettings
    streamer: Any = None
    generator: torch.Generator | None = None
    prefix_cache: PrefixCache | None = None

    def token_rules(self) -> TokenRules:
        """The token-id arguments' tensors (their errors before the prefill)."""
        return TokenRules.of(self.settings, self.model.spec.vocab_size, self.input_ids.device)

    def prefill(self, num_beams: int) -> tuple[torch.Tensor, CacheSession]:
        """Each prompt run once, into a cache with room for num_beams sequences of max_new_tokens each (the
        model's kept session where it fits, the PrefixCache's tokens not run again): (logits, session)."""
        return self.model.prefill(
            self.input_ids, self.attention_mask, num_beams, self.settings.max_new_tokens, reuse_kept_cache=True,
            prefix_cache=self.prefix_cache,
        )  # fmt: skip

    def finish_one_beam(
        self,
        session: CacheSession,
        sequences: torch.Tensor,
        record: StepRecord,
        captures_before: int,
        **counts: int,
    ) -> GenerateOutput:
        """The end of a generation of one beam per prompt (sampling, prompt lookup), its `sequences` cut
        after their last token: the streamer ended, the PrefixCache given the K/V it keeps, the session kept
        for the next generate() (with its decode graph), and the output. counts: GenerateOutput's counters."""
        if self.streamer is not None:
            self.streamer.end()
        if self.prefix_cache is not None:
            session.hold(self.prefix_cache, sequences[0])
        self.model.keep_cache(session)
        return record.output(sequences, session, captures_before, self.settings, **counts)

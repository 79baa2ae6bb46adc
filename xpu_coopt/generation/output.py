"""What a generation returns, and the steps every search loop ends with."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from xpu_coopt.generation.session import CacheSession
from xpu_coopt.generation.settings import GenerationSettings


@dataclass
class GenerateOutput:
    sequences: torch.Tensor  # [N * num_return_sequences, prompt + generated]
    sequences_scores: torch.Tensor | None = None  # beam search with output_scores: length-normalised scores
    scores: tuple[torch.Tensor, ...] | None = None  # output_scores: processed scores of each step
    kv_cache_bytes: int = 0  # bytes the KV cache held
    kv_largest_allocation: int = 0  # bytes of its largest single tensor (one layer's K or V, at most)
    # time.perf_counter() right after each step's tokens were chosen (index 0: the first token)
    step_times: list[float] = field(default_factory=list)
    logits: tuple[torch.Tensor, ...] | None = None  # output_logits: each step's raw logits, float32
    # CUDA graph captures of the decode step this generation made: 1 with cuda_graph, 0 where it replayed a
    # kept graph (model/decode_graph.py)
    decode_graph_captures: int = 0
    # prompt_lookup_num_tokens: the decode steps run, and the draft tokens they kept
    decode_steps: int = 0
    accepted_drafts: int = 0

    def ordinary(self) -> GenerateOutput:
        """This output with ordinary tensors in place of inference-mode ones (see `ordinary`)."""
        return replace(
            self,
            sequences=ordinary(self.sequences),
            sequences_scores=ordinary(self.sequences_scores),
            scores=None if self.scores is None else tuple(map(ordinary, self.scores)),
            logits=None if self.logits is None else tuple(map(ordinary, self.logits)),
        )


def ordinary(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """A tensor the caller may write to and use in autograd: generation runs in inference mode (decode
    steps measured faster on the CPU than under no_grad), whose tensors refuse both, so what leaves it is
    copied once."""
    return tensor.clone() if tensor is not None and tensor.is_inference() else tensor


@dataclass
class StepRecord:
    """What a generation records step by step for its output: when each token was chosen, and with
    output_scores / output_logits each step's scores and raw logits."""

    step_times: list[float] = field(default_factory=list)
    scores: list[torch.Tensor] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)

    def scores_so_far(self, settings: GenerationSettings) -> list[torch.Tensor] | None:
        """The scores a stopping criterion is given: those recorded, with output_scores."""
        return self.scores if settings.output_scores else None

    def output(self, sequences: torch.Tensor, session: CacheSession, captures_before: int,
               settings: GenerationSettings, sequences_scores: torch.Tensor | None = None, **counts: int) -> GenerateOutput:  # fmt: skip
        """The generation's output: `sequences`, and what settings asked to return."""
        return GenerateOutput(
            sequences,
            sequences_scores if settings.output_scores else None,
            tuple(self.scores) if settings.output_scores else None,
            session.nbytes(),
            session.cache.largest_allocation(),
            self.step_times,
            tuple(self.logits) if settings.output_logits else None,
            session.graph_captures() - captures_before,
            **counts,
        )


class HostFlags:
    """Device booleans on their way to the host. The copy is queued before the next decode step and read
    after it: the host then waits for the flags only, not for the step queued behind them, and issues the
    next step's bookkeeping while the device still runs that step."""

    def __init__(self, flags: torch.Tensor) -> None:
        self.values = flags.to("cpu", non_blocking=True)
        self.ready = None
        if flags.device.type != "cpu":
            self.ready = torch.Event(device=flags.device)
            self.ready.record()

    def read(self) -> list[bool]:
        if self.ready is not None:
            self.ready.synchronize()
        return self.values.tolist()


def eos_ids(settings: GenerationSettings, device: torch.device) -> torch.Tensor:
    """The EOS ids as a device tensor, made once per generation: per-step host-to-device copies would each
    wait for the work queued before them, a decode step included."""
    return torch.tensor(settings.eos_token_id or [], dtype=torch.long, device=device)

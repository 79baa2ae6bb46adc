"""A decode step captured as a CUDA graph and replayed for every later step of a generation.

At batch 1 a 7B model's decode step launches a few hundred small kernels; in eager mode the GPU waits on
Python between them. The graph records them once and replays them with one launch. What changes between
steps lives in device tensors updated in place before each replay: the input tokens (copied into the
graph's input buffer) and the cache's write cells, positions and segment lengths
(cache/device_lengths.py). Both cache layouts are preallocated for max_new_tokens (a paged pool for the
blocks they can come to use), so every tensor the graph touches keeps its address. The graph reads every
tensor at the address it was captured with, so a step that finds one moved (a rotary table extended
past max_position_embeddings, LlamaDecoder.cover_positions) captures the graph again
(DecodeGraph.captures counts them). Prefill stays eager: its shapes change with every prompt.

generate() keeps its cache, and with it the graph, for the next generate() whose batch, beams, prompt and
max_new_tokens fit it (generation/session.py): the cache is reset in place and the graph replays the
new generation's steps without another capture (two eager steps and the capture's launches, some tens
of milliseconds for a 7B model).
"""

from __future__ import annotations

import torch

from xpu_coopt.cache import SegmentKVCache

# Eager runs before capture, on a side stream as torch.cuda.graph requires: they compile the Triton kernels
# and create the cuBLAS workspaces, which must not happen during capture. Each run computes the very step
# being captured (same inputs, same cache cells), so it changes nothing.
WARMUP_RUNS = 2


def _addresses(decoder, cache: SegmentKVCache) -> dict[str, int]:
    """Where the tensors a decode step reads and writes lie, but for the weights (which never move): the
    cache's, and the rotary table (which moves when a generation runs past it)."""
    tensors = {**cache.graph_inputs(), "cos_sin_cache": decoder.cos_sin_cache}
    return {name: tensor.data_ptr() for name, tensor in tensors.items()}


class DecodeGraph:
    """One cache's decode step as a CUDA graph, kept beside the cache by its session
    (generation/session.py). Call begin_decode_step() on the cache before each call."""

    def __init__(self, decoder, cache: SegmentKVCache) -> None:
        if cache.lengths is None:
            raise RuntimeError("DecodeGraph needs a cache set to device lengths (use_device_lengths)")
        self.decoder = decoder
        self.tokens = torch.zeros((cache.num_seqs, 1), dtype=torch.long, device=cache.beam_slots.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.input_addresses: dict[str, int] = {}  # what the graph reads, where it was captured
        self.captures = 0

    def _forward(self, cache: SegmentKVCache) -> torch.Tensor:
        return self.decoder.forward(self.tokens, cache.positions().view(-1, 1), cache, True)

    def _capture(self, cache: SegmentKVCache) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                self._forward(cache)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._forward(cache)

    def _replay(self) -> None:
        self.graph.replay()

    def __call__(self, cache: SegmentKVCache, next_tokens: torch.Tensor) -> torch.Tensor:
        """next_tokens [S] -> logits [S, vocab]: the graph's output buffer, overwritten by the next call.
        Captures the graph at the first call and again whenever a tensor it reads has moved (a rotary table
        extended): a replay would otherwise read freed or stale memory without an error of its own."""
        self.tokens.copy_(next_tokens.view(-1, 1))
        addresses = _addresses(self.decoder, cache)
        if addresses != self.input_addresses:
            self.graph = self.logits = None  # the old graph's memory goes back before the new capture
            self._capture(cache)
            self.input_addresses = addresses
            self.captures += 1
        self._replay()
        return self.logits

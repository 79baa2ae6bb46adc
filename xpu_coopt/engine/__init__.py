"""Continuous batching (issue 38): requests join and leave a running batch at every step.

- block_manager.py: the KV pool's blocks, handed to sequences as they grow and taken back as they end
  (and named by their tokens, for prefix caching); kv_pool.py: the pool's tensors
- request.py: a request and the sequence it becomes (its tokens, blocks and state)
- scheduler.py: which sequences run each step, within a token budget: decodes first, then prompt chunks;
  preemption when the pool runs out
- step_batch.py: one step's ragged batch as the decoder's cache: where each token's K/V goes, and the
  attention of each sequence over its blocks
- engine.py: the loop: schedule, run the model, sample, retire finished requests
- llm.py: LLM, the offline API (vLLM's): generate(prompts, SamplingParams) in prompt order
"""

from xpu_coopt.engine.llm import LLM, SamplingParams

__all__ = ["LLM", "SamplingParams"]

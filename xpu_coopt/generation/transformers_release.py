"""Where transformers releases differ in what generate() computes: xpu_coopt matches the release installed,
so each difference is one flag here, read once at import."""

from __future__ import annotations

import importlib.metadata

from packaging.version import Version

_INSTALLED = Version(importlib.metadata.version("transformers"))

# 5.23: the repetition penalty skips each prompt's left padding (generate() passes the padding lengths to
# RepetitionPenaltyLogitsProcessor); earlier releases penalize the padding's ids too (the pad token's).
PENALTY_SKIPS_PADDING = Version("5.23") <= _INSTALLED

# 5.24: beam sampling orders the candidates it draws by accumulated log-probability, best first, as top-k
# orders them; earlier releases keep the order of the draw, which decides ties among running beams.
BEAM_SAMPLES_SORTED = Version("5.24") <= _INSTALLED

# 5.24: prefix_allowed_tokens_fn's batch index is the row over max(num_beams, num_return_sequences), so the
# samples of one prompt share its index; earlier releases divide by num_beams alone, so that each sample of
# num_return_sequences counts as a prompt of its own.
PREFIX_BATCH_SPANS_RETURN_SEQUENCES = Version("5.24") <= _INSTALLED

# 5.0: min_p's floor keeps the min_tokens_to_keep most probable tokens as torch.topk orders the
# probabilities; earlier releases keep the first of torch.argsort over the scores, which orders ties
# otherwise.
MIN_P_FLOOR_BY_TOPK = Version("5.0.0rc0") <= _INSTALLED

"""The sampling warpers against transformers' own, on scores built to sit where each warper decides: ties,
cumulative probabilities exactly at top_p's boundary, all-equal logits, and peaked distributions where
min_tokens_to_keep (beam sampling keeps 1 + the EOS ids) and not the warper's threshold sets the floor."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import (
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from xpu_coopt.generation.logits_processing import warp
from xpu_coopt.generation.settings import GenerationSettings

LN2 = math.log(2.0)
# Rows of scores over 6 tokens, each built to sit on some warper's boundary.
ROWS = {
    "all equal": [0.0] * 6,
    # probabilities 1/2, 1/4, 1/8, 1/16, 1/32, 1/32: cumulative sums land on 1/2, 3/4, 7/8, ...
    "halving": [-k * LN2 for k in (0, 1, 2, 3, 4, 4)],
    "ties at the top": [2.0, 2.0, 2.0, 0.5, 0.5, -1.0],
    "tie across the cut": [3.0, 1.0, 1.0, 1.0, 0.0, -2.0],
    "peaked": [12.0, 0.0, 0.0, -1.0, -3.0, -3.0],
    "two peaks": [8.0, 8.0, 0.0, 0.0, 0.0, -4.0],
}
SCORES = torch.tensor(list(ROWS.values()), dtype=torch.float32)

# (settings of xpu_coopt's warp with every other warper off, transformers' warper for min_tokens_to_keep)
WARPERS = {
    "temperature 0.7": (dict(temperature=0.7), lambda keep: TemperatureLogitsWarper(0.7)),
    "top_k 1": (dict(top_k=1), lambda keep: TopKLogitsWarper(1, min_tokens_to_keep=keep)),
    "top_k 2": (dict(top_k=2), lambda keep: TopKLogitsWarper(2, min_tokens_to_keep=keep)),
    "top_k 3": (dict(top_k=3), lambda keep: TopKLogitsWarper(3, min_tokens_to_keep=keep)),
    "top_p 0.5": (dict(top_p=0.5), lambda keep: TopPLogitsWarper(0.5, min_tokens_to_keep=keep)),
    "top_p 0.75": (dict(top_p=0.75), lambda keep: TopPLogitsWarper(0.75, min_tokens_to_keep=keep)),
    "top_p 0.875": (dict(top_p=0.875), lambda keep: TopPLogitsWarper(0.875, min_tokens_to_keep=keep)),
    "top_p 0.05": (dict(top_p=0.05), lambda keep: TopPLogitsWarper(0.05, min_tokens_to_keep=keep)),
    "min_p 0.5": (dict(min_p=0.5), lambda keep: MinPLogitsWarper(0.5, min_tokens_to_keep=keep)),
    "min_p 0.25": (dict(min_p=0.25), lambda keep: MinPLogitsWarper(0.25, min_tokens_to_keep=keep)),
    "typical 0.5": (dict(typical_p=0.5), lambda keep: TypicalLogitsWarper(0.5, min_tokens_to_keep=keep)),
    "typical 0.9": (dict(typical_p=0.9), lambda keep: TypicalLogitsWarper(0.9, min_tokens_to_keep=keep)),
    "epsilon 0.125": (dict(epsilon_cutoff=0.125), lambda keep: EpsilonLogitsWarper(0.125, min_tokens_to_keep=keep)),
    "epsilon 0.3": (dict(epsilon_cutoff=0.3), lambda keep: EpsilonLogitsWarper(0.3, min_tokens_to_keep=keep)),
    "eta 0.2": (dict(eta_cutoff=0.2), lambda keep: EtaLogitsWarper(0.2, min_tokens_to_keep=keep)),
    "eta 0.9": (dict(eta_cutoff=0.9), lambda keep: EtaLogitsWarper(0.9, min_tokens_to_keep=keep)),
}  # fmt: skip


def _warped(options: dict, keep: int) -> torch.Tensor:
    settings = GenerationSettings(do_sample=True, **{"top_k": 0, **options})
    return warp(SCORES.clone(), settings, keep)


@pytest.mark.parametrize("keep", [1, 2, 3])
@pytest.mark.parametrize("name", sorted(WARPERS))
def test_each_warper_matches_transformers_at_its_boundaries(name, keep):
    options, transformers_warper = WARPERS[name]
    expected = transformers_warper(keep)(torch.zeros((SCORES.shape[0], 1), dtype=torch.long), SCORES.clone())
    actual = _warped(options, keep)
    for row, case in enumerate(ROWS):
        kept, expected_kept = actual[row].isfinite(), expected[row].isfinite()
        assert torch.equal(kept, expected_kept), (
            f"{case}: kept {kept.tolist()}, transformers {expected_kept.tolist()}"
        )
        assert torch.equal(actual[row][kept], expected[row][kept]), case


def test_top_p_keeps_the_token_whose_cumulative_probability_is_exactly_the_boundary():
    """Uniform over 4 tokens, top_p=0.75: the lowest token's cumulative 0.25 equals 1 - top_p, so it goes;
    three stay (transformers removes cumulative <= 1 - top_p)."""
    settings = GenerationSettings(do_sample=True, top_k=0, top_p=0.75)
    assert warp(torch.zeros((1, 4)), settings).isfinite().sum() == 3


@pytest.mark.parametrize(
    "options", [dict(top_p=0.05), dict(min_p=0.9), dict(epsilon_cutoff=0.3), dict(typical_p=0.05)]
)
def test_the_floor_decides_where_the_threshold_alone_keeps_one_token(options):
    """A peaked row, where each warper's threshold alone keeps one token: keep=2 (beam sampling's floor)
    must leave two, the two most likely."""
    peaked = torch.tensor([[12.0, 1.0, 0.0, -1.0]])
    settings = GenerationSettings(do_sample=True, top_k=0, **options)
    assert warp(peaked.clone(), settings, keep=1).isfinite().sum() == 1
    assert warp(peaked.clone(), settings, keep=2).isfinite().tolist() == [[True, True, False, False]]

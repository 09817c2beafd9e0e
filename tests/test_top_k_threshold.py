"""select.top_k finds its tokens by threshold (no full sort); it must keep
exactly what the stable descending sort keeps: the first k candidates of
`_ranked`, ties to the earlier slot, -inf candidates above non-candidates,
NaN where sort puts it."""
import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpolicy.backends.torch import select as sel

# Few distinct values, so ties are common.
VALUES = [0.0, 0.25, 0.5, 1.0, -1.0, math.inf, -math.inf, -torch.finfo(torch.float32).max]


def by_sorting(scores: torch.Tensor, candidates: torch.Tensor, k: int) -> torch.Tensor:
    order = sel._ranked(scores, candidates)
    counts = candidates.sum(dim=-1).clamp(max=k)
    take = torch.zeros_like(candidates)
    for head in range(scores.shape[0]):
        take[head, order[head, : int(counts[head])]] = True
    return take


@st.composite
def problems(draw):
    heads = draw(st.integers(1, 4))
    length = draw(st.integers(0, 24))
    values = VALUES + ([math.nan] if draw(st.booleans()) else [])
    scores = torch.tensor(draw(st.lists(st.sampled_from(values), min_size=heads * length, max_size=heads * length)), dtype=torch.float32)
    candidates = torch.tensor(draw(st.lists(st.booleans(), min_size=heads * length, max_size=heads * length)), dtype=torch.bool)
    k = draw(st.integers(0, length + 2))
    return scores.reshape(heads, length), candidates.reshape(heads, length), k


@settings(max_examples=400, deadline=None)
@given(problems())
def test_top_k_keeps_what_the_stable_sort_keeps(problem):
    scores, candidates, k = problem
    assert torch.equal(sel.top_k(scores, candidates, k), by_sorting(scores, candidates, k))


def test_both_threshold_directions_on_decode_sized_rows():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 50, (90, 1025), generator=generator).float() / 7  # many ties
    candidates = torch.rand(90, 1025, generator=generator) < 0.5
    for k in (1, 100, 400, 500, 600):  # from above (leave out many) ... from below (leave out few)
        assert torch.equal(sel.top_k(scores, candidates, k), by_sorting(scores, candidates, k))

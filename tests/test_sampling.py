"""Each sampling op on hand-worked distributions, against HF's processors, and as a whole."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from helpers import chi_square_sf
from muestra.engine.sampling import (
    SamplingBatch,
    SamplingParams,
    apply_min_p,
    apply_presence_frequency,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_p,
    sample_inverse_cdf,
)
from muestra.errors import InputError


def probs_of(logits: torch.Tensor) -> torch.Tensor:
    return logits.softmax(-1)


def logits_of(probs: list[float]) -> torch.Tensor:
    return torch.tensor([probs]).log()


def test_top_p_mlx_case():
    out = probs_of(apply_top_p(logits_of([0.9, 0.0, 0.0, 0.1]), torch.tensor([0.3])))
    assert torch.allclose(out, torch.tensor([[1.0, 0.0, 0.0, 0.0]]))


def test_top_p_keeps_smallest_set_reaching_p():
    out = probs_of(apply_top_p(logits_of([0.6, 0.25, 0.1, 0.05]), torch.tensor([0.8])))
    assert torch.allclose(out, torch.tensor([[0.6 / 0.85, 0.25 / 0.85, 0.0, 0.0]]))


def test_top_k_per_row():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [1.0, 3.0, 2.0, 0.0]])
    params = [SamplingParams(top_k=2), SamplingParams(top_k=0)]
    out = SamplingBatch.build(params, 4, torch.device("cpu")).warp(logits).logits
    assert out[0].tolist() == [-math.inf, 3.0, 2.0, -math.inf]
    assert out[1].tolist() == logits[1].tolist()  # k = 0 is off


def test_min_p():
    out = apply_min_p(logits_of([0.5, 0.3, 0.15, 0.05]), torch.tensor([0.2]))
    assert out[0, 3] == -math.inf and torch.isfinite(out[0, :3]).all()


def test_temperature_per_row_and_greedy_rows_untouched():
    logits = torch.tensor([[2.0, 4.0], [2.0, 4.0]])
    out = apply_temperature(logits, torch.tensor([2.0, 0.0]))
    assert out.tolist() == [[1.0, 2.0], [2.0, 4.0]]


def test_repetition_penalty_hand_worked():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    out = apply_repetition_penalty(logits, seen, torch.tensor([2.0]))
    assert out.tolist() == [[1.0, -4.0, 1.0]]


def test_presence_frequency_hand_worked():
    logits = torch.tensor([[1.0, 1.0, 1.0]])
    counts = torch.tensor([[2, 0, 1]])
    out = apply_presence_frequency(logits, counts, torch.tensor([0.5]), torch.tensor([0.1]))
    assert torch.allclose(out, torch.tensor([[1.0 - 0.5 - 0.2, 1.0, 1.0 - 0.5 - 0.1]]))


@pytest.mark.parametrize("seed", range(5))
def test_pipeline_matches_hf_processors(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, 500, generator=g) * 3
    ids = torch.randint(0, 500, (1, 30), generator=g)
    params = SamplingParams(
        temperature=0.7, top_k=40, top_p=0.9, min_p=0.05, repetition_penalty=1.3
    )
    batch = SamplingBatch.build([params], 500, torch.device("cpu"))
    seen = torch.zeros(1, 500, dtype=torch.bool)
    seen[0, ids[0]] = True
    counts = torch.zeros(1, 500, dtype=torch.int32)
    ours = batch.warp(batch.penalise(logits, seen, counts)).logits
    hf = RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())
    for warper in (
        TemperatureLogitsWarper(0.7),
        TopKLogitsWarper(40),
        TopPLogitsWarper(0.9),
        MinPLogitsWarper(0.05),
    ):
        hf = warper(ids, hf)
    assert torch.equal(torch.isinf(ours), torch.isinf(hf))
    assert torch.allclose(ours.softmax(-1), hf.softmax(-1), atol=1e-6)


def test_inverse_cdf_never_draws_zero_probability():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]])
    for u in (0.0, 0.25, 0.4999999, 0.5, 0.75, 0.9999999):
        token = int(sample_inverse_cdf(probs, torch.tensor([u])))
        assert token in (1, 3)
    assert int(sample_inverse_cdf(probs, torch.tensor([0.0]))) == 1
    assert int(sample_inverse_cdf(probs, torch.tensor([0.6]))) == 3


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.5),
        SamplingParams(temperature=1.5, top_k=4),
        SamplingParams(temperature=1.0, top_p=0.8),
        SamplingParams(temperature=1.0, min_p=0.15),
        SamplingParams(temperature=0.8, top_k=5, top_p=0.9, min_p=0.05),
    ],
    ids=["t1", "t0.5", "topk", "topp", "minp", "all"],
)
def test_empirical_frequencies_match_processed_probabilities(params):
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0]])
    batch = SamplingBatch.build([params], 8, torch.device("cpu"))
    expected = batch.warp(logits).logits.softmax(-1)[0]
    draws = 20000
    generator = torch.Generator().manual_seed(1234)
    counts = torch.zeros(8)
    for _ in range(draws):
        counts[int(batch.choose(batch.warp(logits), [generator]))] += 1
    assert counts[expected == 0].sum() == 0, "a removed token was drawn"
    support = expected > 0
    exp_counts = expected[support] * draws
    statistic = float(((counts[support] - exp_counts) ** 2 / exp_counts).sum())
    p_value = chi_square_sf(statistic, int(support.sum()) - 1)
    assert p_value > 0.001, (statistic, counts, exp_counts)


def test_chi_square_detects_a_wrong_sampler():
    """The same test rejects draws from the unprocessed distribution (it can fail)."""
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0]])
    processed = SamplingBatch.build([SamplingParams(temperature=0.5)], 8, torch.device("cpu"))
    expected = processed.warp(logits).logits.softmax(-1)[0]
    wrong = SamplingBatch.build([SamplingParams(temperature=1.0)], 8, torch.device("cpu"))
    generator = torch.Generator().manual_seed(1234)
    counts = torch.zeros(8)
    for _ in range(5000):
        counts[int(wrong.choose(wrong.warp(logits), [generator]))] += 1
    exp_counts = expected * 5000
    statistic = float(((counts - exp_counts) ** 2 / exp_counts).sum())
    assert chi_square_sf(statistic, 7) < 1e-6


def test_mixed_greedy_and_sampled_rows():
    logits = torch.tensor([[0.0, 5.0, 4.9], [0.0, 5.0, 4.9]])
    batch = SamplingBatch.build(
        [SamplingParams(temperature=0), SamplingParams(temperature=50)], 3, torch.device("cpu")
    )
    assert not batch.all_greedy and batch.any_greedy
    generator = torch.Generator().manual_seed(0)
    picks = {int(batch.choose(batch.warp(logits), [None, generator])[1]) for _ in range(50)}
    assert int(batch.choose(batch.warp(logits), [None, generator])[0]) == 1
    assert picks == {0, 1, 2}


def test_logit_bias_and_flags():
    params = [SamplingParams(temperature=0, logit_bias={2: 100.0}), SamplingParams(temperature=0)]
    batch = SamplingBatch.build(params, 3, torch.device("cpu"))
    assert batch.all_greedy and batch.no_penalties
    out = batch.penalise(torch.zeros(2, 3), None, None)
    assert out.argmax(-1).tolist() == [2, 0]
    with pytest.raises(InputError, match="outside"):
        SamplingBatch.build([SamplingParams(logit_bias={7: 1.0})], 3, torch.device("cpu"))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -1},
        {"top_p": 0},
        {"top_p": 1.5},
        {"min_p": 1},
        {"top_k": -2},
        {"repetition_penalty": 0},
        {"presence_penalty": 3},
        {"temperature": float("nan")},
    ],
)
def test_invalid_params_name_the_field(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(InputError, match=name):
        SamplingParams(**kwargs)


def test_a_rows_draw_does_not_depend_on_its_neighbours():
    """Top-k rows take the candidate path, others the full one; mixing them changes nothing."""
    logits = torch.randn(3, 300, generator=torch.Generator().manual_seed(3)) * 2
    params = [
        SamplingParams(top_k=10, top_p=0.9),
        SamplingParams(top_p=0.8),
        SamplingParams(temperature=0),
    ]
    mixed = SamplingBatch.build(params, 300, torch.device("cpu"))
    gens = [torch.Generator().manual_seed(i) for i in range(2)] + [None]
    together = [mixed.choose(mixed.warp(logits), gens).tolist() for _ in range(20)]
    alone = []
    solo_gens = [torch.Generator().manual_seed(i) for i in range(2)] + [None]
    for _ in range(20):
        step = []
        for row, p in enumerate(params):
            solo = SamplingBatch.build([p], 300, torch.device("cpu"))
            step.append(int(solo.choose(solo.warp(logits[row : row + 1]), [solo_gens[row]])))
        alone.append(step)
    assert together == alone


@pytest.mark.parametrize("scale", [0.3, 3.0, 8.0])
def test_top_p_head_equals_the_full_sort(scale):
    """Top-p on a real-sized vocabulary takes the top TOP_P_HEAD tokens first; it keeps
    exactly the tokens HF's full ascending sort keeps, flat rows (whose head holds less
    than p: the full-sort fallback) and peaked rows (decided by the head) alike."""
    from muestra.engine.sampling import TOP_P_HEAD, _top_p_sorted

    g = torch.Generator().manual_seed(int(scale * 10))
    logits = torch.randn(16, 49152, generator=g) * scale
    top_p = torch.tensor([0.5, 0.8, 0.9, 0.95] * 4)
    ours, reference = apply_top_p(logits, top_p), _top_p_sorted(logits, top_p)
    assert torch.equal(torch.isinf(ours), torch.isinf(reference))
    assert torch.equal(ours[~torch.isinf(ours)], logits[~torch.isinf(ours)])
    head_mass = logits.softmax(-1).topk(TOP_P_HEAD, dim=-1).values.sum(-1)
    decided_by_head = int((head_mass >= top_p).sum())
    if scale >= 8.0:
        assert decided_by_head == 16  # the fast path was taken
    if scale <= 0.3:
        assert decided_by_head == 0  # the fallback was taken


def test_probabilities_is_the_distribution_a_row_draws_from():
    """`probabilities`: temperature, top-k, top-p and min-p then softmax, as the pipeline
    samples (the notebooks check it against a hand computation on the real model)."""
    from muestra.engine.sampling import probabilities

    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    plain = probabilities(logits, SamplingParams(temperature=1.0))
    assert torch.allclose(plain, logits.softmax(-1))
    cooled = probabilities(logits, SamplingParams(temperature=0.5))
    assert torch.allclose(cooled, (logits / 0.5).softmax(-1))
    top2 = probabilities(logits, SamplingParams(temperature=1.0, top_k=2))
    assert torch.allclose(top2, torch.cat([torch.tensor([2.0, 1.0]).softmax(-1), torch.zeros(3)]))
    nucleus = probabilities(logits, SamplingParams(temperature=1.0, top_p=0.6))
    # cumulative shares 0.56 < 0.6 ≤ 0.77: the first two tokens cross 0.6
    assert (nucleus > 0).tolist() == [True, True, False, False, False]
    greedy = probabilities(logits, SamplingParams(temperature=0))
    assert greedy.tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]
    with pytest.raises(InputError, match="temperature, top-k, top-p and min-p only"):
        probabilities(logits, SamplingParams(temperature=1.0, repetition_penalty=1.2))

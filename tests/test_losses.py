"""Losses checked against direct computations (brute force where the closed form is subtle)."""
import itertools
import math

import numpy as np
import pytest
import torch

from pyterrier_coder import losses


def test_listnet_kl_matches_definition():
    scores = torch.tensor([[2.0, 1.0, 0.0, 5.0]])
    target = torch.tensor([[2.0, 1.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, False]])   # last column is padding: ignored even with a big score
    p = np.array([2 / 3, 1 / 3, 0.0])
    logq = np.log(np.exp([2.0, 1.0, 0.0]) / np.exp([2.0, 1.0, 0.0]).sum())
    expected = sum(pi * (math.log(pi) - lq) for pi, lq in zip(p, logq) if pi > 0)
    assert losses.listnet_kl(scores, target, mask).item() == pytest.approx(expected, rel=1e-5)


def test_listnet_kl_is_zero_when_distributions_match_and_skips_queries_without_target():
    target = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    scores = torch.tensor([[10.0, 10.0, -1e3], [1.0, 2.0, 3.0]])
    mask = torch.ones_like(target, dtype=torch.bool)
    assert losses.listnet_kl(scores, target, mask).item() == pytest.approx(0.0, abs=1e-5)


def test_listnet_kl_averages_only_over_queries_with_target_mass():
    target = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    scores = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    mask = torch.ones(2, 2, dtype=torch.bool)
    # query 1: KL(one-hot || uniform over 2) = log 2; query 2 has no target and is left out of the mean (not a 0 in it)
    assert losses.listnet_kl(scores, target, mask).item() == pytest.approx(math.log(2), rel=1e-5)


def test_group_losses_ignore_padding_columns():
    scores = torch.tensor([[2.0, 0.0, 5.0]])       # the last column is padding, with a large score
    mask = torch.tensor([[True, True, False]])
    assert losses.pairwise_hinge(scores, mask).item() == pytest.approx(0.0)
    labels = torch.tensor([[1.0, 0.0, 0.0]])
    expected_bce = (math.log1p(math.exp(-2.0)) + math.log(2)) / 2
    assert losses.pointwise_bce(scores, labels, mask).item() == pytest.approx(expected_bce, rel=1e-5)
    assert losses.localized_contrastive(scores, mask).item() == pytest.approx(math.log1p(math.exp(-2.0)), rel=1e-5)


def test_listnet_gradient_raises_relevant_scores():
    scores = torch.zeros(1, 4, requires_grad=True)
    losses.listnet_kl(scores, torch.tensor([[1.0, 0, 0, 0]]), torch.ones(1, 4, dtype=torch.bool)).backward()
    assert scores.grad[0, 0] < 0 and (scores.grad[0, 1:] > 0).all()


def test_multilabel_margin_matches_pairs():
    scores = torch.tensor([[1.0, 0.5, 0.8, 3.0]])
    relevant = torch.tensor([[True, False, False, False]])
    mask = torch.tensor([[True, True, True, False]])
    expected = (max(0, 1 - 1.0 + 0.5) + max(0, 1 - 1.0 + 0.8)) / 2
    assert losses.multilabel_margin(scores, relevant, mask).item() == pytest.approx(expected)


def _rr(ranking_labels, k):
    for i, rel in enumerate(ranking_labels[:k]):
        if rel > 0:
            return 1 / (i + 1)
    return 0.0


def _dcg(gains, k):
    return sum(g / math.log2(i + 2) for i, g in enumerate(gains[:k]))


@pytest.mark.parametrize('seed', range(5))
def test_delta_mrr_and_ndcg_match_brute_force_swaps(seed):
    rng = np.random.default_rng(seed)
    n, k = 12, 8
    gains = np.zeros(n)
    pos_positions = rng.choice(n, size=3, replace=False)
    gains[pos_positions] = rng.integers(1, 3, size=3)
    neg_positions = [i for i in range(n) if gains[i] == 0]
    pos_ranks = torch.tensor([[p + 1 for p in pos_positions]])
    neg_ranks = torch.tensor([[p + 1 for p in neg_positions]])
    pos_mask = torch.ones_like(pos_ranks, dtype=torch.bool)
    pos_gains = torch.tensor([[gains[p] for p in pos_positions]], dtype=torch.float)
    ideal = _dcg(sorted(gains, reverse=True), k)
    d_mrr = losses.delta_mrr(pos_ranks, neg_ranks, pos_mask, k)
    d_ndcg = losses.delta_ndcg(pos_ranks, neg_ranks, pos_gains, pos_mask, k, torch.tensor([ideal]))
    for (a, p), (b, q) in itertools.product(enumerate(pos_positions), enumerate(neg_positions)):
        swapped = gains.copy()
        swapped[p], swapped[q] = swapped[q], swapped[p]
        assert d_mrr[0, a, b].item() == pytest.approx(abs(_rr(swapped, k) - _rr(gains, k)), abs=1e-6)
        assert d_ndcg[0, a, b].item() == pytest.approx(abs(_dcg(swapped, k) - _dcg(gains, k)) / ideal, abs=1e-6)


@pytest.mark.parametrize('seed', range(5))
def test_delta_rr_each_is_each_relevant_documents_own_swap_change(seed):
    rng = np.random.default_rng(seed)
    n, k = 12, 8
    pos_positions = rng.choice(n, size=3, replace=False)
    neg_positions = [i for i in range(n) if i not in pos_positions]
    pos_ranks = torch.tensor([[p + 1 for p in pos_positions]])
    neg_ranks = torch.tensor([[p + 1 for p in neg_positions]])
    pos_mask = torch.ones_like(pos_ranks, dtype=torch.bool)
    d_each = losses.delta_rr_each(pos_ranks, neg_ranks, pos_mask, k)
    for (a, p), (b, q) in itertools.product(enumerate(pos_positions), enumerate(neg_positions)):
        alone = np.zeros(n)                      # this relevant document as the query's only one
        alone[p] = 1
        swapped = alone.copy()
        swapped[p], swapped[q] = 0, 1
        assert d_each[0, a, b].item() == pytest.approx(abs(_rr(swapped, k) - _rr(alone, k)), abs=1e-6)
    # with a single relevant document it is the exact change of the query's reciprocal rank
    one = pos_ranks[:, :1]
    assert torch.allclose(losses.delta_rr_each(one, neg_ranks, pos_mask[:, :1], k),
                          losses.delta_mrr(one, neg_ranks, pos_mask[:, :1], k))


def test_delta_rr_each_moves_the_relevant_documents_below_the_first():
    # relevant at ranks 1 and 3, a negative at rank 2: the exact ΔMRR of the second one is 0, its own change 1/2 - 1/3
    pos_ranks, neg_ranks = torch.tensor([[1, 3]]), torch.tensor([[2]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    assert losses.delta_mrr(pos_ranks, neg_ranks, mask, 10)[0, 1, 0].item() == 0
    assert losses.delta_rr_each(pos_ranks, neg_ranks, mask, 10)[0, :, 0].tolist() == pytest.approx([0.5, 1 / 6])


def test_weighted_pairwise_logistic_weights_pairs():
    pos = torch.tensor([[1.0]])
    neg = torch.tensor([[0.0, 2.0]])
    weights = torch.tensor([[[0.0, 3.0]]])
    mask = torch.ones(1, 1, 2, dtype=torch.bool)
    expected = (0 * math.log1p(math.exp(-1)) + 3 * math.log1p(math.exp(1))) / 2
    assert losses.weighted_pairwise_logistic(pos, neg, weights, mask).item() == pytest.approx(expected, rel=1e-5)


def test_group_losses():
    scores = torch.tensor([[3.0, 1.0, 0.0]])
    expected = -math.log(math.exp(3) / (math.exp(3) + math.exp(1) + 1))
    assert losses.localized_contrastive(scores).item() == pytest.approx(expected, rel=1e-5)
    assert losses.pairwise_hinge(scores).item() == pytest.approx(0.0)
    assert losses.pairwise_hinge(torch.tensor([[0.0, 0.5]])).item() == pytest.approx(1.5)
    bce = losses.pointwise_bce(torch.tensor([0.0]), torch.tensor([1.0]))
    assert bce.item() == pytest.approx(math.log(2), rel=1e-5)


def test_losses_are_chosen_by_name_or_given_as_a_callable():
    from pyterrier_coder.losses import CANDIDATE_LIST_LOSSES, GROUP_LOSSES, loss_function, loss_name
    assert loss_function('listnet', CANDIDATE_LIST_LOSSES, 'Coder') is CANDIDATE_LIST_LOSSES['listnet']
    assert loss_function('lce', GROUP_LOSSES, 'MonoElectra') is GROUP_LOSSES['lce']

    def mine(scores, mask=None):
        return scores.sum() * 0
    assert loss_function(mine, GROUP_LOSSES, 'MonoElectra') is mine
    assert loss_name(mine).endswith('test_losses_are_chosen_by_name_or_given_as_a_callable.<locals>.mine')
    with pytest.raises(ValueError, match=r"Coder: loss must be one of \('listnet', 'margin'\) or a callable, got 'kl'"):
        loss_function('kl', CANDIDATE_LIST_LOSSES, 'Coder')
    scores = torch.tensor([[2.0, 1.0, 0.5]])
    mask = torch.ones_like(scores, dtype=torch.bool)
    target = torch.tensor([[1.0, 0.0, 0.0]])
    torch.testing.assert_close(CANDIDATE_LIST_LOSSES['listnet'](scores, target, mask, temperature=0.5),
                               losses.listnet_kl(scores / 0.5, target, mask))
    torch.testing.assert_close(GROUP_LOSSES['ce'](scores, mask),
                               losses.pointwise_bce(scores, torch.tensor([[1.0, 0.0, 0.0]]), mask))

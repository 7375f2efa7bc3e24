"""Ranking losses used by the trainers.

All list losses take ``scores`` of shape ``[B, L]`` and a boolean ``mask`` of the same shape (False = padding,
excluded from the loss). Every function returns a scalar: the mean over the queries of the batch.

A component's ``loss=`` setting is a name from its table (:data:`CANDIDATE_LIST_LOSSES` for CODER,
:data:`GROUP_LOSSES` for MonoElectra) or a callable with the same signature as that table's functions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_NEG = -1e4  # large negative for masked logits; finite so fp16/bf16 softmax never sees inf - inf


def _masked(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return scores.masked_fill(~mask, _NEG)


def listnet_kl(scores: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """ListNet / KL(softmax-target || softmax(scores)) (CODER).

    ``target`` holds non-negative relevance weights (0 = no target mass); it is normalised per query to a
    distribution. Queries with no target mass contribute nothing (callers skip them beforehand)."""
    target = target.float() * mask
    mass = target.sum(-1, keepdim=True)
    has_target = mass.squeeze(-1) > 0
    p = target / mass.clamp(min=1e-12)
    log_q = F.log_softmax(_masked(scores.float(), mask), dim=-1)
    # KL = sum p log p - sum p log q; the entropy term is constant but makes the value a true divergence (>= 0)
    kl = (p * (torch.log(p.clamp(min=1e-12)) - log_q)).masked_fill(p == 0, 0).sum(-1)
    return kl[has_target].mean() if has_target.any() else scores.sum() * 0


def softmax_target(weights: torch.Tensor, mask: torch.Tensor, label_temperature: float = 1.0) -> torch.Tensor:
    """The CODER paper's target distribution (Eq. 3: D_KL(σ(y) ‖ σ(ŝ))): the softmax over a query's candidates of its
    target weights ``y`` divided by ``label_temperature``, so every candidate has some mass and a relevant one
    ``exp(y / label_temperature)`` times that of an unjudged one. Padding (``mask`` False) gets none, and a query
    without any positive weight gets no target at all (zeros: :func:`listnet_kl` skips it)."""
    logits = _masked(weights.float() / label_temperature, mask)
    p = torch.softmax(logits, dim=-1) * mask
    return p * ((weights > 0) & mask).any(-1, keepdim=True)


def multilabel_margin(scores: torch.Tensor, relevant: torch.Tensor, mask: torch.Tensor,
                      margin: float = 1.0) -> torch.Tensor:
    """Pairwise multi-label max-margin loss (CODER's ablation): mean over (relevant i, non-relevant j) pairs
    of ``max(0, margin - s_i + s_j)``."""
    pos = relevant & mask
    neg = (~relevant) & mask
    diff = margin - scores.unsqueeze(-1) + scores.unsqueeze(-2)          # [B, i, j]
    pairs = pos.unsqueeze(-1) & neg.unsqueeze(-2)
    hinge = F.relu(diff.float()) * pairs
    per_query = hinge.sum((-1, -2)) / pairs.sum((-1, -2)).clamp(min=1)
    valid = pairs.any(-1).any(-1)
    return per_query[valid].mean() if valid.any() else scores.sum() * 0


def reciprocal_rank(ranks: torch.Tensor, k: int) -> torch.Tensor:
    """1/rank within the cut-off k, else 0 (ranks start at 1)."""
    ranks = ranks.float()
    return torch.where(ranks <= k, 1.0 / ranks, torch.zeros_like(ranks))


def discount(ranks: torch.Tensor, k: int) -> torch.Tensor:
    ranks = ranks.float()
    return torch.where(ranks <= k, 1.0 / torch.log2(ranks + 1), torch.zeros_like(ranks))


def delta_mrr(pos_ranks: torch.Tensor, neg_ranks: torch.Tensor, pos_mask: torch.Tensor, k: int) -> torch.Tensor:
    """|ΔMRR@k| when a relevant document (rank r+) and a non-relevant one (rank r-) swap places.

    pos_ranks ``[B, P]`` (padding masked by ``pos_mask``), neg_ranks ``[B, N]``; returns ``[B, P, N]``.
    With several relevant documents only the first one counts: with f the first and s the second relevant rank,
    a swap changes RR if the negative was above f (new first = r-) or if the first relevant drops below the
    second (new first = min(s, r-))."""
    big = torch.full_like(pos_ranks, 10**9)
    ranks = torch.where(pos_mask, pos_ranks, big)
    sorted_ranks = ranks.sort(-1).values
    first = sorted_ranks[:, :1]
    second = sorted_ranks[:, 1:2] if sorted_ranks.shape[1] > 1 else torch.full_like(first, 10**9)
    rp = pos_ranks.unsqueeze(-1)                     # [B, P, 1]
    rn = neg_ranks.unsqueeze(-2)                     # [B, 1, N]
    f = first.unsqueeze(-1)
    s = second.unsqueeze(-1)
    rr_f = reciprocal_rank(f, k)
    up = reciprocal_rank(rn.expand(-1, rp.shape[1], -1), k) - rr_f               # negative above first relevant
    down = rr_f - reciprocal_rank(torch.minimum(s, rn).expand(-1, rp.shape[1], -1), k)  # first relevant drops
    delta = torch.where(rn < f, up, torch.where((rp == f) & (rn > f), down, torch.zeros_like(up)))
    return delta.abs() * pos_mask.unsqueeze(-1)


def delta_rr_each(pos_ranks: torch.Tensor, neg_ranks: torch.Tensor, pos_mask: torch.Tensor, k: int) -> torch.Tensor:
    """``|1/r+ - 1/r-|`` within the cut-off k (0 beyond it): each relevant document's own change of reciprocal rank
    if it swapped places with the non-relevant one, as if it were the query's only relevant document. This is the
    weight ADORE's reference implementation gives every pair; with one relevant document it equals
    :func:`delta_mrr`, with several it also moves the relevant documents below the first. Shapes as
    :func:`delta_mrr`."""
    rr_pos = reciprocal_rank(pos_ranks, k).unsqueeze(-1)
    rr_neg = reciprocal_rank(neg_ranks, k).unsqueeze(-2)
    return (rr_pos - rr_neg).abs() * pos_mask.unsqueeze(-1)


def delta_ndcg(pos_ranks, neg_ranks, pos_gains, pos_mask, k: int, ideal_dcg: torch.Tensor) -> torch.Tensor:
    """|ΔnDCG@k| when a relevant document (gain g, rank r+) swaps with a non-relevant one (gain 0, rank r-):
    ``g * |D(r+) - D(r-)| / IDCG`` with ``D(r) = 1/log2(r+1)`` within the cut-off."""
    dp = discount(pos_ranks, k).unsqueeze(-1)
    dn = discount(neg_ranks, k).unsqueeze(-2)
    delta = pos_gains.unsqueeze(-1) * (dp - dn).abs() / ideal_dcg.clamp(min=1e-12).view(-1, 1, 1)
    return delta * pos_mask.unsqueeze(-1)


def weighted_pairwise_logistic(pos_scores: torch.Tensor, neg_scores: torch.Tensor, weights: torch.Tensor,
                               pair_mask: torch.Tensor) -> torch.Tensor:
    """ADORE / LambdaRank: mean over queries of ``sum_pairs w * log(1 + exp(s- - s+))`` (normalised by the
    number of pairs). ``pos_scores [B,P]``, ``neg_scores [B,N]``, ``weights``/``pair_mask`` ``[B,P,N]``."""
    diff = neg_scores.unsqueeze(-2) - pos_scores.unsqueeze(-1)
    loss = F.softplus(diff.float()) * weights * pair_mask
    per_query = loss.sum((-1, -2)) / pair_mask.sum((-1, -2)).clamp(min=1)
    valid = pair_mask.any(-1).any(-1)
    return per_query[valid].mean() if valid.any() else pos_scores.sum() * 0


def localized_contrastive(scores: torch.Tensor, mask: torch.Tensor = None) -> torch.Tensor:
    """LCE: softmax cross-entropy over a group whose column 0 is the positive."""
    if mask is not None:
        scores = _masked(scores.float(), mask)
    target = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
    return F.cross_entropy(scores.float(), target)


def pointwise_bce(scores: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor = None) -> torch.Tensor:
    """Pointwise binary cross-entropy on relevance logits (monoBERT-style 'CE' baseline)."""
    loss = F.binary_cross_entropy_with_logits(scores.float(), labels.float(), reduction='none')
    if mask is None:
        return loss.mean()
    return (loss * mask).sum() / mask.sum().clamp(min=1)


def pairwise_hinge(scores: torch.Tensor, mask: torch.Tensor = None, margin: float = 1.0) -> torch.Tensor:
    """Pairwise hinge between the positive (column 0) and each negative of its group."""
    diff = F.relu(margin - scores[:, :1].float() + scores[:, 1:].float())
    if mask is None:
        return diff.mean()
    m = mask[:, 1:]
    return (diff * m).sum() / m.sum().clamp(min=1)



# ----------------------------------------------------------------------------------------------------------
# the tables the components choose their loss from (by name), each entry with one signature per table

def candidate_listnet(scores: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, *,
                      temperature: float) -> torch.Tensor:
    """CODER's listwise loss over a query's candidates: :func:`listnet_kl` of the scores divided by the temperature
    (the scores a model outputs stay plain inner products)."""
    return listnet_kl(scores / temperature, target, mask)


def candidate_margin(scores: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, *,
                     temperature: float) -> torch.Tensor:
    """CODER's pairwise ablation: :func:`multilabel_margin` with the candidates of positive target weight as the
    relevant ones (on the unscaled scores: the margin is in their units)."""
    return multilabel_margin(scores, target > 0, mask)


#: CODER: ``fn(scores [B, L], target weights [B, L], mask [B, L], *, temperature) -> scalar``
CANDIDATE_LIST_LOSSES = {'listnet': candidate_listnet, 'margin': candidate_margin}


def group_pointwise_bce(scores: torch.Tensor, mask: torch.Tensor = None) -> torch.Tensor:
    """:func:`pointwise_bce` on groups whose column 0 is the positive and the others negatives."""
    labels = torch.zeros_like(scores, dtype=torch.float32)
    labels[:, 0] = 1.0
    return pointwise_bce(scores, labels, mask)


#: MonoElectra: ``fn(scores [B, n], mask [B, n]) -> scalar``, column 0 of each group its positive
GROUP_LOSSES = {'lce': localized_contrastive, 'ce': group_pointwise_bce, 'hinge': pairwise_hinge}


def loss_function(loss, table: dict, component: str):
    """The function of ``loss``: a name from ``table``, or a callable (used as it is)."""
    if callable(loss):
        return loss
    if loss not in table:
        raise ValueError(f'{component}: loss must be one of {tuple(table)} or a callable, got {loss!r}')
    return table[loss]


def loss_name(loss) -> str:
    """How a loss is recorded in saved settings: its name, or a callable's qualified name."""
    return loss if isinstance(loss, str) else f'{getattr(loss, "__module__", "?")}.{getattr(loss, "__qualname__", loss)}'


def in_batch_pairwise_logistic(scores: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """STAR's loss as its authors' code computes it: RankNet over every (positive, negative) pair of the batch.

    ``scores [B, N]``: each query against every document encoded for the batch; ``positives [B]``: the column of
    each query's positive; ``negatives [B, N]``: whether document j is a negative for query i (its hard negatives,
    the other queries' documents, never a document judged relevant to it). The mean over all pairs of the batch of
    ``log(1 + exp(s(q, d-) - s(q, d+)))``: every pair weighs the same, so a query with more negatives weighs more."""
    scores = scores.float()
    diff = scores - scores.gather(1, positives.view(-1, 1))
    pairs = negatives.sum()
    if not pairs:
        return scores.sum() * 0
    return (F.softplus(diff) * negatives).sum() / pairs


def in_batch_softmax(scores: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """The listwise alternative on the same pairs: softmax cross-entropy of each query's positive against its
    negatives, ``-log(exp(s+) / (exp(s+) + sum exp(s-)))``, averaged over the queries that have a negative.
    Arguments as :func:`in_batch_pairwise_logistic`."""
    scores = scores.float()
    rows = torch.arange(len(scores), device=scores.device)
    kept = negatives.clone()
    kept[rows, positives] = True
    log_p = F.log_softmax(_masked(scores, kept), dim=-1)[rows, positives]
    valid = negatives.any(-1)
    return -log_p[valid].mean() if valid.any() else scores.sum() * 0


def margin_mse(pos_scores: torch.Tensor, neg_scores: torch.Tensor, teacher_margins: torch.Tensor,
               mask: torch.Tensor = None) -> torch.Tensor:
    """Margin-MSE (Hofstätter et al., 2020): the mean over pairs of ``((s+ - s-) - teacher margin)²``, so the student
    learns the teacher's margins, not its absolute scores (teacher and student scores may have different offsets).
    All arguments have one shape (one pair per element); ``mask`` (False = not a pair) leaves elements out."""
    error = ((pos_scores.float() - neg_scores.float()) - teacher_margins.float()) ** 2
    if mask is None:
        return error.mean()
    return (error * mask).sum() / mask.sum().clamp(min=1)


def in_batch_margin_mse(scores: torch.Tensor, teacher: torch.Tensor, positive: torch.Tensor,
                        mask: torch.Tensor) -> torch.Tensor:
    """Margin-MSE over in-batch negatives (TAS-Balanced's in-batch term): query i's positive, in column
    ``positive[i]`` of ``scores [B, P]`` (every query against every passage of the batch), is paired with each
    passage j where ``mask[i, j]``, and ``((s_i,pos - s_i,j) - (t_i,pos - t_i,j))²`` is averaged per query, then over
    the queries that have such a passage. ``teacher`` holds the in-batch teacher's scores of the same cells."""
    rows = torch.arange(scores.shape[0], device=scores.device)
    student = scores.float()[rows, positive].unsqueeze(1) - scores.float()
    target = teacher.float()[rows, positive].unsqueeze(1) - teacher.float()
    error = ((student - target) ** 2) * mask
    counts = mask.sum(1)
    valid = counts > 0
    if not valid.any():
        return scores.sum() * 0
    return (error.sum(1)[valid] / counts[valid]).mean()

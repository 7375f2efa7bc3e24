"""The positive threshold read from the qrels: binary, TREC DL-style 0-3, NFCorpus' 2-1, and the real collections."""
import pandas as pd
import pytest

from pyterrier_coder.labels import choose_label_scale


def _qrels(rows):
    return pd.DataFrame(rows, columns=['qid', 'docno', 'label'])


def test_binary_qrels_use_every_positive():
    qrels = _qrels([(f'q{i}', f'd{j}', 1) for i in range(10) for j in range(2)] + [('q0', 'd9', 0)])
    scale = choose_label_scale(qrels)
    assert (scale.min_label, scale.lower_labels, scale.grades) == (1, 'negative', (1,))
    assert scale.queries == scale.queries_kept == 10 and 'one positive grade' in scale.reason


def test_graded_qrels_use_the_top_grade_that_leaves_enough_queries():
    # TREC DL style 0-3: 4 of 10 queries have a 3, 8 have a 2 or more, all have a 1 or more
    rows = [(f'q{i}', 'a', 1) for i in range(10)] + [(f'q{i}', 'b', 2) for i in range(8)] + \
        [(f'q{i}', 'c', 3) for i in range(4)] + [(f'q{i}', 'z', 0) for i in range(10)]
    scale = choose_label_scale(_qrels(rows))
    assert (scale.min_label, scale.lower_labels, scale.grades, scale.queries_kept) == (3, 'ignore', (1, 2, 3), 4)
    # with a stricter share, the next grade down
    assert choose_label_scale(_qrels(rows), min_query_share=0.5).min_label == 2
    # a top grade for one query in ten is not enough: every grade that leaves 30% counts
    rare = [(f'q{i}', 'a', 1) for i in range(10)] + [('q0', 'b', 2)]
    scale = choose_label_scale(_qrels(rare))
    assert (scale.min_label, scale.lower_labels) == (1, 'negative') and 'no grade above 1' in scale.reason


def test_the_topics_restrict_the_queries_counted():
    rows = [(f'q{i}', 'a', 1) for i in range(10)] + [(f'q{i}', 'b', 2) for i in range(3)]
    topics = pd.DataFrame({'qid': ['q0', 'q1', 'q2', 'q3'], 'query': ['x'] * 4})
    assert choose_label_scale(_qrels(rows)).min_label == 2          # 3 of 10
    assert choose_label_scale(_qrels(rows), topics).queries == 4      # 3 of 4 among the topics
    with pytest.raises(ValueError, match='no judged positive'):
        choose_label_scale(_qrels([('q0', 'a', 0)]))


def test_real_collections(nfcorpus_dataset, vaswani_dataset):
    nfcorpus = choose_label_scale(nfcorpus_dataset.get_qrels('train'), nfcorpus_dataset.get_topics('train'))
    assert (nfcorpus.min_label, nfcorpus.lower_labels, nfcorpus.grades) == (2, 'ignore', (1, 2))
    assert 800 < nfcorpus.queries_kept < 1000 < nfcorpus.queries
    vaswani = choose_label_scale(vaswani_dataset.get_qrels('train'), vaswani_dataset.get_topics('train'))
    assert (vaswani.min_label, vaswani.lower_labels, vaswani.queries) == (1, 'negative', 55)

import json
import warnings

import pandas as pd
import pyterrier as pt
import pytest

from pyterrier_coder.datasets import DatasetError, IrdsCollection, LocalDataset, load_dataset

CORPUS = [
    {'docno': '001', 'text': 'the first document'},
    {'docno': 'd2', 'text': 'the second document'},
    {'docno': 'd3', 'text': ''},
]
TOPICS = 'qid\tquery\n001\tfirst query\n2\tsecond query\n'
QRELS = '001 0 001 1\n001 0 d2 0\n2 0 d3 2\n'


def write_dataset(root, corpus=None, topics=None, qrels=None):
    """Writes a dataset directory; `topics`/`qrels` map split names to file contents."""
    root.mkdir(parents=True, exist_ok=True)
    corpus = CORPUS if corpus is None else corpus
    (root / 'corpus.jsonl').write_text(
        ''.join((line if isinstance(line, str) else json.dumps(line)) + '\n' for line in corpus))
    for kind, suffix, files in [('topics', '.tsv', topics or {'test': TOPICS}),
                                ('qrels', '.txt', qrels or {'test': QRELS})]:
        (root / kind).mkdir(exist_ok=True)
        for split, content in files.items():
            (root / kind / f'{split}{suffix}').write_text(content)
    return root


@pytest.fixture
def tiny(tmp_path):
    return LocalDataset(write_dataset(tmp_path / 'tiny', topics={'test': TOPICS, 'train': TOPICS},
                                      qrels={'test': QRELS, 'train': QRELS}))


# -- happy path ----------------------------------------------------------------------------------------

def test_load_dataset_local(tmp_path):
    path = write_dataset(tmp_path / 'ds')
    for spec in (path, str(path)):
        ds = load_dataset(spec)
        assert isinstance(ds, LocalDataset) and isinstance(ds, pt.datasets.Dataset)
        assert ds.path == path
    assert repr(ds) == f'LocalDataset({str(path)!r})'
    assert load_dataset(ds) is ds
    assert ds.info_url() is None


def test_load_dataset_irds_is_passed_to_pyterrier(monkeypatch):
    sentinel = object()
    calls = []
    monkeypatch.setattr(pt, 'get_dataset', lambda spec: calls.append(spec) or sentinel)
    assert load_dataset('irds:beir/nfcorpus/test') is sentinel
    assert calls == ['irds:beir/nfcorpus/test']


class _RecordingIrds:
    """Stands in for pt.get_dataset's IRDSDataset (no download here): records what is read from which id."""

    def __init__(self, spec, calls):
        self.spec, self.calls = spec, calls

    def get_topics(self, variant=None):
        self.calls.append((self.spec, 'topics', variant))
        return pd.DataFrame({'qid': [self.spec], 'query': ['q']})

    def get_qrels(self, variant=None):
        self.calls.append((self.spec, 'qrels', variant))
        return pd.DataFrame({'qid': [self.spec], 'docno': ['d'], 'label': [1]})

    def get_corpus_iter(self, **kwargs):
        self.calls.append((self.spec, 'corpus', None))
        return iter([{'docno': 'd', 'text': 't'}])


def test_irds_collection_reads_its_splits_from_the_sub_datasets(monkeypatch):
    """ir_datasets names splits as sub-datasets (beir/nfcorpus/train) while PyTerrier reads get_topics' argument
    as a query field, so get_topics('train') of pt.get_dataset('irds:beir/nfcorpus') cannot work. ir_datasets'
    registry is real here (it is part of the package); only the reading of files is stood in for."""
    calls = []
    monkeypatch.setattr(pt, 'get_dataset', lambda spec: _RecordingIrds(spec, calls))
    ds = load_dataset('irds:beir/nfcorpus')
    assert isinstance(ds, IrdsCollection) and ds.splits == ['dev', 'test', 'train']
    assert ds.get_topics('train')['qid'].tolist() == ['irds:beir/nfcorpus/train']
    assert ds.get_qrels('test')['qid'].tolist() == ['irds:beir/nfcorpus/test']
    assert list(ds.get_corpus_iter()) == [{'docno': 'd', 'text': 't'}]
    ds.get_topics('text')           # not a split: PyTerrier's query-field variant of the collection's topics
    assert calls == [('irds:beir/nfcorpus/train', 'topics', None), ('irds:beir/nfcorpus/test', 'qrels', None),
                     ('irds:beir/nfcorpus', 'corpus', None), ('irds:beir/nfcorpus', 'topics', 'text')]
    with pytest.raises(KeyError, match="No split 'valid'.*'dev', 'test', 'train'"):
        ds.split('valid')
    assert 'dev/small' in IrdsCollection.split_names('msmarco-passage')   # split names may hold a '/'
    assert load_dataset('irds:beir/nfcorpus/test').spec == 'irds:beir/nfcorpus/test'   # a leaf: unchanged
    assert load_dataset('irds:vaswani').spec == 'irds:vaswani'


def test_topics(tiny):
    assert tiny.splits == ['test', 'train']
    topics = tiny.get_topics('test')
    assert list(topics.columns) == ['qid', 'query']
    assert topics['qid'].tolist() == ['001', '2']  # leading zeros kept
    assert topics['query'].tolist() == ['first query', 'second query']
    assert all(isinstance(v, str) for v in topics.to_numpy().ravel())


def test_qrels(tiny):
    qrels = tiny.get_qrels('test')
    assert list(qrels.columns) == ['qid', 'docno', 'label']
    assert qrels.values.tolist() == [['001', '001', 1], ['001', 'd2', 0], ['2', 'd3', 2]]
    assert qrels['label'].dtype == 'int64'
    assert all(isinstance(v, str) for v in qrels[['qid', 'docno']].to_numpy().ravel())


def test_topicsqrels(tiny):
    topics, qrels = tiny.get_topicsqrels('train')
    assert len(topics) == 2 and len(qrels) == 3


def test_corpus_iter(tiny):
    docs = list(tiny.get_corpus_iter(verbose=False))
    assert docs == CORPUS
    assert tiny.num_docs() == 3
    assert list(tiny.get_corpus_iter(verbose=True)) == CORPUS  # progress bar does not change the output


def test_corpus_iter_has_a_length(tmp_path):
    # as PyTerrier's dataset iterators (pt.utils.GeneratorLen): code written for them calls len()
    ds = LocalDataset(write_dataset(tmp_path / 'ds', corpus=[CORPUS[0], '', CORPUS[1]]))
    it = ds.get_corpus_iter(verbose=False)
    assert len(it) == 2
    assert next(it) == CORPUS[0] and list(it) == [CORPUS[1]]
    assert len(ds.get_corpus_iter(verbose=True)) == 2


def test_corpus_extra_fields_and_blank_lines(tmp_path):
    ds = LocalDataset(write_dataset(tmp_path / 'ds', corpus=[{'docno': 'a', 'text': 't', 'title': 'T'}, '',
                                                             {'docno': 7, 'text': 'int docno'}]))
    assert list(ds.get_corpus_iter(verbose=False)) == [{'docno': 'a', 'text': 't', 'title': 'T'},
                                                       {'docno': '7', 'text': 'int docno'}]
    assert ds.num_docs() == 2


def test_single_split_needs_no_name(tmp_path):
    ds = LocalDataset(write_dataset(tmp_path / 'ds'))
    assert ds.splits == ['test']
    pd.testing.assert_frame_equal(ds.get_topics(), ds.get_topics('test'))
    pd.testing.assert_frame_equal(ds.get_qrels(), ds.get_qrels('test'))


def test_several_splits_need_a_name(tiny):
    with pytest.raises(ValueError, match=r"\['test', 'train'\]"):
        tiny.get_topics()


def test_empty_queries_are_kept_with_a_warning(tmp_path):
    ds = LocalDataset(write_dataset(tmp_path / 'ds', topics={'test': 'qid\tquery\n1\t\n2\tok\n3\n'}))
    with pytest.warns(UserWarning, match='2 of 3 topics') as record:
        topics = ds.get_topics('test')
    assert len(record) == 1  # once, with the count
    assert topics.values.tolist() == [['1', ''], ['2', 'ok'], ['3', '']]


def test_no_warning_without_empty_queries(tiny):
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        tiny.get_topics('test')


# -- errors --------------------------------------------------------------------------------------------

def test_missing_directory(tmp_path):
    missing = tmp_path / 'nope'
    with pytest.raises(FileNotFoundError, match='nope'):
        load_dataset(missing)
    with pytest.raises(FileNotFoundError, match='nope'):
        LocalDataset(missing)


def test_path_that_is_a_file(tmp_path):
    (tmp_path / 'file.txt').write_text('x')
    with pytest.raises(ValueError, match='file.txt'):
        load_dataset(tmp_path / 'file.txt')


def test_bad_spec_type():
    with pytest.raises(ValueError):
        load_dataset(42)


def test_missing_split_lists_available(tiny):
    with pytest.raises(KeyError, match=r"'dev'.*\['test', 'train'\]"):
        tiny.get_topics('dev')
    with pytest.raises(KeyError, match=r"'dev'.*\['test', 'train'\]"):
        tiny.get_qrels('dev')


@pytest.mark.parametrize('line', ['q1 0 d1', 'q1 0 d1 1 extra'])
def test_qrels_wrong_field_count(tmp_path, line):
    ds = LocalDataset(write_dataset(tmp_path / 'ds', qrels={'test': f'q1 0 d0 1\n\n{line}\n'}))
    with pytest.raises(DatasetError, match=r'test\.txt:3: expected 4 fields'):
        ds.get_qrels('test')


def test_qrels_non_integer_label(tmp_path):
    ds = LocalDataset(write_dataset(tmp_path / 'ds', qrels={'test': 'q1 0 d1 1\nq1 0 d2 rel\n'}))
    with pytest.raises(DatasetError, match=r"test\.txt:2: label must be an integer, found 'rel'"):
        ds.get_qrels('test')


def test_qrels_duplicate(tmp_path):
    ds = LocalDataset(write_dataset(tmp_path / 'ds', qrels={'test': 'q1 0 d1 1\nq1 0 d1 2\n'}))
    with pytest.raises(DatasetError, match=r'test\.txt:2: duplicate.*line 1'):
        ds.get_qrels('test')


@pytest.mark.parametrize('content', ['1\tfirst\n2\tsecond\n', 'id\ttext\n1\tfirst\n', ''])
def test_topics_missing_header(tmp_path, content):
    ds = LocalDataset(write_dataset(tmp_path / 'ds', topics={'test': content}))
    with pytest.raises(DatasetError, match=r'test\.tsv:1: expected the header'):
        ds.get_topics('test')


def test_topics_extra_field(tmp_path):
    ds = LocalDataset(write_dataset(tmp_path / 'ds', topics={'test': 'qid\tquery\n1\tok\n2\ta\tb\n'}))
    with pytest.raises(DatasetError, match=r'test\.tsv:3: expected 2 tab-separated fields'):
        ds.get_topics('test')


def test_topics_duplicate_qid(tmp_path):
    ds = LocalDataset(write_dataset(tmp_path / 'ds', topics={'test': 'qid\tquery\n1\ta\n1\tb\n'}))
    with pytest.raises(DatasetError, match=r"test\.tsv:3: duplicate qid '1'"):
        ds.get_topics('test')


@pytest.mark.parametrize('bad_line, message', [
    ('{"docno": "d9", "text": ', r'corpus\.jsonl:2: not valid JSON'),
    ('{"text": "no docno"}', r"corpus\.jsonl:2: missing 'docno'"),
    ('{"docno": "d9"}', r"corpus\.jsonl:2: missing 'text'"),
    ('{"docno": null, "text": "x"}', r'corpus\.jsonl:2: docno must be a non-empty string'),
    ('{"docno": "d9", "text": 5}', r'corpus\.jsonl:2: text must be a string'),
    ('["d9", "x"]', r'corpus\.jsonl:2: expected a JSON object'),
])
def test_corpus_errors(tmp_path, bad_line, message):
    ds = LocalDataset(write_dataset(tmp_path / 'ds', corpus=[CORPUS[0], bad_line, CORPUS[1]]))
    it = ds.get_corpus_iter(verbose=False)
    assert next(it) == CORPUS[0]  # rows before the bad one are fine
    with pytest.raises(DatasetError, match=message):
        next(it)


def test_missing_corpus(tmp_path):
    root = write_dataset(tmp_path / 'ds')
    (root / 'corpus.jsonl').unlink()
    with pytest.raises(FileNotFoundError, match='corpus.jsonl'):
        LocalDataset(root).get_corpus_iter(verbose=False)  # at the call, not at the first document


# -- real collections (skipped when ../shared/datasets is absent) ---------------------------------------

def test_nfcorpus_counts(nfcorpus_dataset):
    ds = nfcorpus_dataset
    assert ds.splits == ['dev', 'test', 'train']
    assert ds.num_docs() == 3395
    docnos = {d['docno'] for d in ds.get_corpus_iter(verbose=False)}
    assert len(docnos) == 3395
    for split, n_topics in [('train', 2594), ('dev', 325), ('test', 325)]:
        topics, qrels = ds.get_topics(split), ds.get_qrels(split)
        assert len(topics) == n_topics
        assert qrels['label'].isin([1, 2]).all()  # the 2-1-0 files list no 0s
        assert set(qrels['qid']) <= set(topics['qid'])
    # README: every judged test document is in the corpus; 323 of the 325 test topics are judged.
    test_qrels = ds.get_qrels('test')
    assert set(test_qrels['docno']) <= docnos
    assert test_qrels['qid'].nunique() == 323


def test_vaswani_counts(vaswani_dataset):
    ds = vaswani_dataset
    assert ds.splits == ['all', 'dev', 'test', 'train']
    assert ds.num_docs() == 11429
    topics, qrels = ds.get_topics('all'), ds.get_qrels('all')
    assert len(topics) == 93
    assert len(qrels) == 2083
    assert topics['qid'].map(type).eq(str).all() and qrels['docno'].map(type).eq(str).all()
    assert set(qrels['label']) == {1}    # binary labels
    # train / dev / test partition 'all' by position (55 / 14 / 24 topics)
    parts = {split: set(ds.get_topics(split)['qid']) for split in ('train', 'dev', 'test')}
    assert [len(parts[s]) for s in ('train', 'dev', 'test')] == [55, 14, 24]
    assert set().union(*parts.values()) == set(topics['qid']) and sum(map(len, parts.values())) == 93


def test_local_dataset_text_loader(tmp_path):
    """pt.text.get_text(dataset) works with a local directory as it does with ir_datasets: any corpus field."""
    root = tmp_path / 'ds'
    (root / 'topics').mkdir(parents=True)
    (root / 'corpus.jsonl').write_text(json.dumps({'docno': 'a', 'text': 'apple', 'title': 'A'}) + '\n'
                                       + json.dumps({'docno': 'b', 'text': 'pear', 'title': 'B'}) + '\n')
    dataset = load_dataset(root)
    frame = pd.DataFrame({'qid': ['1', '1', '2'], 'docno': ['b', 'a', 'b']})
    out = pt.text.get_text(dataset)(frame)
    assert out['text'].tolist() == ['pear', 'apple', 'pear'] and out['title'].tolist() == ['B', 'A', 'B']
    assert list(pt.text.get_text(dataset, 'title')(frame).columns) == ['qid', 'docno', 'title']
    with pytest.raises(KeyError, match=r"1 docno\(s\) not in the corpus.*\['zz'\]"):
        dataset.text_loader()(pd.DataFrame({'qid': ['1'], 'docno': ['zz']}))
    with pytest.raises(ValueError, match='body'):
        dataset.text_loader('body')


def test_a_directory_of_datasets_is_not_a_dataset(tmp_path):
    (tmp_path / 'nfc' / 'topics').mkdir(parents=True)
    (tmp_path / 'nfc' / 'corpus.jsonl').write_text('')
    with pytest.raises(DatasetError, match=r"not a dataset directory .* it holds the datasets \['nfc'\]"):
        load_dataset(tmp_path)

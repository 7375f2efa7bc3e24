"""The main job (`pyterrier-coder experiment --quick`) on the real NFCorpus: outputs exist, parse and agree."""
import contextlib
import io
import re
import json

import matplotlib.image
import pandas as pd
import pyterrier as pt
import pytest

from pyterrier_coder.cli import main
from pyterrier_coder.experiment import BASELINE, COMPARISONS, paired_comparisons

EXPECTED = ['BM25', 'Dense', 'BM25 >> Dense', 'BM25 >> CODER', 'BM25 >> CODER (+ BM25 score)', 'CODER', 'ADORE',
            'BM25 >> MonoELECTRA', 'BM25 >> MonoELECTRA (+ BM25 score)']


def run_file(name):
    """The runner's file name for the test run of pipeline ``name``."""
    import re
    return re.sub(r'[^A-Za-z0-9]+', '_', name).strip('_') + '.res.gz'


def test_results_table(nfcorpus_quick_run):
    out, stdout = nfcorpus_quick_run
    results = pd.read_csv(out / 'results.csv')
    assert results['name'].tolist() == EXPECTED
    for col in ['nDCG@10', 'RR@10', 'R@100', 'R@1000', 'AP', 'nDCG@10 p-value', 'nDCG@10 p-value corrected', 'ms/query']:
        assert col in results.columns, col
    assert results['nDCG@10'].between(0, 1).all()
    bm25 = results.set_index('name').loc['BM25']
    assert 0.2 < bm25['nDCG@10'] < 0.5          # a real BM25 on a sample of 60 judged test queries
    assert 'BM25 >> CODER' in stdout and 'nDCG@10' in stdout


def test_perquery_and_runs_agree_with_results(nfcorpus_quick_run):
    out, _ = nfcorpus_quick_run
    results = pd.read_csv(out / 'results.csv').set_index('name')
    perquery = pd.read_csv(out / 'perquery.csv', dtype={'qid': str})
    means = perquery[perquery['measure'] == 'nDCG@10'].groupby('name')['value'].mean()
    for name in EXPECTED:
        assert means[name] == pytest.approx(results.loc[name, 'nDCG@10'], abs=1e-9)
    runs = sorted(p.name for p in (out / 'runs').glob('*.res.gz'))
    assert len(runs) == len(EXPECTED)
    assert set(json.loads((out / 'runs' / 'manifest.json').read_text())) == set(EXPECTED)
    assert perquery['qid'].nunique() == 60
    dense_run = pt.io.read_results(str(out / 'runs' / 'Dense.res.gz'))
    assert dense_run['qid'].nunique() == 60 and dense_run.groupby('qid').size().eq(1000).all()
    bm25_run = pt.io.read_results(str(out / 'runs' / 'BM25.res.gz'))
    assert set(bm25_run['qid']) <= set(perquery['qid'])   # BM25 may find nothing for a query


def test_report_and_plots(nfcorpus_quick_run):
    out, _ = nfcorpus_quick_run
    report = (out / 'report.md').read_text()
    assert '| BM25 >> CODER |' in report and BASELINE in report and 'Holm' in report
    for name in ['training_coder.png', 'training_coder_single_stage.png', 'training_adore.png',
                 'training_electra.png', 'perquery_ndcg_diff.png']:
        image = matplotlib.image.imread(out / name)
        assert image.shape[0] > 100 and image.shape[1] > 100
        assert f'![{name}]({name})' in report


def test_comparisons_count_the_wins_and_losses_of_the_system():
    system, reference = COMPARISONS[0]
    values = {system: [0.5, 0.4, 0.3, 0.2], reference: [0.1, 0.2, 0.9, 0.2]}     # system: 2 wins, 1 loss, 1 tie
    perquery = pd.DataFrame([{'qid': str(q), 'name': name, 'measure': measure, 'value': value[q]}
                             for measure in ('nDCG@10', 'RR@10') for name, value in values.items() for q in range(4)])
    rows = paired_comparisons(perquery, [system, reference, 'another system'])
    assert len(rows) == 2                      # one row per measure: no other pair of COMPARISONS is in the names
    row = rows[rows['measure'] == 'nDCG@10'].iloc[0]
    assert (row['system'], row['reference'], row['wins'], row['losses']) == (system, reference, 2, 1)
    assert row['difference'] == pytest.approx(0.0)


def test_paired_comparisons(nfcorpus_quick_run):
    out, _ = nfcorpus_quick_run
    comparisons = pd.read_csv(out / 'comparisons.csv')
    ndcg = comparisons[comparisons['measure'] == 'nDCG@10'].set_index('system')
    assert set(zip(ndcg.index, ndcg['reference'])) == {
        ('BM25 >> CODER', 'BM25'), ('BM25 >> MonoELECTRA', 'BM25'), ('CODER', 'Dense'), ('ADORE', 'Dense'),
        ('BM25 >> CODER (+ BM25 score)', 'BM25'), ('BM25 >> CODER (+ BM25 score)', 'BM25 >> CODER'),
        ('BM25 >> MonoELECTRA (+ BM25 score)', 'BM25'), ('BM25 >> MonoELECTRA (+ BM25 score)', 'BM25 >> MonoELECTRA')}
    perquery = pd.read_csv(out / 'perquery.csv', dtype={'qid': str})
    table = perquery[perquery['measure'] == 'nDCG@10'].pivot(index='qid', columns='name', values='value')
    from scipy import stats
    row = ndcg.loc[['BM25 >> CODER']].iloc[0]
    assert row['difference'] == pytest.approx(table['BM25 >> CODER'].mean() - table['BM25'].mean())
    assert row['p-value'] == pytest.approx(stats.ttest_rel(table['BM25 >> CODER'], table['BM25']).pvalue)
    assert (row['wins'], row['losses']) == ((table['BM25 >> CODER'] > table['BM25']).sum(),
                                            (table['BM25 >> CODER'] < table['BM25']).sum())
    assert '## Paired comparisons' in (out / 'report.md').read_text()


def test_fused_rows_are_the_reranker_runs_interpolated_with_bm25(nfcorpus_quick_run):
    """Each `(+ BM25 score)` test run equals its reranker's test run fused with BM25's scores at the weight chosen
    on dev (fusion_weights.json, also in the report)."""
    import numpy as np
    from pyterrier_coder.experiment import QUICK
    from pyterrier_coder.fusion import normalise_per_query
    out, stdout = nfcorpus_quick_run
    weights = json.loads((out / 'fusion_weights.json').read_text())
    assert set(weights) == {'BM25 >> CODER (+ BM25 score)', 'BM25 >> MonoELECTRA (+ BM25 score)'}
    report = (out / 'report.md').read_text()
    assert '## Interpolation weights' in report
    bm25 = pt.io.read_results(str(out / 'runs' / 'BM25.res.gz'))
    for reranker, depth in [('BM25 >> CODER', 1000), ('BM25 >> MonoELECTRA', QUICK['rerank_depth'])]:
        h = weights[reranker + ' (+ BM25 score)']
        assert h['alpha'] in [a for a, _ in h['by_alpha']] and len(h['by_alpha']) == 11
        assert f"**{reranker} (+ BM25 score)**: weight {h['alpha']:g}" in report
        first = bm25[bm25['rank'] < depth][['qid', 'docno', 'score']]
        ranked = pt.io.read_results(str(out / 'runs' / run_file(reranker)))[['qid', 'docno', 'score']]
        both = ranked.merge(first, on=['qid', 'docno'], suffixes=('', '_bm25'))
        assert len(both) == len(ranked)
        expected = (h['alpha'] * normalise_per_query(both['qid'], both['score'], 'minmax')
                    + (1 - h['alpha']) * normalise_per_query(both['qid'], both['score_bm25'], 'minmax'))
        fused = pt.io.read_results(str(out / 'runs' / run_file(reranker + ' (+ BM25 score)')))
        merged = both.assign(expected=expected).merge(fused, on=['qid', 'docno'], suffixes=('', '_fused'))
        assert len(merged) == len(fused) == len(ranked)
        # the TREC run files keep about 6 significant digits of the scores
        assert np.allclose(merged['score_fused'], merged['expected'], atol=1e-4)
        # the reranker's test scores were reused, not computed again; its time is counted in the fused latency
        assert f"{reranker} (+ BM25 score): fusing the test scores of '{reranker}'" in stdout
        results = pd.read_csv(out / 'results.csv').set_index('name')['ms/query']
        assert results[reranker + ' (+ BM25 score)'] >= results[reranker]


def test_rerun_reuses_models_and_unchanged_runs(nfcorpus_quick_run):
    out, _ = nfcorpus_quick_run
    stamps = {p: p.stat().st_mtime_ns for p in (out / 'models').rglob('*') if p.is_file()}
    before = pd.read_csv(out / 'results.csv')
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(['experiment', '--dataset', str(_dataset_path()), '--quick', '--out', str(out),
                     '--device', 'cpu'])
    assert code == 0
    assert stdout.getvalue().count('reusing trained') == 4
    assert stdout.getvalue().count('reusing the test run') == len(EXPECTED)
    # the interpolation weights are not chosen again (that would score the dev candidates again)
    assert stdout.getvalue().count('chosen by a previous invocation') == 2
    assert 'chosen on' not in stdout.getvalue()
    assert {p: p.stat().st_mtime_ns for p in (out / 'models').rglob('*') if p.is_file()} == stamps
    after = pd.read_csv(out / 'results.csv')
    pd.testing.assert_frame_equal(after, before)   # identical, latency included (measured when first run)
    assert 'Test runs reused' in (out / 'report.md').read_text()


def test_run_cache_misses_when_a_model_changes(nfcorpus_quick_run, tmp_path):
    out, _ = nfcorpus_quick_run
    import shutil
    copy = tmp_path / 'out'
    shutil.copytree(out, copy)
    config = copy / 'models' / 'coder' / 'pyterrier_coder.json'
    config.write_text(config.read_text())       # touched: the model may have changed
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(['experiment', '--dataset', str(_dataset_path()), '--quick', '--out', str(copy),
                     '--device', 'cpu', '--components', 'bm25,dense,coder'])
    assert code == 0
    log = stdout.getvalue()
    assert "reusing the test run of 'BM25 >> CODER'" not in log
    assert "reusing the test run of 'BM25 >> CODER (+ BM25 score)'" not in log
    assert 'BM25 >> CODER (+ BM25 score): weight of the reranker' in log and 'chosen on' in log
    assert "reusing the test run of 'CODER'" in log and "reusing the test run of 'BM25'" in log
    results = pd.read_csv(copy / 'results.csv')
    assert results['name'].tolist() == ['BM25', 'Dense', 'BM25 >> Dense', 'BM25 >> CODER',
                                        'BM25 >> CODER (+ BM25 score)', 'CODER']
    assert sorted(p.name for p in (copy / 'runs').glob('*.res.gz')) == sorted(
        run_file(n) for n in results['name'])   # runs of dropped pipelines are removed


def _dataset_path():
    from conftest import require_dataset
    return require_dataset('nfcorpus')


def test_bad_dataset_and_components_exit_with_message(tmp_path, capsys):
    assert main(['experiment', '--dataset', str(tmp_path / 'missing'), '--out', str(tmp_path / 'o')]) == 2
    assert 'missing' in capsys.readouterr().err
    assert main(['experiment', '--dataset', str(_dataset_path()), '--components', 'bm25,colbert',
                 '--out', str(tmp_path / 'o')]) == 2
    assert 'colbert' in capsys.readouterr().err


@pytest.mark.parametrize('args, component', [(['--base', 'nope-model-dir'], 'DenseEncoder'),
                                             (['--cross-encoder', 'nope-model-dir'], 'MonoElectra')])
def test_a_missing_model_fails_before_anything_is_built(tmp_path, capsys, monkeypatch, args, component):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / 'o'
    assert main(['experiment', '--dataset', str(_dataset_path()), '--out', str(out), '--quick',
                 '--components', 'bm25,electra', *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith('pyterrier-coder: error: ') and f"{component}: cannot load the model 'nope-model-dir'" in err
    assert not (out / 'indexes').exists()


def test_quickstart_notebook_runs(nfcorpus_quick_run, monkeypatch):
    """Executes examples/quickstart.ipynb on the quick budget, reusing the quick run's indexes."""
    nbformat = pytest.importorskip('nbformat')
    nbclient = pytest.importorskip('nbclient')
    from pathlib import Path
    out, _ = nfcorpus_quick_run
    monkeypatch.setenv('PTC_DATASET', str(_dataset_path()))
    monkeypatch.setenv('PTC_INDEX_DIR', str(out / 'indexes'))
    monkeypatch.setenv('PTC_QUICK', '1')
    examples = Path(__file__).resolve().parents[1] / 'examples'
    nb = nbformat.read(examples / 'quickstart.ipynb', as_version=4)
    nbclient.NotebookClient(nb, timeout=900, kernel_name='python3',
                            resources={'metadata': {'path': str(examples)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == 'code' for o in cell.get('outputs', [])]
    assert not [o for o in outputs if o.get('output_type') == 'error']
    table = [o for o in outputs if 'text/html' in o.get('data', {}) and 'BM25 &gt;&gt; CODER' in o['data']['text/html']]
    assert table, 'the pt.Experiment table is missing from the outputs'
    assert 'BM25 &gt;&gt; CODER (+ BM25 score)' in table[0]['data']['text/html']   # the fused row (Interpolate)
    assert any('image/png' in o.get('data', {}) for o in outputs)


def test_electra_ablations_reuse_the_main_row_and_match_its_pairs(nfcorpus_quick_run, tmp_path):
    """--ablations after a main run: the main rows' models and test runs are reused; CE and LCE n=2 are trained at
    the same steps and query-passage pairs per step, and compared with the main MonoELECTRA row."""
    import shutil
    from pyterrier_coder.electra import MonoElectra
    from pyterrier_coder.experiment import QUICK
    out, _ = nfcorpus_quick_run
    copy = tmp_path / 'out'
    shutil.copytree(out, copy)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(['experiment', '--dataset', str(_dataset_path()), '--quick', '--out', str(copy), '--device', 'cpu',
                     '--components', 'bm25,dense,electra', '--ablations'])
    assert code == 0, stdout.getvalue()
    log = stdout.getvalue()
    assert "reusing the test run of 'BM25 >> MonoELECTRA'" in log and 'training electra_ce' in log
    results = pd.read_csv(copy / 'results.csv')
    assert results['name'].tolist() == ['BM25', 'Dense', 'BM25 >> Dense', 'BM25 >> MonoELECTRA',
                                        'BM25 >> MonoELECTRA (+ BM25 score)', 'BM25 >> MonoELECTRA (CE)',
                                        'BM25 >> MonoELECTRA (hinge)', 'BM25 >> MonoELECTRA (LCE, n=2)',
                                        'Dense >> MonoELECTRA', 'BM25 >> MonoELECTRA (dense negatives)',
                                        'Dense >> MonoELECTRA (dense negatives)']
    # the same model reranks both first stages: trained once
    assert log.count('training electra_dense_negatives') == 1 and 'training electra:' not in log
    e = QUICK['electra']
    n2 = MonoElectra.load(copy / 'models' / 'electra_n2', device='cpu')
    ce = MonoElectra.load(copy / 'models' / 'electra_ce', device='cpu')
    assert (n2.group_size, n2.loss, ce.group_size, ce.loss) == (2, 'lce', e['group_size'], 'ce')
    assert n2.group_size * n2.config.batch_size == e['group_size'] * e['train_batch_size']
    assert n2.history['steps'] == ce.history['steps'] == e['max_steps']
    comparisons = pd.read_csv(copy / 'comparisons.csv')
    pairs = set(zip(comparisons['system'], comparisons['reference']))
    assert {('BM25 >> MonoELECTRA (CE)', 'BM25 >> MonoELECTRA'), ('BM25 >> MonoELECTRA (LCE, n=2)', 'BM25 >> MonoELECTRA'),
            ('BM25 >> MonoELECTRA', 'BM25')} <= pairs


def test_set_overrides_parse_and_validate():
    from pyterrier_coder.experiment import FULL, QUICK, apply_overrides, parse_overrides
    overrides = parse_overrides(['electra.max_steps=600', 'coder.lr=1e-5', 'rerank_depth=50',
                                 "electra.loss=ce", 'adore.patience=None'])
    assert overrides == {'electra': {'max_steps': 600, 'loss': 'ce'}, 'coder': {'lr': 1e-5}, 'rerank_depth': 50,
                         'adore': {'patience': None}}
    budget = apply_overrides(FULL, overrides)
    assert budget['electra']['max_steps'] == 600 and budget['coder']['lr'] == 1e-5 and budget['rerank_depth'] == 50
    assert FULL['electra']['max_steps'] == 800          # the module's budget is not changed
    for bad, match in [(['electra.max_stepz=1'], 'max_stepz'), (['colbert.lr=1'], 'colbert'),
                       (['electra=3'], 'component'), (['coder.index=x'], 'index'), (['noequals'], 'key=value'),
                       # values of the wrong type fail here too, naming the setting, not after the indexes are built
                       (['coder.max_steps=ten'], "coder.max_steps must be an integer .* got 'ten'"),
                       (['rerank_depth=abc'], 'rerank_depth must be an integer'),
                       (['train_queries=1.5'], 'train_queries must be an integer'),   # default None in FULL
                       (['electra.group_size=True'], 'electra.group_size must be an integer'),
                       (['coder.lr=fast'], 'coder.lr must be a number'),
                       (['electra.lower_labels=3'], 'electra.lower_labels must be a string'),
                       (['adore.prefetch=1'], 'adore.prefetch must be True or False'),
                       (['rerank_depth=None'], 'rerank_depth cannot be None'),
                       # values the component's constructor would refuse, refused before anything is built
                       (['electra.loss=foo'], "--set: MonoElectra: loss must be one of"),
                       (['electra.group_size=None'], 'MonoElectra: group_size and negatives_from must be >= 1'),
                       (['coder.schedule=cosine'], 'Coder: schedule must be one of'),
                       (['adore.k=0'], 'Adore: k must be >= 1'),
                       # CODER over a trained bi-encoder: changes to the coder budget, checked as a Coder's
                       (['coder_over.refresh_every=0'], 'Coder: refresh_every must be >= 1'),
                       (['coder_over.refresh_evry=5'], 'refresh_evry'),
                       (['coder_over.lr=fast'], 'coder_over.lr must be a number'),
                       # checked with the coder settings it changes, whichever of the two is set last
                       (['coder_over.target=softmax', 'coder.loss=margin'], "Coder: target='softmax' is a distribution")]:
        with pytest.raises(ValueError, match=match):
            apply_overrides(FULL, parse_overrides(bad))
    # an integer where a number is expected, None, and settings without a typed default are accepted
    budget = apply_overrides(FULL, parse_overrides(['coder.warmup=5', 'coder.lr=1', 'coder.max_steps=None',
                                                    'electra.amp=True', 'coder.temperature=2.0', 'test_queries=None']))
    assert (budget['coder']['warmup'], budget['coder']['max_steps'], budget['electra']['amp']) == (5, None, True)
    assert apply_overrides(QUICK, parse_overrides(['test_queries=None']))['test_queries'] is None   # all of them
    budget = apply_overrides(FULL, parse_overrides(['coder_over.lr=5e-5', 'coder_over.refresh_every=None']))
    assert budget['coder_over'] == {'lr': 5e-5, 'refresh_every': None} and budget['coder']['lr'] == FULL['coder']['lr']
    # a fraction where the quick budget's default is 0 steps (an int): the full budget's 0.1 says a number is fine
    assert apply_overrides(QUICK, parse_overrides(['coder.warmup=0.05']))['coder']['warmup'] == 0.05


def test_cli_strips_the_component_names(monkeypatch):
    from pyterrier_coder import cli
    seen = []

    class RecordingExperiment:
        def __init__(self, settings):
            seen.append(settings)

        def run(self):
            raise ValueError('stop here')
    monkeypatch.setattr(cli, 'ExperimentRunner', RecordingExperiment)
    assert main(['experiment', '--dataset', 'x', '--components', ' bm25 , dense,,coder ']) == 2
    assert seen[0].components == ('bm25', 'dense', 'coder')


def test_run_key_changes_with_a_shared_budget_entry(tmp_path):
    # a run is reused only when nothing it depends on changed: here the dev queries the fusion weight is chosen on
    from pyterrier_coder.experiment import ExperimentRunner, ExperimentSettings

    def key(**overrides):
        experiment = ExperimentRunner(ExperimentSettings(dataset='x', out=str(tmp_path), quick=True, overrides=overrides,
                                                   device='cpu', verbose=False))
        return experiment._key('BM25 >> MonoELECTRA (+ BM25 score)', 'BM25 top-10 + text', ['q1', 'q2'], [])
    assert key() == key()
    assert key(electra_dev_queries=11) != key()
    assert key(train_queries=150) != key()


def test_cross_encoder_bf16_on_cpus_with_bf16_instructions(tmp_path, monkeypatch):
    """On CPU the runner trains and scores MonoELECTRA under bf16 autocast only when the CPU has bf16 instructions
    (emulated bf16 is slower than fp32), unless the user set electra.amp; on CUDA the component's default stays."""
    from pyterrier_coder.experiment import ExperimentRunner, ExperimentSettings
    from pyterrier_coder.experiment import runner
    from pyterrier_coder.devices import cpu_computes_bf16
    assert isinstance(cpu_computes_bf16(), bool)

    def amp(has_bf16, device='cpu', overrides=None):
        monkeypatch.setattr(runner, 'cpu_computes_bf16', lambda: has_bf16)
        log = io.StringIO()
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            exp = ExperimentRunner(ExperimentSettings(dataset='unused', out=str(tmp_path), device=device,
                                                overrides=overrides or {}))
        return exp.budget['electra'].get('amp'), 'bf16 autocast' in log.getvalue()

    assert amp(True) == (True, True)
    assert amp(False) == (None, False)
    assert amp(True, overrides={'electra': {'amp': False}}) == (False, False)
    assert amp(True, device='cuda') == (None, False)


def test_changed_settings_retrain_only_that_model(nfcorpus_quick_run, tmp_path):
    """--set changes one component's budget: that model is retrained (the log says what changed), the others and
    their test runs are reused; an unknown setting exits with a message before any work."""
    import json
    import shutil
    out, _ = nfcorpus_quick_run
    copy = tmp_path / 'out'
    shutil.copytree(out, copy)
    args = ['experiment', '--dataset', str(_dataset_path()), '--quick', '--out', str(copy), '--device', 'cpu',
            '--components', 'bm25,dense,coder,electra']
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(args + ['--set', 'electra.max_steps=2', '--set', 'electra.eval_every=1']) == 0
    log = stdout.getvalue()
    assert 'retraining electra: its settings changed (settings)' in log
    assert 'reusing trained coder ' in log and "reusing the test run of 'BM25 >> CODER'" in log
    assert "reusing the test run of 'BM25 >> MonoELECTRA'" not in log
    spec = json.loads((copy / 'models' / 'electra' / 'experiment_spec.json').read_text())
    assert spec['settings']['max_steps'] == 2
    from pyterrier_coder.electra import MonoElectra
    assert MonoElectra.load(copy / 'models' / 'electra', device='cpu').history['steps'] == 2
    with contextlib.redirect_stdout(io.StringIO()) as again:
        assert main(args + ['--set', 'electra.max_steps=2', '--set', 'electra.eval_every=1']) == 0
    assert 'reusing trained electra ' in again.getvalue()
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(args + ['--set', 'electra.max_stepz=2']) == 2
    assert 'max_stepz' in err.getvalue()


def test_a_stopped_job_keeps_the_runs_it_finished(nfcorpus_quick_run, tmp_path, monkeypatch):
    """Each pipeline is run on test as soon as its models are ready, and the run cache is written after each one:
    when training a later model fails, the earlier test runs are on disk and the next invocation reuses them."""
    import json
    import shutil
    from pyterrier_coder.electra import MonoElectra
    out, _ = nfcorpus_quick_run
    copy = tmp_path / 'out'
    shutil.copytree(out, copy)
    shutil.rmtree(copy / 'runs')
    shutil.rmtree(copy / 'models' / 'electra')

    def failing_fit(self, *args, **kwargs):
        raise RuntimeError('stopped')
    monkeypatch.setattr(MonoElectra, 'fit', failing_fit)
    args = ['experiment', '--dataset', str(_dataset_path()), '--quick', '--out', str(copy), '--device', 'cpu',
            '--components', 'bm25,dense,coder,electra']
    with contextlib.redirect_stdout(io.StringIO()), pytest.raises(RuntimeError, match='stopped'):
        main(args)
    finished = ['BM25', 'Dense', 'BM25 >> Dense', 'BM25 >> CODER', 'BM25 >> CODER (+ BM25 score)', 'CODER']
    manifest = json.loads((copy / 'runs' / 'manifest.json').read_text())
    assert sorted(manifest) == sorted(finished)
    assert all((copy / 'runs' / entry['file']).exists() for entry in manifest.values())
    monkeypatch.undo()
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(args) == 0
    log = stdout.getvalue()
    assert all(f'reusing the test run of {name!r}' in log for name in finished)
    assert 'training electra' in log


def test_vaswani_binary_labels_end_to_end(vaswani_dataset, tiny_bert_dir, tiny_cross_encoder_dir, tmp_path):
    """A collection with binary qrels (labels 1 only) and its own train/dev/test splits: the runner chooses every
    judged document as a positive, trains every component and writes every output (tiny models: the figures mean
    nothing, the run must complete)."""
    out = tmp_path / 'vaswani'
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(['experiment', '--dataset', str(vaswani_dataset.path), '--quick', '--out', str(out),
                     '--device', 'cpu', '--base', str(tiny_bert_dir), '--cross-encoder', str(tiny_cross_encoder_dir),
                     '--measures', 'R@10,P@5', '--rel', '2'])
    assert code == 0, stdout.getvalue()[-3000:]
    log = stdout.getvalue()
    assert 'positives: label >= 1 (one positive grade (1): every judged positive counts)' in log
    assert 'dev_queries: dev has 14 topics, fewer than the 30 asked for' in log
    results = pd.read_csv(out / 'results.csv')
    assert results['name'].tolist() == EXPECTED
    for column in ('R@10', 'P@5', 'RR(rel=2)@10', 'R(rel=2)@100', 'R(rel=2)@1000', 'AP(rel=2)'):
        assert results[column].between(0, 1).all(), column
    # Vaswani's labels are all 1: counting only labels >= 2 as relevant, nothing is relevant
    assert (results[['RR(rel=2)@10', 'AP(rel=2)']] == 0).all().all() and (results['RR@10'] > 0).any()
    assert pd.read_csv(out / 'perquery.csv', dtype={'qid': str})['qid'].nunique() == 24
    report = (out / 'report.md').read_text()
    assert '- Positives: label >= 1, lower grades train as negatives' in report and '## Validation curves' in report
    for model in ('coder', 'coder_single_stage', 'adore', 'electra'):
        spec = json.loads((out / 'models' / model / 'experiment_spec.json').read_text())
        assert (spec['settings']['min_label'], spec['settings']['lower_labels']) == (1, 'negative'), model
    info = json.loads((out / 'run_info.json').read_text())
    assert info['label_scale']['min_label'] == 1 and info['test_queries'] == 24 and info['wall_seconds'] > 0
    assert info['machine']['cores'] >= 1 and set(info['training']) == {'coder', 'coder_single_stage', 'adore',
                                                                          'electra'}
    assert info['training']['coder']['eval'][0][0] == 0


def test_every_trainer_takes_the_collections_label_scale_unless_set():
    """Graded qrels (NFCorpus-like: grades 1 and 2): every trainer, ADORE included, counts label 2 as positive and
    keeps label-1 documents out of its negatives; a --set value wins over the scale."""
    from pyterrier_coder.experiment.budgets import FULL, TRAINED, apply_overrides, fit_budget
    from pyterrier_coder.labels import choose_label_scale
    qrels = pd.DataFrame({'qid': ['a', 'a', 'b', 'c'], 'docno': ['d1', 'd2', 'd1', 'd3'], 'label': [2, 1, 2, 1]})
    topics = pd.DataFrame({'qid': ['a', 'b', 'c'], 'query': ['x', 'y', 'z']})
    scale = choose_label_scale(qrels, topics)
    assert (scale.min_label, scale.lower_labels) == (2, 'ignore')
    overrides = {'adore': {'lower_labels': 'negative'}}
    budget = apply_overrides(FULL, overrides)          # a copy
    fit_budget(budget, overrides, 100, (scale, topics, qrels))
    chosen = {component: (budget[component]['min_label'], budget[component]['lower_labels']) for component in TRAINED}
    assert chosen == {**{component: (2, 'ignore') for component in TRAINED}, 'adore': (2, 'negative')}
    budget = apply_overrides(FULL, {})
    fit_budget(budget, {}, 100, (scale, topics, qrels))
    assert budget['adore']['lower_labels'] == 'ignore'


def test_a_small_collection_clips_the_full_budget(tiny_collection, tiny_bert_dir, tiny_cross_encoder_dir, tmp_path):
    """The full budget on a collection of 96 documents and 10 training queries: depths, candidate counts and batch
    sizes are clipped to what the collection has, each with a log line, and the run completes."""
    out = tmp_path / 'tiny'
    stdout = io.StringIO()
    sets = ['coder.max_steps=4', 'adore.max_steps=4', 'electra.max_steps=2', 'electra.eval_every=1']
    with contextlib.redirect_stdout(stdout):
        code = main(['experiment', '--dataset', str(tiny_collection), '--out', str(out), '--device', 'cpu',
                     '--base', str(tiny_bert_dir), '--cross-encoder', str(tiny_cross_encoder_dir),
                     *[arg for s in sets for arg in ('--set', s)]])
    assert code == 0, stdout.getvalue()[-3000:]
    log = stdout.getvalue()
    for line in ('rerank_depth: 100 is more than the 96 documents of the collection: 96',
                 'coder.num_candidates: 1000 is more than the 96 documents: 96', 'adore.k: 200 is more than the 96',
                 'electra.negatives_from: 100 is more than the 96', 'coder.batch_size: 32 is more than the 10 training',
                 'electra_dev_queries: dev has 3 topics, fewer than the 60 asked for',
                 'positives: label >= 2'):
        assert line in log, line
    assert 'coder: 10 training queries with a positive, 1 steps per epoch: at most 4 steps' in log
    assert len(pd.read_csv(out / 'results.csv')) == len(EXPECTED)
    report = (out / 'report.md').read_text()
    assert 'rerank_depth: 100 is more than the 96 documents' in report


def test_every_ablation_row_runs(tiny_collection, tiny_bert_dir, tiny_cross_encoder_dir, tmp_path):
    """--ablations on the tiny collection and models with every component: every row is trained, run and compared
    with its reference (the figures mean nothing)."""
    from pyterrier_coder.experiment import COMPARISONS, QUICK
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(['experiment', '--dataset', str(tiny_collection), '--quick', '--ablations', '--out',
                     str(tmp_path / 'out'), '--device', 'cpu', '--base', str(tiny_bert_dir), '--cross-encoder',
                     str(tiny_cross_encoder_dir), '--components', 'bm25,dense,coder,adore,electra,star,tasb'])
    assert code == 0, stdout.getvalue()[-3000:]
    names = pd.read_csv(tmp_path / 'out' / 'results.csv')['name'].tolist()
    for row in ('BM25 >> CODER (softmax target)', 'BM25 >> CODER (N=32)', 'BM25 >> CODER (random negatives)',
                'BM25 >> CODER (in-batch negatives)', 'ADORE (PQ index)', 'ADORE (RankNet, no ΔM)',
                'BM25 >> MonoELECTRA (hinge)', 'Dense >> MonoELECTRA', 'BM25 >> MonoELECTRA (dense negatives)',
                'Dense >> MonoELECTRA (dense negatives)', 'STAR', 'ADORE+STAR', 'STAR (random negatives only)',
                'STAR (hard negatives only)', 'TAS-Balanced', 'CODER+TAS-Balanced', 'BM25 >> CODER+TAS-Balanced',
                'TAS-Balanced (random, pairwise)', 'TAS-Balanced (tas, in-batch)', 'TAS-Balanced (tas-balanced, pairwise)'):
        assert row in names, row
    compared = pd.read_csv(tmp_path / 'out' / 'comparisons.csv')
    expected = {(a, b) for a, b in COMPARISONS if a in names and b in names}
    assert set(zip(compared['system'], compared['reference'])) == expected
    # CODER over the TAS-Balanced index trains with the coder budget changed by coder_over (refreshed candidates)
    settings = {name: json.loads((tmp_path / 'out' / 'models' / name / 'pyterrier_coder.json').read_text())['settings']
                for name in ('coder', 'coder_tasb')}
    assert settings['coder']['refresh_every'] is None
    assert settings['coder_tasb']['refresh_every'] == QUICK['coder_over']['refresh_every']
    assert {k: v for k, v in settings['coder_tasb'].items() if k not in ('refresh_every', 'validate_with')} == \
        {k: v for k, v in settings['coder'].items() if k not in ('refresh_every', 'validate_with')}


def test_models_no_pipeline_holds_are_released_and_read_again_not_retrained(tiny_collection, tiny_bert_dir,
                                                                            tmp_path):
    """An --ablations run builds many models: the runner keeps a model in memory only while a pipeline or another
    model holds it, and reads it again from models/<name> when a later pipeline asks for it, even under --retrain
    (each model is trained once per run)."""
    import gc
    from pyterrier_coder.experiment import ExperimentRunner, ExperimentSettings
    runner = ExperimentRunner(ExperimentSettings(
        dataset=str(tiny_collection), out=str(tmp_path / 'out'), base=str(tiny_bert_dir), quick=True, ablations=True,
        retrain=True, device='cpu', components=('bm25', 'dense', 'coder', 'adore', 'star')))
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        runner.run()
    log = stdout.getvalue()
    trained = re.findall(r'\] training (\w+):', log)
    assert len(trained) == len(set(trained)) >= 8, trained             # each trained once
    assert 'reusing trained' not in log
    assert sum(runner.system_models.values(), []).count('coder') > 1   # coder serves several pipelines
    gc.collect()
    assert len(runner._models) < len(trained) / 2, sorted(runner._models)   # the others were released


def test_star_alone_trains_on_the_training_split(tiny_collection, tiny_bert_dir, tmp_path):
    """--components bm25,dense,star (no other trainer) still reads the training and dev splits."""
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(['experiment', '--dataset', str(tiny_collection), '--quick', '--out', str(tmp_path / 'out'),
                     '--device', 'cpu', '--base', str(tiny_bert_dir), '--components', 'bm25,dense,star'])
    assert code == 0, stdout.getvalue()[-3000:]
    names = pd.read_csv(tmp_path / 'out' / 'results.csv')['name'].tolist()
    assert names == ['BM25', 'Dense', 'BM25 >> Dense', 'STAR', 'ADORE+STAR']
    assert '- Positives: label >= 2' in (tmp_path / 'out' / 'report.md').read_text()


def test_an_unknown_measure_fails_before_anything_runs(tmp_path, capsys):
    assert main(['experiment', '--dataset', 'unused', '--out', str(tmp_path), '--measures', 'nDCG@ten']) == 2
    assert "--measures: 'nDCG@ten' is not an ir_measures measure" in capsys.readouterr().err

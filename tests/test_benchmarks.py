"""The benchmark harness runs every benchmark at tiny sizes (``--small``) and reports its figures in the JSON file.
No figure is asserted against a number: they are wall-clock. What is asserted is behaviour: every figure is
reported, the compared variants do the same work (same rankings, same scores), the gather and the CODER epoch are
measured in their own processes, and results and data go where the options say."""
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / 'benchmarks' / 'run.py'


def run_harness(*options, timeout=600):
    proc = subprocess.run([sys.executable, str(SCRIPT), '--small', '--threads', '1', *options],
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope='module')
def small_run(tmp_path_factory):
    """All four benchmarks at --small, once; no --json, so the figures go to the workdir's results.json."""
    work = tmp_path_factory.mktemp('benchmarks') / 'work'
    stdout = run_harness('--workdir', str(work))
    return work, stdout, json.loads((work / 'results.json').read_text())


def positive(section: dict, *keys):
    for key in keys:
        assert section[key] > 0, key


def test_results_json_by_default_in_the_workdir(small_run):
    work, stdout, results = small_run
    assert f'figures written to {work / "results.json"}' in stdout
    assert results['machine']['small'] is True and results['machine']['torch_threads'] == 1
    for name in ('coder_rerank', 'train_step', 'cross_encoder', 'gather'):
        assert results[name], name
        assert f'=== {name} ===' in stdout and f'({name} took ' in stdout


def test_coder_rerank_reports_the_three_variants_with_the_same_rankings(small_run):
    results = small_run[2]
    sections = ['coder_rerank'] + (['coder_rerank_tasb_sized'] if 'coder_rerank_tasb_sized' in results else [])
    for name in sections:
        rerank = results[name]
        positive(rerank, 'coder_ms_per_query', 'dr_ms_per_query', 'floor_ms_per_query', 'ratio_coder_over_dr')
        assert isinstance(rerank['coder_overhead_over_floor'], float)
        assert rerank['same_top10'] is True, name                   # Coder ranks as pyterrier-dr's scorer does
        split = rerank['coder_split']
        assert 0 < split['encode'] + split['gather'] + split['ids'] <= split['total']


def test_train_step_reports_every_phase_and_comparison(small_run):
    step = small_run[2]['train_step']
    for model in ('coder', 'adore'):
        positive(step, *(f'{model}_{phase}_ms' for phase in ('gather', 'encoder_forward', 'optimizer', 'loop_step')),
                 f'{model}_fit_wall_s')
    positive(step, 'adore_retrieval_ms', 'coder_step_prefetch_ms', 'coder_step_no_prefetch_ms', 'prefetch_step_ratio',
             'adore_search_ms', 'inmemory_search_ms', 'search_ratio', 'loop_step_ms', 'bare_step_ms')
    assert isinstance(step['trainingloop_overhead'], float)


def test_cross_encoder_reports_all_parts_with_the_same_scores_as_the_bare_loop(small_run):
    ce = small_run[2]['cross_encoder']
    positive(ce, 'infer_transform_pairs_s', 'infer_score_pairs_pairs_s', 'infer_bare_pairs_s',
             'infer_bare_unsorted_pairs_s', 'train_loop_pairs_s', 'train_fit_pairs_s', 'train_bare_pairs_s',
             'amp_infer_speedup', 'amp_train_speedup')
    assert ce['infer_max_abs_score_diff'] < 1e-4                    # same model, same pairs: the same scores


def test_gather_benchmark_reports_both_child_processes(small_run):
    work, stdout, results = small_run
    gather = results['gather']
    # the gather's own process
    for key in ('cold_ms', 'store_gather_ms', 'baseline_ms', 'peak_rss_after_mib', 'traced_peak_mib'):
        assert gather[key] > 0, key
    # the CODER epoch's own process: 64 queries in batches of 32
    assert gather['coder_epoch_seconds'] > 0 and gather['coder_epoch_peak_rss_mib'] > 0
    assert '2 steps of 32' in stdout
    assert not (work / 'gather_100000x128.flex').exists()           # removed without --keep-data


def test_only_one_part_and_an_explicit_json_path(tmp_path):
    out = tmp_path / 'figures' / 'amp.json'
    stdout = run_harness('--only', 'cross_encoder:amp', '--workdir', str(tmp_path / 'work'), '--json', str(out))
    ce = json.loads(out.read_text())['cross_encoder']
    assert 'amp_infer_speedup' in ce and 'infer_transform_pairs_s' not in ce and 'train_loop_pairs_s' not in ce
    assert '=== train_step ===' not in stdout
    assert not (tmp_path / 'work' / 'results.json').exists()


def test_default_workdir_is_in_the_system_temp_directory():
    proc = subprocess.run([sys.executable, str(SCRIPT), '--help'], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f'(default: {Path(tempfile.gettempdir()) / "pyterrier-coder-benchmarks"})' in proc.stdout

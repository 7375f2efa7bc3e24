"""The benchmark harness runs (tiny sizes) and reports its figures; no figure is asserted (they are wall-clock)."""
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / 'benchmarks' / 'run.py'


def test_gather_benchmark_reports_both_child_processes(tmp_path):
    out = tmp_path / 'figures.json'
    proc = subprocess.run([sys.executable, str(SCRIPT), '--small', '--only', 'gather', '--threads', '1',
                           '--workdir', str(tmp_path / 'work'), '--json', str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    gather = json.loads(out.read_text())['gather']
    # the gather's own process
    for key in ('cold_ms', 'store_gather_ms', 'baseline_ms', 'peak_rss_after_mib', 'traced_peak_mib'):
        assert gather[key] > 0, key
    # the CODER epoch's own process: 64 queries in batches of 32
    assert gather['coder_epoch_seconds'] > 0 and gather['coder_epoch_peak_rss_mib'] > 0
    assert '2 steps of 32' in proc.stdout
    assert not (tmp_path / 'work' / 'gather_100000x128.flex').exists()     # removed without --keep-data

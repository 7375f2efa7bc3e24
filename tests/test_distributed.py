"""Data-parallel training: every trainer under ``torchrun --nproc_per_node=2`` (gloo, CPU) gives the same weights,
losses and validation curve as one process on the same global batches; only rank 0 writes checkpoints."""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pyterrier_coder import distributed
from pyterrier_coder.datasets import load_dataset
from pyterrier_coder.encoders import DenseEncoder, DenseIndex
from pyterrier_coder.retrievers import BM25

SCRIPT = Path(__file__).with_name('distributed_fit.py')


def _without_dropout(src: Path, dst: Path) -> Path:
    """A copy of a fixture model with dropout off: dropout masks depend on how a batch is split."""
    shutil.copytree(src, dst)
    config = json.loads((dst / 'config.json').read_text())
    for key in ('hidden_dropout_prob', 'attention_probs_dropout_prob', 'classifier_dropout'):
        config[key] = 0.0
    (dst / 'config.json').write_text(json.dumps(config))
    return dst


@pytest.fixture(scope='module')
def workdir(tiny_bert_dir, tiny_cross_encoder_dir, tiny_collection, tmp_path_factory):
    work = tmp_path_factory.mktemp('distributed')
    ds = load_dataset(tiny_collection)
    _without_dropout(tiny_bert_dir, work / 'bert')
    _without_dropout(tiny_cross_encoder_dir, work / 'electra')
    encoder = DenseEncoder(str(work / 'bert'), pooling='mean', normalize=True, device='cpu')
    DenseIndex(encoder, work / 'dense.flex', verbose=False).index(ds.get_corpus_iter(verbose=False))
    BM25(work / 'bm25', text=True).index(ds.get_corpus_iter(verbose=False), verbose=False)
    return work


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _run(component, collection, work, out, nproc):
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1'}
    for key in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        env.pop(key, None)
    launcher = [] if nproc == 1 else ['-m', 'torch.distributed.run', '--nnodes=1', f'--nproc_per_node={nproc}',
                                      '--master_addr=127.0.0.1', f'--master_port={_free_port()}']
    cmd = [sys.executable, *launcher, str(SCRIPT), component, str(collection), str(work), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f'{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}'
    return json.loads((out / 'history.json').read_text()), torch.load(out / 'weights.pt')


@pytest.mark.parametrize('component', ['Coder', 'Adore', 'MonoElectra'])
def test_two_process_gloo_training_matches_one_process(component, workdir, tiny_collection, tmp_path):
    single_history, single = _run(component, tiny_collection, workdir, tmp_path / 'single', 1)
    ddp_history, ddp = _run(component, tiny_collection, workdir, tmp_path / 'ddp', 2)
    assert (single_history['world_size'], ddp_history['world_size']) == (1, 2)
    assert ddp_history['steps'] == single_history['steps'] == 4
    assert (tmp_path / 'ddp' / 'checkpoints' / 'checkpoint.pt').exists()
    # the process group the loop created was torn down before the interpreter's own shutdown, on every rank
    assert [(tmp_path / 'ddp' / f'exit-rank{r}.txt').read_text() for r in (0, 1)] == ['not initialized'] * 2
    assert (tmp_path / 'single' / 'exit-rank0.txt').read_text() == 'not initialized'
    if component == 'Coder':   # batches were served by the background gather in both runs (and still agree)
        assert single_history['prefetched_batches'] > 0 and ddp_history['prefetched_batches'] > 0
    np.testing.assert_allclose([v for _, v in ddp_history['loss']], [v for _, v in single_history['loss']],
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose([v for _, v in ddp_history['eval']], [v for _, v in single_history['eval']],
                               atol=1e-6)
    assert ddp.keys() == single.keys()
    for name in single:
        torch.testing.assert_close(ddp[name], single[name], rtol=1e-4, atol=1e-5, msg=name)
    initial = torch.load(tmp_path / 'single' / 'initial.pt')
    changed = sum(not torch.equal(single[k], initial[k]) for k in initial)
    assert changed > 0, 'training did not change the weights: the comparison would be vacuous'


def test_the_group_is_destroyed_at_exit_unless_an_exception_ends_the_script(monkeypatch):
    destroyed = []
    monkeypatch.setattr(distributed.dist, 'is_initialized', lambda: True)
    monkeypatch.setattr(distributed.dist, 'destroy_process_group', lambda: destroyed.append(True))
    monkeypatch.delattr(sys, 'last_value', raising=False)
    monkeypatch.delattr(sys, 'last_exc', raising=False)
    distributed._destroy_at_exit()
    assert destroyed == [True]
    monkeypatch.setattr(sys, 'last_value', RuntimeError('uncaught'), raising=False)
    distributed._destroy_at_exit()
    assert destroyed == [True]


def test_single_process_is_not_distributed(monkeypatch):
    monkeypatch.delenv('WORLD_SIZE', raising=False)
    dp = distributed.DataParallel()
    assert not dp.enabled and dp.is_main and dp.world == 1
    batch = np.arange(7)
    assert dp.shard(batch) is batch
    assert dp.broadcast(3.5) == 3.5 and dp.sum_scalar(2.0) == 2.0 and dp.any(False) is False
    assert distributed.is_main_process()


def test_process_group_backend_follows_the_training_device(monkeypatch):
    """Under torchrun on a GPU machine: NCCL for CUDA tensors and gloo for CPU ones (so ``device='cpu'`` training
    works there too), this rank's GPU made current only when training on CUDA, and a long timeout (rank 0
    validates alone while the others wait). torch's CUDA and process-group calls are stood in for."""
    calls = []
    monkeypatch.setenv('WORLD_SIZE', '2')
    monkeypatch.setattr(distributed.dist, 'is_initialized', lambda: False)
    monkeypatch.setattr(distributed.dist, 'init_process_group', lambda **kw: calls.append(('init', kw)))
    monkeypatch.setattr(distributed.torch.cuda, 'set_device', lambda d: calls.append(('set_device', d)))
    monkeypatch.setattr(distributed.torch.cuda, 'is_available', lambda: True)
    distributed.init(torch.device('cpu'))
    distributed.init(torch.device('cuda', 1))
    assert calls[0] == ('init', {'backend': 'cpu:gloo,cuda:nccl', 'timeout': distributed.TIMEOUT})
    assert calls[1:] == [('set_device', torch.device('cuda', 1)), calls[0]]
    assert distributed.TIMEOUT.total_seconds() >= 3600
    monkeypatch.setattr(distributed.torch.cuda, 'is_available', lambda: False)
    distributed.init(torch.device('cpu'))
    assert calls[-1] == ('init', {'backend': 'gloo', 'timeout': distributed.TIMEOUT})


def test_each_rank_uses_its_own_gpu(monkeypatch):
    monkeypatch.setenv('WORLD_SIZE', '4')
    monkeypatch.setenv('LOCAL_RANK', '3')
    assert distributed.local_gpu(4) == 3
    assert distributed.local_gpu(1) == 0       # a launcher that shows each process only its own GPU
    monkeypatch.setattr(distributed.torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(distributed.torch.cuda, 'device_count', lambda: 2)
    assert distributed.device_for_rank(None) == distributed.device_for_rank('cuda') == 'cuda:1'
    assert distributed.device_for_rank('cpu') == 'cpu'
    monkeypatch.delenv('WORLD_SIZE')
    dp = distributed.DataParallel(torch.device('cuda', 1))
    assert not dp.enabled and dp._reduce_device() == torch.device('cuda', 1)
    assert distributed.DataParallel(torch.device('cpu'))._reduce_device() == torch.device('cpu')

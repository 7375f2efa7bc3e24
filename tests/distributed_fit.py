"""Trains one component on the fixture collection and writes its weights and history; run by
tests/test_distributed.py both as a single process and under ``torchrun --nproc_per_node=2`` (gloo), whose
results must agree. Usage: distributed_fit.py COMPONENT COLLECTION WORKDIR OUT"""
import atexit
import json
import os
import sys
import warnings
from pathlib import Path

import torch

from pyterrier_coder import distributed
from pyterrier_coder.adore import Adore
from pyterrier_coder.coder import Coder
from pyterrier_coder.datasets import load_dataset
from pyterrier_coder.electra import MonoElectra
from pyterrier_coder.encoders import DenseEncoder, DenseIndex
from pyterrier_coder.retrievers import BM25

# 10 training queries in global batches of 5: with 2 ranks the shards have 3 and 2 queries (unequal on purpose)
OPTIONS = dict(lr=1e-3, warmup=1, schedule='linear', batch_size=5, max_steps=4, eval_every=2, device='cpu',
               verbose=False, seed=7)


def _record_exit_state(out: Path) -> None:
    """Registered before fit, so it runs after whatever fit registers with atexit (last in, first out)."""
    state = 'left initialized' if torch.distributed.is_initialized() else 'not initialized'
    out.mkdir(parents=True, exist_ok=True)
    (out / f'exit-rank{os.environ.get("RANK", "0")}.txt').write_text(state)


def main(component: str, collection: str, work: str, out: str) -> None:
    torch.set_num_threads(1)
    atexit.register(_record_exit_state, Path(out))
    warnings.simplefilter('ignore')
    work = Path(work)
    # checkpoints go through the rank-0-only write + barrier path under torchrun
    OPTIONS.update(checkpoint_dir=str(Path(out) / 'checkpoints'), checkpoint_every=2)
    ds = load_dataset(collection)
    bm25 = BM25(work / 'bm25', text=True)
    train = (bm25 % 10)(ds.get_topics('train'))
    qrels = ds.get_qrels('train')
    if component == 'MonoElectra':
        options = {**OPTIONS, 'train_batch_size': OPTIONS['batch_size']}
        del options['batch_size']
        # loss='ce': under LCE (and hinge) the head's bias gets no gradient in exact arithmetic (a softmax over
        # a group ignores a shared offset), so Adam turns rounding noise into full-size, order-dependent steps
        model = MonoElectra(str(work / 'electra'), max_length=64, group_size=3, negatives_from=10, loss='ce',
                            **options)
        module = model.model
    else:
        encoder = DenseEncoder(str(work / 'bert'), pooling='mean', normalize=True, device='cpu')
        dense = DenseIndex(encoder, work / 'dense.flex', verbose=False)
        cls, extra = (Coder, dict(num_candidates=10)) if component == 'Coder' else (Adore, dict(k=10))
        model = cls(dense, encoder, **extra, **OPTIONS)
        module = model.trainable_module()
    initial = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    model.fit(train, qrels, train, qrels)
    if distributed.is_main_process():
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        torch.save(initial, out / 'initial.pt')
        torch.save({k: v.cpu() for k, v in module.state_dict().items()}, out / 'weights.pt')
        history = {k: model.history[k] for k in ('loss', 'eval', 'best_step', 'steps', 'prefetched_batches')
                   if k in model.history}
        history['world_size'] = distributed.world_size()
        (out / 'history.json').write_text(json.dumps(history))


if __name__ == '__main__':
    main(*sys.argv[1:5])

"""The run's figures: training curves per trained model, per-query differences against the baseline."""
from __future__ import annotations

from typing import List

import numpy as np
import pandas as pd

from .comparisons import BASELINE


def write_plots(runner, perquery: pd.DataFrame, names: List[str]) -> List[str]:
    """``training_<model>.png`` (loss and validation curve) for each trained model and ``perquery_ndcg_diff.png``
    (each pipeline's per-query nDCG@10 minus the baseline's); returns the file names."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    files = []
    for name, history in runner.histories.items():
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
        steps, loss = zip(*history['loss']) if history['loss'] else ((), ())
        ax1.plot(steps, loss, lw=0.8)
        if len(loss) > 10:
            window = max(2, len(loss) // 20)
            smooth = np.convolve(loss, np.ones(window) / window, mode='valid')
            ax1.plot(steps[window - 1:], smooth, lw=2, label=f'mean of {window}')
            ax1.legend()
        ax1.set(title=f'{name}: training loss', xlabel='step', ylabel='loss')
        if history.get('eval'):
            s, v = zip(*history['eval'])
            ax2.plot(s, v, marker='o')
            ax2.axvline(history['best_step'], color='grey', ls='--', label='best (kept)')
            ax2.legend()
        ax2.set(title=f'{name}: validation {history["metric"]}', xlabel='step', ylabel=history['metric'])
        fig.tight_layout()
        path = runner.out / f'training_{name}.png'
        fig.savefig(path, dpi=100)
        plt.close(fig)
        files.append(path.name)
    ndcg = perquery[perquery['measure'] == 'nDCG@10'].pivot(index='qid', columns='name', values='value')
    others = [n for n in names if n != BASELINE]
    if others:
        fig, axes = plt.subplots(len(others), 1, figsize=(10, 2.2 * len(others)), squeeze=False)
        for ax, name in zip(axes[:, 0], others):
            diff = (ndcg[name] - ndcg[BASELINE]).sort_values(ascending=False).to_numpy()
            ax.bar(np.arange(len(diff)), diff, width=1.0, color=np.where(diff >= 0, 'tab:green', 'tab:red'))
            ax.axhline(0, color='black', lw=0.5)
            ax.set(title=f'{name} − {BASELINE}: per-query nDCG@10 (mean {diff.mean():+.4f})', ylabel='Δ nDCG@10')
        axes[-1, 0].set_xlabel('queries (sorted)')
        fig.tight_layout()
        path = runner.out / 'perquery_ndcg_diff.png'
        fig.savefig(path, dpi=100)
        plt.close(fig)
        files.append(path.name)
    return files

"""Timing and reporting for the benchmarks: the Report (printed lines + the figures for the JSON file), side-by-side
timing with interleaved repeats, per-phase timers, the machine description, and the helpers for measuring in a
fresh child process (its own peak RSS, the page cache evicted first)."""
from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENTRY_POINT = Path(__file__).with_name('run.py')


def sizes(table: dict, args) -> dict:
    """The ``small`` or ``full`` entry of a benchmark's size table."""
    return table['small' if args.small else 'full']


# ----------------------------------------------------------------------------------------------------------
# reporting

class Report:
    """Prints aligned lines and keeps the numbers for the JSON file."""

    def __init__(self):
        self.results = {}
        self.current = None

    def section(self, name: str, description: str):
        self.current = self.results.setdefault(name, {})
        print(f'\n=== {name} ===', flush=True)
        for line in description.strip().splitlines():
            print(f'  {line}')

    def note(self, text: str):
        for line in text.strip().splitlines():
            print(f'  | {line}')

    def value(self, key: str, label: str, value, unit: str = '', detail: str = ''):
        self.current[key] = value
        shown = f'{value:,.3f}' if isinstance(value, float) else str(value)
        print(f'  {label:<58} {shown:>12} {unit:<10} {detail}'.rstrip(), flush=True)

    def ratio(self, key: str, label: str, value: float, target: str = '', ok=None, pct: bool = False):
        self.current[key] = value
        shown = f'{value * 100:+.1f}%' if pct else f'{value:.3f}'
        verdict = '' if ok is None else ('  [meets target]' if ok else '  [misses target]')
        print(f'  {label:<58} {shown:>12} {"(target " + target + ")" if target else "":<22}{verdict}', flush=True)

    def write(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.results, indent=2, default=str))


def spread(times, scale=1e3, unit='ms'):
    return f'[{min(times) * scale:,.2f} - {max(times) * scale:,.2f} {unit}, n={len(times)}]'


# ----------------------------------------------------------------------------------------------------------
# timing

def make_sync(device):
    import torch
    if device.type == 'cuda':
        return torch.cuda.synchronize
    return lambda: None


def interleaved(fns: dict, *, warmup: int, repeats: int, sync) -> dict:
    """Wall seconds of each callable: ``warmup`` untimed rounds, then ``repeats`` rounds in which every variant
    runs once, in alternating order (so drifting machine load hits all variants alike)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
            sync()
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            sync()
            start = time.perf_counter()
            fns[name]()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


class PhaseTimer:
    """Wraps callables on an *instance* (monkeypatching attributes) to accumulate their wall time while armed.
    On CUDA each wrapped call synchronises before and after so the time is the phase's own."""

    def __init__(self, sync):
        self.sync = sync
        self.seconds = {}
        self.calls = {}
        self.armed = False
        self._undo = []

    def wrap(self, obj, attr: str, phase: str):
        original = getattr(obj, attr)

        def wrapped(*args, **kwargs):
            if not self.armed:
                return original(*args, **kwargs)
            self.sync()
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.sync()
                self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start
                self.calls[phase] = self.calls.get(phase, 0) + 1
        setattr(obj, attr, wrapped)
        self._undo.append((obj, attr))

    def reset(self):
        self.seconds, self.calls = {}, {}

    @contextlib.contextmanager
    def armed_(self):
        self.reset()
        self.armed = True
        try:
            yield self
        finally:
            self.armed = False

    def restore(self):
        for obj, attr in self._undo:
            obj.__dict__.pop(attr, None)
        self._undo = []


def bare_update(loss, module, optimizer, grad_clip):
    """The end of a bare training step, as the baselines write it: backward, ``clip_grad_norm_`` (when
    ``grad_clip``), optimiser step, ``zero_grad``."""
    import torch
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(module.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------------------------------------
# the machine

def machine(args) -> dict:
    """Prints the machine, the library versions and the mode; returns them for the JSON file."""
    import torch
    import transformers
    import pyterrier_dr
    import pyterrier_coder
    from pyterrier_coder.devices import infer_device
    device = infer_device(args.device)
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    try:
        import psutil
        ram = f'{psutil.virtual_memory().total / 2**30:.1f} GiB'
    except ImportError:
        ram = 'unknown'
    load = ', '.join(f'{x:.2f}' for x in os.getloadavg()) if hasattr(os, 'getloadavg') else 'n/a'
    gpu = torch.cuda.get_device_name(device) if device.type == 'cuda' else '-'
    print('=== machine ===')
    print(f'  cpu cores: {os.cpu_count()} (usable by this process: {affinity}); torch threads: '
          f'{torch.get_num_threads()} (interop {torch.get_num_interop_threads()}); RAM {ram}; load average {load}')
    print(f'  device: {device} {gpu}; {platform.processor() or platform.machine()}; python {platform.python_version()}')
    print(f'  torch {torch.__version__}, transformers {transformers.__version__}, '
          f'pyterrier-dr {getattr(pyterrier_dr, "__version__", "?")}, pyterrier-coder {pyterrier_coder.__version__}')
    print(f'  mode: {"--small (tiny sizes: checks the harness, figures are not representative)" if args.small else "full size"}'
          f'; workdir {args.workdir}')
    return dict(cores=os.cpu_count(), usable_cores=affinity, torch_threads=torch.get_num_threads(), device=str(device),
                gpu=gpu, load_average=load, small=args.small)


# ----------------------------------------------------------------------------------------------------------
# child processes and memory

def run_child(args, flag: str, value) -> dict:
    """Runs the entry point with ``flag value`` (a hidden child option) and this run's options in a fresh Python
    process, and returns the figures the child wrote with ``write_child_json``."""
    with tempfile.NamedTemporaryFile('r', suffix='.json') as out:
        cmd = [sys.executable, str(ENTRY_POINT), flag, str(value), '--child-json', out.name,
               '--workdir', str(args.workdir)] + (['--small'] if args.small else []) + \
              (['--device', args.device] if args.device else []) + \
              (['--threads', str(args.threads)] if args.threads else [])
        proc = subprocess.run(cmd)
        if proc.returncode:
            raise RuntimeError(f'{flag[2:]} process failed with code {proc.returncode}')
        return json.loads(Path(out.name).read_text())


def write_child_json(args, report: Report):
    """In a child process: hands the figures of its section back to the parent (``run_child``)."""
    if args.child_json:
        with open(args.child_json, 'w') as f:
            json.dump(report.current or {}, f)


def proc_status():
    """VmHWM (peak RSS), VmRSS, RssAnon, RssFile of this process in MiB (Linux /proc)."""
    out = {}
    try:
        with open('/proc/self/status') as f:
            for line in f:
                key = line.split(':')[0]
                if key in ('VmHWM', 'VmRSS', 'RssAnon', 'RssFile'):
                    out[key] = int(line.split()[1]) / 1024
    except OSError:
        # no /proc: fall back to getrusage (kB on Linux, bytes on macOS). Note that ru_maxrss survives fork+exec
        # (the child starts with its parent's peak), which is why /proc's per-process VmHWM is preferred.
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out['VmHWM'] = maxrss / 2**20 if sys.platform == 'darwin' else maxrss / 1024
    return out


def evict_page_cache(file) -> bool:
    """Drops ``file`` from the page cache (best effort: only pages no process maps), so that the next read is cold."""
    try:
        fd = os.open(file, os.O_RDONLY)
        os.fsync(fd)                      # dirty pages (a freshly written index) cannot be evicted
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        return True
    except (AttributeError, OSError):
        return False

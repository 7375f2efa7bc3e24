"""Where computation runs: the device (CUDA when present, this rank's GPU under torchrun), mixed precision on CUDA
and on CPUs with bf16 instructions, and faiss indexes on GPUs."""
from __future__ import annotations

import torch

from .distributed import device_for_rank, launched, local_gpu


def infer_device(device=None) -> 'torch.device':
    """``device`` if given, else CUDA when present, else CPU; under torchrun, ``'cuda'`` is this rank's GPU."""
    device = device_for_rank(device)
    if device is None:
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    return torch.device(device)



def cuda_amp_dtype() -> 'torch.dtype':
    """The autocast dtype on CUDA: bf16 where the GPU computes it natively (compute capability >= 8: A100, H100,
    RTX 30xx...), else fp16 (with a gradient scaler when training). ``torch.cuda.is_bf16_supported()`` alone also
    says yes for GPUs that only emulate bf16 (T4, V100), where it is slow."""
    try:
        native = torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:   # torch < 2.3 has no such argument and did not count emulation either
        native = torch.cuda.is_bf16_supported()
    return torch.bfloat16 if native else torch.float16

#: the largest k a faiss GPU index answers (faiss's GPU k-selection limit)
FAISS_GPU_MAX_K = 2048



def faiss_gpu_count() -> int:
    """GPUs that the installed faiss can use (0 with faiss-cpu, whatever torch sees)."""
    import faiss
    return faiss.get_num_gpus() if hasattr(faiss, 'get_num_gpus') else 0



def check_faiss_gpu_k(k: int, component: str, instead: str) -> None:
    """A faiss GPU index cannot return more than :data:`FAISS_GPU_MAX_K` results per query."""
    if k > FAISS_GPU_MAX_K:
        raise ValueError(f'{component}: k={k} is more than a faiss GPU index returns ({FAISS_GPU_MAX_K} per '
                         f'query); use a smaller k, or {instead}')



def faiss_to_gpus(index):
    """``index`` copied onto the GPUs faiss sees: sharded over all of them in a single process; under torchrun
    only onto this rank's GPU, since every rank holds its own index (sharding each over all GPUs would put
    ``world_size`` shards and temporary-memory reservations on every GPU)."""
    import faiss
    if faiss_gpu_count() == 0:
        raise RuntimeError('faiss sees no GPU (faiss-cpu is installed, or no GPU is visible): use gpu=False, or '
                           "install faiss-gpu instead of faiss-cpu (pip install -e '.[gpu]')")
    options = faiss.GpuMultipleClonerOptions()
    if launched():
        return faiss.index_cpu_to_gpus_list(index, co=options, gpus=[local_gpu(faiss_gpu_count())])
    options.shard = True
    return faiss.index_cpu_to_all_gpus(index, co=options)


def cpu_computes_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX), which make CPU autocast worth it (see
    :func:`autocast_for`). Asked through torch's private probes; False when a torch version lacks them."""
    probes = ('_is_avx512_bf16_supported', '_is_amx_tile_supported')
    return any(bool(getattr(torch.cpu, probe, lambda: False)()) for probe in probes)



def autocast_for(device: torch.device, enabled: bool):
    """Mixed precision on ``device`` when ``enabled``: on CUDA bf16 where supported, else fp16 (the loop then adds a
    gradient scaler); on CPU bf16. AMP is the default on CUDA only: a CPU runs bf16 fast only with AVX512-BF16 or
    AMX (docs/performance.md measures the gain on a MiniLM cross-encoder) and is emulated without them, so on CPU
    it is opt-in (``amp=True``)."""
    if enabled and device.type == 'cuda':
        return torch.autocast('cuda', dtype=cuda_amp_dtype())
    if enabled and device.type == 'cpu':
        return torch.autocast('cpu', dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)

"""Where stages run: backend switches, data resident on the device, one GPU per worker process.

Harness code (not part of any stage's code version): where a stage runs never changes what it computes.

- :func:`configure_backends`: ``cudnn.benchmark`` on CUDA (the autotuner picks the fastest convolution for the
  fixed shapes of a training loop); nothing on a CPU.
- :func:`resident`: a stage's uint8 images moved to the device once, so every loop's ``images[idx]`` and
  ``to_float`` run on the device and the batched augmentation (``encoders.augment``) runs there too; on a CPU
  it returns the tensor itself.
- :func:`assign_gpus`: which GPU each ``--workers`` process gets (its own ``CUDA_VISIBLE_DEVICES``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ...encoders.runtime import log

# a dataset larger than this share of the free GPU memory stays on the host (batches are copied per step)
RESIDENT_SHARE = 0.25


def configure_backends(device: torch.device) -> None:
    """Backend switches for a run on ``device``: the cuDNN autotuner on CUDA (its convolution choice may vary
    between runs, so CUDA runs are not bit-reproducible; CPU runs are unaffected)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def resident(images: torch.Tensor, device: torch.device, share: float = RESIDENT_SHARE) -> torch.Tensor:
    """``images`` on ``device`` (moved once), or unchanged on a CPU, already there, or too large to hold."""
    if device.type != "cuda" or images.device == device:
        return images
    size = images.numel() * images.element_size()
    free, _ = torch.cuda.mem_get_info(device)
    if size > share * free:
        log.info("defbench: %.1f GB of images stay on the host (more than %.0f%% of the GPU's free %.1f GB)",
                 size / 1e9, 100 * share, free / 1e9)
        return images
    return images.to(device)


@dataclass(frozen=True)
class WorkerDevice:
    """One worker's device: ``visible`` is its ``CUDA_VISIBLE_DEVICES`` (None: leave it as inherited)."""
    device: str
    visible: str | None = None


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` entries: the inherited list where one is set,
    else ``0..device_count-1``."""
    inherited = os.environ.get("CUDA_VISIBLE_DEVICES")
    count = torch.cuda.device_count()
    if inherited is not None and inherited.strip():
        return [g.strip() for g in inherited.split(",") if g.strip()][:count]
    return [str(i) for i in range(count)]


def assign_gpus(device: torch.device, workers: int, gpus: list[str] | None = None) -> list[WorkerDevice]:
    """The device of each of ``workers`` processes.

    On CUDA each worker is pinned to one GPU through its own ``CUDA_VISIBLE_DEVICES`` and sees it as
    ``cuda:0``. The rule: worker ``i`` gets GPU ``i mod G`` (G = the visible GPUs), so with
    ``workers <= G`` every worker has a GPU of its own, and with more workers than GPUs they wrap round-robin
    (per-GPU counts differ by at most one) and a warning says that GPUs are shared. ``--device cuda:N``
    pins every worker to GPU N. On a CPU every worker gets the CPU (the cores are shared).
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if device.type != "cuda":
        return [WorkerDevice(str(device))] * workers
    gpus = visible_gpus() if gpus is None else gpus
    if not gpus:
        raise RuntimeError("CUDA device requested but no GPU is visible")
    if device.index is not None:  # one named GPU: every worker shares it
        return [WorkerDevice("cuda:0", gpus[device.index])] * workers
    if workers > len(gpus):
        log.warning("defbench: %d workers on %d GPUs: workers share GPUs round-robin (worker i on GPU i mod %d)",
                    workers, len(gpus), len(gpus))
    return [WorkerDevice("cuda:0", gpus[i % len(gpus)]) for i in range(workers)]


def pin_worker(assigned: WorkerDevice) -> torch.device:
    """In a fresh worker process, before it touches CUDA: set its ``CUDA_VISIBLE_DEVICES``; returns its device."""
    if assigned.visible is not None:
        if torch.cuda.is_initialized():  # too late to narrow what CUDA sees: address the GPU by its index
            index = visible_gpus().index(assigned.visible) if assigned.visible in visible_gpus() else 0
            log.warning("defbench: CUDA was initialised before the worker was pinned; using cuda:%d", index)
            return torch.device(f"cuda:{index}")
        os.environ["CUDA_VISIBLE_DEVICES"] = assigned.visible
    device = torch.device(assigned.device)
    configure_backends(device)
    return device

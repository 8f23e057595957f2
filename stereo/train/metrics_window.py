"""The logged training metrics: loss terms summed on the device between two log lines, then averaged (over the
micro-batches and the ranks: the mean over the global batch, comparable at any world size)."""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist


class Window:
    """Sums of the loss terms between two log lines, kept on the device: one host sync per logged line."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.micro_batches = 0
        self.samples = 0
        self.data_wait = 0.0
        self.start = time.perf_counter()

    def add(self, terms: dict[str, torch.Tensor], samples: int) -> None:
        for key, value in terms.items():
            value = value.detach().float()
            self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.micro_batches += 1
        self.samples += samples

    def flush(self, lr: float, grad_norm, skipped_steps: int, loader) -> dict[str, float]:
        elapsed = time.perf_counter() - self.start
        n = max(self.micro_batches, 1)
        if self.sums and dist.is_initialized():  # the mean over the global batch: comparable at any world size
            names = sorted(self.sums)
            stacked = torch.stack([self.sums[k] for k in names])
            dist.all_reduce(stacked)
            self.sums = dict(zip(names, stacked / dist.get_world_size()))
        means = {k: v.item() / n for k, v in self.sums.items()}
        scalars = {"loss": means.get("total", math.nan), "loss/init": means.get("init", math.nan),
                   "loss/seq": means.get("seq", math.nan), "train/epe": means.get("epe", math.nan),
                   "lr": lr, "grad_norm": grad_norm,
                   "samples_per_s": self.samples / max(elapsed, 1e-9), "data_wait_s": self.data_wait,
                   "skipped_steps": skipped_steps}
        if torch.cuda.is_available():
            scalars["gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        for name, count in (loader.bad_sample_counts() or {}).items():
            scalars[f"bad_samples/{name}"] = count
        scalars["data/retries"] = loader.retries()
        self.__init__()
        return scalars

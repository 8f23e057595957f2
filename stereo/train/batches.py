"""The training batches: the loader's stream on the device, endless, started before the RNG is restored."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch


def batches_forever(loader, device: torch.device):
    """Endless stream of batches on the device (a finite loader is simply restarted).

    Tensors are made contiguous: collate's images come NHWC-strided from numpy, and on CPU (torch 2.13, oneDNN)
    the backward of a strided-2 1x1 conv on such input corrupts the heap ("double free or corruption").
    """
    while True:
        for batch in loader:
            yield {k: v.to(device, non_blocking=True).contiguous() if torch.is_tensor(v) else v
                   for k, v in batch.items()}


def started(batches: Iterator[dict]) -> Iterator[dict]:
    """The same stream, with its first batch already fetched (so that the loader has started)."""
    first = next(batches)
    return itertools.chain([first], batches)

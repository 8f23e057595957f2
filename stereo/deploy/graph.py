"""What an exported graph computes, as a PyTorch module: the test-mode forward on images already padded.

Padding stays outside the graph (the runtime pads with `stereo.model.infer.InputPadder` and crops back), so the graph's
height and width are symbolic multiples of `divisor`: 32 (the 1/4-resolution volume is halved three more times), or 64
with hierarchical inference, whose half-resolution pass needs half the size to be a multiple of 32 again.
"""

from __future__ import annotations

import torch
from torch import nn

from stereo.model.infer import DIVISOR, InputPadder, predict


def divisor(hierarchical: bool) -> int:
    return 2 * DIVISOR if hierarchical else DIVISOR


class DisparityGraph(nn.Module):
    """left/right (B,3,H,W) float32 RGB 0..255, H and W multiples of `divisor(hierarchical)` -> disparity (B,1,H,W)
    float32 px, after `iters` GRU iterations (fixed in the graph)."""

    def __init__(self, model: nn.Module, iters: int, hierarchical: bool = False) -> None:
        super().__init__()
        self.model = model
        self.iters = iters
        self.hierarchical = hierarchical
        self.eval()  # the wrapper too: the exporter warns of a module in training mode

    @property
    def divisor(self) -> int:
        return divisor(self.hierarchical)

    def forward(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        return predict(self.model, left, right, self.iters, self.hierarchical)


def padded_predict(graph: DisparityGraph, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """The graph on any image size, padded and cropped back as the ONNX runtime does (the PyTorch reference)."""
    padder = InputPadder(*left.shape[-2:], graph.divisor)
    with torch.no_grad():
        return padder.unpad(graph(padder.pad_tensor(left), padder.pad_tensor(right)))

"""Run an exported graph with onnxruntime on any image size: pad as the sidecar says, run, crop back."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from stereo.deploy.onnx_export import read_sidecar
from stereo.model.infer import InputPadder


def _pad(image: np.ndarray, pad: tuple[int, int, int, int]) -> np.ndarray:
    left, right, top, bottom = pad
    return np.pad(image, ((top, bottom), (left, right), (0, 0)), mode="edge")  # edge = torch's replicate


class OnnxStereo:
    """`OnnxStereo("model.onnx")(left, right)`: (H,W,3) uint8/float RGB pair of any size -> (H,W) float32 disparity."""

    def __init__(self, path: str | Path, threads: int | None = None, providers: list[str] | None = None) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: ONNX file not found")
        self.meta = read_sidecar(self.path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
        options.log_severity_level = 3  # warnings about unused initializers are noise here
        self.session = ort.InferenceSession(str(self.path), options,
                                            providers=providers or ["CPUExecutionProvider"])
        self.divisor = int(self.meta["padding"]["multiple_of"])

    def check_size(self, height: int, width: int) -> None:
        """Refuse an image the graph cannot take, naming the range (padding to the divisor comes first)."""
        for name, side in (("height", height), ("width", width)):
            padded = side + (-side % self.divisor)
            info = self.meta[name]
            if info["dynamic"] and not info["min"] <= padded <= info["max"]:
                raise ValueError(f"{self.path}: {name} {side} (padded {padded}) is outside the exported range "
                                 f"{info['min']}..{info['max']}; export again with that range or --static")
            if not info["dynamic"] and padded != info["size"]:
                raise ValueError(f"{self.path}: exported for {name} {info['size']} only (static), got {side}")

    def run_padded(self, left: np.ndarray, right: np.ndarray) -> np.ndarray:
        """(B,3,H,W) float32 already padded -> (B,1,H,W) disparity: the graph as it is."""
        return self.session.run(["disparity"], {"left": left, "right": right})[0]

    def __call__(self, left: np.ndarray, right: np.ndarray) -> np.ndarray:
        if left.shape != right.shape:
            raise ValueError(f"left and right images differ in shape: {left.shape} vs {right.shape}")
        height, width = left.shape[:2]
        self.check_size(height, width)
        padder = InputPadder(height, width, self.divisor)
        batch = int(self.meta["batch"]["size"])

        def tensor(image: np.ndarray) -> np.ndarray:
            chw = _pad(image.astype(np.float32), padder.pad).transpose(2, 0, 1)[None]
            return np.ascontiguousarray(np.repeat(chw, batch, axis=0))

        disp = self.run_padded(tensor(left), tensor(right))[0, 0]
        pl, pr, pt, pb = padder.pad
        return np.ascontiguousarray(disp[pt:disp.shape[0] - pb, pl:disp.shape[1] - pr])

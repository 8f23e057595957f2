"""`python -m stereo.deploy.check_engine ENGINE --onnx model.onnx [--max-abs PX] [--mean-abs PX]`: does a deployed
engine compute what PyTorch computed at export time?

Runs the reference pair stored beside the export (`model.reference.npz`, named and checksummed in `model.json`)
through ENGINE and compares its disparity with the stored PyTorch one: max and mean absolute difference, exit code 1
when over the thresholds (defaults: the fp32 / fp16 figures of docs/deploy.md). ENGINE is a TensorRT engine
(`.engine` / `.plan`, needs the `tensorrt` Python package and a GPU) or an ONNX file, run by onnxruntime (the stand-in
the tests use where TensorRT cannot be installed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

from stereo.deploy.onnx_export import read_sidecar
from stereo.deploy.parity import difference

# Measured (docs/deploy.md): onnxruntime fp32 vs PyTorch stays under 1e-3 px; fp16 engines differ by up to ~1 px at
# edges, ~0.05 px on average.
THRESHOLDS = {"fp32": (0.01, 0.001), "fp16": (2.0, 0.1)}


def load_reference(meta: dict, onnx_file: Path) -> dict[str, np.ndarray]:
    path = onnx_file.with_name(meta["reference"]["file"])
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the reference pair named in {onnx_file.with_suffix('.json')} is missing")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != meta["reference"]["sha256"]:
        raise ValueError(f"{path}: checksum {digest[:12]}... does not match the sidecar's "
                         f"{meta['reference']['sha256'][:12]}... (a file from another export?)")
    with np.load(path) as data:
        return {k: data[k] for k in ("left", "right", "disparity")}


def _tensor(image: np.ndarray, batch: int) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(image.astype(np.float32).transpose(2, 0, 1)[None], batch, axis=0))


def run_tensorrt(engine_file: Path, left: np.ndarray, right: np.ndarray) -> np.ndarray:  # pragma: no cover - GPU
    """One inference of a TensorRT engine with dynamic height/width (TensorRT 10 tensor API; torch for the buffers)."""
    import tensorrt as trt
    import torch

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(engine_file.read_bytes())
    context = engine.create_execution_context()
    buffers = {"left": torch.from_numpy(left).cuda(), "right": torch.from_numpy(right).cuda()}
    for name in ("left", "right"):
        context.set_input_shape(name, tuple(buffers[name].shape))
    buffers["disparity"] = torch.empty(tuple(context.get_tensor_shape("disparity")), device="cuda")
    for name, tensor in buffers.items():
        context.set_tensor_address(name, tensor.data_ptr())
    stream = torch.cuda.current_stream()
    if not context.execute_async_v3(stream.cuda_stream):
        raise RuntimeError(f"{engine_file}: TensorRT execution failed")
    stream.synchronize()
    return buffers["disparity"].cpu().numpy()


def check(engine: Path, onnx_file: Path) -> dict:
    """The engine's disparity on the reference pair against the stored PyTorch one."""
    meta = read_sidecar(onnx_file)
    ref = load_reference(meta, onnx_file)
    batch = int(meta["batch"]["size"])
    left, right = _tensor(ref["left"], batch), _tensor(ref["right"], batch)
    if engine.suffix == ".onnx":
        from stereo.deploy.runtime import OnnxStereo

        out = OnnxStereo(engine).run_padded(left, right)
        runner = "onnxruntime"
    elif engine.suffix in (".engine", ".plan", ".trt"):
        out = run_tensorrt(engine, left, right)
        runner = "tensorrt"
    else:
        raise ValueError(f"{engine}: expected a TensorRT engine (.engine/.plan/.trt) or an ONNX file (.onnx)")
    return {"engine": str(engine), "runner": runner, "precision": meta["precision"],
            "size": list(ref["disparity"].shape), **difference(out[0, 0], ref["disparity"])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stereo.deploy.check_engine", description=__doc__.split("\n\n")[0])
    parser.add_argument("engine", type=Path, help="TensorRT engine (.engine/.plan) or ONNX file (onnxruntime)")
    parser.add_argument("--onnx", type=Path, required=True, help="the export it was built from (its .json beside)")
    parser.add_argument("--max-abs", type=float, help="largest allowed |engine - PyTorch| px (default by precision)")
    parser.add_argument("--mean-abs", type=float, help="largest allowed mean |engine - PyTorch| px")
    args = parser.parse_args(argv)
    try:
        result = check(args.engine, args.onnx)
    except (FileNotFoundError, ValueError) as exc:
        print(f"check_engine: {exc}", file=sys.stderr)
        return 2
    max_abs, mean_abs = THRESHOLDS[result["precision"]]
    max_abs, mean_abs = args.max_abs or max_abs, args.mean_abs or mean_abs
    result["passed"] = result["finite"] and result["max_abs"] <= max_abs and result["mean_abs"] <= mean_abs
    result["thresholds"] = {"max_abs": max_abs, "mean_abs": mean_abs}
    print(json.dumps(result))
    print(f"{'PASS' if result['passed'] else 'FAIL'}: {result['runner']} vs PyTorch on the "
          f"{result['size'][1]}x{result['size'][0]} reference pair: max {result['max_abs']:.3g} px "
          f"(<= {max_abs}), mean {result['mean_abs']:.3g} px (<= {mean_abs})"
          f"{'' if result['finite'] else ', NOT FINITE'}", file=sys.stderr)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

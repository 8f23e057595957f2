"""The fp16 variant of an exported graph: fp16 weights and activations, with the overflow-prone operations in fp32.

What overflows or loses too much in half precision (fp16's largest value is 65504, its resolution 1/1024 of the value):
- the model's own fp32 islands (`autocast_off` in stereo/model; here every node of FoundationStereo's own code):
  the group-wise correlation volume and its feature normalisation (cost_volume.py), the geometry lookup with its
  all-pairs correlation (lookup.py), the soft-argmin disparity regression (a softmax over up to 104 bins, then a sum of bin x probability: cost_volume.py) and the
  convex upsampling's softmax and weighted sum (upsample.py). Disparities are hundreds of pixels, where fp16 steps
  by 0.25 px;
- everywhere else, the operators whose intermediate values grow with the reduced size: normalisations (layer and
  instance norm sum squares over channels or whole images: a 2000x2900 image has 5.8 M pixels), L2 norms, softmax
  (exp) and sums, powers and square roots. Convolutions and matmuls accumulate in fp32 on GPUs' tensor cores.
These nodes keep fp32 inputs and outputs, with casts inserted at their boundaries (onnxruntime's float16 converter).
`docs/deploy.md` has the measurements: no inf or NaN at 736x1280 and at full Middlebury size.
"""

from __future__ import annotations

import ast
from pathlib import Path

FP32_OP_TYPES = ("Softmax", "LogSoftmax", "LayerNormalization", "InstanceNormalization", "GroupNormalization",
                 "BatchNormalization", "ReduceL2", "ReduceSumSquare", "ReduceSum", "ReduceMean", "Pow", "Sqrt",
                 "Exp", "Erf", "Reciprocal", "CumSum", "Range", "Resize")
# The model's fp32 islands are functions, not modules: the cost volumes, the geometry lookup, the soft-argmin and the
# upsampling are called from FoundationStereo's own methods. So every node made by FoundationStereo's (or the export
# wrapper's) own code, not by one of its submodules, stays fp32: those islands plus the image normalisation and the
# disparity updates of the iterations (values of hundreds of pixels), all light work beside the convolutions.
FP32_OWNERS = ("stereo.model.foundation_stereo.FoundationStereo", "stereo.deploy.graph.DisparityGraph")


def island_nodes(model) -> list[str]:
    """Names of the nodes whose innermost module is one of FP32_OWNERS (the exporter's class-hierarchy metadata)."""
    names = []
    for node in model.graph.node:
        hierarchy = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.class_hierarchy"), None)
        if hierarchy is None:
            continue
        modules = ast.literal_eval(hierarchy)[:-1]  # the last entry is the operator
        if modules and modules[-1] in FP32_OWNERS:
            names.append(node.name)
    return names


def convert_to_fp16(src: str | Path, dst: str | Path, external_data: bool = False) -> list[str]:
    """Rewrite the fp32 graph `src` as `dst` in fp16 (inputs and output stay float32); returns what stays fp32: the
    operator types and the island nodes' count, as the sidecar records them."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    islands = island_nodes(model)
    if not islands:
        raise RuntimeError(f"{src}: no node is marked as made by {FP32_OWNERS[0]}; the exporter's metadata changed "
                           f"and the fp32 islands cannot be found")
    half = convert_float_to_float16(model, keep_io_types=True, op_block_list=list(FP32_OP_TYPES),
                                    node_block_list=islands, disable_shape_infer=True)
    dst = Path(dst)
    data = dst.with_name(dst.name + ".data")
    data.unlink(missing_ok=True)
    onnx.save_model(half, str(dst), save_as_external_data=external_data,
                    location=data.name if external_data else None)
    return [*FP32_OP_TYPES, f"{len(islands)} nodes of FoundationStereo's own code (cost volumes, lookup, soft-argmin, "
                            f"upsampling, disparity updates)"]


def torch_fp16_disparity(model, left, right, iters: int, hierarchical: bool = False):
    """The PyTorch model in half precision on the CPU, as a GPU runs it under fp16 autocast: CUDA's autocast rules
    (norms, softmax, sums in fp32: `stereo.plan.simulate.cuda_autocast_policy`) plus the model's own fp32 islands.
    Where onnxruntime has no fp16 kernel for an operator it computes it in fp32, so this is the check that the
    half-precision arithmetic itself stays finite."""
    import torch

    from stereo.model.infer import predict
    from stereo.plan.simulate import cuda_autocast_policy

    with cuda_autocast_policy(), torch.autocast("cpu", dtype=torch.float16):
        return predict(model, left, right, iters, hierarchical)


def fp32_layer_names(src: str | Path) -> list[str]:
    """The nodes of an fp32 export that the fp16 variant keeps in fp32 (TensorRT layers take the ONNX node names)."""
    import onnx

    model = onnx.load(str(src), load_external_data=False)
    islands = set(island_nodes(model))
    return [n.name for n in model.graph.node if n.name in islands or n.op_type in FP32_OP_TYPES]


if __name__ == "__main__":  # `python -m stereo.deploy.fp16 model.onnx`: trtexec's --layerPrecisions for the fp32 graph
    import sys

    print(",".join(f"{name}:fp32" for name in fp32_layer_names(sys.argv[1])))

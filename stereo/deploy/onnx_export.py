"""Export a FoundationStereo model to ONNX (torch.onnx's dynamo exporter) with a JSON sidecar.

Writes `OUT.onnx` (weights inside, or in `OUT.onnx.data` past protobuf's 2 GB limit), `OUT.json` (what the graph
takes and gives, how it was made) and `OUT.reference.npz` (a reference pair and the PyTorch disparity on it, for
checking any engine built from the file later: `stereo.deploy.check_engine`).

Height and width are symbolic: multiples of 32 (64 with hierarchical inference) between `min_side` and `max_side`
(1344 at most: beyond it the ViT input is capped at 1344 on the longer side, another branch of the model, so a larger
image needs its own export with `static=True` at that size). The batch stays fixed (default 1): the model's guards
on the batch (the left and right views share one backbone pass) do not export symbolically. Standard operators only:
the model's attention is torch's `scaled_dot_product_attention`, which exports as plain MatMul/Softmax.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from stereo.deploy.graph import DisparityGraph
from stereo.deploy.reference import reference_pair
from stereo.model.backbone.feature import VIT_MAX_SIDE

SIDECAR_FORMAT = "foundation-stereo-onnx/1"
PROTOBUF_LIMIT = 2 * 1024**3
# The graph, the names and the metadata besides the weights: external data starts well below protobuf's 2 GB.
EXTERNAL_DATA_ABOVE = int(1.8 * 1024**3)


class ExportError(RuntimeError):
    """The model or the options cannot be exported as asked; the message says what to change."""


@dataclass
class ExportSpec:
    iters: int
    hierarchical: bool = False
    height: int = 480  # the traced example size, and the reference pair's (a multiple of the divisor)
    width: int = 640
    batch: int = 1
    opset: int = 18
    min_side: int | None = None  # default: 2 x the divisor
    max_side: int = VIT_MAX_SIDE
    static: bool = False  # height and width fixed at the example size (images over 1344 px)
    precision: str = "fp32"  # or "fp16": fp16 graph with fp32 islands (stereo.deploy.fp16)
    external_data: bool | None = None  # None: only past protobuf's limit

    def validate(self) -> None:
        div = 64 if self.hierarchical else 32
        if self.iters < 1:
            raise ExportError(f"iterations must be at least 1, got {self.iters}")
        if self.opset < 17:
            raise ExportError(f"opset 17 or newer (LayerNormalization is standard from 17), got {self.opset}")
        if self.precision not in ("fp32", "fp16"):
            raise ExportError(f"precision fp32 or fp16, got {self.precision!r}")
        for name, value in (("height", self.height), ("width", self.width)):
            if value % div:
                why = " (hierarchical: the half-resolution pass needs multiples of 32)" if div == 64 else ""
                raise ExportError(f"{name} {value} is not a multiple of {div}{why}")
            if not self.static and not (self.low <= value <= self.max_side):
                raise ExportError(f"{name} {value} is outside the dynamic range {self.low}..{self.max_side}; "
                                  f"export a larger image with static=True (--static)")
        if not self.static and self.max_side > VIT_MAX_SIDE:
            raise ExportError(f"a dynamic export covers sides up to {VIT_MAX_SIDE} (the ViT's input cap changes the "
                              f"graph beyond it); export larger images with --static at their size")

    @property
    def divisor(self) -> int:
        return 64 if self.hierarchical else 32

    @property
    def low(self) -> int:
        return self.min_side or 2 * self.divisor


@dataclass
class Exported:
    onnx: Path
    sidecar: Path
    reference: Path
    external_data: Path | None
    seconds: float
    meta: dict = field(default_factory=dict)


def _dynamic_shapes(spec: ExportSpec) -> dict | None:
    if spec.static:
        return None
    div = spec.divisor
    h = torch.export.Dim("height_div", min=spec.low // div, max=spec.max_side // div)
    w = torch.export.Dim("width_div", min=spec.low // div, max=spec.max_side // div)
    dims = {2: div * h, 3: div * w}
    return {"left": dims, "right": dims}


def _parameter_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def export_onnx(model: nn.Module, out: str | Path, spec: ExportSpec, *, source: str = "",
                log=print) -> Exported:
    """Export `model` (a FoundationStereo, fp32, on the CPU) as `out` (.onnx) with its sidecar and reference pair."""
    spec.validate()
    out = Path(out)
    if out.suffix != ".onnx":
        raise ExportError(f"{out}: the output file must end in .onnx")
    out.parent.mkdir(parents=True, exist_ok=True)
    model = model.float().cpu().eval()
    graph = DisparityGraph(model, spec.iters, spec.hierarchical)
    left, right = reference_pair(spec.height, spec.width)
    images = [torch.from_numpy(x).permute(2, 0, 1)[None].float().repeat(spec.batch, 1, 1, 1) for x in (left, right)]
    start = time.perf_counter()
    with torch.no_grad():
        reference = graph(*images)
    log(f"export-onnx: PyTorch reference at {spec.width}x{spec.height} in {time.perf_counter() - start:.1f} s")

    external = spec.external_data if spec.external_data is not None else _parameter_bytes(model) > EXTERNAL_DATA_ABOVE
    start = time.perf_counter()
    log(f"export-onnx: tracing {model.cfg.size}, {spec.iters} iterations"
        f"{', hierarchical' if spec.hierarchical else ''} (torch.export; a minute for small models, more for ViT-L)")
    try:
        program = torch.onnx.export(graph, tuple(images), dynamo=True, opset_version=spec.opset,
                                    dynamic_shapes=_dynamic_shapes(spec), input_names=["left", "right"],
                                    output_names=["disparity"], optimize=True, report=False)
    except Exception as exc:  # torch.export's own message names the guard or operator
        raise ExportError(f"torch.onnx.export failed for {model.cfg.size} at {spec.width}x{spec.height}: "
                          f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    data = out.with_name(out.name + ".data")
    data.unlink(missing_ok=True)
    program.save(out, external_data=external)
    seconds = time.perf_counter() - start
    fp32_kept: list[str] = []
    if spec.precision == "fp16":
        from stereo.deploy.fp16 import convert_to_fp16

        fp32_kept = convert_to_fp16(out, out, external_data=external)
    log(f"export-onnx: wrote {out} in {seconds:.0f} s")

    reference_path = out.with_suffix(".reference.npz")
    disparity = reference[0, 0].numpy().astype(np.float32)
    np.savez_compressed(reference_path, left=left, right=right, disparity=disparity)
    meta = sidecar(model, spec, source=source, onnx_file=out, external=data if data.exists() else None,
                   reference_file=reference_path, disparity=disparity, fp32_kept=fp32_kept, seconds=seconds)
    sidecar_path = out.with_suffix(".json")
    sidecar_path.write_text(json.dumps(meta, indent=2) + "\n")
    return Exported(out, sidecar_path, reference_path, data if data.exists() else None, seconds, meta)


def sidecar(model: nn.Module, spec: ExportSpec, *, source: str, onnx_file: Path, external: Path | None,
            reference_file: Path, disparity: np.ndarray, fp32_kept: list[str], seconds: float) -> dict:
    """The JSON beside the .onnx file: everything a runtime or a later check needs to know about the graph."""
    cfg = model.cfg
    div = spec.divisor
    if spec.static:
        sides = {name: {"dynamic": False, "size": value} for name, value in (("height", spec.height),
                                                                              ("width", spec.width))}
    else:
        sides = {name: {"dynamic": True, "multiple_of": div, "min": spec.low, "max": spec.max_side}
                 for name in ("height", "width")}
    return {
        "format": SIDECAR_FORMAT,
        "onnx": onnx_file.name,
        "external_data": external.name if external else None,
        "onnx_bytes": onnx_file.stat().st_size + (external.stat().st_size if external else 0),
        "source": source,
        "model": {"size": cfg.size, "max_disp": cfg.max_disp, "hidden_dims": list(cfg.hidden_dims),
                  "corr_levels": cfg.corr_levels, "corr_radius": cfg.corr_radius,
                  "parameters": sum(p.numel() for p in model.parameters())},
        "iterations": spec.iters,
        "hierarchical": spec.hierarchical,
        "opset": spec.opset,
        "precision": spec.precision,
        "fp32_kept": fp32_kept,
        "inputs": {name: {"shape": [spec.batch, 3, "height", "width"], "dtype": "float32",
                          "values": "RGB 0..255, not normalised"} for name in ("left", "right")},
        "outputs": {"disparity": {"shape": [spec.batch, 1, "height", "width"], "dtype": "float32",
                                  "values": "left-view disparity in pixels"}},
        "batch": {"dynamic": False, "size": spec.batch,
                  "why": "the model runs both views through one backbone pass; torch.export guards its batch"},
        **sides,
        "padding": {"where": "outside the graph", "multiple_of": div, "mode": "replicate",
                    "split": "left = pad // 2, right = the rest; top = pad // 2, bottom = the rest; "
                             "crop the output back (stereo.model.infer.InputPadder)"},
        "reference": {"file": reference_file.name, "sha256": _sha256(reference_file),
                      "pair": "Middlebury 2014 motorcycle (scikit-image), resized to the example size",
                      "height": int(disparity.shape[0]), "width": int(disparity.shape[1]),
                      "disparity_min": float(disparity.min()), "disparity_max": float(disparity.max()),
                      "disparity_mean": float(disparity.mean())},
        "torch": torch.__version__,
        "export_seconds": round(seconds, 1),
        "spec": asdict(spec),
    }


def read_sidecar(onnx_file: str | Path) -> dict:
    """The JSON beside `onnx_file`; a missing or foreign one is an error naming the file."""
    path = Path(onnx_file).with_suffix(".json")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no sidecar JSON beside {onnx_file} (written by `stereo export-onnx`)")
    meta = json.loads(path.read_text())
    if meta.get("format") != SIDECAR_FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, expected {SIDECAR_FORMAT!r}")
    return meta

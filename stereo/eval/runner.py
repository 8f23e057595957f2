"""Run a model over decoded samples and measure it: shared by `python -m stereo eval` and training validation.

Samples are the decoded-sample dicts of docs/architecture.md (`left`, `right`, `disp`, `valid`, `nocc`, `key`).
Any image size works: `stereo.model.infer.predict` pads to the model's multiple of 32 and crops back. Nothing is
written unless `out_dir` is given, so validation during training costs only the forward passes and the counting.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from stereo.eval.metrics import MetricAccumulator, with_unit
from stereo.pictures import disparity_panel, markdown_table, summary_sheet
from stereo.model.infer import predict
from stereo.progress import track

DEFAULT_HEADLINE: tuple[str, ...] = ("epe/pooled", "bp_2/pooled", "d1/pooled")
SHEET_IMAGES = 3  # worst and best images shown on the summary sheet


def _to_tensor(image: np.ndarray, device: torch.device) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) float32 0..255 on `device`."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float().to(device)


def _file_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "__", key).strip("_") or "image"


def evaluate(model: torch.nn.Module, samples: Iterable[dict[str, Any]], iters: int, device: str | torch.device,
             out_dir: str | Path | None = None, max_disp: float | None = None, progress: bool = True, *,
             headline: Sequence[str] = DEFAULT_HEADLINE, title: str = "evaluation", save_images: bool = True,
             metadata: dict[str, Any] | None = None, hierarchical: bool = False, total: int | None = None,
             keep_panels: int = 0) -> dict[str, Any]:
    """Predict every sample, score it, and return the summary (flat: `epe/pooled`, `d1_noc/mean_image`, ...,
    `images`, `pixels`, `seconds_per_image`) plus `rows`: the per-image rows (key, metrics, seconds, size).

    `max_disp` drops ground truth >= max_disp from the metrics (None: no cap; see stereo.eval.metrics).
    With `out_dir`: `results.json` and `results.md` (both led by `metadata`), and unless `save_images` is false a
    panel PNG per image under `images/` and `summary.png`.
    `hierarchical`: predict as the released `--hiera` does (see stereo.model.infer.predict).
    `total`: the number of samples, for the progress display, when `samples` has no len().
    `keep_panels`: the labelled panels of the first N samples are returned under `panels` (the trainer logs them
    as validation images).
    `headline` names the summary keys shown in the table and sheet; its first entry (without the `/pooled` or
    `/mean_image` suffix) ranks the images for the sheet.
    """
    device = torch.device(device)
    out = Path(out_dir) if out_dir is not None else None
    panels = out is not None and save_images
    if out is not None:
        (out / "images" if panels else out).mkdir(parents=True, exist_ok=True)
    accumulator = MetricAccumulator(max_disp)
    rows: list[dict[str, Any]] = []
    kept: list[np.ndarray] = []
    if total is None:
        try:
            total = len(samples)  # type: ignore[arg-type]
        except TypeError:  # a generator, or shards whose length is unknown until read
            total = None
    for sample in track(samples, total, title, "img", enabled=progress):
        left, right = _to_tensor(sample["left"], device), _to_tensor(sample["right"], device)
        start = time.perf_counter()
        # no_grad, not inference_mode: under ZeRO-3 the forward gathers weights that later train, and a tensor made in
        # inference mode can never enter autograd again
        with torch.no_grad():
            disp = predict(model, left, right, iters, hierarchical)  # eval mode inside, the caller's restored after
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        pred = disp.float().cpu().numpy().reshape(sample["disp"].shape)
        row = {"key": sample["key"], **accumulator.add(pred, sample["disp"], sample["valid"], sample.get("nocc")),
               "seconds": seconds, "height": pred.shape[0], "width": pred.shape[1]}
        if panels or len(kept) < keep_panels:
            panel = disparity_panel(sample["left"], sample["disp"], pred, sample["valid"])
            if len(kept) < keep_panels:
                kept.append(panel)
            if panels:
                panel_path = out / "images" / f"{len(rows):04d}_{_file_name(sample['key'])}.png"
                Image.fromarray(panel).save(panel_path)
                row["panel"] = str(panel_path.relative_to(out))
        rows.append(row)
    summary = accumulator.summary()
    summary["seconds_per_image"] = float(np.mean([r["seconds"] for r in rows])) if rows else None
    result = {**summary, "rows": rows, **({"panels": kept} if keep_panels else {})}
    if out is not None:
        write_report(out, result, headline, title, metadata)
    return result


def _json_safe(value: Any) -> Any:
    """inf/NaN (a broken prediction) -> None, since JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def write_report(out: Path, result: dict[str, Any], headline: Sequence[str], title: str,
                 metadata: dict[str, Any] | None = None) -> None:
    """results.json (everything), results.md (headline table + per-image table), summary.png (worst/best)."""
    rows, metadata = result["rows"], metadata or {}
    summary = {k: v for k, v in result.items() if k not in ("rows", "panels")}
    (out / "results.json").write_text(json.dumps(_json_safe({**metadata, "summary": summary, "images": rows}),
                                                 indent=2) + "\n")
    per_image_keys = list(dict.fromkeys(k.rsplit("/", 1)[0] for k in headline))
    text = f"# {title}\n\n" + "".join(f"- {k}: {v}\n" for k, v in metadata.items()) + "\n"
    text += markdown_table(["metric", "value"], [(with_unit(k), summary.get(k)) for k in headline])
    text += f"\n{summary['images']} images, {summary.get('seconds_per_image') or 0:.3f} s per image\n\n"
    text += markdown_table(["image", *map(with_unit, per_image_keys)],
                           [(r["key"], *(r.get(k) for k in per_image_keys)) for r in rows])
    (out / "results.md").write_text(text)
    rank_key = per_image_keys[0]
    ranked = sorted((r for r in rows if r.get(rank_key) is not None and "panel" in r),
                    key=lambda r: r[rank_key], reverse=True)
    if not ranked:
        return
    worst = ranked[:min(SHEET_IMAGES, math.ceil(len(ranked) / 2))]
    best = ranked[len(worst):][::-1][:SHEET_IMAGES]

    def tiles(chosen: list[dict[str, Any]]) -> list[tuple[str, float, Path]]:
        return [(r["key"], r[rank_key], out / r["panel"]) for r in chosen]

    summary_sheet(out / "summary.png", f"{title}  (ranked by {with_unit(rank_key)})",
                  [(with_unit(k), summary.get(k)) for k in headline], tiles(worst), tiles(best), with_unit(rank_key))

"""`compare` on two small run directories written the way the trainer writes them."""

import json

import yaml
from PIL import Image

from stereo.cli import main
from stereo.eval.compare import flatten


def _write_run(path, lr, speed, epe_scale, time_offset=0.0):
    path.mkdir(parents=True)
    config = {"name": "tiny", "optim": {"lr": lr, "betas": [0.9, 0.999]}, "train": {"steps": 30}}
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    lines = []
    for step in range(10, 31, 10):
        lines.append({"step": step, "time": time_offset + step / speed, "loss": 10.0 / step, "loss/init": 4.0 / step,
                      "loss/seq": 6.0 / step, "lr": lr, "samples_per_s": speed})
        lines.append({"step": step, "time": time_offset + step / speed + 1, "val/demo_val/epe/pooled": epe_scale * (40 - step),
                      "val/demo_val/epe/mean_image": 1.0, "val/demo_val/bp_2/pooled": 50.0})
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")


def test_compare_writes_table_with_differences_and_plots(tmp_path, capsys):
    _write_run(tmp_path / "a", lr=1e-3, speed=4.0, epe_scale=1.0)
    _write_run(tmp_path / "b", lr=2e-4, speed=2.0, epe_scale=2.0, time_offset=1.7e9)  # Unix timestamps
    out = tmp_path / "cmp"
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    text = (out / "compare.md").read_text()
    assert text == capsys.readouterr().out.rstrip("\n") + "\n"
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in text.splitlines()
            if line.startswith("| ")}
    assert rows["last step"] == ["30", "30"]
    # a: 30 / 4 + 1 = 8.5 s since start; b: timestamps, made relative to its first line (16 - 5 = 11 s)
    assert rows["wall time (min)"] == [f"{8.5 / 60:.3f}", f"{11 / 60:.3f}"]
    assert rows["final val/demo_val/epe/pooled"] == ["10.000", "20.000"]
    assert rows["best val/demo_val/epe/pooled"] == ["10.000", "20.000"]
    assert rows["median samples/s"] == ["4.000", "2.000"]
    assert rows["final loss"] == ["0.333", "0.333"]
    assert rows["optim.lr"] == ["0.001", "0.0002"]  # the only config difference
    assert "train.steps" not in rows and "optim.betas" not in rows
    for name in ("loss.png", "val.png"):
        with Image.open(out / name) as image:
            assert image.width > 500 and image.height > 200


def test_compare_names_the_bad_file(tmp_path, capsys):
    _write_run(tmp_path / "a", lr=1e-3, speed=4.0, epe_scale=1.0)
    (tmp_path / "b").mkdir()
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "o")]) == 1
    assert "b/metrics.jsonl" in capsys.readouterr().err
    _write_run(tmp_path / "c", lr=1e-3, speed=4.0, epe_scale=1.0)
    with open(tmp_path / "c" / "metrics.jsonl", "a") as f:
        f.write("{not json\n")
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "c"), "--out", str(tmp_path / "o")]) == 1
    assert "c/metrics.jsonl:7" in capsys.readouterr().err


def test_flatten_nested_config():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None}) == {"a.b": 1, "a.c.d": [1, 2], "e": None}

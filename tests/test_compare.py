"""`compare` on small run directories written the way the trainer writes them: the main metric first, counters
left out of the table and the plots, runs named (and the legends labelled) by what differs between them."""

import json

import yaml
from PIL import Image

import stereo.eval.compare as compare_module
from stereo.cli import main
from stereo.config.load import flatten

VAL = "val/demo_val"  # a key with the validation set's name in it: the main metric is found without --metric


def _write_run(path, lr, speed, epe_scale, time_offset=0.0, steps=30):
    path.mkdir(parents=True)
    config = {"name": "tiny", "optim": {"lr": lr, "betas": [0.9, 0.999]}, "train": {"steps": steps,
                                                                                    "run_dir": str(path)}}
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    lines = [{"step": 0, "time": time_offset, f"{VAL}/epe/pooled": 5.0, f"{VAL}/images": 9.0}]  # shared start
    for step in range(10, 31, 10):
        lines.append({"step": step, "time": time_offset + step / speed, "loss": 10.0 / step, "loss/init": 4.0 / step,
                      "loss/seq": 6.0 / step, "lr": lr, "samples_per_s": speed})
        lines.append({"step": step, "time": time_offset + step / speed + 1,
                      f"{VAL}/epe/pooled": epe_scale * (40 - step),
                      f"{VAL}/epe/mean_image": 1.0, f"{VAL}/bp_2/pooled": 50.0, f"{VAL}/bp_4/pooled": 40.0,
                      f"{VAL}/bp_3/pooled": 45.0, f"{VAL}/d1/pooled": 45.0,
                      f"{VAL}/images": 9.0, f"{VAL}/pixels": 98451.0, f"{VAL}/pixels_noc": 0.0,
                      f"{VAL}/seconds_per_image": 0.7})
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")


def _rows(text):
    return {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in text.splitlines()
            if line.startswith("| ")}


def test_compare_main_metric_first_counters_dropped_runs_named_by_differences(tmp_path, capsys, monkeypatch):
    _write_run(tmp_path / "tiny-20261201-101010", lr=1e-3, speed=4.0, epe_scale=2.0)
    _write_run(tmp_path / "tiny-20261201-121212", lr=2e-4, speed=2.0, epe_scale=1.0, time_offset=1.7e9)  # Unix time
    plotted = []
    real_plot = compare_module._plot
    monkeypatch.setattr(compare_module, "_plot", lambda runs, keys, out: (
        plotted.append((out.name, [run.name for run in runs], keys)), real_plot(runs, keys, out)))
    out = tmp_path / "cmp"
    assert main(["compare", str(tmp_path / "tiny-20261201-101010"), str(tmp_path / "tiny-20261201-121212"),
                 "--out", str(out)]) == 0
    text = (out / "compare.md").read_text()
    assert text == capsys.readouterr().out.rstrip("\n") + "\n"
    table = text.split("## Config differences")[0]
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    # named by the difference (not the timestamped directories), the better run first
    assert lines[0] == "|  | optim.lr=0.0002 | optim.lr=0.001 |"
    # the main metric first: best after step 0 (the step-0 value 5.0 is every run's start) and its step
    assert [line.split("|")[1].strip() for line in lines[1:4]] == [
        f"best {VAL}/epe/pooled (px)", f"step of best {VAL}/epe/pooled", f"final {VAL}/epe/pooled (px)"]
    rows = _rows(text)
    assert rows[f"best {VAL}/epe/pooled (px)"] == ["10.000", "20.000"]
    assert rows[f"step of best {VAL}/epe/pooled"] == ["30", "30"]
    assert rows[f"final {VAL}/bp_2/pooled (%)"] == ["50.000", "50.000"]
    # bp_3 equal to D1 in every run (all ground truth under 60 px) is one column, said so under the table
    assert rows[f"final {VAL}/d1/pooled (%)"] == ["45.000", "45.000"] and not [k for k in rows if "bp_3" in k]
    assert f"{VAL}/bp_3/pooled left out: equal to D1 in every run" in text
    assert not [key for key in rows if any(part in key for part in ("images", "pixels", "seconds", "mean_image"))]
    assert rows["last step"] == ["30", "30"]
    # b: timestamps, made relative to its first line (16 s); a: 30 / 4 + 1 = 8.5 s since start
    assert rows["wall time (m:ss)"] == ["0:16", "0:08"]
    assert rows["median samples/s"] == ["2.000", "4.000"]
    assert rows["final loss"] == ["0.333", "0.333"]
    assert rows["optim.lr"] == ["0.0002", "0.001"]  # the only config difference (the run directory is not one)
    assert "train.steps" not in rows and "optim.betas" not in rows and "train.run_dir" not in rows
    assert rows["run directory"] == [str(tmp_path / "tiny-20261201-121212"), str(tmp_path / "tiny-20261201-101010")]
    # plots: legends name the difference; validation panels start with the main metric, no counters
    assert plotted[0] == ("loss.png", ["optim.lr=0.0002", "optim.lr=0.001"], ["loss", "loss/init", "loss/seq"])
    assert plotted[1] == ("val.png", ["optim.lr=0.0002", "optim.lr=0.001"],
                          [f"{VAL}/epe/pooled", f"{VAL}/bp_2/pooled", f"{VAL}/d1/pooled"])
    for name in ("loss.png", "val.png"):
        with Image.open(out / name) as image:
            assert image.width > 500 and image.height > 200


def test_compare_direction_max_and_identical_configs(tmp_path, capsys):
    _write_run(tmp_path / "a", lr=1e-3, speed=4.0, epe_scale=1.0)
    _write_run(tmp_path / "b", lr=1e-3, speed=4.0, epe_scale=2.0)
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "o"),
                 "--metric", f"{VAL}/epe/pooled", "--direction", "max"]) == 0
    text = capsys.readouterr().out
    assert [line for line in text.splitlines() if line.startswith("| ")][0] == "|  | b | a |"  # names: directories
    assert _rows(text)[f"best {VAL}/epe/pooled (px)"] == ["60.000", "30.000"]  # max, still after step 0
    assert "The configs are identical." in text


def test_compare_names_the_bad_file(tmp_path, capsys):
    _write_run(tmp_path / "a", lr=1e-3, speed=4.0, epe_scale=1.0)
    (tmp_path / "b").mkdir()
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "o")]) == 1
    assert "b/metrics.jsonl" in capsys.readouterr().err
    _write_run(tmp_path / "c", lr=1e-3, speed=4.0, epe_scale=1.0)
    with open(tmp_path / "c" / "metrics.jsonl", "a") as f:
        f.write("{not json\n")
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "c"), "--out", str(tmp_path / "o")]) == 1
    assert "c/metrics.jsonl:8" in capsys.readouterr().err
    assert main(["compare", "--out", str(tmp_path / "o")]) == 2  # neither runs nor a sweep
    assert "give run directories" in capsys.readouterr().err


def test_flatten_nested_config():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None}) == {"a.b": 1, "a.c.d": [1, 2], "e": None}

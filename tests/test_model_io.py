"""Released checkpoint format: save/load round trips, strict mismatch errors, initialise, `model summary`."""

from __future__ import annotations

import io
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch
import yaml

from stereo.cli import main
from stereo.config.errors import ConfigError
from stereo.config.schema import ModelConfig
from stereo.model import build_model
from stereo.model.io import export_released, initialise, load_released, read_checkpoint
from stereo.model.pretrained import WeightMismatchError

MANIFESTS = Path(__file__).resolve().parents[1] / "stereo" / "model" / "manifests"


def tiny(**changes) -> ModelConfig:
    cfg = ModelConfig(size="tiny", max_disp=64, hidden_dims=[32, 32, 32])
    for key, value in changes.items():
        setattr(cfg, key, value)
    return cfg


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def trained_like():
    torch.manual_seed(3)
    model = build_model(tiny())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model


def test_released_format_round_trip(tmp_path, trained_like):
    paths = export_released(trained_like, tmp_path / "model_best_bp2.pth", global_step=1234, epoch=5,
                            config={"model": {"size": "tiny"}}, safetensors=True)
    assert [p.name for p in paths] == ["model_best_bp2.pth", "cfg.yaml", "model_best_bp2.safetensors"]
    released_cfg = yaml.safe_load(paths[1].read_text())  # what the released inference script builds its model from
    assert released_cfg["vit_size"] == "tiny" and released_cfg["max_disp"] == 64
    assert released_cfg["hidden_dims"] == [32, 32, 32] and released_cfg["n_gru_layers"] == 3
    assert len({p.stat().st_mode for p in paths}) == 1  # safetensors alone would write 0600
    payload = torch.load(paths[0], map_location="cpu", weights_only=True)
    assert payload["global_step"] == 1234 and payload["epoch"] == 5
    assert set(payload["model"]) == set(trained_like.state_dict())
    for path in (paths[0], paths[2]):
        fresh = build_model(tiny())
        assert not same_weights(fresh, trained_like)
        load_released(fresh, path)
        assert same_weights(fresh, trained_like)
        assert fresh.feature.vit_initialised_from == str(path)
        assert read_checkpoint(path)[1] == {"model": {"size": "tiny"}}


def test_ddp_prefix_and_bare_state_dict(tmp_path, trained_like):
    state = trained_like.state_dict()
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "global_step": 1, "epoch": 0},
               tmp_path / "ddp.pth")
    torch.save(state, tmp_path / "bare.pth")
    for name in ("ddp.pth", "bare.pth"):
        fresh = build_model(tiny())
        load_released(fresh, tmp_path / name)
        assert same_weights(fresh, trained_like)


def test_mismatch_lists_missing_unexpected_and_wrong_shape(tmp_path, trained_like):
    state = dict(trained_like.state_dict())
    del state["classifier.2.bias"]
    state["extra.weight"] = torch.zeros(1)
    state["proj_cmb.weight"] = torch.zeros(3, 3, 1, 1)
    path = tmp_path / "broken.pth"
    torch.save({"model": state, "global_step": 0, "epoch": 0}, path)
    fresh = build_model(tiny())
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(WeightMismatchError) as info:
        load_released(fresh, path)
    err = info.value
    assert err.missing == ["classifier.2.bias"] and err.unexpected == ["extra.weight"]
    assert [k for k, _, _ in err.wrong_shape] == ["proj_cmb.weight"]
    assert str(path) in str(err) and "classifier.2.bias" in str(err)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())  # nothing loaded


def test_size_mismatch_is_reported_by_key(tmp_path):
    with torch.device("meta"):
        vits = build_model(ModelConfig(size="vits"))
    fake = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in vits.state_dict().items() if k.startswith("cnet.")}
    torch.save({"model": fake}, tmp_path / "partial.pth")
    with pytest.raises(WeightMismatchError, match="missing"):
        load_released(build_model(tiny()), tmp_path / "partial.pth")


def test_initialise_refuses_a_random_frozen_vit(tmp_path, trained_like):
    with pytest.raises(ConfigError, match="allow_random_vit"):
        initialise(build_model(tiny()), tiny())
    allowed = tiny()
    allowed.pretrained.allow_random_vit = True
    initialise(build_model(allowed), allowed)  # the demo's explicit opt-in
    export_released(trained_like, tmp_path / "init.pth", global_step=0, epoch=0)
    cfg = tiny(init_from=str(tmp_path / "init.pth"))
    model = build_model(cfg)
    initialise(model, cfg)
    assert same_weights(model, trained_like)


@pytest.mark.parametrize("size", ["vits", "vitl"])
def test_model_summary_tsv_is_the_manifest(size):
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["model", "summary", "--size", size, "--tsv"]) == 0
    printed = out.getvalue().splitlines()
    expected = (MANIFESTS / f"foundationstereo_{size}_state_dict.tsv").read_text().splitlines()
    assert printed == expected  # same lines in the same order: the released state dict, byte for byte

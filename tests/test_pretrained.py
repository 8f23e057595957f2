"""Starting points: Depth Anything V2 and timm EdgeNeXt files in their release layouts, made here at tiny size."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
from torch import nn

from stereo.config.errors import ConfigError
from stereo.config.schema import PretrainedConfig
from stereo.model.backbone import Feature, backbone_dims
from stereo.model.pretrained import (
    EDGENEXT_CLASSIFIER_KEYS,
    WeightMismatchError,
    load_depth_anything,
    load_edgenext,
    load_pretrained,
    read_state_dict,
    require_initialised_vit,
)


def tiny_feature(seed: int) -> Feature:
    torch.manual_seed(seed)
    return Feature(backbone_dims("tiny"))


def depth_anything_release(feature: Feature) -> dict[str, torch.Tensor]:
    """The layout of depth_anything_v2_vit*.pth: DINOv2 under `pretrained.`, the DPT head under `depth_head.`."""
    sd = {k: v.clone() for k, v in feature.dino.depth_anything.state_dict().items()}
    assert {k.split(".")[0] for k in sd} == {"pretrained", "depth_head"}
    assert "pretrained.mask_token" in sd and "depth_head.scratch.output_conv2.2.weight" in sd
    return sd


def timm_edgenext_release(feature: Feature) -> dict[str, torch.Tensor]:
    """timm's edgenext_small state dict: stem.*, stages.*, and the ImageNet classifier head.*."""
    sd = {k: v.clone() for k, v in feature.state_dict().items() if k.startswith(("stem.", "stages."))}
    width = feature.stages[3].blocks[0].gamma.shape[0]
    sd |= {"head.norm.weight": torch.ones(width), "head.norm.bias": torch.zeros(width),
           "head.fc.weight": torch.randn(1000, width), "head.fc.bias": torch.zeros(1000)}
    return sd


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_depth_anything_release_loads_and_marks_the_vit(tmp_path):
    source, target = tiny_feature(1), tiny_feature(2)
    path = tmp_path / "depth_anything_v2_vits.pth"
    torch.save(depth_anything_release(source), path)
    assert target.vit_initialised_from is None
    summary = load_depth_anything(target, path)
    assert summary.loaded == len(source.dino.depth_anything.state_dict())
    assert same_tensors(target.dino.state_dict(), source.dino.state_dict())
    assert target.vit_initialised_from == str(path)
    x = torch.randn(1, 3, 64, 128)
    with torch.no_grad():
        torch.testing.assert_close(target.dino(x), source.dino(x))


def test_loaders_accept_a_whole_model_with_a_feature(tmp_path):
    model = nn.Module()
    model.feature = tiny_feature(2)
    path = tmp_path / "da.pth"
    torch.save(depth_anything_release(tiny_feature(1)), path)
    load_depth_anything(model, path)
    assert model.feature.vit_initialised_from == str(path)
    with pytest.raises(TypeError, match="Feature"):
        load_depth_anything(nn.Linear(2, 2), path)


@pytest.mark.parametrize(
    "corrupt, field, key",
    [
        (lambda sd: sd.pop("pretrained.blocks.1.ls2.gamma"), "missing", "pretrained.blocks.1.ls2.gamma"),
        (lambda sd: sd.__setitem__("pretrained.pos_embed", torch.zeros(1, 17, 48)), "wrong_shape",
         "pretrained.pos_embed"),
        (lambda sd: sd.__setitem__("pretrained.register_tokens", torch.zeros(1, 4, 48)), "unexpected",
         "pretrained.register_tokens"),
    ],
    ids=["missing", "wrong_shape", "unexpected"],
)
def test_depth_anything_mismatch_is_named_and_nothing_is_loaded(tmp_path, corrupt, field, key):
    target = tiny_feature(2)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    sd = depth_anything_release(tiny_feature(1))
    corrupt(sd)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(WeightMismatchError) as info:
        load_depth_anything(target, path)
    err = info.value
    named = [k if isinstance(k, str) else k[0] for k in getattr(err, field)]
    assert named == [key]
    assert key in str(err) and str(path) in str(err)
    others = {"missing", "unexpected", "wrong_shape"} - {field}
    assert all(getattr(err, f) == [] for f in others)
    assert same_tensors(target.state_dict(), before)
    assert target.vit_initialised_from is None


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_edgenext_loads_with_its_classifier_ignored(tmp_path, suffix):
    source, target = tiny_feature(1), tiny_feature(2)
    sd = timm_edgenext_release(source)
    path = tmp_path / f"edgenext_small{suffix}"
    if suffix == ".pth":
        torch.save(sd, path)
    else:
        safetensors.torch.save_file(sd, str(path))
    decoder_before = {k: v.clone() for k, v in target.conv4.state_dict().items()}
    summary = load_edgenext(target, path)
    assert sorted(summary.ignored) == sorted(k for k in EDGENEXT_CLASSIFIER_KEYS if k.startswith("head."))
    assert summary.loaded == len(sd) - 4
    assert same_tensors(target.stem.state_dict(), source.stem.state_dict())
    assert same_tensors(target.stages.state_dict(), source.stages.state_dict())
    assert same_tensors(target.conv4.state_dict(), decoder_before)  # only stem and stages are touched
    assert target.vit_initialised_from is None  # EdgeNeXt says nothing about the ViT


def test_timm_edgenext_missing_and_wrong_shape_named_together(tmp_path):
    sd = timm_edgenext_release(tiny_feature(1))
    del sd["stages.2.blocks.0.xca.temperature"]
    sd["stem.0.weight"] = torch.zeros(16, 3, 3, 3)
    path = tmp_path / "edgenext_small.safetensors"
    safetensors.torch.save_file(sd, str(path))
    with pytest.raises(WeightMismatchError) as info:
        load_edgenext(tiny_feature(2), path)
    err = info.value
    assert err.missing == ["stages.2.blocks.0.xca.temperature"]
    assert err.wrong_shape == [("stem.0.weight", (16, 3, 3, 3), (16, 3, 4, 4))]
    assert err.unexpected == []  # head.* are expected extras
    assert "stages.2.blocks.0.xca.temperature" in str(err) and "stem.0.weight" in str(err)


def test_read_state_dict_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        read_state_dict(tmp_path / "nothing.pth")
    odd = tmp_path / "weights.bin"
    odd.write_bytes(b"x")
    with pytest.raises(ValueError, match="weights.bin"):
        read_state_dict(odd)
    not_sd = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_sd)
    with pytest.raises(ValueError, match="list.pth.*state dict"):
        read_state_dict(not_sd)
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"model": {"a": torch.ones(2)}, "global_step": 3}, wrapped)
    assert list(read_state_dict(wrapped)) == ["a"]


def test_random_frozen_vit_is_refused_unless_allowed(tmp_path):
    feature = tiny_feature(2)
    with pytest.raises(ConfigError, match="model.pretrained.depth_anything"):
        require_initialised_vit(feature, allow_random=False)
    require_initialised_vit(feature, allow_random=True)
    require_initialised_vit(Feature(backbone_dims("tiny"), freeze_vit=False), allow_random=False)  # it trains

    da, en = tmp_path / "da.pth", tmp_path / "en.safetensors"
    source = tiny_feature(1)
    torch.save(depth_anything_release(source), da)
    safetensors.torch.save_file(timm_edgenext_release(source), str(en))
    summaries = load_pretrained(feature, PretrainedConfig(depth_anything=str(da), edgenext=str(en)))
    assert [s.target for s in summaries] == ["feature.dino.depth_anything", "feature.stem/stages"]
    require_initialised_vit(feature, allow_random=False)

"""The feature side: released key layout, shapes, freezing, checkpointing, DINOv2 semantics."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stereo.model.backbone import Feature, backbone_dims, vit_input_size
from stereo.model.backbone.dinov2 import DinoVisionTransformer
from stereo.model.backbone.edgenext import SplitTransposeBlock

MANIFESTS = Path(__file__).resolve().parents[1] / "stereo" / "model" / "manifests"


def released_feature_keys(size: str) -> dict[str, tuple[int, ...]]:
    lines = (MANIFESTS / f"foundationstereo_{size}_state_dict.tsv").read_text().splitlines()[1:]
    keys = {}
    for line in lines:
        key, shape, _dtype = line.split("\t")
        if key.startswith("feature."):
            keys[key] = tuple(int(s) for s in shape.split(",")) if shape else ()
    return keys


@pytest.mark.parametrize("size", ["vits", "vitb", "vitl"])
def test_feature_keys_and_shapes_match_the_released_checkpoint(size):
    with torch.device("meta"):
        feature = Feature(backbone_dims(size))
    ours = {f"feature.{k}": tuple(v.shape) for k, v in feature.state_dict().items()}
    released = released_feature_keys(size)
    assert sorted(set(released) - set(ours)) == []
    assert sorted(set(ours) - set(released)) == []
    assert [k for k in released if released[k] != ours[k]] == []


@pytest.mark.parametrize(
    "size, d_out, vit_dim",
    [("vits", [128, 192, 320, 304], 32), ("vitb", [160, 192, 320, 304], 64), ("vitl", [224, 192, 320, 304], 128)],
)
def test_pyramid_widths_of_the_released_sizes(size, d_out, vit_dim):
    with torch.device("meta"):
        feature = Feature(backbone_dims(size))
    assert feature.d_out == d_out
    assert feature.vit_feat_dim == vit_dim


def test_unknown_size_is_named():
    with pytest.raises(ValueError, match="vitx"):
        backbone_dims("vitx")


def tiny_input(batch: int = 4, h: int = 128, w: int = 256) -> torch.Tensor:
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(1))


def test_tiny_forward_backward_shapes_and_frozen_vit():
    torch.manual_seed(0)
    feature = Feature(backbone_dims("tiny"))
    feature.train()
    assert not feature.dino.training and feature.stages.training  # frozen part stays in eval
    x = tiny_input()
    feats, vit_feat = feature(x)
    d = feature.d_out
    assert [tuple(f.shape) for f in feats] == [
        (4, d[0], 32, 64), (4, d[1], 16, 32), (4, d[2], 8, 16), (4, d[3], 4, 8)
    ]
    assert tuple(vit_feat.shape) == (4, feature.vit_feat_dim, 32, 64)
    assert not vit_feat.requires_grad
    sum(f.square().mean() for f in feats).backward()
    for name, p in feature.named_parameters():
        if name.startswith("dino."):
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_unfrozen_vit_trains_and_follows_train_eval():
    torch.manual_seed(0)
    feature = Feature(backbone_dims("tiny"), freeze_vit=False)
    feature.train()
    assert feature.dino.training
    feats, vit_feat = feature(tiny_input(2, 64, 128))
    (feats[0].mean() + vit_feat.mean()).backward()
    qkv = feature.dino.depth_anything.pretrained.blocks[0].attn.qkv.weight
    assert qkv.grad is not None and qkv.grad.abs().sum() > 0
    feature.eval()
    assert not feature.dino.training


@pytest.mark.parametrize("freeze_vit", [True, False])
def test_activation_checkpointing_gives_the_same_values_and_gradients(freeze_vit):
    torch.manual_seed(0)
    plain = Feature(backbone_dims("tiny"), freeze_vit=freeze_vit)
    ckpt = Feature(backbone_dims("tiny"), freeze_vit=freeze_vit, checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    x = tiny_input(2, 64, 128)
    outs = []
    for model in (plain, ckpt):
        feats, vit_feat = model(x)
        (sum(f.square().mean() for f in feats) + vit_feat.square().mean()).backward()
        outs.append((feats, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    for a, b in zip(outs[0][0], outs[1][0]):
        torch.testing.assert_close(a, b)
    assert outs[0][1].keys() == outs[1][1].keys()
    for name in outs[0][1]:
        torch.testing.assert_close(outs[0][1][name], outs[1][1][name], msg=name)


def test_input_not_divisible_by_32_is_refused():
    feature = Feature(backbone_dims("tiny"))
    with pytest.raises(ValueError, match="divisible by 32"):
        feature(torch.zeros(2, 3, 100, 128))


@pytest.mark.parametrize(
    "hw, expected", [((320, 736), (336, 784)), ((128, 256), (224, 336)), ((1504, 2016), (1120, 1344))]
)
def test_vit_input_size_rounds_up_to_112_and_caps_at_1344(hw, expected):
    assert vit_input_size(*hw) == expected


def test_depth_anything_feature_has_the_vit_input_size():
    feature = Feature(backbone_dims("tiny")).eval()
    out = feature.dino(tiny_input(1, 128, 256))
    assert tuple(out.shape) == (1, feature.vit_feat_dim, 224, 336)


def reference_intermediate_layers(vit: DinoVisionTransformer, x: torch.Tensor) -> list[torch.Tensor]:
    """DINOv2 written out by hand: explicit attention matrix, LayerScale, exact GELU, final norm per taken block."""
    p = vit.patch_size
    tokens = F.conv2d(x, vit.patch_embed.proj.weight, vit.patch_embed.proj.bias, stride=p)
    tokens = tokens.flatten(2).transpose(1, 2)
    tokens = torch.cat([vit.cls_token.expand(x.shape[0], -1, -1), tokens], 1) + vit.pos_embed
    out = []
    for i, blk in enumerate(vit.blocks):
        b, n, c = tokens.shape
        heads = blk.attn.num_heads
        h = F.layer_norm(tokens, (c,), blk.norm1.weight, blk.norm1.bias, 1e-6)
        q, k, v = (h @ blk.attn.qkv.weight.T + blk.attn.qkv.bias).reshape(b, n, 3, heads, -1).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(c // heads), dim=-1)
        a = (attn @ v).transpose(1, 2).reshape(b, n, c) @ blk.attn.proj.weight.T + blk.attn.proj.bias
        tokens = tokens + blk.ls1.gamma * a
        h = F.layer_norm(tokens, (c,), blk.norm2.weight, blk.norm2.bias, 1e-6)
        m = F.gelu(h @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias) @ blk.mlp.fc2.weight.T + blk.mlp.fc2.bias
        tokens = tokens + blk.ls2.gamma * m
        if i in vit.take_layers:
            out.append(F.layer_norm(tokens, (c,), vit.norm.weight, vit.norm.bias, 1e-6)[:, 1:])
    return out


def test_intermediate_layers_match_a_written_out_dinov2():
    torch.manual_seed(0)
    vit = Feature(backbone_dims("tiny")).dino.depth_anything.pretrained
    with torch.no_grad():  # non-trivial LayerScale so that a missing gamma would show
        for blk in vit.blocks:
            blk.ls1.gamma.uniform_(0.5, 1.5)
            blk.ls2.gamma.uniform_(0.5, 1.5)
    vit.take_layers = (0, 2, 3, 3)
    x = torch.randn(1, 3, 518, 518)  # the native 37x37 grid: pos_embed used as stored
    with torch.no_grad():
        ours = vit.get_intermediate_layers(x)
        ref = reference_intermediate_layers(vit, x)
    assert len(ours) == 3  # one output per distinct taken block
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Keys' cubic convolution weights (PyTorch's A=-0.75) for the 4 taps around a fractional offset t."""
    d = np.stack([t + 1, t, 1 - t, 2 - t], -1)
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    return np.where(d <= 1, near, far)


def bicubic_by_scale(table: np.ndarray, scale: float, out: int, axis: int) -> np.ndarray:
    """1-D bicubic resampling along `axis`, source coordinate (dst + 0.5) / scale - 0.5, border-clamped taps."""
    n = table.shape[axis]
    src = (np.arange(out) + 0.5) / scale - 0.5
    base = np.floor(src).astype(int)
    w = cubic_weights(src - base)
    idx = np.clip(base[:, None] + np.arange(-1, 3)[None, :], 0, n - 1)
    moved = np.moveaxis(table, axis, 0)
    res = (moved[idx] * w.reshape(out, 4, *([1] * (moved.ndim - 1)))).sum(1)
    return np.moveaxis(res, 0, axis)


def test_pos_embed_interpolation_uses_dinov2_offset_scale():
    torch.manual_seed(0)
    vit = DinoVisionTransformer(backbone_dims("tiny").vit)
    gh, gw = 16, 24  # e.g. a 224x336 ViT input
    ours = vit.interpolate_pos_encoding(gh, gw, torch.float32).detach()
    assert tuple(ours.shape) == (1, 1 + gh * gw, vit.pos_embed.shape[-1])
    table = vit.pos_embed.detach()[0, 1:].reshape(37, 37, -1).double().numpy()

    def expected(offset: float) -> np.ndarray:
        t = bicubic_by_scale(table, (gh + offset) / 37, gh, 0)
        return bicubic_by_scale(t, (gw + offset) / 37, gw, 1).reshape(gh * gw, -1)

    np.testing.assert_allclose(ours[0, 1:].numpy(), expected(0.1), atol=1e-5)
    assert np.abs(ours[0, 1:].numpy() - expected(0.0)).max() > 1e-3  # the offset matters
    torch.testing.assert_close(ours[:, :1], vit.pos_embed[:, :1].detach())  # class token untouched
    assert vit.interpolate_pos_encoding(37, 37, torch.float32) is vit.pos_embed


def test_sdta_block_with_uneven_channel_chunks():
    block = SplitTransposeBlock(160, num_scales=3, num_heads=8, expand_ratio=4, use_pos_emb=True)
    assert [c.weight.shape[0] for c in block.convs] == [54, 54]  # chunks 54, 54, 52 as timm's
    x = torch.randn(2, 160, 5, 7)
    assert block(x).shape == x.shape


def test_bf16_autocast_forward_backward_on_cpu():
    feature = Feature(backbone_dims("tiny"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats, vit_feat = feature(tiny_input(2, 64, 128))
    assert all(f.isfinite().all() for f in [*feats, vit_feat])
    sum(f.float().square().mean() for f in feats).backward()
    assert feature.stem[0].weight.grad is not None


@pytest.mark.gpu
def test_vitl_feature_training_crop_on_gpu_in_bf16():
    feature = Feature(backbone_dims("vitl")).cuda().train()
    x = torch.randn(4, 3, 320, 736, device="cuda")  # B=2 pairs at the paper's crop
    torch.cuda.reset_peak_memory_stats()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        feats, vit_feat = feature(x)
    assert [tuple(f.shape) for f in feats] == [(4, 224, 80, 184), (4, 192, 40, 92), (4, 320, 20, 46), (4, 304, 10, 23)]
    assert tuple(vit_feat.shape) == (4, 128, 80, 184)
    assert all(f.isfinite().all() for f in [*feats, vit_feat])
    sum(f.float().square().mean() for f in feats).backward()
    assert all(p.grad is None for p in feature.dino.parameters())
    assert feature.deconv8_4.conv1.conv.weight.grad is not None

"""FoundationStereo stereo side: released manifests, output shapes, gradients, and the numerical pieces
(cost volumes, soft-argmin, disparity attention, geometry lookup, context upsampling) against direct references."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from stereo.config.schema import ModelConfig
from stereo.model import build_model
from stereo.model.cli import manifest_rows
from stereo.model.cost_volume import concat_volume, gwc_volume, soft_argmin
from stereo.model.filtering import DisparityAttention, MultiheadSelfAttention
from stereo.model.foundation_stereo import UNUSED_MODULES
from stereo.model.lookup import build_pyramid, lookup
from stereo.model.upsample import context_upsample

MANIFESTS = Path(__file__).resolve().parents[1] / "stereo" / "model" / "manifests"


def tiny_config(**changes) -> ModelConfig:
    cfg = ModelConfig(size="tiny", max_disp=64, train_iters=2, valid_iters=3, hidden_dims=[32, 32, 32])
    for key, value in changes.items():
        setattr(cfg, key, value)
    return cfg


def read_manifest(size: str) -> dict[str, tuple[str, str]]:
    lines = (MANIFESTS / f"foundationstereo_{size}_state_dict.tsv").read_text().splitlines()
    assert lines[0] == "key\tshape\tdtype"
    return {key: (shape, dtype) for key, shape, dtype in (line.split("\t") for line in lines[1:])}


@pytest.mark.parametrize("size", ["vits", "vitb", "vitl"])
def test_state_dict_matches_released_manifest(size):
    with torch.device("meta"):
        model = build_model(ModelConfig(size=size))
    ours = {key: (shape, dtype) for key, shape, dtype in manifest_rows(model)}
    expected = read_manifest(size)
    assert sorted(set(ours) - set(expected)) == [] and sorted(set(expected) - set(ours)) == []
    assert {k: v for k, v in ours.items() if v != expected[k]} == {}


def test_unused_modules_are_frozen_and_param_groups():
    with torch.device("meta"):
        model = build_model(ModelConfig(size="vitl"))
    for name in UNUSED_MODULES:
        assert all(not p.requires_grad for p in model.get_submodule(name).parameters()), name
    groups = model.param_groups(1e-4, 1e-5)
    assert [g["name"] for g in groups] == ["stereo"]
    # released trainable count (39,201,418) minus the 14 unused tensors (1,625,856)
    assert sum(p.numel() for p in groups[0]["params"]) == 37_575_562
    with torch.device("meta"):
        unfrozen = build_model(ModelConfig(size="vits", freeze_vit=False))
    groups = unfrozen.param_groups(1e-4, 1e-5)
    assert [(g["name"], g["lr"]) for g in groups] == [("stereo", 1e-4), ("vit", 1e-5)]
    assert sum(p.numel() for p in groups[1]["params"]) == 22_056_576 + 2_728_513  # DINOv2-S + DPT


@pytest.fixture(scope="module")
def small_pair():
    g = torch.Generator().manual_seed(1)
    left = torch.rand(1, 3, 32, 64, generator=g) * 255
    return left, torch.roll(left, -2, dims=3)


def test_tiny_shapes_train_and_test(small_pair):
    torch.manual_seed(0)
    model = build_model(tiny_config())
    left, right = small_pair
    model.train()
    with torch.no_grad():
        init_disp, preds = model(left, right)
    assert init_disp.shape == (1, 1, 8, 16) and len(preds) == 2
    assert all(p.shape == (1, 1, 32, 64) and p.dtype == torch.float32 for p in preds)
    model.eval()
    with torch.no_grad():
        out = model(left, right, test_mode=True)
        assert out.shape == (1, 1, 32, 64) and torch.isfinite(out).all()
        assert model(left, right, iters=1, test_mode=True).shape == (1, 1, 32, 64)


def _gradients(pair, checkpointing: bool):
    torch.manual_seed(0)
    cfg = tiny_config()
    cfg.activation_checkpointing.features = cfg.activation_checkpointing.cost_filtering = checkpointing
    cfg.activation_checkpointing.update = checkpointing
    model = build_model(cfg)
    torch.manual_seed(1)  # the same dropout masks in both runs
    init_disp, preds = model(*pair)
    (init_disp.mean() + sum(p.mean() for p in preds)).backward()
    return model, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_gradients_and_batchnorm_statistics_with_and_without_checkpointing(small_pair):
    model, grads = _gradients(small_pair, checkpointing=False)
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and (n not in grads or not grads[n].any())]
    assert no_grad == []
    unused = [n for n, p in model.named_parameters() if any(n.startswith(u + ".") for u in UNUSED_MODULES)]
    assert unused and all(not model.get_parameter(n).requires_grad for n in unused)
    assert all(not p.requires_grad for p in model.feature.dino.parameters())  # frozen ViT
    recomputing, recomputed = _gradients(small_pair, checkpointing=True)
    assert recomputed.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(recomputed[name], grads[name], rtol=1e-3, atol=1e-5, msg=name)
    # the recomputation in backward does not count the batch a second time in the running statistics
    buffers = dict(recomputing.named_buffers())
    assert any("running_mean" in name for name in buffers)
    for name, buffer in model.named_buffers():
        torch.testing.assert_close(buffers[name], buffer, rtol=1e-4, atol=1e-6, msg=name)


def test_bf16_autocast_and_bf16_weights_keep_fp32_outputs(small_pair):
    torch.manual_seed(0)
    model = build_model(tiny_config()).eval()
    left, right = small_pair
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(left, right, iters=1, test_mode=True)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    model.to(torch.bfloat16).train()  # what DeepSpeed's bf16 mode does: weights cast, fp32 inputs unchanged
    init_disp, preds = model(left, right, iters=1)
    assert init_disp.dtype == preds[0].dtype == torch.float32
    preds[0].mean().backward()
    assert model.update_block.disp_head.conv[0].weight.grad.dtype == torch.bfloat16


def test_channels_last_is_refused_on_the_cpu(small_pair):
    model = build_model(tiny_config(channels_last=True))
    assert model.channels_last and model.update_block.gru04.conv1[0].weight.is_contiguous(
        memory_format=torch.channels_last)
    assert model.corr_stem[0].weight.is_contiguous(memory_format=torch.channels_last_3d)
    with pytest.raises(ValueError, match="channels_last"):
        model(*small_pair, iters=1)


def test_strided_residual_skip_is_the_strided_1x1_conv():
    """The skip of a stride-2 ResidualBlock slices, then runs its 1x1 conv at stride 1: the released model's strided
    conv with the same parameters, forward and backward, to fp32 rounding (oneDNN sums in another order)."""
    from stereo.model.layers import ResidualBlock

    torch.manual_seed(0)
    block = ResidualBlock(8, 16, norm="batch", stride=2).train()
    conv = block.downsample[0]
    assert conv.stride == (1, 1) and block.stride == 2
    x = torch.randn(2, 8, 33, 64, requires_grad=True)  # an odd side: ceil(33 / 2) rows either way
    ours, released = conv(x[:, :, ::2, ::2]), F.conv2d(x, conv.weight, conv.bias, stride=2)
    torch.testing.assert_close(ours, released, rtol=1e-5, atol=1e-6)
    upstream = torch.randn_like(ours)
    grads = [torch.autograd.grad(out, (x, conv.weight, conv.bias), upstream) for out in (ours, released)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_cost_volumes_match_the_loop_definition():
    g = torch.Generator().manual_seed(0)
    left, right = torch.randn(2, 16, 3, 20, generator=g), torch.randn(2, 16, 3, 20, generator=g)
    num_disp, groups = 7, 4
    ref_gwc = torch.zeros(2, groups, num_disp, 3, 20)
    ref_cat = torch.zeros(2, 32, num_disp, 3, 20)
    lg = F.normalize(left.view(2, groups, 4, 3, 20), dim=2)
    rg = F.normalize(right.view(2, groups, 4, 3, 20), dim=2)
    for d in range(num_disp):
        ref_gwc[:, :, d, :, d:] = (lg[..., d:] * rg[..., : 20 - d]).sum(2)
        ref_cat[:, :16, d] = left
        ref_cat[:, 16:, d, :, d:] = right[..., : 20 - d]
    torch.testing.assert_close(gwc_volume(left, right, num_disp, groups), ref_gwc, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(concat_volume(left, right, num_disp), ref_cat)


def test_soft_argmin_is_the_expected_bin():
    logits = torch.randn(2, 9, 4, 5)
    prob = torch.softmax(logits, 1)
    expected = sum(prob[:, d] * d for d in range(9)).unsqueeze(1)
    torch.testing.assert_close(soft_argmin(logits), expected)
    peaked = torch.full((1, 9, 1, 1), -1e4)
    peaked[0, 6] = 0.0
    assert soft_argmin(peaked).item() == pytest.approx(6.0)


def test_disparity_attention_heads_attend_over_the_sequence():
    torch.manual_seed(0)
    attn = MultiheadSelfAttention(dim=8, heads=2)
    x = torch.randn(3, 5, 8)
    q, k, v = (proj(x).view(3, 5, 2, 4) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    weights = torch.softmax(torch.einsum("nlhd,nmhd->nhlm", q, k) / 2.0, dim=-1)  # per head, over tokens m
    expected = attn.out_proj(torch.einsum("nhlm,nmhd->nlhd", weights, v).reshape(3, 5, 8))
    torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-6)
    # permuting the tokens permutes the output: attention is over the sequence, not across heads
    perm = torch.tensor([4, 2, 0, 1, 3])
    torch.testing.assert_close(attn(x[:, perm]), attn(x)[:, perm], rtol=1e-5, atol=1e-6)


def test_disparity_transformer_tokens_are_disparity_bins():
    torch.manual_seed(0)
    dt = DisparityAttention(dim=8, heads=2, layers=1, max_len=6).eval()
    volume = torch.randn(1, 8, 6, 2, 3)
    out = dt(volume)
    assert out.shape == volume.shape
    changed = volume.clone()
    changed[0, :, 5, 1, 2] += 1.0  # one disparity bin at one pixel
    diff = (dt(changed) - out).abs().sum(1)[0]  # (D, H, W)
    assert diff[:, 1, 2].min() > 0  # every bin of that pixel sees it
    assert diff.sum() == diff[:, 1, 2].sum()  # no other pixel does
    assert "pos_table" not in dict(dt.named_buffers()) and not any("pos" in k for k in dt.state_dict())
    with pytest.raises(ValueError, match="disparity tokens"):
        dt(torch.randn(1, 8, 7, 1, 1))


def _grid_sample_lookup(volume, left, right, disp, levels, radius):
    """Direct reference: grid_sample (bilinear, align_corners=True, zeros) on 1-px-high grids, level by level."""
    b, c, d, h, w = volume.shape
    geo = volume.permute(0, 3, 4, 1, 2).reshape(b * h * w, c, 1, d)
    corr = torch.einsum("bchx,bchy->bhxy", F.normalize(left, dim=1), F.normalize(right, dim=1))
    corr = corr.reshape(b * h * w, 1, 1, w)
    dx = torch.arange(-radius, radius + 1, dtype=torch.float32).view(1, 1, -1, 1)
    x = torch.arange(w, dtype=torch.float32).repeat(b * h).view(-1, 1, 1, 1)
    dd = disp.reshape(-1, 1, 1, 1)
    out = []
    for i in range(levels):
        for vol, pos in ((geo, dd / 2**i + dx), (corr, x / 2**i - dd / 2**i + dx)):
            size = vol.shape[-1]
            grid = torch.cat([2 * pos / (size - 1) - 1, torch.zeros_like(pos)], -1)
            out.append(F.grid_sample(vol, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
                       .reshape(b, h, w, -1))
            vol_next = F.avg_pool2d(vol, [1, 2], stride=[1, 2])
            if vol is geo:
                geo_next = vol_next
            else:
                corr_next = vol_next
        geo, corr = geo_next, corr_next
    return torch.cat(out, -1).permute(0, 3, 1, 2)


def test_geometry_lookup_matches_grid_sample():
    g = torch.Generator().manual_seed(0)
    volume = torch.randn(2, 3, 12, 2, 10, generator=g)
    left, right = torch.randn(2, 6, 2, 10, generator=g), torch.randn(2, 6, 2, 10, generator=g)
    disp = torch.rand(2, 1, 2, 10, generator=g) * 14 - 1  # also outside [0, D-1]: zero padding
    out = lookup(build_pyramid(volume, left, right, levels=2), disp, radius=2)
    assert out.shape == (2, 2 * 5 * (3 + 1), 2, 10)
    torch.testing.assert_close(out, _grid_sample_lookup(volume, left, right, disp, 2, 2), rtol=1e-5, atol=1e-5)


def test_context_upsample_is_a_convex_combination_times_four():
    disp = torch.full((1, 1, 3, 4), 2.5)
    logits = torch.randn(1, 9, 12, 16)
    torch.testing.assert_close(context_upsample(disp, logits)[:, :, 4:8, 4:12], torch.full((1, 1, 4, 8), 10.0))
    onehot = torch.full((1, 9, 12, 16), -1e4)
    onehot[:, 4] = 0.0  # all weight on the centre tap: nearest upsampling of 4 * disp
    ramp = torch.arange(12.0).view(1, 1, 3, 4)
    expected = F.interpolate(4 * ramp, scale_factor=4, mode="nearest")
    torch.testing.assert_close(context_upsample(ramp, onehot), expected)


@pytest.mark.gpu
def test_gpu_bf16_channels_last_train_step_keeps_fp32_disparities():
    torch.manual_seed(0)
    model = build_model(tiny_config(channels_last=True)).cuda()
    left = torch.rand(2, 3, 128, 256, device="cuda") * 255
    with torch.autocast("cuda", dtype=torch.bfloat16):
        init_disp, preds = model(left, left.roll(-4, dims=3), iters=3)
    assert init_disp.dtype == torch.float32 and all(p.dtype == torch.float32 for p in preds)
    (init_disp.mean() + sum(p.mean() for p in preds)).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.gpu
def test_gpu_released_widths_train_step_at_the_paper_crop():
    torch.manual_seed(0)
    model = build_model(ModelConfig(size="vits")).cuda()
    left = torch.rand(1, 3, 320, 736, device="cuda") * 255
    with torch.autocast("cuda", dtype=torch.bfloat16):
        init_disp, preds = model(left, left.roll(-8, dims=3), iters=2)
    assert init_disp.shape == (1, 1, 80, 184) and preds[-1].shape == (1, 1, 320, 736)
    preds[-1].mean().backward()


@pytest.mark.gpu
def test_gpu_compiled_inference_matches_eager():
    torch.manual_seed(0)
    model = build_model(tiny_config()).cuda().eval()
    left = torch.rand(1, 3, 64, 128, device="cuda") * 255
    right = left.roll(-4, dims=3)
    with torch.no_grad():
        eager = model(left, right, iters=3, test_mode=True)
        compiled = torch.compile(model, fullgraph=True)(left, right, iters=3, test_mode=True)
    torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("freeze_bn", [False, True])
def test_freeze_bn_keeps_running_statistics(small_pair, freeze_bn):
    torch.manual_seed(0)
    model = build_model(tiny_config(freeze_bn=freeze_bn)).train()
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running_mean" in k}
    with torch.no_grad():
        model(*small_pair)
    moved = [k for k, v in model.state_dict().items() if "running_mean" in k and not torch.equal(v, stats[k])]
    assert (moved == []) == freeze_bn
    assert model.feature.training and model.cnet.training  # only the BatchNorm layers are held in eval mode

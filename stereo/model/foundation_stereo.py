"""FoundationStereo (Wen et al., CVPR 2025), weight-compatible with the released checkpoints.

Top-level modules are registered in the released order so that `state_dict()` lists keys as the manifests do.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from stereo.config.errors import ConfigError
from stereo.config.schema import ModelConfig
from stereo.model.backbone import Feature, backbone_dims
from stereo.model.context import ChannelAttention, ContextNet, SpatialAttention
from stereo.model.cost_volume import concat_volume, gwc_volume, soft_argmin
from stereo.model.filtering import Hourglass
from stereo.model.layers import BasicConv, Conv2x
from stereo.model.layers3d import BasicConv3d, FeatureAtt, ResnetBasicBlock3D
from stereo.model.lookup import LookupPyramid, build_pyramid, lookup
from stereo.model.precision import upcast
from stereo.model.update import UpdateBlock
from stereo.model.upsample import context_upsample

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Built and kept in the state dict (strict loading of released checkpoints) but never used in forward.
UNUSED_MODULES = ("cnet.down", "cnet.norm", "context_zqr_convs", "stem_4")
# What `compile_regions` compiles, each on its own: the feature network (with stem_2), the context network, and one
# GRU iteration (with its lookup and upsampling), compiled once and called for every iteration.
REGIONS = ("feature", "context", "iteration")


@dataclass(frozen=True)
class StereoWidths:
    """Widths of the stereo side (everything but `feature`). The released sizes share one set."""

    volume: int = 28  # cost-volume channels after corr_stem
    groups: int = 8  # group-wise correlation groups
    concat: int = 12  # proj_cmb channels per view in the concatenation volume
    kernel_disp: int = 17  # disparity kernel of the axial-planar convs
    dt_heads: int = 4
    dt_layers: int = 4
    cnet: tuple[int, int, int] = (64, 96, 128)  # context trunk at 1, 1/2, 1/4
    motion: tuple[int, int] = (256, 64)  # motion encoder: geometry branch, disparity branch
    mask: tuple[int, int] = (64, 32)  # mask head; the second is also the upsampler width
    stem: int = 32  # stem_2 width (= mask[1])
    stem_4: int = 48
    classifier_kernel: int = 7
    gru_mix_kernel: int = 3  # the input/state mixing convs of each GRU (the heaviest convs of an iteration)


def stereo_widths(size: str) -> StereoWidths:
    if size == "tiny":
        return StereoWidths(volume=4, groups=2, concat=1, kernel_disp=5, dt_heads=2, dt_layers=2,
                            cnet=(8, 16, 32), motion=(32, 8), mask=(16, 8), stem=8, stem_4=8,
                            classifier_kernel=3, gru_mix_kernel=1)  # CPU: a 7x7x7 conv is slow; 1x1 mixing
    return StereoWidths()


@contextlib.contextmanager
def running_stats_frozen(norms: list[nn.modules.batchnorm._BatchNorm]):
    """BatchNorm normalises with the batch statistics as usual but leaves the running statistics and the batch count
    as they are: a checkpointed region's recomputation must not count its batch a second time. (Momentum 0 rather
    than track_running_stats=False, which would change what BatchNorm saves for backward.)"""
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, count) in zip(norms, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)


def normalise(image: torch.Tensor) -> torch.Tensor:
    """RGB 0..255 -> ImageNet-normalised."""
    mean = torch.tensor(IMAGENET_MEAN, device=image.device, dtype=image.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=image.device, dtype=image.dtype).view(1, 3, 1, 1)
    return (image / 255.0 - mean) / std


class FoundationStereo(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        if len(set(cfg.hidden_dims)) != 1:
            raise ConfigError("model.hidden_dims", f"one width for all three levels (cam/sam are shared), "
                                                   f"got {cfg.hidden_dims}")
        self.cfg = cfg
        wd = stereo_widths(cfg.size)
        hidden = cfg.hidden_dims[0]
        feature = Feature(backbone_dims(cfg.size), freeze_vit=cfg.freeze_vit,
                          checkpoint=cfg.activation_checkpointing.features)
        d_out = list(feature.d_out)
        lookup_dim = cfg.corr_levels * (2 * cfg.corr_radius + 1) * (wd.volume + 1)

        self.cnet = ContextNet(wd.cnet, feature.vit_feat_dim, hidden)
        self.update_block = UpdateBlock(hidden, lookup_dim, *wd.motion, mask_dims=wd.mask,
                                        mix_kernel=wd.gru_mix_kernel)
        self.sam = SpatialAttention()
        self.cam = ChannelAttention(hidden)
        self.context_zqr_convs = nn.ModuleList(nn.Conv2d(hidden, 3 * hidden, 3, padding=1) for _ in range(3))
        self.feature = feature
        self.proj_cmb = nn.Conv2d(d_out[0], wd.concat, 1)
        self.stem_2 = nn.Sequential(BasicConv(3, wd.stem, 3, stride=2, padding=1, norm="instance"),
                                    nn.Conv2d(wd.stem, wd.stem, 3, padding=1, bias=False),
                                    nn.InstanceNorm2d(wd.stem), nn.ReLU())
        self.stem_4 = nn.Sequential(BasicConv(wd.stem, wd.stem_4, 3, stride=2, padding=1, norm="instance"),
                                    nn.Conv2d(wd.stem_4, wd.stem_4, 3, padding=1, bias=False),
                                    nn.InstanceNorm2d(wd.stem_4), nn.ReLU())
        self.spx_2_gru = Conv2x(wd.mask[1], wd.stem, norm="none")
        self.spx_gru = nn.Sequential(nn.ConvTranspose2d(2 * wd.stem, 9, 4, stride=2, padding=1))
        self.corr_stem = nn.Sequential(
            nn.Conv3d(wd.groups + 2 * wd.concat, wd.volume, 1),
            BasicConv3d(wd.volume, wd.volume, kernel_size=3, padding=1),
            ResnetBasicBlock3D(wd.volume), ResnetBasicBlock3D(wd.volume))
        self.corr_feature_att = FeatureAtt(wd.volume, d_out[0])
        self.cost_agg = Hourglass(wd.volume, d_out, cfg.max_disp, wd.kernel_disp, wd.dt_heads, wd.dt_layers)
        self.classifier = nn.Sequential(
            BasicConv3d(wd.volume, wd.volume // 2, kernel_size=3, padding=1),
            ResnetBasicBlock3D(wd.volume // 2),
            nn.Conv3d(wd.volume // 2, 1, wd.classifier_kernel, padding=wd.classifier_kernel // 2))
        self.widths = wd
        self.batch_norms = [m for m in self.modules()
                            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        self.channels_last = False
        self.compiled: dict[str, object] = {}  # a plain dict: compiled wrappers stay out of the state dict
        for name in UNUSED_MODULES:
            self.get_submodule(name).requires_grad_(False)

    def train(self, mode: bool = True) -> "FoundationStereo":
        super().train(mode)
        if mode and self.cfg.freeze_bn:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    # ----- parameters -------------------------------------------------------------------------------------------

    def vit_parameters(self) -> list[nn.Parameter]:
        """The DepthAnything-V2 part (DINOv2 + DPT): frozen by `Feature` unless model.freeze_vit is false."""
        return list(self.feature.dino.parameters())

    def param_groups(self, lr: float, vit_lr: float) -> list[dict]:
        """AdamW groups of the trainable parameters; the ViT gets its own group (and lr) only when unfrozen."""
        vit_ids = {id(p) for p in self.vit_parameters()}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in vit_ids]
        groups = [{"params": rest, "lr": lr, "name": "stereo"}]
        vit = [p for p in self.vit_parameters() if p.requires_grad]
        if vit:
            groups.append({"params": vit, "lr": vit_lr, "name": "vit"})
        return groups

    def use_channels_last(self) -> None:
        """Channels-last weights (NHWC for 2-D convs, NDHWC for 3-D ones); forward then converts the inputs and the
        cost volume. GPU only: torch 2.13's CPU backward of a 1x1 stride-2 conv on channels-last input crashes
        (segfault; the context net's downsampling blocks have such convs), so forward refuses it on the CPU."""
        self.channels_last = True
        for p in self.parameters():
            if p.dim() in (4, 5):
                fmt = torch.channels_last if p.dim() == 4 else torch.channels_last_3d
                p.data = p.data.contiguous(memory_format=fmt)

    def compile_regions(self, iteration_mode: str | None = None, backend: str = "inductor") -> None:
        """torch.compile each of REGIONS on its own, static shapes (`dynamic=False`: a new input size compiles new
        graphs rather than symbolic ones, which CUDA graphs cannot capture). `iteration_mode="reduce-overhead"`
        captures the GRU iteration in CUDA graphs (GPU). The state dict is unchanged; eager and compiled modules
        share their parameters. Wrap a call in `torch.compiler.set_stance("force_eager")` to run it eagerly."""
        self.compiled = {name: torch.compile(getattr(self, f"_{name}_region"), dynamic=False, backend=backend,
                                             mode=iteration_mode if name == "iteration" else None)
                         for name in REGIONS}

    def _region(self, name: str):
        return self.compiled.get(name) or getattr(self, f"_{name}_region")

    # ----- forward ----------------------------------------------------------------------------------------------

    def _maybe_checkpoint(self, enabled: bool, fn, *args):
        if not (enabled and self.training and torch.is_grad_enabled()):
            return fn(*args)
        if torch.compiler.is_compiling():  # compiled recomputation replays pure ops: buffers are updated once
            return checkpoint(fn, *args, use_reentrant=False)
        return checkpoint(fn, *args, use_reentrant=False,
                          context_fn=lambda: (contextlib.nullcontext(), running_stats_frozen(self.batch_norms)))

    def _cost_volume(self, left: list[torch.Tensor], right: list[torch.Tensor]) -> torch.Tensor:
        num_disp = self.cfg.max_disp // 4
        gwc = gwc_volume(left[0], right[0], num_disp, self.widths.groups)
        cat = concat_volume(self.proj_cmb(left[0]), self.proj_cmb(right[0]), num_disp)
        volume = torch.cat([gwc.to(cat.dtype), cat], 1)
        if self.channels_last:
            volume = volume.contiguous(memory_format=torch.channels_last_3d)
        volume = self.corr_stem(volume)
        volume = self.corr_feature_att(volume, left[0])
        return self.cost_agg(volume, left)

    def _feature_region(self, left_n: torch.Tensor, right_n: torch.Tensor):
        """Region `feature`: both views through the feature network together, and the left view's stem_2."""
        if self.channels_last:
            left_n = left_n.contiguous(memory_format=torch.channels_last)
            right_n = right_n.contiguous(memory_format=torch.channels_last)
        feats, vit_feat = self.feature(torch.cat([left_n, right_n], 0))
        return feats, vit_feat, self.stem_2(left_n)

    def _context(self, image: torch.Tensor, vit_feat: torch.Tensor):
        levels = self.cnet(image, vit_feat)
        net = [torch.tanh(h) for h, _ in levels]
        inp = [torch.relu(c) for _, c in levels]
        inp = [self.cam(x) * x for x in inp]
        att = [self.sam(x) for x in inp]
        return net, inp, att

    def _context_region(self, image: torch.Tensor, vit_feat: torch.Tensor):
        """Region `context`: the context network and its attention maps (checkpointed with the features)."""
        return self._maybe_checkpoint(self.cfg.activation_checkpointing.features, self._context, image, vit_feat)

    def _upsample(self, disp: torch.Tensor, mask_feat: torch.Tensor, stem_2x: torch.Tensor) -> torch.Tensor:
        logits = self.spx_gru(self.spx_2_gru(mask_feat, stem_2x))
        return context_upsample(disp, logits)

    def _iteration(self, pyramid: LookupPyramid, net, inp, att, disp, stem_2x, upsample: bool):
        net, mask_feat, delta = self.update_block(net, inp, att, lookup(pyramid, disp, self.cfg.corr_radius), disp)
        disp = disp + upcast(delta)
        full = self._upsample(disp, mask_feat, stem_2x) if upsample else None
        return net, disp, full

    def _iteration_region(self, pyramid: LookupPyramid, net, inp, att, disp, stem_2x, upsample: bool):
        """Region `iteration`: one GRU update, a function of tensors of fixed shapes (and the static `upsample`, always
        true in training), with no host synchronisation: compiled once, it serves every iteration."""
        return self._maybe_checkpoint(self.cfg.activation_checkpointing.update, self._iteration, pyramid, net, inp,
                                      att, disp, stem_2x, upsample)

    def _weights_autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """With bf16/fp16 weights (e.g. DeepSpeed's bf16 mode, which casts the module but not its inputs) run under
        autocast to that dtype, so fp32 inputs and the fp32 islands meet the weights in one precision."""
        dtype = self.proj_cmb.weight.dtype
        if dtype in (torch.bfloat16, torch.float16) and torch.amp.is_autocast_available(device.type):
            return torch.autocast(device_type=device.type, dtype=dtype)
        return contextlib.nullcontext()

    def forward(self, left: torch.Tensor, right: torch.Tensor, iters: int | None = None, test_mode: bool = False,
                init_disp: torch.Tensor | None = None):
        """left/right (B,3,H,W) RGB 0..255, H and W multiples of 32; `init_disp` (B,1,H/4,W/4) in 1/4-res px starts
        the iterations instead of the cost volume's soft-argmin (hierarchical inference).

        Train: (init_disp (B,1,H/4,W/4) in 1/4-res px, [disparity (B,1,H,W)] * iters); test: the last disparity.
        Disparities are fp32 (fp64 for an fp64 model) whatever the weights' precision or an enclosing autocast.
        """
        with self._weights_autocast(left.device):
            return self._forward(left, right, iters, test_mode, init_disp)

    def _forward(self, left: torch.Tensor, right: torch.Tensor, iters: int | None, test_mode: bool,
                 init_disp: torch.Tensor | None):
        if iters is None:
            iters = self.cfg.valid_iters if test_mode else self.cfg.train_iters
        ac = self.cfg.activation_checkpointing
        b = left.shape[0]
        left_n, right_n = normalise(upcast(left)), normalise(upcast(right))
        if self.channels_last and left.device.type != "cuda":
            raise ValueError("model.channels_last is for GPUs: torch's CPU backward crashes on channels-last input "
                             "(1x1 stride-2 convolutions); set model.channels_last=false on the CPU")
        feats, vit_feat, stem_2x = self._region("feature")(left_n, right_n)
        feat_l = [f[:b] for f in feats]
        feat_r = [f[b:] for f in feats]

        volume = self._maybe_checkpoint(ac.cost_filtering, self._cost_volume, feat_l, feat_r)
        if init_disp is None:
            init_disp = soft_argmin(self.classifier(volume).squeeze(1))
        else:
            expected = (b, 1, left.shape[-2] // 4, left.shape[-1] // 4)
            if tuple(init_disp.shape) != expected:
                raise ValueError(f"init_disp must be {expected} (1/4 resolution), got {tuple(init_disp.shape)}")
            init_disp = upcast(init_disp)
        net, inp, att = self._region("context")(left_n, vit_feat[:b])
        pyramid = build_pyramid(volume, feat_l[0], feat_r[0], self.cfg.corr_levels)

        iteration = self._region("iteration")
        disp = init_disp
        preds = []
        for i in range(iters):
            upsample = not test_mode or i == iters - 1
            net, disp, full = iteration(pyramid, net, inp, att, disp.detach(), stem_2x, upsample)
            if full is not None:
                preds.append(full)
        return preds[-1] if test_mode else (init_disp, preds)

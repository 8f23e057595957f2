"""Width/depth presets of the feature side for each model size.

vits/vitb/vitl are the released DepthAnything-V2 + EdgeNeXt-small configurations (their keys and shapes are
checked against the released state-dict manifests); "tiny" is a narrow stand-in with the same structure for CPU
tests and the demo.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ViTDims:
    """DINOv2 ViT/14 with LayerScale, qkv bias and MLP ratio 4, as torch.hub's dinov2_vit*14."""

    embed_dim: int
    depth: int
    num_heads: int
    take_layers: tuple[int, int, int, int]  # blocks whose (normed) outputs feed the DPT head
    patch_size: int = 14
    img_size: int = 518  # pos_embed covers (518/14)^2 = 37x37 patches + the class token
    mlp_ratio: int = 4


@dataclass(frozen=True)
class DPTDims:
    """DepthAnything-V2 DPT head: per-level projection widths and the RefineNet width."""

    out_channels: tuple[int, int, int, int]
    features: int


@dataclass(frozen=True)
class EdgeNeXtDims:
    """timm EdgeNeXt: per stage width, depth, depthwise kernel, Res2Net-style split count and XCA heads.
    The last `global_blocks[i]` blocks of stage i are SDTA blocks."""

    dims: tuple[int, int, int, int] = (48, 96, 160, 304)
    depths: tuple[int, int, int, int] = (3, 3, 9, 3)
    kernel_sizes: tuple[int, int, int, int] = (3, 5, 7, 9)
    d2_scales: tuple[int, int, int, int] = (2, 2, 3, 4)
    heads: tuple[int, int, int, int] = (8, 8, 8, 8)
    global_blocks: tuple[int, int, int, int] = (0, 1, 1, 1)
    use_pos_emb: tuple[bool, bool, bool, bool] = (False, True, False, False)
    expand_ratio: int = 4


@dataclass(frozen=True)
class BackboneDims:
    size: str
    vit: ViTDims
    dpt: DPTDims
    edgenext: EdgeNeXtDims

    @property
    def vit_feat_dim(self) -> int:
        """Channels of the DepthAnything feature the stereo model uses (output_conv1: features // 2)."""
        return self.dpt.features // 2

    @property
    def d_out(self) -> list[int]:
        """Channels of the feature pyramid [1/4, 1/8, 1/16, 1/32] returned by `Feature`."""
        c = self.edgenext.dims
        return [2 * c[0] + self.vit_feat_dim, 2 * c[1], 2 * c[2], c[3]]


_PRESETS = {
    "vits": BackboneDims(
        "vits", ViTDims(384, 12, 6, (2, 5, 8, 11)), DPTDims((48, 96, 192, 384), 64), EdgeNeXtDims()
    ),
    "vitb": BackboneDims(
        "vitb", ViTDims(768, 12, 12, (2, 5, 8, 11)), DPTDims((96, 192, 384, 768), 128), EdgeNeXtDims()
    ),
    "vitl": BackboneDims(
        "vitl", ViTDims(1024, 24, 16, (4, 11, 17, 23)), DPTDims((256, 512, 1024, 1024), 256), EdgeNeXtDims()
    ),
    "tiny": BackboneDims(
        "tiny",
        ViTDims(48, 4, 3, (0, 1, 2, 3)),
        DPTDims((16, 16, 32, 32), 16),
        EdgeNeXtDims(
            dims=(16, 32, 48, 64), depths=(1, 1, 1, 1), kernel_sizes=(3, 5, 5, 7), heads=(4, 4, 4, 4)
        ),
    ),
}

SIZES = tuple(_PRESETS)


def backbone_dims(size: str) -> BackboneDims:
    if size not in _PRESETS:
        raise ValueError(f"model size must be one of {', '.join(SIZES)}, got {size!r}")
    return _PRESETS[size]

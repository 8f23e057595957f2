"""Feature side of FoundationStereo: frozen DepthAnything-V2 (DINOv2 + DPT) and the trainable EdgeNeXt branch."""

from stereo.model.backbone.dims import SIZES, BackboneDims, backbone_dims
from stereo.model.backbone.feature import Feature, vit_input_size

__all__ = ["SIZES", "BackboneDims", "Feature", "backbone_dims", "vit_input_size"]

"""U-Net backbones for consistency models (they never see sigma; see fastcm.cm for the parametrization)."""
from .unet import PRESETS, Block, UNet, UNetConfig, build_unet

__all__ = ["UNetConfig", "PRESETS", "UNet", "Block", "build_unet"]

"""pallas_flash: fused FlashAttention for JAX in Pallas, a drop-in for jax.nn.dot_product_attention."""

from pallas_flash.api import dot_product_attention
from pallas_flash.config import FlashConfig, MosaicConfig, default_config, default_mosaic_config
from pallas_flash.decode import DecodeConfig, decode_attention

__all__ = ["dot_product_attention", "decode_attention", "FlashConfig", "MosaicConfig", "DecodeConfig",
           "default_config", "default_mosaic_config"]
__version__ = "0.1.0"

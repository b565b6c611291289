"""``llava`` family: a stock ``transformers.LlavaForConditionalGeneration`` at toy scale.

Nothing here re-implements LLaVA: the config is a ``transformers.LlavaConfig`` built from a lab
recipe, the model is transformers' own class, and attention is observed through transformers'
attention registry (:mod:`owl_lab.models.transformers_attention`).
"""

from transformers import LlavaConfig, LlavaForConditionalGeneration

from .configuration_llava import llava_config, llava_patch_features, patches_per_image
from .loading_llava import build_for_training, encode_images, load_checkpoint, prepare_llava
from .processing_llava import LlavaProcessor

__all__ = [
    "LlavaConfig",
    "LlavaForConditionalGeneration",
    "LlavaProcessor",
    "build_for_training",
    "encode_images",
    "prepare_llava",
    "llava_config",
    "llava_patch_features",
    "load_checkpoint",
    "patches_per_image",
]

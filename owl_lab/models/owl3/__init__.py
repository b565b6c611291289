"""mPLUG-Owl3 family (7B-240728 gated, 7B-241101 fused, 1B/2B-241014, and the lab's ablations).

Exports the config, model and processor classes, registered with ``AutoConfig`` /
``AutoModelForCausalLM`` / ``AutoProcessor`` / ``AutoImageProcessor`` under ``model_type="mplugowl3"``,
and :func:`load_checkpoint`.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModelForCausalLM, AutoProcessor

from owl_lab.models.owl3.configuration_owl3 import Owl3Config, complete_config, detect_variant, load_config
from owl_lab.models.owl3.image_processing_owl3 import Owl3ImageProcessor
from owl_lab.models.owl3.loading_owl3 import load_checkpoint
from owl_lab.models.owl3.modeling_owl3 import Owl3CausalLMOutputWithPast, Owl3ForCausalLM
from owl_lab.models.owl3.processing_owl3 import Owl3Processor
from owl_lab.models.owl3.toy_tokenizer import build_word_tokenizer

AutoConfig.register(Owl3Config.model_type, Owl3Config, exist_ok=True)
AutoModelForCausalLM.register(Owl3Config, Owl3ForCausalLM, exist_ok=True)
# AutoProcessor finds Owl3Processor by processor_config.json's processor_class, else by the config class
AutoProcessor.register(Owl3Config, Owl3Processor, exist_ok=True)
AutoImageProcessor.register(Owl3Config, image_processor_classes={"pil": Owl3ImageProcessor}, exist_ok=True)

__all__ = [
    "Owl3Config",
    "Owl3ForCausalLM",
    "Owl3Processor",
    "Owl3ImageProcessor",
    "Owl3CausalLMOutputWithPast",
    "load_checkpoint",
    "load_config",
    "complete_config",
    "detect_variant",
    "build_word_tokenizer",
]

"""mPLUG-Owl2 family: checkpoint-compatible config, model, processor and loader."""

from transformers import AutoConfig, AutoImageProcessor, AutoModelForCausalLM, AutoProcessor

from owl_lab.models.loading import read_state_dict
from owl_lab.models.owl2.configuration_owl2 import (
    DEFAULT_IMAGE_TOKEN,
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    Owl2Config,
    load_config,
)
from owl_lab.models.owl2.image_processing_owl2 import Owl2ImageProcessor
from owl_lab.models.owl2.loading_owl2 import load_checkpoint
from owl_lab.models.owl2.modeling_owl2 import Owl2ForCausalLM, Owl2Model, Owl2PreTrainedModel
from owl_lab.models.owl2.processing_owl2 import Owl2Processor

AutoConfig.register(Owl2Config.model_type, Owl2Config, exist_ok=True)
AutoModelForCausalLM.register(Owl2Config, Owl2ForCausalLM, exist_ok=True)
# AutoProcessor finds Owl2Processor by processor_config.json's processor_class, else by the config class
AutoProcessor.register(Owl2Config, Owl2Processor, exist_ok=True)
# a saved preprocessor_config.json names Owl2ImageProcessor; an official one names CLIPImageProcessor
AutoImageProcessor.register(Owl2Config, image_processor_classes={"pil": Owl2ImageProcessor}, exist_ok=True)

__all__ = [
    "Owl2Config",
    "Owl2ForCausalLM",
    "Owl2Model",
    "Owl2PreTrainedModel",
    "Owl2Processor",
    "Owl2ImageProcessor",
    "load_checkpoint",
    "load_config",
    "read_state_dict",
    "IMAGE_TOKEN_INDEX",
    "IGNORE_INDEX",
    "DEFAULT_IMAGE_TOKEN",
]

"""The family registry (owl_lab.families): lookups, errors, and that every path names a real module."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from owl_lab import families
from owl_lab.families import FAMILIES, family_of, family_of_checkpoint, find_sites, get_family, resolve_path
from owl_lab.models.llava import build_for_training
from owl_lab.models.owl2 import Owl2ForCausalLM
from owl_lab.models.owl3 import Owl3ForCausalLM
from owl_lab.synth.tokenizer import build_tokenizer
from owl_lab.zoo import load_owl


@pytest.fixture(scope="module")
def goldens(owl2_golden_dir, owl3_golden_dir):
    # llava: a random tiny stock LlavaForConditionalGeneration, prepared by the registry entry
    llava, _ = build_for_training(
        {
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "vision_config": {
                "hidden_size": 16,
                "intermediate_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "image_size": 14,
                "patch_size": 7,
            },
        },
        build_tokenizer("llava"),
    )
    return {"owl2": load_owl(owl2_golden_dir)[0], "owl3": load_owl(owl3_golden_dir)[0], "llava": llava}


def test_lookups_by_name_model_and_directory(goldens, owl2_golden_dir, owl3_golden_dir):
    assert get_family("owl2") is families.OWL2 and get_family(families.OWL3) is families.OWL3
    assert family_of(goldens["owl2"]) is families.OWL2 and family_of(goldens["owl3"]) is families.OWL3
    assert family_of_checkpoint(owl2_golden_dir).name == "owl2"
    assert family_of_checkpoint(owl3_golden_dir).name == "owl3"
    assert families.OWL2.model_class is Owl2ForCausalLM and families.OWL3.model_class is Owl3ForCausalLM
    assert isinstance(goldens["owl2"].config, families.OWL2.config_class)


def test_unknown_family_errors_name_what_was_given():
    with pytest.raises(ValueError, match=r"unknown family 'fuyu'.*\['llava', 'owl2', 'owl3'\]"):
        get_family("fuyu")

    class Stranger:
        config = SimpleNamespace(model_type="llama")

    with pytest.raises(ValueError, match="Stranger with model_type='llama'"):
        family_of(Stranger())
    with pytest.raises(ValueError, match="model_type=None"):
        family_of(object())


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_component_path_resolves_on_the_golden_model(goldens, name):
    spec, model = FAMILIES[name], goldens[name]
    for component in spec.paths:
        if component == "gate_event":  # a HookPoint only on gated hyper layers
            continue
        index = {"i": 0, "k": 0}
        found = resolve_path(model, spec, component, i=index["i"], k=index["k"])
        assert found is not None, component
    layers = find_sites(model, spec, "decoder_layer")
    assert [s.index for s in layers] == list(range(model.config.get_text_config().num_hidden_layers))
    assert find_sites(model, spec, "no_such_component") == []
    with pytest.raises(KeyError, match="no component 'nope'"):
        spec.path("nope")


def test_spec_facts_the_lab_branches_on(goldens):
    owl2, owl3 = goldens["owl2"], goldens["owl3"]
    assert families.OWL2.image_token_id == -200 and families.OWL3.image_token_id is None
    assert families.OWL2.image_layers(owl2.config) == list(range(owl2.config.num_hidden_layers))
    assert families.OWL3.image_layers(owl3.config) == owl3.config.hyper_layer_indices
    pixels2 = torch.zeros(1, 3, owl2.config.image_size, owl2.config.image_size)
    grid2 = owl2.config.vision_settings.grid
    assert families.OWL2.patch_features(owl2, pixels2).shape[1] == grid2 * grid2
    size3 = owl3.config.vision_config.image_size
    pixels3 = torch.zeros(1, 3, size3, size3)
    assert families.OWL3.patch_features(owl3, pixels3).shape[1] == owl3.config.tokens_per_image
    assert families.OWL2.has("abstractor_event") and not families.OWL3.has("abstractor_event")
    assert families.OWL3.has("gate_event") and not families.OWL2.has("gate_event")


def test_image_marker_is_the_sentinel_or_the_configs_image_token(goldens):
    assert families.OWL2.image_marker(goldens["owl2"].config) == -200
    assert families.OWL3.image_marker(goldens["owl3"].config) is None  # images are not input_ids rows
    # a family whose image rows are vocabulary tokens (LLaVA-style): the config names the id
    vocab_marked = replace(families.OWL2, name="vocab", image_token_id=None, expands_image_marker=False)
    assert vocab_marked.image_marker(SimpleNamespace(image_token_index=32000)) == 32000
    assert vocab_marked.image_marker(SimpleNamespace(image_token_id=7, image_token_index=32000)) == 7

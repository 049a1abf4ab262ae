"""Every architecture row is tied to a tiny model the family tests build and run (tests/runtime/test_families.py,
tests/quantize/test_family_compress.py, tests/calibrate/test_family_routing.py): a new row without one fails here."""

from __future__ import annotations

import transformers

from mc_gguf.hf.architectures import ARCHITECTURES
from mc_gguf.hf.tiny import TINY_FAMILIES


def test_every_architecture_row_has_a_tiny_model():
    tiny = {model for _, model, _ in TINY_FAMILIES.values()}
    tiny.add("MixtralForCausalLM")  # build_tiny_mixtral, the model of every other test
    assert tiny == set(ARCHITECTURES), tiny ^ set(ARCHITECTURES)


def test_each_tiny_model_is_a_transformers_class_of_its_row():
    for config_name, model_name, _ in TINY_FAMILIES.values():
        assert hasattr(transformers, config_name) and hasattr(transformers, model_name)
        assert ARCHITECTURES[model_name].hf_architecture == model_name

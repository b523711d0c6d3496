"""A new family in one file: a toy model class, its adapter and its tiny checkpoint, registered for this module only,
and the generated registry x family equality tests of ``tests/test_cut.py`` (the support matrix's image and
multi-image tests) run on it for every registered compressor.

The toy family is LLaVA-1.5 under a class transformers does not know (``ToyLlava``) with its own tower geometry
(40 px images of 8 px patches: a 5x5 grid). Its adapter only names its class; everything else is inherited from the
LLaVA adapter, as a real family reuses a shared base (the AnyRes or Qwen-VL adapters). Nothing outside this file
changes: ``vtc.apply`` finds the adapter through the registry (the nearest registered model class wins, so the
LLaVA adapter does not claim the subclass), and ``vtc.testing`` builds the toy from its registered ``TinyModel``.
"""

from __future__ import annotations

import pytest
from test_cut import (  # noqa: F401  (the generated tests, collected here again with this module's fixtures)
    test_batch_of_two_equals_single_runs,
    test_compressed_generate_equals_hand_built_prompt,
    test_forward_path_equals_hand_built_and_shrinks_labels,
    test_keep_all_generate_equals_unwrapped,
    test_multi_image_prompt_each_image_gets_its_budget,
)
from transformers import CLIPImageProcessor, CLIPVisionConfig, LlavaForConditionalGeneration, LlavaProcessor

from vtc import testing
from vtc.integrations.transformers import (
    TinyModel,
    adapter_for,
    register_adapter,
    register_tiny,
    supported_families,
    unregister_adapter,
)
from vtc.integrations.transformers.families.llava import (
    LLAVA_TEMPLATE,
    TINY_PATCH,
    LlavaAdapter,
    build_tiny_llava,
    square_views,
)


# ------------------------------------------------------------------------------------------------ the toy family
class ToyLlava(LlavaForConditionalGeneration):
    """A model class of its own (no transformers auto-class knows it)."""


class ToyAdapter(LlavaAdapter):
    family = "toy_llava"

    @classmethod
    def model_classes(cls):
        return (ToyLlava,)


TOY_IMAGE = 40


def build_toy(tok):
    """Tiny ToyLlava: a 3-layer CLIP tower of width 32 on 40 px images (5x5 = 25 tokens), a 2-layer Llama LLM."""
    tower = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                             image_size=TOY_IMAGE, patch_size=TINY_PATCH)
    return build_tiny_llava(tok, ToyLlava, LlavaProcessor, square_views(CLIPImageProcessor, TOY_IMAGE), tower,
                            image_token_id=tok.convert_tokens_to_ids("<image>"))


TOY = TinyModel(build=build_toy, placeholders=("<image>",), chat_template=LLAVA_TEMPLATE,
                image_sizes=((40, 40), (64, 48)))


# ------------------------------------------------------------------------------------------------ registered here
@pytest.fixture(scope="module", autouse=True)
def toy_family():
    """The toy family is registered while this module's tests run, and only then."""
    register_adapter(ToyAdapter)
    register_tiny(ToyAdapter, TOY)
    yield ToyAdapter.family
    unregister_adapter(ToyAdapter)


@pytest.fixture
def family(toy_family):
    return toy_family


@pytest.fixture
def loaded(family):
    """A fresh toy (model, processor) per test (the class is not an auto-class, so it is built, not reloaded)."""
    return testing.build_tiny(family)


def test_the_toy_is_registered_and_served_by_its_own_adapter(loaded, family):
    model, _ = loaded
    assert type(model) is ToyLlava and family in supported_families() and family not in testing.FAMILIES
    assert type(adapter_for(model)) is ToyAdapter  # not the LLaVA adapter of its base class
    assert adapter_for(model).tower_info().num_layers == 3  # its own tower
    llava, _ = testing.build_tiny("llava")
    assert type(adapter_for(llava)) is LlavaAdapter


def test_registration_is_reversible():
    class Other(ToyAdapter):
        family = "toy_other"

    before = supported_families()
    register_adapter(Other)
    register_tiny(Other, TOY)
    assert supported_families() == before + ["toy_other"] and "toy_other" in testing.families()
    unregister_adapter(Other)
    assert supported_families() == before and "toy_other" not in testing.families()
    with pytest.raises(ValueError, match="already registered"):
        register_adapter(type("Clash", (LlavaAdapter,), {"family": "llava"}))
    with pytest.raises(ValueError, match="register_adapter before"):
        register_tiny(Other, TOY)

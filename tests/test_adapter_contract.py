"""The adapter contract itself: the abstract core, capabilities checked when a family is defined, refusals by need."""

from __future__ import annotations

import pytest

from dexar.adapters import ADAPTERS, DexarInputError, VLMAdapter
from dexar.adapters.florence2 import Florence2Adapter
from dexar.methods import GradCAM


class Stub(VLMAdapter):
    """The smallest family: the abstract core, nothing else (refuses GradCAM's need)."""

    model_types = ("stub",)
    refused_needs = {"hidden_grads": "the stub holds no hidden states"}

    def encode_prompts(self, images, prompts):
        return [[0]] * len(prompts), {}

    def tokenize_answer(self, answer):
        return [1]

    def image_grid(self, image_inputs):
        return 1, 1


def test_the_abstract_core_must_be_implemented():
    class Partial(VLMAdapter):
        model_types = ("partial",)

        def encode_prompts(self, images, prompts):
            return [], {}

    with pytest.raises(TypeError, match="image_grid") as err:
        Partial(None, None)
    assert "tokenize_answer" in str(err.value)
    assert sorted(VLMAdapter.__abstractmethods__) == ["encode_prompts", "image_grid", "tokenize_answer"]


@pytest.mark.parametrize(
    "attributes,match",
    [
        ({"architecture": "encoder"}, "architecture = 'encoder'"),
        ({"model_types": ()}, "model_types"),
        ({"pixel_perturbation": "yes"}, "pixel_perturbation"),
        ({"refused_needs": {"full_attention": "two\nlines"}}, "one-line reason"),
    ],
)
def test_capabilities_are_checked_when_the_family_is_defined(attributes, match):
    with pytest.raises(TypeError, match=match):
        type("Broken", (Stub,), attributes)


def test_refusals_are_keyed_by_need_and_the_method_view_follows():
    stub = Stub(None, None)
    assert Stub.refused_methods == {"gradcam": "the stub holds no hidden states"}
    for method in ("gradcam", GradCAM(layer=0)):  # a name (default options) or a method with its own layer
        with pytest.raises(DexarInputError, match="^gradcam is not supported for Stub: the stub holds no") as err:
            stub.check_method(method)
        assert "\n" not in str(err.value)
        assert str(err.value).endswith(
            "; use dexar, attention, rollout, chefercam, attngrad, integrated_gradients, rise, iia or tam"
        )
    stub.check_method("dexar")
    assert not stub.cross_attention and Stub.architecture == "decoder"


def test_every_family_declares_its_capabilities():
    """Florence-2 is the one cross-attention family; it refuses exactly the five methods the README names."""
    assert {cls.architecture for cls in ADAPTERS.values()} == {"decoder", "cross"}
    assert [cls for cls in set(ADAPTERS.values()) if cls.architecture == "cross"] == [Florence2Adapter]
    assert sorted(Florence2Adapter.refused_methods) == ["chefercam", "gradcam", "iia", "rollout", "tam"]
    assert all(not cls.refused_needs for cls in ADAPTERS.values() if cls is not Florence2Adapter)

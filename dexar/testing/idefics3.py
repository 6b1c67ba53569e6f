"""A tiny random Idefics3 / SmolVLM model for tests, built from the real ``transformers`` classes.

A word-level tokenizer over the Shapes words plus the family's special tokens and its own image processor
(PIL backend): nothing is downloaded.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMImageProcessorPil,
)

from dexar.adapters.processing import ImageTextProcessor
from dexar.shapes.vocabulary import WORDS
from dexar.testing.llava import tiny_llama_config
from dexar.testing.weights import scale_weights
from dexar.testing.word_tokenizer import word_tokenizer

IDEFICS3_SPECIALS = [
    "<|im_start|>",
    "<fake_token_around_image>",
    "<image>",
    "<end_of_utterance>",
    "<global-img>",
    *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)),
]


def random_idefics3(
    family: str = "idefics3",
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    tile: int = 32,
    patch: int = 4,
    max_side: int = 64,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> tuple[nn.Module, object]:
    """A random Idefics3 (``family="idefics3"``) or SmolVLM (``"smolvlm"``): SigLIP-style tower + pixel shuffle + Llama.

    Tiles are ``tile`` pixels with ``(tile/patch/2)²`` tokens each; images are resized to a longest
    edge of ``max_side`` and split into up to ``(max_side/tile)²`` tiles plus the global view.
    Idefics3 comes with its real ``Idefics3Processor``; SmolVLM's processor also needs a video
    processor (torchvision), so it comes as an :class:`ImageTextProcessor`.
    """
    tokenizer = word_tokenizer(
        ["<pad>", "<unk>", *IDEFICS3_SPECIALS, *WORDS],
        specials=IDEFICS3_SPECIALS,
        eos_token="<end_of_utterance>",
        bos_token="<|im_start|>",
        extra_special_tokens={"image_token": "<image>"},
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=tile,
        patch_size=patch,
    )
    text = tiny_llama_config(tokenizer, hidden, layers, heads, kv_heads, bos_token_id=None)
    kinds = {
        "idefics3": (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil),
        "smolvlm": (SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMImageProcessorPil),
    }
    if family not in kinds:
        raise ValueError(f"family must be one of {sorted(kinds)}, got {family!r}")
    config_cls, model_cls, image_processor_cls = kinds[family]
    config = config_cls(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=2,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = model_cls._from_config(config, attn_implementation="sdpa")
    scale_weights(model, seed=seed)
    model = model.to(dtype).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.suppress_tokens = [model.config.image_token_id]  # random weights: never an image token
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    image_processor = image_processor_cls(
        size={"longest_edge": max_side}, max_image_size={"longest_edge": tile}, do_image_splitting=True
    )
    if family == "idefics3":
        seq_len = (tile // patch // 2) ** 2
        return model, Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=seq_len)
    return model, ImageTextProcessor(tokenizer, image_processor)

"""A tiny random LLaVA-NeXT model for tests, built from the real ``transformers`` classes.

The Shapes word tokenizer and LLaVA-NeXT's any-resolution image processor (PIL backend): nothing is
downloaded.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    CLIPVisionConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    PreTrainedTokenizerBase,
)

from dexar.testing.llava import tiny_llama_config
from dexar.testing.weights import scale_weights
from dexar.testing.word_tokenizer import shapes_word_tokenizer


def random_llava_next(
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    tile: int = 32,
    patch: int = 8,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> tuple[nn.Module, LlavaNextProcessor]:
    """A random LLaVA-NeXT (CLIP tower + Llama) with anyres tiles of ``tile`` pixels (``tile/patch`` tokens a side).

    Grid pinpoints: 1×2, 2×1 and 2×2 tiles, so the tile layout depends on the image's aspect ratio.
    ``tokenizer``: as :func:`dexar.testing.llava.random_llava`'s (default: the Shapes word tokenizer).
    """
    tokenizer = tokenizer if tokenizer is not None else shapes_word_tokenizer()
    pinpoints = [[tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile]]
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=tile,
        patch_size=patch,
    )
    text = tiny_llama_config(tokenizer, hidden, layers, heads, kv_heads)
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlavaNextForConditionalGeneration._from_config(config, attn_implementation="sdpa")
        with torch.no_grad():
            model.model.image_newline.normal_()
    scale_weights(model, seed=seed)
    model = model.to(dtype).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.suppress_tokens = [model.config.image_token_id]  # random weights: never an image token
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": tile},
        crop_size={"height": tile, "width": tile},
        image_grid_pinpoints=pinpoints,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return model, processor

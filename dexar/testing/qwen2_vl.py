"""A tiny random Qwen2-VL / Qwen2.5-VL model for tests, built from the real ``transformers`` classes.

A word-level tokenizer over the Shapes words plus Qwen's special tokens and Qwen's own image processor
(PIL backend): nothing is downloaded.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
)

from dexar.adapters.processing import ImageTextProcessor
from dexar.shapes.vocabulary import WORDS
from dexar.testing.weights import scale_weights
from dexar.testing.word_tokenizer import word_tokenizer

QWEN_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def random_qwen2_vl(
    version: str = "2",
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    patch: int = 8,
    merge: int = 2,
    max_side: int = 64,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> tuple[nn.Module, ImageTextProcessor]:
    """A random Qwen2-VL (``version="2"``) or Qwen2.5-VL (``"2.5"``) with its image processor.

    Images are resized to multiples of ``patch·merge`` pixels with at most ``max_side²`` pixels, so
    each image's token grid depends on its size (dynamic resolution).
    """
    tokenizer = word_tokenizer(
        ["<pad>", "<unk>", *QWEN_SPECIALS, *WORDS, "system", "you", "are", "helpful"],
        specials=QWEN_SPECIALS,
        eos_token="<|im_end|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0},
        bos_token_id=None,
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=tokenizer.pad_token_id,
    )
    common = dict(
        depth=2, num_heads=2, patch_size=patch, spatial_merge_size=merge, temporal_patch_size=2, in_channels=3
    )
    if version == "2":
        vision = dict(common, embed_dim=16, hidden_size=hidden, mlp_ratio=2)
        config_cls, model_cls = Qwen2VLConfig, Qwen2VLForConditionalGeneration
    elif version == "2.5":
        # window attention over 2×2 merged tokens in block 0, full attention in block 1
        vision = dict(
            common,
            hidden_size=16,
            intermediate_size=32,
            out_hidden_size=hidden,
            window_size=2 * merge * patch,
            fullatt_block_indexes=[1],
        )
        config_cls, model_cls = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    else:
        raise ValueError(f"version must be '2' or '2.5', got {version!r}")
    config = config_cls(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = model_cls._from_config(config, attn_implementation="sdpa")
    scale_weights(model, seed=seed)
    model = model.to(dtype).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.suppress_tokens = [model.config.image_token_id]  # random weights: never an image token
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=(patch * merge) ** 2,
        max_pixels=max_side * max_side,
        patch_size=patch,
        merge_size=merge,
        temporal_patch_size=2,
    )
    return model, ImageTextProcessor(tokenizer, image_processor)

"""Tiny random Qwen2-VL / Qwen2.5-VL, LLaVA-NeXT and Idefics3 / SmolVLM models for tests.

Built from the real ``transformers`` classes with a word-level tokenizer
(:func:`~dexar.testing.word_tokenizer.word_tokenizer`) over the Shapes words plus each family's special
tokens, and the family's own image processor (PIL backend), so nothing is downloaded.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    CLIPVisionConfig,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    PreTrainedTokenizerBase,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMImageProcessorPil,
)

from dexar.adapters.processing import ImageTextProcessor
from dexar.shapes.vocabulary import WORDS
from dexar.testing.llava import tiny_llama_config
from dexar.testing.weights import scale_weights
from dexar.testing.word_tokenizer import shapes_word_tokenizer, word_tokenizer

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

"""The bundled Shapes VLM: a real ``LlavaForConditionalGeneration`` small enough to train on a CPU.

It is built like LLaVA-1.5 at a small scale: a SentencePiece-style BPE wrapped as ``LlamaTokenizerFast``
(:mod:`dexar.shapes.tokenizer`), the LLaVA-1.5 prompt template, and ``llava-hf``'s CLIP image
processing (resize the shortest edge, center crop, CLIP mean/std) at 64 pixels, so
``AutoProcessor``/``AutoModelForImageTextToText`` load the saved directory like any LLaVA checkpoint.
The Shapes language (colours, shapes, prompts, caption grammar, words) is :mod:`dexar.shapes.vocabulary`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from dexar.shapes.vocabulary import IMAGE_SIZE

SHAPES_CHECKPOINT: str = str(Path(__file__).parents[1] / "assets" / "shapes-llava")
"""Path of the bundled, trained Shapes checkpoint (an HF directory ``from_pretrained`` loads)."""

PATCH_SIZE = 8
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def tokenizer_specials() -> dict[str, Any]:
    """The special tokens and padding side every Shapes tokenizer is built with (LLaVA-1.5's names)."""
    return {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "padding_side": "left",
        "extra_special_tokens": {"image_token": "<image>"},
    }


def build_shapes_config(tokenizer: Any, text_layers: int = 3) -> LlavaConfig:
    """LLaVA config: CLIP tower (hidden 128, 4 layers) → GELU projector → Llama (hidden 128, ``text_layers``)."""
    vision = CLIPVisionConfig(
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=128,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        tie_word_embeddings=False,
    )


def build_shapes_model(processor: LlavaProcessor, seed: int = 0, text_layers: int = 3) -> LlavaForConditionalGeneration:
    """A freshly initialised Shapes model (deterministic for a seed), SDPA attention."""
    config = build_shapes_config(processor.tokenizer, text_layers)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    tok = processor.tokenizer
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    return model

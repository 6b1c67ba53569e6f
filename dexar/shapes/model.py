"""The bundled Shapes VLM: a real ``LlavaForConditionalGeneration`` small enough to train on a CPU.

It has a word-level tokenizer (``tokenizers`` WordLevel model wrapped in ``PreTrainedTokenizerFast``)
and the PIL CLIP image processor, so ``AutoProcessor``/``AutoModelForImageTextToText`` load the saved
directory like any LLaVA checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

SHAPES_CHECKPOINT: str = str(Path(__file__).parents[1] / "assets" / "shapes-llava")
"""Path of the bundled, trained Shapes checkpoint (an HF directory ``from_pretrained`` loads)."""

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (230, 210, 40),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
IMAGE_SIZE = 64
PATCH_SIZE = 8

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
WORDS = [
    "user",
    ":",
    "assistant",
    "describe",
    "the",
    "image",
    ".",
    "what",
    "color",
    "shape",
    "is",
    "object",
    "?",
    "i",
    "see",
    "a",
    "and",
    *COLORS,
    *SHAPES,
]


def build_shapes_tokenizer() -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer over the Shapes vocabulary, adding ``<s>`` in front."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + WORDS)}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
        extra_special_tokens={"image_token": "<image>"},
    )
    return fast


def build_shapes_processor() -> LlavaProcessor:
    """The LLaVA processor of the Shapes model: word tokenizer + 64×64 CLIP preprocessing."""
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_shapes_tokenizer(),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def build_shapes_config(tokenizer: PreTrainedTokenizerFast) -> LlavaConfig:
    """LLaVA config: CLIP tower (hidden 128, 4 layers) → GELU projector → Llama (hidden 128, 3 layers)."""
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
        num_hidden_layers=3,
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


def build_shapes_model(processor: LlavaProcessor, seed: int = 0) -> LlavaForConditionalGeneration:
    """A freshly initialised Shapes model (deterministic for a seed), SDPA attention."""
    config = build_shapes_config(processor.tokenizer)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    tok = processor.tokenizer
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    return model

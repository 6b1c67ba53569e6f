"""A tiny random PaliGemma model for tests, built from the real ``transformers`` classes.

A word-level tokenizer over :data:`~dexar.testing.word_tokenizer.PROMPT_WORDS` and PaliGemma's own
processor: nothing is downloaded.
"""

from __future__ import annotations

import torch
from transformers import (
    GemmaConfig,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
)

from dexar.testing.weights import scale_weights
from dexar.testing.word_tokenizer import prompt_word_tokenizer


def random_paligemma(
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    grid: int = 4,
    patch: int = 8,
    vision_layers: int = 1,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> tuple[PaliGemmaForConditionalGeneration, PaliGemmaProcessor]:
    """A randomly initialised PaliGemma (SigLIP tower + Gemma prefix-LM) and its processor.

    Args:
        hidden: Gemma hidden size (= projection size).
        layers: Gemma decoder layers.
        heads: Attention heads.
        kv_heads: Key/value heads (GQA when fewer than ``heads``).
        grid: Image-token grid side (``grid²`` image tokens).
        patch: SigLIP patch size (image side = ``grid * patch``).
        vision_layers: SigLIP layers (0: each image token sees only its own patch).
        dtype: Parameter dtype.
        seed: Initialisation seed.

    """
    tokenizer = prompt_word_tokenizer(["<pad>", "<eos>", "<bos>", "<unk>"], bos_token="<bos>", eos_token="<eos>")
    side = grid * patch
    image_processor = SiglipImageProcessorPil(size={"height": side, "width": side})
    image_processor.image_seq_length = grid * grid
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    vocab = len(processor.tokenizer)  # the processor adds <loc…>/<seg…> tokens
    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=vision_layers,
        num_attention_heads=2,
        image_size=side,
        patch_size=patch,
        vision_use_head=False,
    )
    text = GemmaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = PaliGemmaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=processor.image_token_id,
        vocab_size=vocab,
        projection_dim=hidden,
        hidden_size=hidden,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = PaliGemmaForConditionalGeneration._from_config(config, attn_implementation="sdpa")
        scale_weights(model)
    model = model.to(dtype).eval()
    for module in model.modules():  # Gemma's embed_scale: built in float32 then cast; a load computes it in dtype
        if hasattr(module, "scalar_embed_scale"):
            module.embed_scale.fill_(module.scalar_embed_scale)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model, processor

"""A tiny random Florence-2 model for tests, built from the real ``transformers`` classes.

A word-level tokenizer over :data:`~dexar.testing.word_tokenizer.PROMPT_WORDS` and Florence-2's own processor:
nothing is downloaded, and a saved directory loads through ``AutoProcessor`` /
``AutoModelForImageTextToText`` like a hub checkpoint.
"""

from __future__ import annotations

import torch
from transformers import (
    BartConfig,
    CLIPImageProcessorPil,
    Florence2Config,
    Florence2ForConditionalGeneration,
    Florence2Processor,
    Florence2VisionConfig,
)

from dexar.testing.weights import scale_weights
from dexar.testing.word_tokenizer import prompt_word_tokenizer


def random_florence2(
    hidden: int = 32,
    encoder_layers: int = 1,
    decoder_layers: int = 2,
    heads: int = 4,
    image_size: int = 32,
    vision_depths: tuple[int, int] = (1, 1),
    vision_kernels: tuple[int, int] = (7, 3),
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> tuple[Florence2ForConditionalGeneration, Florence2Processor]:
    """A randomly initialised Florence-2 (two-stage DaViT + BART) and its processor.

    The vision tower has strides 4 and 2, so the image-feature grid is ``image_size / 8`` square; the
    encoder sees those features plus one pooled (temporal) token, then the prompt.

    Args:
        hidden: BART ``d_model`` (= projection size).
        encoder_layers: BART encoder layers.
        decoder_layers: BART decoder layers.
        heads: Attention heads of encoder and decoder.
        image_size: Image side in pixels (a multiple of 8).
        vision_depths: DaViT blocks per stage (0: convolutional patch embeddings only).
        vision_kernels: Patch-embedding kernels of the two stages (padding ``(k - 1) // 2``, none when
            ``k`` is the stride); ``(4, 2)`` makes every feature a function of its own 8×8 pixel cell.
        dtype: Parameter dtype.
        seed: Initialisation seed.

    """
    tokenizer = prompt_word_tokenizer(["<s>", "<pad>", "</s>", "<unk>"], bos_token="<s>", eos_token="</s>")
    grid = image_size // 8
    image_processor = CLIPImageProcessorPil(
        size={"height": image_size, "width": image_size},
        do_center_crop=False,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    image_processor.image_seq_length = grid * grid + 1
    processor = Florence2Processor(image_processor=image_processor, tokenizer=tokenizer)
    vision = Florence2VisionConfig(
        depths=tuple(vision_depths),
        patch_size=tuple(vision_kernels),
        patch_stride=(4, 2),
        patch_padding=tuple(0 if k == s else (k - 1) // 2 for k, s in zip(vision_kernels, (4, 2), strict=True)),
        patch_prenorm=(False, True),
        embed_dim=(16, 32),
        num_heads=(2, 4),
        num_groups=(2, 4),
        window_size=2,
        drop_path_rate=0.0,
        projection_dim=hidden,
        max_position_embeddings=max(grid, 8),
    )
    text = BartConfig(
        vocab_size=len(tokenizer),
        d_model=hidden,
        encoder_layers=encoder_layers,
        decoder_layers=decoder_layers,
        encoder_attention_heads=heads,
        decoder_attention_heads=heads,
        encoder_ffn_dim=hidden * 2,
        decoder_ffn_dim=hidden * 2,
        max_position_embeddings=128,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.eos_token_id,
        forced_eos_token_id=tokenizer.eos_token_id,
        scale_embedding=False,
    )
    config = Florence2Config(vision_config=vision, text_config=text, image_token_id=processor.image_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Florence2ForConditionalGeneration._from_config(config, attn_implementation="sdpa")
        scale_weights(model)
    model = model.to(dtype).eval()
    gen = model.generation_config
    gen.pad_token_id, gen.eos_token_id, gen.bos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id, 0
    gen.decoder_start_token_id = tokenizer.eos_token_id
    return model, processor

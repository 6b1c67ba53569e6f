"""Tiny random PaliGemma and Florence-2 models built from the real ``transformers`` classes (tests, benchmarks).

Nothing is downloaded: the tokenizers are word-level (:func:`~dexar.testing.word_tokenizer.word_tokenizer`)
and the processors are the families' own processor classes, so a saved directory loads through
``AutoProcessor`` / ``AutoModelForImageTextToText`` like a hub checkpoint.
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
    GemmaConfig,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    PreTrainedTokenizerFast,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
)

from dexar.shapes.vocabulary import COLORS, SHAPES
from dexar.testing.weights import scale_weights
from dexar.testing.word_tokenizer import NEWLINE_AND_PUNCTUATION, word_tokenizer

PROMPT_WORDS = (
    "cap",
    "describe",
    "in",
    "detail",
    "what",
    "is",
    "shown",
    "the",
    "image",
    "a",
    "an",
    "and",
    *COLORS,
    *SHAPES,
    "left",
    "right",
    "top",
    "bottom",
    "of",
    "on",
    ".",
    ",",
    "?",
    "\n",
)
"""The PaliGemma and Florence-2 test vocabulary after the special tokens: their task prompts' words, the
Shapes colours and shapes (:mod:`dexar.shapes.vocabulary`), positions, punctuation and the newline."""


def prompt_word_tokenizer(specials: list[str], bos_token: str, eos_token: str) -> PreTrainedTokenizerFast:
    """PaliGemma's / Florence-2's test tokenizer: ``specials``, ``<image>``, then :data:`PROMPT_WORDS`.

    Newlines and single punctuation marks are tokens (:data:`~dexar.testing.word_tokenizer.NEWLINE_AND_PUNCTUATION`).
    """
    return word_tokenizer(
        [*specials, "<image>", *PROMPT_WORDS],
        pre_tokenizer=NEWLINE_AND_PUNCTUATION,
        bos_token=bos_token,
        eos_token=eos_token,
        extra_special_tokens={"image_token": "<image>"},
    )


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

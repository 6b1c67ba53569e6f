"""Random LLaVA models of any size built from the real ``transformers`` classes (tests, benchmarks)."""

from __future__ import annotations

import torch
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerBase,
)

from dexar.testing.weights import scale_weights
from dexar.testing.word_tokenizer import shapes_word_tokenizer


def vlm_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """A hub text tokenizer made ready for a tiny LLaVA: ``<image>`` (and ``<pad>`` when missing), left padding.

    Used with a real SentencePiece tokenizer (e.g. Mistral 7B's, ``tests/adapters/test_real_tokenizer.py``) in
    :func:`random_llava` and :func:`dexar.testing.llava_next.random_llava_next`.
    """
    specials = [t for t in ("<image>",) if t not in tokenizer.get_vocab()]
    extra: dict = {"additional_special_tokens": specials} if specials else {}
    if tokenizer.pad_token is None:
        extra["pad_token"] = "<pad>"
    if extra:
        tokenizer.add_special_tokens(extra)
    tokenizer.padding_side = "left"
    return tokenizer


def tiny_llama_config(
    tokenizer, hidden: int, layers: int, heads: int, kv_heads: int | None = None, max_positions: int = 1024, **extra
) -> LlamaConfig:
    """A small Llama text config sized for ``tokenizer``: MLP width ``2·hidden``, untied embeddings.

    ``extra`` overrides any field (e.g. ``bos_token_id=None``).
    """
    fields = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaConfig(**{**fields, **extra})


def random_llava(
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int | None = None,
    grid: int = 4,
    patch: int = 8,
    vision_hidden: int = 32,
    vision_layers: int = 1,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A randomly initialised LLaVA (CLIP tower + Llama) with the Shapes word tokenizer (or ``tokenizer``).

    Args:
        hidden: LLM hidden size.
        layers: LLM decoder layers.
        heads: LLM attention heads.
        kv_heads: Key/value heads (GQA when fewer than ``heads``).
        grid: Image-token grid side (``grid²`` image tokens).
        patch: Vision patch size (image side = ``grid * patch``).
        vision_hidden: Vision tower hidden size.
        vision_layers: Vision tower layers.
        dtype: Parameter dtype.
        seed: Initialisation seed.
        attn_implementation: Attention implementation of every sub-model.
        tokenizer: A tokenizer holding ``<image>`` and a pad token (:func:`vlm_tokenizer`); default: the
            Shapes word tokenizer (one token per word).

    """
    tokenizer = tokenizer if tokenizer is not None else shapes_word_tokenizer()
    side = grid * patch
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=vision_hidden * 2,
        num_hidden_layers=vision_layers,
        num_attention_heads=max(1, vision_hidden // 16),
        image_size=side,
        patch_size=patch,
    )
    text = tiny_llama_config(tokenizer, hidden, layers, heads, kv_heads, max_positions=4096)
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        image_seq_length=grid * grid,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration._from_config(config, attn_implementation=attn_implementation)
        scale_weights(model)  # random init is tiny: attention would be near uniform
    model = model.to(dtype).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side}),
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return model, processor

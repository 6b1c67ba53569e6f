"""The bundled Shapes checkpoint: small, safetensors, LLaVA-1.5-style, accurate, and explained exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor, AutoTokenizer, LlamaTokenizerFast

from datamodules.shapes import make_shapes_sample
from dexar import SHAPES_CHECKPOINT, load_model, tracing
from dexar.adapters import get_adapter
from dexar.generation import generate_answers
from dexar.methods import DexAR
from dexar.reference import naive_dexar, naive_layer_grads
from dexar.shapes_model import CLIP_MEAN, CLIP_STD, COLORS, IMAGE_SIZE, SHAPES
from dexar.shapes_tokenizer import train_shapes_tokenizer, word_pieces


@pytest.fixture(scope="module")
def bundled64():
    return load_model(SHAPES_CHECKPOINT, dtype="float64")


def test_checkpoint_is_small_safetensors():
    files = {p.name: p.stat().st_size for p in Path(SHAPES_CHECKPOINT).iterdir()}
    assert "model.safetensors" in files and not any(n.endswith((".bin", ".pt", ".pkl")) for n in files)
    assert sum(files.values()) <= 10 * 2**20


def test_greedy_exact_match_on_500_held_out_images():
    model, processor = load_model(SHAPES_CHECKPOINT)
    adapter = get_adapter(model, processor)
    hits, non_square = 0, 0
    for first in range(0, 500, 50):
        samples = [make_shapes_sample(i, "test") for i in range(first, first + 50)]
        answers = generate_answers(adapter, samples, max_new_tokens=32)
        hits += sum(a.text == s.answer for a, s in zip(answers, samples, strict=True))
        non_square += sum(s.image.size != (IMAGE_SIZE, IMAGE_SIZE) for s in samples)
    assert non_square >= 150, "the held-out captions include cropped, non-square images"
    assert hits / 500 >= 0.90


def test_tokenizer_is_the_trained_llava_style_bpe():
    tokenizer = AutoTokenizer.from_pretrained(SHAPES_CHECKPOINT)
    assert isinstance(tokenizer, LlamaTokenizerFast)
    assert json.loads((Path(SHAPES_CHECKPOINT) / "tokenizer_config.json").read_text())["tokenizer_class"] in (
        "LlamaTokenizer",
        "LlamaTokenizerFast",
    )
    trained = train_shapes_tokenizer()  # the script reproduces the shipped tokenizer exactly
    assert tokenizer.get_vocab() == trained.get_vocab()
    assert tokenizer.backend_tokenizer.to_str() == trained.backend_tokenizer.to_str()
    ids = tokenizer.convert_tokens_to_ids(["<unk>", "<s>", "</s>", "<0x00>", "<0x0A>", "<0xFF>"])
    assert ids == [0, 1, 2, 3, 13, 258]
    assert tokenizer.convert_ids_to_tokens([len(tokenizer) - 2, len(tokenizer) - 1]) == ["<image>", "<pad>"]
    assert (tokenizer.pad_token, tokenizer.image_token, tokenizer.padding_side) == ("<pad>", "<image>", "left")
    pieces = {word: word_pieces(tokenizer, word) for word in (*COLORS, *SHAPES)}
    assert all(1 <= len(p) <= 3 and p[0].startswith("▁") and "▁" not in "".join(p[1:]) for p in pieces.values())
    assert sum(len(p) >= 2 for p in pieces.values()) > len(pieces) / 2, pieces
    assert pieces["triangle"] == ["▁tri", "an", "gle"] and pieces["yellow"] == ["▁yel", "low"]
    # the LLaVA-1.5 template: <s> in front, the newline by byte fallback, any character round-trips
    prompt = tokenizer("USER: <image>\ndescribe the image. ASSISTANT:")["input_ids"]
    assert prompt[0] == tokenizer.bos_token_id and "<0x0A>" in tokenizer.convert_ids_to_tokens(prompt)
    assert tokenizer.decode(tokenizer("é ☕ x", add_special_tokens=False)["input_ids"]) == "é ☕ x"


def test_processor_is_llava_hf_clip_processing():
    config = json.loads((Path(SHAPES_CHECKPOINT) / "processor_config.json").read_text())["image_processor"]
    assert config["image_processor_type"] == "CLIPImageProcessor"
    image_processor = AutoProcessor.from_pretrained(SHAPES_CHECKPOINT).image_processor
    assert image_processor.size == {"shortest_edge": IMAGE_SIZE}
    assert image_processor.crop_size == {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    assert image_processor.do_resize and image_processor.do_center_crop and image_processor.resample == 3
    assert image_processor.do_rescale and image_processor.rescale_factor == pytest.approx(1 / 255)
    assert list(image_processor.image_mean) == list(CLIP_MEAN) and list(image_processor.image_std) == list(CLIP_STD)


def test_answers_follow_assistant_with_a_leading_space():
    model, processor = load_model(SHAPES_CHECKPOINT)
    adapter = get_adapter(model, processor)
    sample = make_shapes_sample(2, "test")
    prompt_ids, _ = adapter.encode_prompts([sample.image], [sample.prompt])
    answer = adapter.tokenize_answer(sample.answer)
    tokens = processor.tokenizer.convert_ids_to_tokens(answer)
    assert tokens[:3] == ["▁i", "▁see", "▁a"] and len(answer) > len(sample.answer.split())
    assert processor.tokenizer.decode(prompt_ids[0], skip_special_tokens=True).endswith(f"\n{sample.prompt} ASSISTANT:")
    joint = processor.tokenizer(adapter.format_prompt(sample.prompt) + " " + sample.answer, add_special_tokens=True)[
        "input_ids"
    ]
    assert joint[len(joint) - len(answer) :] == answer and processor.tokenizer.decode(answer) == sample.answer
    generated = generate_answers(adapter, [sample], max_new_tokens=32, keep_eos=True)[0]
    assert generated.ids[-1] == processor.tokenizer.eos_token_id, "generation stops at </s>"


def test_one_pass_equals_naive_on_bundled_model(bundled64):
    model, processor = bundled64
    adapter = get_adapter(model, processor)
    samples = [make_shapes_sample(i, "test") for i in (0, 1)]
    assert samples[0].image.size == (IMAGE_SIZE, IMAGE_SIZE) != samples[1].image.size, "a square and a cropped image"
    answers = [adapter.tokenize_answer(s.answer) for s in samples]
    prompt_ids, image_inputs = adapter.encode_prompts([s.image for s in samples], [s.prompt for s in samples])
    batch = adapter.build_batch(prompt_ids, answers, image_inputs)
    trace = tracing.run(adapter, batch)
    out = DexAR()(trace)
    for b in range(2):
        grads, _ = naive_layer_grads(adapter, batch, b)
        length, pad = grads.shape[2], int((batch.inputs["attention_mask"][b] == 0).sum())
        assert (trace.grads[b, :, :, -length:, pad:] - grads).abs().max() <= 1e-10
        ids = batch.sample_inputs(b)["input_ids"][0]
        image = torch.nonzero(ids == adapter.image_token_id)[:, 0]
        n = len(ids)
        text = [[j for j in range(n - length + t) if ids[j] != adapter.image_token_id] for t in range(length)]
        maps, weights, seq = naive_dexar(grads, image, text, trace.grid)
        assert (out.token_maps[b, -length:] - maps).abs().max() <= 1e-10
        assert (out.token_weights[b, -length:] - weights).abs().max() <= 1e-10
        assert (out.sequence_map[b] - seq).abs().max() <= 1e-10

"""The bundled Shapes checkpoint: small, safetensors, LLaVA-1.5-style, accurate, and explained exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from datamodules.shapes import make_shapes_sample
from dexar import SHAPES_CHECKPOINT, load_model
from dexar.adapters import get_adapter
from dexar.generation import generate_answers
from dexar.methods import DexAR
from dexar.shapes.tokenizer import build_shapes_processor
from dexar.shapes.vocabulary import IMAGE_SIZE
from dexar.testing.reference import naive_dexar, naive_layer_grads
from dexar.trace import run as run_trace


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


def test_bundled_checkpoint_ships_the_trained_bpe_and_llava_processor(tmp_path):
    """The checkpoint's tokenizer and processor are the ones the code builds (tests/shapes/test_shapes_tokenizer.py)."""
    build_shapes_processor().save_pretrained(tmp_path)
    for name in ("tokenizer.json", "processor_config.json"):
        assert json.loads((Path(SHAPES_CHECKPOINT) / name).read_text()) == json.loads((tmp_path / name).read_text())
    model, processor = load_model(SHAPES_CHECKPOINT)
    assert model.config.text_config.vocab_size == len(processor.tokenizer)
    assert model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids("<image>")


def test_generation_stops_at_eos():
    model, processor = load_model(SHAPES_CHECKPOINT)
    adapter = get_adapter(model, processor)
    sample = make_shapes_sample(2, "test")
    generated = generate_answers(adapter, [sample], max_new_tokens=32, keep_eos=True)[0]
    assert generated.ids[-1] == processor.tokenizer.eos_token_id, "generation stops at </s>"
    assert generated.text == sample.answer


def test_one_pass_equals_naive_on_bundled_model(bundled64):
    model, processor = bundled64
    adapter = get_adapter(model, processor)
    samples = [make_shapes_sample(i, "test") for i in (0, 1)]
    assert samples[0].image.size == (IMAGE_SIZE, IMAGE_SIZE) != samples[1].image.size, "a square and a cropped image"
    answers = [adapter.tokenize_answer(s.answer) for s in samples]
    prompt_ids, image_inputs = adapter.encode_prompts([s.image for s in samples], [s.prompt for s in samples])
    batch = adapter.build_batch(prompt_ids, answers, image_inputs)
    trace = run_trace(adapter, batch)
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

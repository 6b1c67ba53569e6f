"""The word view: words segmented by the tokenizer, word maps and weights, and where they are used.

Sub-word cases use the Shapes BPE trained here (``train_shapes_tokenizer``: ``tri`` + ``angle``) in a tiny
random LLaVA, so they run whichever Shapes checkpoint is bundled (word-level or sub-word).
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.shapes import make_shapes_sample
from dexar.adapters import get_adapter
from dexar.explain import Explainer
from dexar.explanation import Explanation
from dexar.explorer import payload_from_explanations
from dexar.explorer.adapter import explanation_groups, filler_flags
from dexar.methods import DexAR
from dexar.pipeline.evaluation import EvaluationSettings, Evaluator
from dexar.shapes.tokenizer import train_shapes_tokenizer
from dexar.testing.llava import random_llava
from dexar.testing.word_tokenizer import shapes_word_tokenizer
from dexar.words import Word, segment_words, word_aggregate


@pytest.fixture(scope="module")
def bpe():
    return train_shapes_tokenizer()


@pytest.fixture(scope="module")
def subword_llava(bpe):
    return random_llava(hidden=32, layers=2, heads=4, grid=4, dtype=torch.float64, tokenizer=bpe)


def test_shapes_bpe_words_are_the_answer_words(bpe):
    sample = make_shapes_sample(9, "test")
    ids = bpe(sample.answer, add_special_tokens=False)["input_ids"]
    words = segment_words(bpe, ids)
    assert [w.text for w in words] == sample.answer.split()
    assert len(ids) > len(words)  # some word is several pieces
    assert [i for w in words for i in w.pieces] == list(range(len(ids)))
    pieces = bpe.convert_ids_to_tokens(ids)
    assert all(pieces[w.start].startswith("▁") for w in words)
    assert not any(p.startswith("▁") for w in words for p in pieces[w.start + 1 : w.end])


def test_word_level_tokenizer_every_token_is_a_word():
    tok = shapes_word_tokenizer()
    ids = tok("a red circle and a blue square", add_special_tokens=False)["input_ids"]
    assert [w.text for w in segment_words(tok, ids)] == "a red circle and a blue square".split()
    assert [(w.start, w.end) for w in segment_words(tok, ids)] == [(t, t + 1) for t in range(7)]
    eos = [*ids, tok.eos_token_id]
    assert segment_words(tok, eos)[-1] == Word(tok.eos_token, 7, 8)  # </s> is a word of its own


def test_word_aggregate_by_hand():
    """Two pieces with λ = (0.75, 0.25): map = MinMax(0.75·E₀ + 0.25·E₁), weight 0.75; λ = 0: plain mean."""
    maps = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [1.0, 0.5]]])
    weights = torch.tensor([0.75, 0.25, 0.4])
    words = [Word("suitcase", 0, 2), Word("x", 2, 3)]
    wmaps, wweights = word_aggregate(maps, weights, words)
    assert torch.allclose(wmaps[0], torch.tensor([[1.0, 1 / 3], [0.0, 0.0]]))  # (0.75, 0.25, 0, 0) min-max
    assert torch.equal(wmaps[1], maps[2]) and wweights.tolist() == [0.75, pytest.approx(0.4)]
    zero = word_aggregate(maps, torch.zeros(3), words)[0][0]
    assert torch.allclose(zero, torch.tensor([[1.0, 1.0], [0.0, 0.0]]))  # plain mean, then min-max


def test_explanation_without_words_is_one_word_per_token():
    exp = Explanation(
        tokens=["a", "b"],
        token_ids=[1, 2],
        token_maps=torch.rand(2, 3, 3),
        token_weights=torch.tensor([0.2, 0.7]),
        sequence_map=torch.rand(3, 3),
        inputs={},
        answer_positions=torch.tensor([5, 6]),
    )
    assert exp.word_texts == ["a", "b"] and torch.equal(exp.word_maps, exp.token_maps)
    assert torch.equal(exp.word_weights, exp.token_weights)


def test_explained_sub_word_answer_has_a_word_view(subword_llava, tmp_path):
    model, processor = subword_llava
    sample = make_shapes_sample(9, "test")
    exp = Explainer(model, processor, {"dexar": DexAR()}).explain_samples([sample])["dexar"][0]
    assert exp.word_texts == sample.answer.split() and len(exp.tokens) > len(exp.word_texts)
    assert not any("▁" in t for t in exp.tokens)
    exp.save(tmp_path)
    words_png, tokens_png = Image.open(tmp_path / "words.png"), Image.open(tmp_path / "tokens.png")
    assert words_png.width == 128 * len(exp.word_texts) and tokens_png.width == 128 * len(exp.tokens)
    saved = json.loads((tmp_path / "explanation.json").read_text())
    assert [w["text"] for w in saved["words"]] == exp.word_texts
    assert saved["word_weights"] == pytest.approx(exp.word_weights.tolist())


def test_the_explorer_shows_the_words_the_explanation_saves(subword_llava):
    """A sub-word answer: the explorer's words, their pieces, maps and weights are the Explanation's word view,
    with the tokenizer's words and without them (then one word per piece, as the Explanation counts them)."""
    model, processor = subword_llava
    sample = make_shapes_sample(9, "test")
    exp = Explainer(model, processor, {"dexar": DexAR()}).explain_samples([sample])["dexar"][0]
    box = (0.0, 0.0, *map(float, sample.image.size))
    for explanation in (exp, replace(exp, words=None)):
        groups = explanation_groups(explanation)
        assert groups == [list(w.pieces) for w in explanation.word_list]
        filler = filler_flags(explanation.tokens, explanation.answer, sample.answer, sample.word_is_content, groups)
        view = payload_from_explanations([explanation], filler=filler, grid_box=box).methods[0]
        assert [w.display for w in view.words] == explanation.word_texts
        assert [[p.text for p in w.pieces] for w in view.words] == [[exp.tokens[t] for t in g] for g in groups]
        word_maps, word_weights = explanation.word_view()
        assert np.allclose([w.weight for w in view.words], word_weights.numpy())
        assert np.allclose(np.stack([w.map for w in view.words]), word_maps.numpy(), atol=1e-6)
    assert len(explanation_groups(exp)) == len(sample.answer.split()) < len(exp.tokens)  # the sub-word case
    assert filler_flags(exp.tokens, exp.answer, sample.answer, sample.word_is_content, explanation_groups(exp))


def test_filler_and_token_localization_are_scored_on_words(subword_llava):
    """Each content word's map meets its object's mask once, whatever its piece count; filler gets one row per word."""
    model, processor = subword_llava
    adapter = get_adapter(model, processor)
    sample = make_shapes_sample(9, "test")
    exp = Explainer(model, processor, {"dexar": DexAR()}).explain_samples([sample])["dexar"][0]
    evaluator = Evaluator(adapter, {"dexar": {}})
    labels = evaluator.word_labels(sample, exp)
    assert [k is not None for k in labels] == list(sample.word_is_content)
    assert [k for k in labels if k is not None] == [k for k in sample.word_mask_index if k >= 0]

    class Recorder:
        input_kind = "localization"

        def __init__(self):
            self.calls = []

        def update(self, maps, masks, ignore, seen=None):
            self.calls.append((maps, masks))

    class FillerRecorder:
        input_kind = "filler"

        def __init__(self):
            self.calls = []

        def update(self, weights, content, mass):
            self.calls.append((weights[0], content[0], mass[0]))

    loc, fill = Recorder(), FillerRecorder()
    evaluator = Evaluator(
        adapter, {"dexar": {"loc": loc, "fill": fill}}, EvaluationSettings(localization_target="tokens")
    )
    evaluator.update_one("dexar", sample, exp)
    maps, masks = loc.calls[0]
    content_words = [w for w, k in enumerate(labels) if k is not None and k >= 0]
    assert maps.shape[0] == masks.shape[0] == len(content_words)
    assert evaluator.rows["dexar"]["loc"] == [f"{sample.id}#{w}" for w in content_words]
    weights, content, mass = fill.calls[0]
    assert torch.equal(weights, exp.word_weights.double()) and content.tolist() == list(sample.word_is_content)
    assert torch.allclose(mass, exp.word_maps.double().flatten(1).sum(1))

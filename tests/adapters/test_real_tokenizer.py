"""A real SentencePiece tokenizer (Mistral 7B's, shipped inside ``mistral-common``) in tiny random LLaVAs.

The word-level test tokenizer hides the paths a hub checkpoint takes: ``▁`` word starts, pieces
(``▁p`` ``otted``), a lone ``▁`` before digits and byte-fallback characters, ``</s>``. These tests load
the tokenizer as a new user would (``AutoTokenizer`` on a folder holding ``tokenizer.model`` and a
``tokenizer_config.json`` naming ``LlamaTokenizer``), put it in the tiny LLaVA and LLaVA-NeXT, and check
teacher forcing, the word view, PascalVOC-QA word labels, generation and float64 exactness.
"""

from __future__ import annotations

import copy
import importlib.resources
import importlib.util
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, LlamaTokenizerFast

from dexar.adapters import DexarInputError, get_adapter
from dexar.explain import Explainer
from dexar.generation import generate_answers
from dexar.labels import sample_token_labels
from dexar.methods import DexAR
from dexar.pipeline.evaluation import Evaluator
from dexar.schema import Sample
from dexar.testing.adapter_checks import assert_exact
from dexar.testing.llava import random_llava, vlm_tokenizer
from dexar.testing.llava_next import random_llava_next
from dexar.words import segment_words

PROMPT = "What is in the picture?"


def _tokenizer_model():
    """Path of Mistral 7B's ``tokenizer.model`` inside ``mistral-common`` (skip when absent)."""
    if importlib.util.find_spec("mistral_common") is None:
        pytest.skip("mistral-common is not installed (pip install -e '.[test]'): no real SentencePiece model")
    if importlib.util.find_spec("sentencepiece") is None:
        pytest.skip("sentencepiece is not installed (pip install -e '.[test]'): cannot convert tokenizer.model")
    path = importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"
    if not path.is_file():
        pytest.skip(f"mistral-common ships no {path.name} in this version")
    return path


@pytest.fixture(scope="session")
def mistral_folder(tmp_path_factory):
    """A folder as a user would have it: ``tokenizer.model`` + ``tokenizer_config.json`` naming LlamaTokenizer."""
    folder = tmp_path_factory.mktemp("mistral-tokenizer")
    shutil.copy(_tokenizer_model(), folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    return folder


@pytest.fixture(scope="session")
def mistral_saved(mistral_folder, tmp_path_factory):
    """The converted fast tokenizer saved once (``tokenizer.json``), so each model loads it quickly."""
    out = tmp_path_factory.mktemp("mistral-fast")
    AutoTokenizer.from_pretrained(mistral_folder).save_pretrained(out)
    return out


def _mistral(saved) -> LlamaTokenizerFast:
    return vlm_tokenizer(LlamaTokenizerFast.from_pretrained(saved))


@pytest.fixture(scope="module")
def llava(mistral_saved):
    model, processor = random_llava(
        hidden=32, layers=2, heads=4, grid=4, dtype=torch.float64, tokenizer=_mistral(mistral_saved)
    )
    return model, processor


def _image(seed: int = 0, size: tuple[int, int] = (40, 32)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _pieces(adapter, answer: str) -> list[str]:
    return adapter.tokenizer.convert_ids_to_tokens(adapter.tokenize_answer(answer))


def test_autotokenizer_loads_the_sentencepiece_model_as_a_fast_llama_tokenizer(mistral_folder):
    tokenizer = AutoTokenizer.from_pretrained(mistral_folder)
    assert tokenizer.is_fast and len(tokenizer) == 32000
    assert tokenizer.convert_ids_to_tokens(tokenizer("potted plant", add_special_tokens=False)["input_ids"]) == [
        "▁p",
        "otted",
        "▁plant",
    ]
    assert tokenizer.eos_token == "</s>"


def test_teacher_forced_answer_with_and_without_a_leading_space(llava):
    model, processor = llava
    adapter = get_adapter(model, processor)
    ids = adapter.tokenize_answer("potted plant")
    assert adapter.tokenize_answer(" potted plant") == ids == adapter.tokenize_answer("potted plant ")
    assert adapter.tokenizer.convert_ids_to_tokens(ids) == ["▁p", "otted", "▁plant"]
    # the answer follows the prompt exactly as the tokenizer cuts prompt + " " + answer
    prompt = adapter.format_prompt(PROMPT)
    joint = adapter.tokenizer(prompt + " potted plant", add_special_tokens=False)["input_ids"]
    assert joint[-len(ids) :] == ids
    prompt_ids, image_inputs = adapter.encode_prompts([_image()], [PROMPT])
    batch = adapter.build_batch(prompt_ids, [ids], image_inputs)
    assert batch.inputs["input_ids"][0, -len(ids) :].tolist() == ids


@pytest.mark.parametrize(
    ("answer", "pieces", "words"),
    [
        ("12 cats.", ["▁", "1", "2", "▁cats", "."], ["12", "cats."]),
        ('"Hi", said the cat', ['▁"', "Hi", '",', "▁said", "▁the", "▁cat"], ['"Hi",', "said", "the", "cat"]),
        ("... and a dog", ["▁...", "▁and", "▁a", "▁dog"], ["...", "and", "a", "dog"]),
        ("☕ café", ["▁", "<0xE2>", "<0x98>", "<0x95>", "▁café"], ["☕", "café"]),
        ("a ☕", ["▁a", "▁", "<0xE2>", "<0x98>", "<0x95>"], ["a", "☕"]),
        ("potted plant", ["▁p", "otted", "▁plant"], ["potted", "plant"]),
    ],
)
def test_words_come_from_the_tokenizer(llava, answer, pieces, words):
    """Digits and byte-fallback characters follow a lone ``▁``; punctuation stays with its whitespace word."""
    model, processor = llava
    adapter = get_adapter(model, processor)
    assert _pieces(adapter, answer) == pieces
    segmented = segment_words(adapter.tokenizer, adapter.tokenize_answer(answer))
    assert [w.text for w in segmented] == words == answer.split()
    assert [i for w in segmented for i in w.pieces] == list(range(len(pieces)))  # every piece in one word


def test_explanation_word_view_and_display_tokens(llava):
    """☕ is one word (not three ``�``), a lone ``▁`` is no word, pieces show without ``▁``."""
    model, processor = llava
    sample = Sample(id="s", image=_image(), prompt=PROMPT, answer="a ☕ and 12 potted plants")
    exp = Explainer(model, processor, {"dexar": DexAR()}).explain_samples([sample])["dexar"][0]
    assert exp.word_texts == ["a", "☕", "and", "12", "potted", "plants"]
    assert not any("▁" in t or "\ufffd" in t for t in exp.tokens)
    assert exp.tokens == ["a", "␣", "<0xE2>", "<0x98>", "<0x95>", "and", "␣", "1", "2", "p", "otted", "plants"]
    assert exp.word_maps.shape == (6, *exp.token_maps.shape[1:])
    for word, weight, wmap in zip(exp.word_list, exp.word_weights, exp.word_maps, strict=True):
        lam = exp.token_weights[word.start : word.end].double()
        assert float(weight) == pytest.approx(float(lam.max()))  # word weight = max λ of its pieces
        maps = exp.token_maps[word.start : word.end].double()
        positive = lam.clamp(min=0) if lam.clamp(min=0).sum() > 0 else torch.ones_like(lam)
        combined = sum(p * m for p, m in zip(positive, maps, strict=True))  # loop over pieces
        span = combined.max() - combined.min()
        expect = (combined - combined.min()) / span if span > 0 else torch.zeros_like(combined)
        assert torch.allclose(wmap.double(), expect, atol=1e-6)
    saved = exp.to_dict()
    assert [w["text"] for w in saved["words"]] == exp.word_texts and len(saved["word_weights"]) == 6


def test_pascal_voc_qa_word_labels_reach_every_piece(llava):
    """``potted plant``: ``p`` + ``otted`` + ``plant`` all content with mask 1; the evaluator scores two words."""
    model, processor = llava
    adapter = get_adapter(model, processor)
    sample = Sample(
        id="voc",
        image=_image(1),
        prompt=PROMPT,
        answer="I see a dog as well as a potted plant",
        word_is_content=[False, False, False, True, False, False, False, False, True, True],
        word_mask_index=[-1, -1, -1, 0, -1, -1, -1, -1, 1, 1],
    )
    labels = sample_token_labels(sample, adapter.tokenizer, context=adapter.format_prompt(sample.prompt))
    assert labels.tokens[-3:] == ["▁p", "otted", "▁plant"]
    assert labels.is_content[-3:] == [True, True, True] and labels.mask_index[-3:] == [1, 1, 1]
    assert labels.is_content[:-3] == [False, False, False, True, False, False, False, False]
    exp = Explainer(model, processor, {"dexar": DexAR()}).explain_samples([sample])["dexar"][0]
    assert exp.token_ids == labels.ids
    evaluator = Evaluator(adapter, {"dexar": {}})
    word_labels = evaluator.word_labels(sample, exp)
    assert exp.word_texts == sample.answer.split()
    assert word_labels == [None, None, None, 0, None, None, None, None, 1, 1]  # per word: filler or mask index


def test_generation_stops_at_the_end_of_sequence_token(llava):
    """Greedy decoding that emits ``▁cat`` then ``</s>`` stops there; ``keep_eos`` keeps ``</s>`` as its own word."""
    model, processor = llava
    adapter = get_adapter(model, processor)
    tok = adapter.tokenizer
    cat = tok.convert_tokens_to_ids("▁cat")
    config = model.generation_config
    old = config.sequence_bias
    config.sequence_bias = [[[cat], 1e4], [[cat, tok.eos_token_id], 3e4]]  # "cat", then </s>
    try:
        sample = Sample(id="g", image=_image(2), prompt=PROMPT)
        plain, kept = (generate_answers(adapter, [sample], max_new_tokens=6, keep_eos=k)[0] for k in (False, True))
    finally:
        config.sequence_bias = old
    assert plain.ids == [cat] and plain.text == "cat"
    assert kept.ids == [cat, tok.eos_token_id] and kept.text == "cat"
    assert [w.text for w in segment_words(tok, kept.ids)] == ["cat", "</s>"]


def test_one_pass_trace_is_exact_on_sub_word_byte_fallback_answers(llava):
    """The one-pass trace == the naive float64 reference (≤ 1e-10) on pieces, a lone ``▁`` and byte pieces."""
    model, processor = llava
    answers = ["a ☕ and 12 potted plants", "é", '"Hi", said the cat']
    samples = [Sample(id=str(i), image=_image(i), prompt=PROMPT, answer=a) for i, a in enumerate(answers)]
    adapter = get_adapter(model, processor)
    lengths = [len(adapter.tokenize_answer(a)) for a in answers]
    assert _pieces(adapter, "é") == ["▁é"] and lengths[0] == 12  # é is a piece of Mistral's; ☕ is 3 bytes
    assert assert_exact(model, processor, samples, lengths) <= 1e-10


def test_llava_next_with_the_real_tokenizer_explains_words(mistral_saved):
    model, processor = random_llava_next(dtype=torch.float64, tokenizer=_mistral(mistral_saved))
    sample = Sample(id="n", image=_image(3, (48, 32)), prompt=PROMPT, answer="☕ potted plant")
    exp = Explainer(model, processor, {"dexar": DexAR()}).explain_samples([sample])["dexar"][0]
    assert exp.word_texts == ["☕", "potted", "plant"]
    assert torch.isfinite(exp.word_maps).all() and exp.word_maps.shape[0] == 3
    other = Sample(id="m", image=_image(4, (48, 32)), prompt=PROMPT, answer="12 é")  # same tile layout, padded
    assert assert_exact(model, processor, [sample, other], [6, 4]) <= 1e-10


def test_an_answer_that_tokenizes_to_nothing_is_an_error(mistral_folder, llava):
    """``LlamaTokenizerFast(vocab_file=...)`` builds a 3-token tokenizer that maps any text to no ids."""
    broken = LlamaTokenizerFast(vocab_file=str(mistral_folder / "tokenizer.model"))
    if broken("potted plant", add_special_tokens=False)["input_ids"]:
        pytest.skip("this transformers version converts tokenizer.model in the constructor: not broken")
    model, processor = llava
    processor = copy.copy(processor)  # the module's model keeps its real tokenizer
    processor.tokenizer = vlm_tokenizer(broken)
    adapter = get_adapter(model, processor)
    with pytest.raises(DexarInputError, match=r"'potted plant'.*LlamaTokenizer"):
        adapter.tokenize_answer("potted plant")
    assert adapter.tokenize_answer("") == []  # an empty answer is not the tokenizer's fault

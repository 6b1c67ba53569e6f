"""Per-word → per-token content labels via offset mapping, on a word tokenizer and on real BPE tokenizers."""

from __future__ import annotations

import string

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from datamodules.fixtures import drain, make_voc
from datamodules.shapes import make_shapes_sample
from datamodules.voc import PascalVOCQADataModule, qa_answer
from dexar.labels import sample_token_labels, token_labels
from dexar.testing.word_tokenizer import shapes_word_tokenizer

CORPUS = [
    "I see a bus as well as a car as well as a person",
    "I see a dog as well as a cat",
    "I see a bird as well as a boat as well as a bottle",
    "the cat sat on the mat and the dog saw a bus",
    "as well as a chair and a sofa I see a horse",
] * 5


def _bpe(style: str) -> PreTrainedTokenizerFast:
    """A tiny BPE trained here: GPT-2 style (byte-level) or SentencePiece style (metaspace ``▁``)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    if style == "bytelevel":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet = sorted(set(string.ascii_letters + string.digits + string.punctuation) | {"▁"})
    trainer = trainers.BpeTrainer(
        vocab_size=len(alphabet) + 40, special_tokens=["<unk>", "<s>"], initial_alphabet=alphabet
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>")


@pytest.fixture(scope="module", params=["bytelevel", "metaspace"])
def bpe(request):
    return _bpe(request.param)


def _pieces(tokenizer, labels, keep) -> str:
    return "".join(tokenizer.decode([i]).strip() for i, k in zip(labels.ids, keep, strict=True) if k)


def test_word_tokenizer_one_token_per_word():
    tok = shapes_word_tokenizer()
    sample = make_shapes_sample(3, "test")
    labels = sample_token_labels(sample, tok)
    assert labels.tokens == sample.answer.split()
    assert labels.is_content == sample.word_is_content and labels.mask_index == sample.word_mask_index
    in_context = sample_token_labels(sample, tok, context="user : <image> describe the image. assistant :")
    assert in_context.ids == labels.ids and in_context.is_content == labels.is_content


@pytest.mark.parametrize("classes", [["potted plant", "dining table"], ["aeroplane", "person", "tv monitor"]])
def test_bpe_multi_token_words_are_all_content(bpe, classes):
    answer, content, mask_index = qa_answer(classes)
    labels = token_labels(bpe, answer, content, mask_index)
    assert labels.ids == bpe(answer, add_special_tokens=False)["input_ids"]
    assert len(labels.ids) > len(answer.split()), "the tiny BPE splits some words"
    multi = [k for k in range(len(classes)) if labels.mask_index.count(k) > len(classes[k].split())]
    assert multi, "at least one class name spans more tokens than words"
    for k, name in enumerate(classes):
        assert _pieces(bpe, labels, [m == k for m in labels.mask_index]) == name.replace(" ", "")
    assert all(c == (m >= 0) for c, m in zip(labels.is_content, labels.mask_index, strict=True))
    fillers = [w for w, c in zip(answer.split(), content, strict=True) if not c]
    assert _pieces(bpe, labels, [not c for c in labels.is_content]) == "".join(fillers)


def test_bpe_in_context_matches_joint_tokenization(bpe):
    answer, content, mask_index = qa_answer(["potted plant", "bus"])
    context = "USER: What do you see? ASSISTANT:"
    labels = token_labels(bpe, answer, content, mask_index, context=context)
    joint = bpe(context + " " + answer, add_special_tokens=False)["input_ids"]
    prefix = bpe(context, add_special_tokens=False)["input_ids"]
    assert joint[: len(prefix)] == prefix and labels.ids == joint[len(prefix) :]
    assert _pieces(bpe, labels, [m == 0 for m in labels.mask_index]) == "pottedplant"
    assert _pieces(bpe, labels, [m == 1 for m in labels.mask_index]) == "bus"


def test_voc_qa_sample_token_masks(bpe, tmp_path):
    fx = make_voc(tmp_path, broken=())
    sample = next(s for s in drain(PascalVOCQADataModule(str(fx.root), num_workers=0)) if len(s.mask_labels) > 1)
    labels = sample_token_labels(sample, bpe)
    masks = labels.token_masks(sample.masks)
    assert masks.shape == (len(labels.ids), *sample.masks.shape[1:]) and masks.dtype == bool
    for t, k in enumerate(labels.mask_index):
        assert np.array_equal(masks[t], sample.masks[k]) if k >= 0 else not masks[t].any()
    assert labels.token_masks(None) is None


def test_errors():
    tok = shapes_word_tokenizer()
    with pytest.raises(ValueError, match="3 words"):
        token_labels(tok, "i see a", [False, True])
    with pytest.raises(ValueError, match="fast tokenizer"):
        token_labels(object(), "a", [True])
    with pytest.raises(ValueError, match="no labelled answer"):
        sample_token_labels(make_shapes_sample(0).__class__(id="x", image=None, prompt="p"), tok)


def test_context_mirrors_the_llava_adapter_answer_tokens():
    import torch

    from dexar.adapters import get_adapter
    from dexar.testing.llava import random_llava

    model, processor = random_llava(hidden=16, layers=1, heads=2, grid=2, dtype=torch.float32)
    adapter = get_adapter(model, processor)
    sample = make_shapes_sample(5, "test")
    labels = sample_token_labels(sample, adapter.tokenizer, context=adapter.format_prompt(sample.prompt))
    assert labels.ids == adapter.tokenize_answer(sample.answer)
    assert labels.is_content == sample.word_is_content


def test_shapes_bpe_labels_every_piece_of_a_content_word():
    """The bundled model's sub-word tokenizer: colour and shape words span 1–3 pieces, all content."""
    from dexar.adapters import LlavaAdapter
    from dexar.labels import word_spans
    from dexar.shapes.tokenizer import build_shapes_processor

    adapter = LlavaAdapter(None, build_shapes_processor())
    tok = adapter.tokenizer
    multi = 0
    for i in range(30):
        sample = make_shapes_sample(i, "test", task="mixed")
        labels = sample_token_labels(sample, tok, context=adapter.format_prompt(sample.prompt))
        assert labels.ids == adapter.tokenize_answer(sample.answer)
        assert len(labels.ids) > len(sample.answer.split())
        for w, (start, end) in enumerate(word_spans(sample.answer)):
            pieces = [t for t, (a, b) in enumerate(labels.offsets) if a < end and b > start]
            assert "".join(tok.decode([labels.ids[t]]).strip() for t in pieces) == sample.answer[start:end]
            assert all(labels.is_content[t] == sample.word_is_content[w] for t in pieces)
            assert all(labels.mask_index[t] == sample.word_mask_index[w] for t in pieces)
            multi += sample.word_is_content[w] and len(pieces) > 1
        assert sum(labels.is_content) >= sum(sample.word_is_content)
    assert multi > 30, "most content words are several pieces"

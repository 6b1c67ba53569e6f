"""The test kit's shared builders: the one word-level tokenizer and the one weight scaling."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dexar.shapes.vocabulary import WORDS
from dexar.testing.weights import scale_weights
from dexar.testing.word_tokenizer import (
    NEWLINE_AND_PUNCTUATION,
    SHAPES_SPECIALS,
    shapes_word_tokenizer,
    word_tokenizer,
)


def test_word_tokenizer_ids_are_vocabulary_positions_and_text_is_lower_cased():
    tok = word_tokenizer(["<pad>", "<unk>", "<s>", "</s>", "red", "circle", "?"], eos_token="</s>")
    assert tok.get_vocab() == {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3, "red": 4, "circle": 5, "?": 6}
    assert tok("RED circle zebra ?", add_special_tokens=False)["input_ids"] == [4, 5, 1, 6]
    assert (tok.pad_token_id, tok.unk_token_id, tok.eos_token_id, tok.padding_side) == (0, 1, 3, "left")


def test_word_tokenizer_splits_on_whitespace_or_keeps_newlines_and_single_marks():
    vocabulary = ["<pad>", "<unk>", "red", "?", ".", "?.", "\n"]
    plain = word_tokenizer(vocabulary)
    marks = word_tokenizer(vocabulary, pre_tokenizer=NEWLINE_AND_PUNCTUATION)
    text = "red?.\nred"
    assert plain.convert_ids_to_tokens(plain(text)["input_ids"]) == ["red", "?.", "red"]
    assert marks.convert_ids_to_tokens(marks(text)["input_ids"]) == ["red", "?", ".", "\n", "red"]


def test_word_tokenizer_specials_stay_whole_and_bos_can_be_prepended():
    tok = word_tokenizer(
        ["<pad>", "<unk>", "<|im_start|>", "<s>", "red"], specials=["<|im_start|>"], bos_token="<s>", prepend_bos=True
    )
    assert tok("<|im_start|>RED")["input_ids"] == [3, 2, 4]
    assert "<|im_start|>" in tok.all_special_tokens


def test_shapes_word_tokenizer_is_one_token_per_shapes_word_after_its_specials():
    tok = shapes_word_tokenizer()
    assert tok.convert_ids_to_tokens(list(range(len(tok)))) == [*SHAPES_SPECIALS, *WORDS]
    ids = tok("what color is the circle?")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["<s>", "what", "color", "is", "the", "circle", "?"]
    assert tok.image_token == "<image>" and tok.bos_token == "<s>" and tok.eos_token == "</s>"


def _net() -> nn.ModuleDict:
    """Matrices are told apart by name, as in the VLMs: ``embed_tokens`` is an embedding."""
    torch.manual_seed(0)
    layers = {"embed_tokens": nn.Embedding(10, 400), "proj": nn.Linear(400, 300), "norm": nn.LayerNorm(300)}
    return nn.ModuleDict(layers)


@pytest.mark.parametrize("seed", [None, 3])
def test_scale_weights_redraws_matrices_at_gain_over_root_fan_in_and_leaves_the_rest(seed):
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    torch.manual_seed(1)
    scale_weights(net, gain=2.0, seed=seed)
    after = net.state_dict()
    assert torch.equal(after["embed_tokens.weight"], before["embed_tokens.weight"])  # embeddings kept
    assert torch.equal(after["proj.bias"], before["proj.bias"])  # vectors kept
    assert torch.equal(after["norm.weight"], before["norm.weight"])
    assert not torch.equal(after["proj.weight"], before["proj.weight"])
    assert after["proj.weight"].std().item() == pytest.approx(2.0 / 400**0.5, rel=0.02)  # 120 000 draws


def test_scale_weights_with_a_seed_ignores_the_global_rng_and_without_one_follows_it():
    drawn = {}
    for key, global_seed, seed in [("a", 1, 5), ("b", 2, 5), ("c", 1, None), ("d", 2, None), ("e", 1, None)]:
        net = _net()
        torch.manual_seed(global_seed)
        scale_weights(net, seed=seed)
        drawn[key] = net["proj"].weight.detach().clone()
    assert torch.equal(drawn["a"], drawn["b"])  # its own generator: the global state does not matter
    assert torch.equal(drawn["c"], drawn["e"]) and not torch.equal(drawn["c"], drawn["d"])
    assert not torch.equal(drawn["a"], drawn["c"])

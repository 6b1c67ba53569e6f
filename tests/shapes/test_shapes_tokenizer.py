"""The Shapes model's LLaVA-1.5-style BPE and template, as saved and loaded back (no trained weights needed)."""

from __future__ import annotations

import json

import pytest
from transformers import AutoProcessor, AutoTokenizer, LlamaTokenizerFast, PreTrainedTokenizerFast

from datamodules.shapes import make_shapes_sample
from dexar.adapters import LlavaAdapter
from dexar.shapes.model import CLIP_MEAN, CLIP_STD, build_shapes_model
from dexar.shapes.tokenizer import build_shapes_processor, train_shapes_tokenizer, word_pieces
from dexar.shapes.vocabulary import COLORS, IMAGE_SIZE, SHAPES


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The Shapes processor saved as a checkpoint directory would hold it."""
    path = tmp_path_factory.mktemp("shapes-processor")
    build_shapes_processor().save_pretrained(path)
    return path


def test_saved_tokenizer_loads_back_as_the_trained_llava_style_bpe(saved):
    # transformers 5 loads every `llava` model's tokenizer as the generic fast tokenizer (llava-hf's too);
    # the file names LLaVA-1.5's class, and that class loads it to the same tokenizer
    tokenizer = AutoTokenizer.from_pretrained(saved)
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    llama = LlamaTokenizerFast.from_pretrained(saved)
    assert isinstance(llama, LlamaTokenizerFast)
    assert llama.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
    config = json.loads((saved / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] in ("LlamaTokenizer", "LlamaTokenizerFast")
    trained = train_shapes_tokenizer()  # training is deterministic: the same tokenizer every time
    assert tokenizer.get_vocab() == trained.get_vocab()
    assert tokenizer.backend_tokenizer.to_str() == trained.backend_tokenizer.to_str()
    ids = tokenizer.convert_tokens_to_ids(["<unk>", "<s>", "</s>", "<0x00>", "<0x0A>", "<0xFF>"])
    assert ids == [0, 1, 2, 3, 13, 258]
    assert tokenizer.convert_ids_to_tokens([len(tokenizer) - 2, len(tokenizer) - 1]) == ["<pad>", "<image>"]
    assert (tokenizer.pad_token, tokenizer.image_token, tokenizer.padding_side) == ("<pad>", "<image>", "left")
    pieces = {word: word_pieces(tokenizer, word) for word in (*COLORS, *SHAPES)}
    assert all(1 <= len(p) <= 3 and p[0].startswith("▁") and "▁" not in "".join(p[1:]) for p in pieces.values())
    assert sum(len(p) >= 2 for p in pieces.values()) > len(pieces) / 2, pieces
    assert pieces["triangle"] == ["▁tri", "an", "gle"] and pieces["yellow"] == ["▁yel", "low"]
    # the LLaVA-1.5 template: <s> in front, the newline by byte fallback, any character round-trips
    prompt = tokenizer("USER: <image>\ndescribe the image. ASSISTANT:")["input_ids"]
    assert prompt[0] == tokenizer.bos_token_id and "<0x0A>" in tokenizer.convert_ids_to_tokens(prompt)
    assert tokenizer.decode(tokenizer("é ☕ x", add_special_tokens=False)["input_ids"]) == "é ☕ x"


def test_word_pieces_are_the_pieces_inside_a_caption():
    tokenizer = train_shapes_tokenizer()
    text = " and ".join(f"a {c} {s}" for c, s in zip(COLORS, SHAPES * 2, strict=False))
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False)["input_ids"])
    expected = [p for word in text.split() for p in word_pieces(tokenizer, word)]
    assert tokens == expected and "<0x78>" not in tokens


def test_saved_processor_is_llava_hf_clip_processing(saved):
    config = json.loads((saved / "processor_config.json").read_text())["image_processor"]
    assert config["image_processor_type"] == "CLIPImageProcessor"
    image_processor = AutoProcessor.from_pretrained(saved).image_processor
    assert image_processor.size == {"shortest_edge": IMAGE_SIZE}
    assert image_processor.crop_size == {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    assert image_processor.do_resize and image_processor.do_center_crop and image_processor.resample == 3
    assert image_processor.do_rescale and image_processor.rescale_factor == pytest.approx(1 / 255)
    assert list(image_processor.image_mean) == list(CLIP_MEAN) and list(image_processor.image_std) == list(CLIP_STD)


def test_answers_follow_assistant_with_a_leading_space(saved):
    processor = AutoProcessor.from_pretrained(saved)
    adapter = LlavaAdapter(build_shapes_model(processor), processor)  # untrained: only the inputs are checked
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

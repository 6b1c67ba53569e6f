"""Public API, CLI and input errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import dexar
from dexar import DexarInputError, explain, load_model
from dexar.pipeline.cli import main as cli_main


@pytest.fixture(scope="module")
def tiny32(tiny_checkpoint):
    return load_model(tiny_checkpoint)


def _image(mode: str, size=(50, 37)) -> Image.Image:
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (*size[::-1], 3), dtype=np.uint8))
    return rgb.convert(mode) if mode != "P" else rgb.convert("P", palette=Image.ADAPTIVE)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "CMYK", "P", "LA", "I;16"])
def test_explain_accepts_every_mode_and_size(tiny32, mode):
    model, processor = tiny32
    exp = explain(model, processor, _image(mode), "describe the image.", answer="i see a red circle")
    assert exp.tokens == ["i", "see", "a", "red", "circle"]
    assert exp.token_maps.shape == (5, 8, 8) and exp.sequence_map.shape == (8, 8)
    assert exp.token_weights.shape == (5,)
    assert torch.isfinite(exp.token_maps).all() and 0 <= exp.sequence_map.min() <= exp.sequence_map.max() <= 1


def test_inputs_and_positions_let_anyone_recompute(tiny32):
    model, processor = tiny32
    exp = explain(model, processor, _image("RGB"), "describe the image.", answer="i see a blue square")
    ids = exp.inputs["input_ids"][0]
    assert ids[exp.answer_positions].tolist() == exp.token_ids
    assert int(exp.answer_positions[-1]) == len(ids) - 1
    again = dexar.Explainer(model, processor).adapter.model(
        **{k: v for k, v in exp.inputs.items() if k != "position_ids"}
    )
    assert again.logits.shape[1] == len(ids)


def test_generated_answer_excludes_eos_unless_asked(tiny32):
    model, processor = tiny32
    exp = explain(model, processor, _image("RGB"), "describe the image.", max_new_tokens=5)
    eos = processor.tokenizer.eos_token_id
    assert eos not in exp.token_ids and len(exp.token_ids) <= 5
    with_eos = explain(model, processor, _image("RGB"), "describe the image.", answer="i see", keep_eos=True)
    assert with_eos.token_ids[-1] == eos and len(with_eos.token_ids) == 3


def test_upsample_and_save(tiny32, tmp_path):
    model, processor = tiny32
    exp = explain(model, processor, _image("RGB"), "describe the image.", answer="i see a red circle")
    up = exp.upsample((37, 50))
    assert up.token_maps.shape == (5, 37, 50) and up.sequence_map.shape == (37, 50)
    out = exp.save(tmp_path / "exp")
    meta = json.loads((out / "explanation.json").read_text())
    assert meta["tokens"] == exp.tokens and len(meta["token_weights"]) == 5
    assert Image.open(out / "sequence.png").size[0] >= 128
    image = _image("RGB")
    assert Image.open(out / "tokens.png").size[0] == 5 * round(128 * image.width / image.height)  # aspect kept


def test_method_options_reach_the_method(tiny32):
    model, processor = tiny32
    a = explain(model, processor, _image("RGB"), "describe the image.", answer="i see a red circle", head_filter="none")
    b = explain(model, processor, _image("RGB"), "describe the image.", answer="i see a red circle")
    assert a.options["head_filter"] == "none" and b.options["head_filter"] == "max"
    with pytest.raises(ValueError, match="unknown method"):
        explain(model, processor, _image("RGB"), "x", answer="red", method="nope")


def test_bad_inputs_give_one_line_errors(tiny32, tmp_path):
    model, processor = tiny32
    with pytest.raises(DexarInputError, match="image not found"):
        explain(model, processor, tmp_path / "missing.png", "describe the image.")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    with pytest.raises(DexarInputError, match="cannot decode image"):
        explain(model, processor, broken, "describe the image.")
    with pytest.raises(DexarInputError, match="must not contain '<image>'"):
        explain(model, processor, _image("RGB"), "<image> describe", answer="red")
    with pytest.raises(DexarInputError, match="cannot load model"):
        load_model(tmp_path / "no-such-model")


def test_unsupported_model_type_lists_supported():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1)
    )
    with pytest.raises(DexarInputError, match=r"supported: .*\bllava\b"):
        dexar.get_adapter(model, None)


def test_cli_explains_and_reports_errors(tiny_checkpoint, tmp_path, capsys):
    image = tmp_path / "img.png"
    _image("RGBA").save(image)
    code = cli_main(
        [
            "explain",
            str(image),
            "--model",
            tiny_checkpoint,
            "--prompt",
            "describe the image.",
            "--answer",
            "i see a red circle",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 0
    assert (tmp_path / "out" / "sequence.png").is_file() and (tmp_path / "out" / "tokens.png").is_file()
    assert "answer: i see a red circle" in capsys.readouterr().out
    code = cli_main(["explain", str(image), "--model", str(tmp_path / "nope"), "--prompt", "x"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("dexar: error: cannot load model") and "\n" not in err
    # a method option the method does not take: refused before any model is loaded (the model path is bad too)
    args = ["explain", str(image), "--model", str(tmp_path / "nope"), "--prompt", "x", "--method", "attention"]
    assert cli_main([*args, "--head-filter", "max"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dexar: error: method 'attention' does not take ['head_filter']") and "\n" not in err
    blocker = tmp_path / "file"
    blocker.write_text("")
    args = ["explain", str(image), "--model", tiny_checkpoint, "--prompt", "x", "--answer", "i see"]
    assert cli_main([*args, "--out", str(blocker / "out")]) == 2  # an output directory that cannot be made
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' weight-loading progress bar
    assert err.startswith(f"dexar: error: cannot write {blocker / 'out'}")


def test_overlay_leaves_low_values_transparent_and_wraps_its_caption():
    from dexar.plotting import MAX_ALPHA, SATURATION, TRANSPARENT_BELOW, blend, colour_bar, overlay, wrap

    image = _image("RGB", (64, 64))
    rgb = np.asarray(image, dtype=float)
    shown = rgb.mean(axis=2, keepdims=True) * (1 - SATURATION) + rgb * SATURATION  # the image under a map
    low = torch.full((8, 8), TRANSPARENT_BELOW)
    assert np.abs(np.asarray(blend(image, low), dtype=float) - shown).max() <= 0.5 + 1e-9  # nothing drawn
    grey = Image.new("RGB", (64, 64), (90, 90, 90))
    assert np.array_equal(np.asarray(blend(grey, low)), np.asarray(grey))  # low values: the image as it is
    high = np.asarray(blend(image, torch.ones(8, 8)), dtype=float)
    expected = shown * (1 - MAX_ALPHA) + np.array([253, 231, 37]) * MAX_ALPHA
    assert np.abs(high - expected).max() <= 0.5 + 1e-9
    caption = "a red circle to the left of a blue square above a small green triangle"
    lines = wrap(caption, 250)
    assert " ".join(lines) == caption and len(lines) > 1  # nothing cut, several lines
    drawn = overlay(image, torch.rand(8, 8), caption=caption)
    plain = overlay(image, torch.rand(8, 8))
    assert drawn.width == plain.width == 256 and drawn.height > plain.height  # small images are enlarged
    assert colour_bar(200).width > 200 and colour_bar(200).getpixel((199, 5)) != (255, 255, 255)

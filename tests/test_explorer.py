"""The HTML explorer without a browser: payload checks, encoding round trips, budgets, W&B media."""

from __future__ import annotations

import base64
import io
import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from dexar.explorer import (
    ExplanationPayload,
    MethodView,
    PieceView,
    RunPayload,
    RunSample,
    WordView,
    group_pieces,
    metric_specs,
    payload_from_explanations,
    render_explanation_html,
    run_payload_from_results,
    wandb_html,
    write_explanation_html,
    write_run_explorer,
)
from dexar.explorer.curves import _ticks, curve_svg
from dexar.explorer.encode import MAP_MAX_SIDE, colormap_hex, image_uri
from dexar.explorer.page import fill, page_data, script_json
from dexar.explorer.run import SIZE_BUDGET, unique_names
from dexar.explorer.synthetic import synthetic_payload, synthetic_run
from dexar.plotting import colorize


def _decode(uri: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))


def _page_json(page: str) -> dict:
    raw = re.search(r'<script type="application/json" id="dx-data">(.*?)</script>', page, re.S).group(1)
    return json.loads(raw)


def _set(path: str, value):
    """A mutation: set the attribute at dotted ``path`` (``methods.0.words.0.map``) of a payload."""

    def mutate(payload):
        *parents, name = path.split(".")
        target = payload
        for part in parents:
            target = target[int(part)] if part.isdigit() else getattr(target, part)
        setattr(target, name, value)

    return mutate


def _one_word_payload(**changes) -> ExplanationPayload:
    grid = np.linspace(0, 1, 16).reshape(4, 4)
    word = WordView(pieces=[PieceView("▁red", 1.0, grid)], weight=1.0, map=grid)
    method = MethodView("dexar", [word], grid)
    payload = ExplanationPayload(image=np.zeros((8, 8, 3), np.uint8), methods=[method], answer="red")
    for key, value in changes.items():
        setattr(payload, key, value)
    return payload


# ---------------------------------------------------------------- payload checks


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (_set("methods.0.sequence_map", np.ones((2, 2, 2))), r"method 'dexar': sequence_map .*shape"),
        (_set("methods.0.words.0.map", np.full((4, 4), np.nan)), r"word 0 \('red'\): map .*non-finite"),
        (_set("methods.0.words.0.pieces.0.map", np.full((4, 4), 1.5)), r"piece 0 .*outside \[0, 1\]"),
        (_set("methods.0.words.0.weight", float("inf")), r"word 0 \('red'\): weight is not finite"),
        (_set("methods.0.words.0.pieces", []), r"method 'dexar', word 0 .* has no pieces"),
        (_set("methods", []), r"`methods` is empty"),
        (lambda p: p.methods.append(p.methods[0]), r"method names repeat"),
        (_set("grid_box", (0, 0, 9, 8)), r"grid_box .* inside the 8×8 image"),
        (_set("image", np.zeros((8, 8, 5), np.uint8)), r"image must be"),
    ],
)
def test_bad_payload_names_the_key_at_fault(mutate, message):
    payload = _one_word_payload()
    mutate(payload)
    with pytest.raises(ValueError, match=message):
        render_explanation_html(payload)


def test_methods_must_explain_the_same_words():
    payload = synthetic_payload(0, methods=("dexar", "attention"))
    payload.methods[1].words[2].text = "another"
    with pytest.raises(ValueError, match="method 'attention' has words .*every method must explain the same answer"):
        page_data(payload)


def test_maps_round_trip_through_8_bit_pngs_and_repeat_maps_are_stored_once():
    payload = synthetic_payload(1, methods=("dexar", "attention"))
    data = page_data(payload)
    for m, method in enumerate(payload.methods):
        out = data["methods"][m]
        for word, word_out in zip(method.words, out["words"], strict=True):
            back = np.asarray(_decode(data["maps"][word_out["map"]]), dtype=np.float64) / 255
            assert back.shape == np.shape(word.map)
            assert np.abs(back - np.asarray(word.map)).max() <= 1 / 510 + 1e-12
            for piece, piece_out in zip(word.pieces, word_out["pieces"], strict=True):
                back = np.asarray(_decode(data["maps"][piece_out["map"]]), dtype=np.float64) / 255
                assert np.abs(back - np.asarray(piece.map)).max() <= 1 / 510 + 1e-12
            if len(word.pieces) == 1:  # a one-piece word: its map and its piece's map are one PNG
                assert word_out["map"] == word_out["pieces"][0]["map"]
        seq = np.asarray(_decode(data["maps"][out["sequence"]]), dtype=np.float64) / 255
        assert np.abs(seq - np.asarray(method.sequence_map)).max() <= 1 / 510 + 1e-12
    assert len(data["maps"]) == len(set(data["maps"]))


def test_maps_placed_on_a_large_image_are_reduced_and_the_crop_box_is_kept():
    big = np.zeros((600, 300))
    big[:300, :150] = 1.0  # the top-left quarter
    payload = _one_word_payload(image=np.zeros((600, 400, 3), np.uint8), grid_box=(50, 0, 350, 600))
    payload.methods[0].sequence_map = big
    data = page_data(payload)
    seq = np.asarray(_decode(data["maps"][data["methods"][0]["sequence"]]), dtype=np.float64) / 255
    assert seq.shape == (MAP_MAX_SIDE, MAP_MAX_SIDE // 2)
    assert seq[: MAP_MAX_SIDE // 2, : MAP_MAX_SIDE // 4].min() == 1 and seq[MAP_MAX_SIDE // 2 :].max() == 0
    assert data["grid_box"] == [50 / 400, 0, 350 / 400, 1]


def test_piece_text_is_shown_without_sentencepiece_markers():
    data = page_data(synthetic_payload(2))
    words = data["methods"][0]["words"]
    shown = [p["text"] for w in words for p in w["pieces"]] + [w["text"] for w in words]
    assert not any("▁" in t for t in shown)
    assert "angle" in shown or "low" in shown or "cle" in shown  # a multi-piece word is there, pieces intact


def test_colour_map_is_the_png_overlays_colour_map():
    ramp = bytes.fromhex(colormap_hex())
    lut = np.frombuffer(ramp, np.uint8).reshape(256, 3)
    for v in (0, 37, 128, 200, 255):
        expected = np.asarray(colorize(np.full((1, 1), v / 255), (1, 1)))[0, 0]
        assert (lut[v] == expected).all()


def test_images_are_png_when_small_or_few_coloured_and_jpeg_when_photographic():
    rng = np.random.default_rng(0)
    assert image_uri(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).startswith("data:image/png")
    assert image_uri(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)).startswith("data:image/jpeg")
    drawing = np.zeros((300, 400, 3), np.uint8)
    drawing[100:200, 100:300] = (220, 50, 47)
    assert image_uri(drawing).startswith("data:image/png")
    assert _decode(image_uri(rng.integers(0, 255, (900, 1200, 3), dtype=np.uint8))).size == (512, 384)


# ---------------------------------------------------------------- the page is self-contained


def test_page_is_self_contained_and_script_safe(tmp_path):
    payload = synthetic_payload(3)
    payload.prompt = 'Say </script><script>alert("x")</script> & <b>'
    path = write_explanation_html(payload, tmp_path)
    page = path.read_text()
    assert path.name == "explanation.html"
    assert "http://" not in page and "https://" not in page and "//cdn" not in page
    assert "default-src 'none'; img-src data:;" in page  # CSP: nothing can be fetched
    assert page.count("</script>") == 2  # the payload cannot close its own script element
    assert _page_json(page)["prompt"] == payload.prompt
    assert re.findall(r"\{\{\w+\}\}", page) == []


def test_script_json_and_fill_do_not_rescan():
    assert script_json({"a": "</script>\u2028&"}) == '{"a":"\\u003c/script\\u003e\\u2028\\u0026"}'
    assert fill("<{{a}}|{{b}}|{{a}}>", a="{{b}}", b="x") == "<{{b}}|x|{{b}}>"
    with pytest.raises(KeyError, match="unknown placeholder"):
        fill("{{nope}}", a="")


# ---------------------------------------------------------------- words from tokens


@pytest.mark.parametrize(
    ("tokens", "answer", "words"),
    [
        (["i", "see", "a", "blue", "square"], "i see a blue square", [[0], [1], [2], [3], [4]]),
        (["▁I", "▁see", "▁a", "▁tri", "angle", ".", "</s>"], "I see a triangle.", [[0], [1], [2], [3, 4, 5], [6]]),
        (["I", "see", "a", "tri", "angle", ".", "</s>"], "I see a triangle.", [[0], [1], [2], [3, 4, 5], [6]]),
        (["Ġred", "Ġcir", "cle"], "", [[0], [1, 2]]),
        (["▁p", "otted", "▁plant"], " potted plant", [[0, 1], [2]]),
        (["▁caf", "<0xC3>", "<0xA9>", "▁ok"], "café ok", [[0, 1, 2], [3]]),
        (["3", "▁cats"], "3 cats", [[0], [1]]),
    ],
)
def test_group_pieces(tokens, answer, words):
    assert group_pieces(tokens, answer) == words


def test_payload_from_explanations_aggregates_pieces_into_words():
    rng = np.random.default_rng(0)
    maps = torch.tensor(rng.random((4, 3, 3)))
    maps[3] = 0
    exp = SimpleNamespace(
        tokens=["▁I", "▁tri", "angle", "▁ok"],
        token_maps=maps,
        token_weights=torch.tensor([0.5, 1.0, 3.0, 0.0]),
        token_empty=torch.tensor([False, False, False, True]),
        sequence_map=torch.tensor(rng.random((3, 3))),
        sequence_empty=False,
        options={"head_filter": "max"},
        answer="I triangle ok",
        image=Image.new("RGB", (12, 12)),
        sample_id="s1",
        method="dexar",
    )
    payload = payload_from_explanations([exp], prompt="p", filler=[True, False, None])
    (view,) = payload.methods
    assert [w.display for w in view.words] == ["I", "triangle", "ok"]
    assert [w.filler for w in view.words] == [True, False, None]
    triangle = view.words[1]
    assert triangle.weight == 3.0 and [p.text for p in triangle.pieces] == ["▁tri", "angle"]
    combined = 1.0 * maps[1].double().numpy() + 3.0 * maps[2].double().numpy()
    expected = (combined - combined.min()) / (combined.max() - combined.min())
    assert np.allclose(triangle.map, expected, atol=1e-6)
    assert np.array_equal(view.words[0].map, maps[0].float().numpy())  # one piece: its own map
    assert view.words[2].empty and not triangle.empty
    assert payload.sample_id == "s1" and payload.answer == "I triangle ok" and view.options == {"head_filter": "max"}
    with pytest.raises(ValueError, match="2 filler flags for 3 words"):
        payload_from_explanations([exp], filler=[True, False])
    with pytest.raises(ValueError, match="has no image"):
        payload_from_explanations([SimpleNamespace(**{**exp.__dict__, "image": None})])


# ---------------------------------------------------------------- run explorer


def test_unique_names():
    assert unique_names(["a/b", "a_b", "A_B", "..", "x y"]) == ["a_b", "a_b-2", "A_B-3", "sample", "x_y"]


def test_run_explorer_writes_index_and_sample_pages_and_removes_stale_ones(tmp_path):
    run = synthetic_run(samples=3)
    (tmp_path / "explorer" / "samples").mkdir(parents=True)
    (tmp_path / "explorer" / "samples" / "old.html").write_text("stale")
    index = write_run_explorer(run, tmp_path)
    assert index == tmp_path / "explorer" / "index.html"
    pages = sorted(p.name for p in (tmp_path / "explorer" / "samples").iterdir())
    assert pages == ["synthetic-000.html", "synthetic-001.html", "synthetic-002.html"]
    data = json.loads(re.search(r'id="dx-run-data">(.*?)</script>', index.read_text(), re.S).group(1))
    assert [s["href"] for s in data["samples"]] == [f"samples/{p}" for p in pages]
    assert data["samples"][1]["metrics"]["attention"]["epg"] == run.samples[1].metrics["attention"]["epg"]
    assert [m["higher_is_better"] for m in data["metrics"]] == [True, True, True, False]
    assert _page_json((tmp_path / "explorer" / "samples" / pages[0]).read_text())["side_by_side"] is True
    with pytest.raises(ValueError, match="no samples"):
        write_run_explorer(RunPayload(samples=[]), tmp_path)


def test_missing_metric_values_are_written_as_null(tmp_path):
    payload = synthetic_payload(0, methods=("dexar",))
    run = RunPayload(samples=[RunSample(payload, {"dexar": {"epg": float("nan"), "iou": None}})])
    index = write_run_explorer(run, tmp_path).read_text()
    data = json.loads(re.search(r'id="dx-run-data">(.*?)</script>', index, re.S).group(1))
    assert data["samples"][0]["metrics"] == {"dexar": {"epg": None, "iou": None}}


def test_run_payload_from_results_json_and_metric_directions(tmp_path):
    from metrics import EnergyPointingGame, NegativePerturbationAUC, PerturbationAUC

    sets = {
        "dexar": {"epg": EnergyPointingGame(), "neg_auc": NegativePerturbationAUC(), "pos_auc": PerturbationAUC()},
        "attention": {"epg": EnergyPointingGame(), "other": object()},
    }
    specs = metric_specs(sets)
    assert [(s.name, s.higher_is_better) for s in specs] == [("epg", True), ("neg_auc", False), ("pos_auc", True)]
    results = {
        "dataset": "ShapesDataModule",
        "model": "shapes-llava",
        "failed_samples": 1,
        "unreadable_samples": 0,
        "results": {"dexar": {"epg": {"value": 0.5, "count": 3, "skipped": 0}}},
        "curves": {"dexar": {"neg_auc": {"levels": [0.0, 0.5], "y": [1.0, 1.2]}}},
    }
    samples = [RunSample(synthetic_payload(0, methods=("dexar",)), {"dexar": {"epg": 0.4}})]
    run = run_payload_from_results(results, samples, specs, title="run-7")
    assert run.means == {"dexar": {"epg": 0.5}} and run.curves == results["curves"]
    assert run.details == {"dataset": "ShapesDataModule", "model": "shapes-llava", "failed samples": "1"}
    index = write_run_explorer(run, tmp_path).read_text()
    assert "Neg. AUC" not in index and "neg_auc ↓" in index  # the curve chart is titled with its direction
    assert "<td>0.5</td>" in index  # the means table


def test_curve_svg_puts_points_where_the_values_are():
    svg = curve_svg("pos ↑", {"A": ([0, 0.5, 1], [1, 2, 3]), "B": ([0, 1], [1, float("nan")])}, {"A": "#111"})
    points = re.search(r'points="([^"]+)" stroke="#111"', svg).group(1).split()
    xs, ys = zip(*[map(float, p.split(",")) for p in points], strict=True)
    assert xs[0] < xs[1] < xs[2] and ys[0] > ys[1] > ys[2]  # SVG y grows downwards
    assert np.isclose(xs[1] - xs[0], xs[2] - xs[1], atol=0.2) and np.isclose(ys[0] - ys[1], ys[1] - ys[2], atol=0.2)
    assert svg.count("<circle") == 4  # B's NaN point is skipped
    assert "<title" in svg and 'role="img"' in svg
    assert _ticks(0, 3.2) == [0, 1, 2, 3] and _ticks(0.9, 1.6) == pytest.approx([1.0, 1.2, 1.4, 1.6])


def test_size_budget_per_sample_and_method_and_for_the_index(tmp_path):
    """The budget of :data:`SIZE_BUDGET` on a run of 20 samples × 3 methods (24×24 grids, up to 12 words).

    The 100-sample run of the browser test checks the same budget at full size."""
    run = synthetic_run(samples=20)
    index = write_run_explorer(run, tmp_path)
    for sample in run.samples:
        methods = len(sample.payload.methods)
        page = tmp_path / "explorer" / "samples" / f"{sample.payload.sample_id}.html"
        assert page.stat().st_size <= SIZE_BUDGET["page_fixed"] + methods * SIZE_BUDGET["page_per_method"]
    assert index.stat().st_size <= SIZE_BUDGET["index_fixed"] + len(run.samples) * SIZE_BUDGET["index_per_sample"]


# ---------------------------------------------------------------- W&B


def test_wandb_html_is_the_page_without_injected_network_css():
    import wandb

    payload = synthetic_payload(4)
    media = wandb_html(payload)
    assert isinstance(media, wandb.Html)
    assert media.html == render_explanation_html(payload, side_by_side=True)
    assert "://" not in media.html  # W&B's stylesheet link is not injected
    assert _page_json(media.html)["side_by_side"] is True


def test_wandb_html_logs_in_an_offline_run_table(tmp_path, monkeypatch):
    """A table cell holding the page is stored (offline) as an ``html-file`` with the whole page."""
    import wandb

    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "data"))  # the table artifact's staging files
    run = wandb.init(mode="offline", dir=str(tmp_path), project="explorer-test")
    try:
        table = wandb.Table(columns=["sample", "explanation"], data=[["s0", wandb_html(synthetic_payload(5))]])
        run.log({"per_sample": table})
    finally:
        run.finish()
        wandb.teardown()  # the singleton keeps this test's settings (online mode): later WandbLoggers would log in
    staged = [p.read_text(errors="replace") for p in (tmp_path / "data").rglob("*") if p.is_file()]
    tables = [json.loads(t) for t in staged if t.startswith('{"_type": "table"')]
    assert tables and tables[0]["column_types"]["params"]["type_map"]["explanation"]["params"]["allowed_types"][0] == {
        "wb_type": "html-file"
    }
    pages = [t for t in staged if 'id="dx-data"' in t]
    assert len(pages) == 1 and _page_json(pages[0])["sample_id"] == "synthetic-005"

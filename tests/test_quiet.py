"""Noise a user cannot act on (issue 13.11): fixed where it is ours, filtered by message where it is not."""

from __future__ import annotations

import json
import logging
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from PIL import Image

from callbacks.wandb_media import WandbMedia
from dexar import explain, load_model
from train_eval import quiet_known_noise


@pytest.fixture(scope="module")
def tiny32(tiny_checkpoint):
    return load_model(tiny_checkpoint)


@pytest.mark.parametrize("method", ["dexar", "iia"])
def test_tracing_passes_the_kv_cache_under_one_name(tiny32, method):
    """Decoder layers are re-run with their own call's kwargs: no `past_key_values` next to `cache`."""
    model, processor = tiny32
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (37, 50, 3), dtype=np.uint8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        explain(model, processor, image, "describe the image.", answer="i see a red circle", method=method)
    assert not [w for w in caught if "past_key_values" in str(w.message)]


def test_wandb_overlay_lists_hold_one_image_size(tmp_path):
    """Sequence overlays and token strips go to separate lists, each padded to one size (no W&B size warning)."""
    for i, (size, tokens) in enumerate([((128, 128), 3), ((160, 128), 5)]):
        sample = tmp_path / "overlays" / "dexar" / f"s{i}"
        sample.mkdir(parents=True)
        (sample / "explanation.json").write_text(json.dumps({"sample_id": f"s{i}", "answer": "a red circle"}))
        Image.new("RGB", size, "red").save(sample / "sequence.png")
        Image.new("RGB", (128 * tokens, 160), "blue").save(sample / "tokens.png")
    fake = SimpleNamespace(Image=lambda image, caption: (image, caption))
    logged = WandbMedia()._overlays(tmp_path, fake)
    assert sorted(logged) == ["overlays/dexar/sequence", "overlays/dexar/tokens"]
    for images in logged.values():
        assert len(images) == 2 and len({image.size for image, _ in images}) == 1
    first, _ = logged["overlays/dexar/tokens"][0]
    assert first.size == (640, 160) and first.getpixel((0, 0)) == (0, 0, 255)  # padded, never rescaled
    assert [c for _, c in logged["overlays/dexar/sequence"]] == ["s0: a red circle", "s1: a red circle"]


def test_known_noise_is_filtered_by_message_only(caplog):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_known_noise()
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning, stacklevel=1)
        warnings.warn("some other deprecation", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["some other deprecation"]
    with caplog.at_level(logging.INFO):
        rank_zero_info("💡 Tip: For seamless cloud logging, try installing litlogger")
        rank_zero_info("GPU available: False, used: False")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False, used: False"]

"""VQAv2 datamodule: official JSON + COCO layout and Hugging Face layouts; meta; errors; subsets."""

from __future__ import annotations

import json

import pytest

from datamodules.common import DatasetLayoutError
from datamodules.fixtures import drain, make_vqav2, make_vqav2_hf
from datamodules.vqav2 import VQAv2DataModule


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("vqav2")
    return {
        "official": make_vqav2(base / "official"),
        "hf-parquet": make_vqav2_hf(base / "hf-parquet", "parquet"),
        "hf-disk": make_vqav2_hf(base / "hf-disk", "disk"),
    }


def _dm(root, tmp_path=None, **kw):
    kw.setdefault("num_samples", None)
    kw.setdefault("num_workers", 0)
    if tmp_path is not None:
        kw["cache_dir"] = str(tmp_path / "hf-cache")
    return VQAv2DataModule(str(root), **kw)


@pytest.mark.parametrize("layout", ["official", "hf-parquet", "hf-disk"])
def test_pairs_with_question_prompt_answer_and_types(roots, layout, tmp_path):
    fx = roots[layout]
    dm = _dm(fx.root, tmp_path)
    samples = drain(dm)
    assert [s.id for s in samples] == [f"vqav2-val-{q}" for q in fx.keys if q not in fx.broken]
    assert sorted(i for i, _ in dm.skipped) == sorted(f"vqav2-val-{q}" for q in fx.broken) and fx.broken
    for s in samples:
        qid = s.meta["question_id"]
        assert s.answer == fx.labels[qid] and s.image.mode == "RGB" and s.image.size == (40, 30)
        assert (
            s.prompt.endswith("?")
            and s.meta["question_type"]
            and s.meta["answer_type"] in ("yes/no", "number", "other")
        )
        assert s.meta["image_id"] == qid // 1000 and s.meta["answers"] == [s.answer] * 10
        assert s.masks is None and s.word_is_content is None
    assert {fx.kinds[s.meta["question_id"]] for s in samples} == {"rgb", "gray", "cmyk"}


def test_subset_seeded_and_same_for_official_and_hub(roots, tmp_path):
    ids = []
    for layout in ("official", "hf-parquet", "official"):
        dm = _dm(roots[layout].root, tmp_path, num_samples=5, seed=3)
        dm.setup()
        ids.append(dm.dataset.ids)
    assert ids[0] == ids[1] == ids[2] and len(ids[0]) == 5
    other = _dm(roots["official"].root, num_samples=5, seed=4)
    other.setup()
    assert other.dataset.ids != ids[0]


def test_errors_name_the_expected_paths(roots, tmp_path):
    with pytest.raises(DatasetLayoutError) as err:
        _dm(tmp_path / "nowhere").setup()
    assert "v2_OpenEnded_mscoco_val2014_questions.json" in str(err.value) and str(tmp_path / "nowhere") in str(
        err.value
    )
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "v2_OpenEnded_mscoco_val2014_questions.json").write_text('{"questions": []}')
    with pytest.raises(DatasetLayoutError, match="v2_mscoco_val2014_annotations.json not found"):
        _dm(tmp_path / "partial").setup()
    (tmp_path / "partial" / "v2_mscoco_val2014_annotations.json").write_text("{not json")
    (tmp_path / "partial" / "val2014").mkdir()
    with pytest.raises(DatasetLayoutError, match="unreadable question/annotation JSON"):
        _dm(tmp_path / "partial").setup()
    (tmp_path / "partial" / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(
        json.dumps({"questions": [{"image_id": 1, "question": "q?", "question_id": 1000}]})
    )
    (tmp_path / "partial" / "v2_mscoco_val2014_annotations.json").write_text('{"annotations": []}')
    with pytest.raises(DatasetLayoutError, match="have no annotation"):
        _dm(tmp_path / "partial").setup()


def test_missing_coco_image_is_skipped_not_fatal(roots, tmp_path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(roots["official"].root, root)
    (root / "val2014" / "COCO_val2014_000000000100.jpg").unlink()
    dm = _dm(root)
    samples = drain(dm)
    assert all(s.meta["image_id"] != 100 for s in samples)
    assert sum("FileNotFoundError" in reason for _, reason in dm.skipped) == 3

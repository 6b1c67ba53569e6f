"""ImageNet datamodule: folder, flat (+CSV), Kaggle and Hugging Face layouts; labels; errors; subsets."""

from __future__ import annotations

import shutil

import pytest

from datamodules.common import DatasetLayoutError
from datamodules.fixtures import drain, make_imagenet, make_imagenet_hf
from datamodules.imagenet import ImageNetDataModule, imagenet_classes, wnid_to_index


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("imagenet")
    out = {layout: make_imagenet(base / layout, layout) for layout in ("folders", "flat", "kaggle")}
    out.update({f"hf-{fmt}": make_imagenet_hf(base / f"hf-{fmt}", fmt) for fmt in ("parquet", "disk")})
    return out


def _dm(root, tmp_path=None, **kw):
    kw.setdefault("num_samples", None)
    kw.setdefault("num_workers", 0)
    if tmp_path is not None:
        kw["cache_dir"] = str(tmp_path / "hf-cache")
    return ImageNetDataModule(str(root), **kw)


def test_class_table_is_complete():
    classes = imagenet_classes()
    assert len(classes) == 1000 and len(wnid_to_index()) == 1000
    assert [c.wnid for c in classes] == sorted(c.wnid for c in classes)
    assert classes[0].wnid == "n01440764" and classes[0].name == "tench" and classes[0].names == "tench, Tinca tinca"
    assert classes[999].wnid == "n15075141"
    assert classes[134].clean_name != classes[517].clean_name, "the two 'crane' classes are told apart"


@pytest.mark.parametrize("layout", ["folders", "flat", "kaggle", "hf-parquet", "hf-disk"])
def test_every_layout_gives_rgb_samples_with_labels(roots, layout, tmp_path):
    fx = roots[layout]
    dm = _dm(fx.root, tmp_path)
    samples = drain(dm)
    assert [s.id for s in samples] == [f"imagenet-val-{k}" for k in fx.keys if k not in fx.broken]
    assert dm.skipped == [(f"imagenet-val-{k}", dm.skipped[0][1]) for k in fx.broken]
    for s in samples:
        key = s.meta["file"]
        wnid = fx.labels[key]
        assert s.image.mode == "RGB" and s.image.size == (40, 30)
        assert s.prompt == "Classify the image."
        assert s.meta["wnid"] == wnid and s.meta["label"] == wnid_to_index()[wnid]
        assert s.answer == imagenet_classes()[s.meta["label"]].name
        assert s.word_is_content == [True] * len(s.answer.split())
    kinds = {fx.kinds[s.meta["file"]] for s in samples}
    assert kinds == {"rgb", "gray", "cmyk"}


def test_answer_template_and_prompt(roots):
    dm = _dm(roots["folders"].root, prompt="What is this?", answer_template="This is {article} {name}.")
    dm.setup()
    s = dm.dataset[0]
    assert s.prompt == "What is this?" and s.answer == "This is a tench."
    assert s.word_is_content == [False, False, False, True]
    fox = next(
        x for x in drain(_dm(roots["folders"].root, answer_template="{article} {name}")) if x.meta["label"] == 278
    )
    assert fox.answer == "a kit fox" and fox.word_is_content == [False, True, True]
    with pytest.raises(KeyError, match="bogus"):
        _dm(roots["folders"].root, answer_template="{bogus}").setup()


def test_subset_is_seeded_and_identical_across_layouts_runs_and_workers(roots, tmp_path):
    ids = {}
    for layout in ("folders", "flat", "hf-parquet"):
        dm = _dm(roots[layout].root, tmp_path, num_samples=4, seed=11)
        dm.setup()
        ids[layout] = dm.dataset.ids
    assert ids["folders"] == ids["flat"] == ids["hf-parquet"] and len(ids["folders"]) == 4
    again = _dm(roots["folders"].root, num_samples=4, seed=11)
    again.setup()
    assert again.dataset.ids == ids["folders"]
    other = _dm(roots["folders"].root, num_samples=4, seed=12)
    other.setup()
    assert other.dataset.ids != ids["folders"]
    with_workers = _dm(roots["folders"].root, num_samples=4, seed=11, num_workers=2, batch_size=2)
    seen = [s.id for s in drain(with_workers)] + [i for i, _ in with_workers.skipped]
    assert sorted(seen) == sorted(ids["folders"])


def test_missing_root_fails_at_setup_naming_path_and_layouts(tmp_path):
    dm = _dm(tmp_path / "nowhere")  # constructing is fine; setup fails
    with pytest.raises(DatasetLayoutError) as err:
        dm.setup()
    msg = str(err.value)
    assert str(tmp_path / "nowhere") in msg and "<wnid>/*.JPEG" in msg and "LOC_val_solution.csv" in msg
    assert "parquet" in msg


def test_wrong_layouts_fail_at_setup(roots, tmp_path):
    (tmp_path / "empty" / "val").mkdir(parents=True)
    with pytest.raises(DatasetLayoutError, match="no class folders and no images"):
        _dm(tmp_path / "empty").setup()
    shutil.copytree(roots["flat"].root / "val", tmp_path / "nocsv" / "val")
    with pytest.raises(DatasetLayoutError, match="LOC_val_solution.csv"):
        _dm(tmp_path / "nocsv").setup()
    (tmp_path / "badfolder" / "val" / "cats").mkdir(parents=True)
    with pytest.raises(DatasetLayoutError, match="not a class folder named by a wnid"):
        _dm(tmp_path / "badfolder").setup()
    (tmp_path / "nosplit").mkdir()
    with pytest.raises(DatasetLayoutError, match="no image folder"):
        _dm(tmp_path / "nosplit").setup()
    with pytest.raises(DatasetLayoutError, match="no parquet file of split 'test'"):
        _dm(roots["hf-parquet"].root, tmp_path, split="test").setup()
    with pytest.raises(DatasetLayoutError, match="no split 'test'"):
        _dm(roots["hf-disk"].root, split="test").setup()


def test_hf_source_without_label_column_fails(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"img": [b"x"]})
    (tmp_path / "data").mkdir()
    ds.to_parquet(str(tmp_path / "data" / "validation-00000-of-00001.parquet"))
    with pytest.raises(DatasetLayoutError, match=r"no column\(s\) \['image', 'label'\]"):
        _dm(tmp_path, tmp_path).setup()


def test_hf_split_selection(roots, tmp_path):
    dm = _dm(roots["hf-parquet"].root, tmp_path, split="train")
    dm.setup()
    assert dm.dataset.ids == ["imagenet-train-n01440764_1"]


def test_hidden_folders_and_files_are_ignored_and_stray_folders_named(roots, tmp_path):
    root = tmp_path / "stray"
    shutil.copytree(roots["folders"].root, root)
    (root / "val" / ".ipynb_checkpoints").mkdir()  # Jupyter leaves one in every folder it opens
    (root / "val" / "n01440764" / ".ipynb_checkpoints").mkdir()
    (root / "val" / "n01440764" / "._ILSVRC2012_val_00000001.JPEG").write_bytes(b"macOS resource fork")
    dm, clean = _dm(root), _dm(roots["folders"].root)
    dm.setup()
    clean.setup()
    assert dm.dataset.ids == clean.dataset.ids
    for name in ("cats", "dogs"):
        (root / "val" / name).mkdir()
    with pytest.raises(DatasetLayoutError, match=r"not a class folder named by a wnid: cats, dogs \(hidden"):
        _dm(root).setup()


def test_parquet_search_stays_where_the_layouts_put_parquet_files(roots, tmp_path):
    """A class-folder root is never walked: a parquet file deep in train/ neither counts nor is found."""
    root = tmp_path / "deep"
    shutil.copytree(roots["folders"].root, root)
    deep = root / "train" / "n01440764" / "extra"
    deep.mkdir(parents=True)
    shutil.copy(next((roots["hf-parquet"].root / "data").glob("validation-*.parquet")), deep / "validation-0.parquet")
    dm = _dm(root)
    dm.setup()
    assert dm.dataset.source.layout == "folders"
    assert dm.dataset.ids == [f"imagenet-val-{k}" for k in roots["folders"].keys]
    # the hub's own parquet layouts are still found: ROOT/data/*.parquet and ROOT/<config>/<split>/*.parquet
    nested = tmp_path / "nested" / "default" / "validation"
    nested.mkdir(parents=True)
    shutil.copy(next((roots["hf-parquet"].root / "data").glob("validation-*.parquet")), nested / "0000.parquet")
    dm = _dm(tmp_path / "nested", tmp_path)
    dm.setup()
    assert len(dm.dataset) == len(roots["hf-parquet"].keys)

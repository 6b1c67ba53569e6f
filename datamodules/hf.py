"""Local Hugging Face ``datasets`` sources: a ``save_to_disk`` directory or parquet files (no network).

Images stay encoded (``Image(decode=False)``): the benchmark dataset decodes each one once, in the
DataLoader worker, and can skip an unreadable one instead of failing inside ``datasets``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from datamodules.common import split_aliases, subfolders

HF_LAYOUT = "Hugging Face save_to_disk directory or *.parquet in ROOT, ROOT/<dir> or ROOT/<dir>/<split> ({columns})"


def is_saved_dataset(root: Path) -> bool:
    """Whether ``root`` is a ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` directory."""
    return (root / "dataset_dict.json").is_file() or (root / "state.json").is_file()


def parquet_files(root: Path, split: str) -> list[Path]:
    """Every parquet file where the layout puts them: ``ROOT``, ``ROOT/<dir>``, ``ROOT/<dir>/<split>``.

    Only these folders are listed, never the whole tree: an image root (ImageNet's ``train/`` holds
    1.28M files) costs one listing of each top-level folder. Hidden folders are skipped.
    """
    if not root.is_dir():
        return []
    folders = [root]
    for name in subfolders(root):
        folders.append(root / name)
        folders += [root / name / alias for alias in split_aliases(split) if (root / name / alias).is_dir()]
    return sorted(f for folder in folders for f in folder.glob("*.parquet") if f.is_file())


def is_hf_root(root: Path, split: str) -> bool:
    """Whether ``root`` is a ``datasets`` directory or holds parquet files where the layout puts them."""
    return is_saved_dataset(root) or bool(parquet_files(root, split))


def _split_parquet_files(root: Path, split: str) -> list[Path]:
    """Parquet files of ``split``: a path part named after the split or starting with ``<split>-``/``_``."""
    files = parquet_files(root, split)
    for alias in split_aliases(split):
        chosen = []
        for f in files:
            parts = f.relative_to(root).parts
            if any(p == alias or p.startswith((f"{alias}-", f"{alias}_", f"{alias}.")) for p in parts):
                chosen.append(f)
        if chosen:
            return chosen
    return []


def open_hf_split(root: Path, split: str, cache_dir: str | None = None) -> tuple[Any, str]:
    """Open ``split`` of a local ``datasets`` source.

    Args:
        root: A ``save_to_disk`` directory (``Dataset`` or ``DatasetDict``) or a folder with parquet files.
        split: Split name; ``val`` also matches ``validation``.
        cache_dir: Where ``datasets`` keeps the Arrow copy it makes of parquet files (default: its cache).

    Returns:
        The ``datasets.Dataset`` and a description of what was opened.

    Raises:
        FileNotFoundError: No such split under ``root`` (the message lists what was found).

    """
    import datasets

    if is_saved_dataset(root):
        loaded = datasets.load_from_disk(str(root))
        if isinstance(loaded, datasets.DatasetDict):
            for alias in split_aliases(split):
                if alias in loaded:
                    return loaded[alias], f"load_from_disk({root})[{alias!r}]"
            raise FileNotFoundError(f"no split {split!r} in {root} (splits: {sorted(loaded)})")
        return loaded, f"load_from_disk({root})"
    files = _split_parquet_files(root, split)
    if not files:
        found = [str(f.relative_to(root)) for f in parquet_files(root, split)][:5]
        raise FileNotFoundError(f"no parquet file of split {split!r} under {root} (found: {found})")
    ds = datasets.Dataset.from_parquet([str(f) for f in files], cache_dir=cache_dir)
    return ds, f"{len(files)} parquet file(s) under {root}"


def require_columns(ds: Any, columns: tuple[str, ...]) -> list[str]:
    """Names of ``columns`` missing from the dataset."""
    return [c for c in columns if c not in ds.column_names]


def arrow_column(ds: Any, name: str) -> Any:
    """One column as a pyarrow array (no decoding, no copy of the other columns)."""
    return ds.with_format("arrow")[name]


def image_paths(ds: Any, column: str = "image") -> list[str | None]:
    """The ``path`` field of an image column (``None`` where absent), read without the bytes."""
    import pyarrow as pa
    import pyarrow.compute as pc

    col = arrow_column(ds, column)
    if not pa.types.is_struct(col.type) or col.type.get_field_index("path") < 0:
        return [None] * len(ds)
    return pc.struct_field(col, "path").to_pylist()


def encoded_images(ds: Any, column: str = "image") -> Any:
    """The dataset reduced to its image column, with images left encoded (``{bytes, path}`` dicts)."""
    import datasets

    return ds.select_columns([column]).cast_column(column, datasets.Image(decode=False))


def image_source(cell: dict[str, Any], root: Path) -> bytes | str:
    """Encoded bytes of an image cell, or its file path (relative paths resolve against ``root``)."""
    if cell.get("bytes"):
        return cell["bytes"]
    path = cell.get("path")
    if not path:
        raise ValueError("image cell has neither bytes nor path")
    return str(path if Path(path).is_absolute() else root / path)

"""Read the records of a W&B run file (``run-*.wandb``) back, offline, without the W&B service.

The file is a LevelDB-style log (``:W&B`` header, 32 KiB blocks, records split into FULL / FIRST /
MIDDLE / LAST chunks) of ``wandb_internal.Record`` protobufs. Used to check what a run logged.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

_HEADER = 7
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def iter_records(path: str | Path) -> Iterator[Any]:
    """Yield every ``Record`` protobuf of a ``.wandb`` file in order."""
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file (missing ':W&B' header)")
    pos, pending = _HEADER, b""
    while pos + 7 <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < 7:  # block trailer padding
            pos += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        if kind in (_FULL, _FIRST):
            pending = chunk
        else:
            pending += chunk
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def wait_for_exit(run_dir: str | Path, timeout: float = 60.0) -> None:
    """Wait until the run file of ``run_dir`` holds its ``exit`` record (the run's last).

    ``wandb.Run.finish()`` can return before W&B's service process has written an offline run's
    records: on a loaded machine a read right after it found the file without a single history,
    summary or config record.

    Raises:
        TimeoutError: No exit record after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        files = sorted(Path(run_dir).glob("run-*.wandb"))
        if files and _has_exit(files[0]):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"no exit record in the run file of {run_dir} after {timeout:.0f} s")
        time.sleep(0.1)


def _has_exit(path: Path) -> bool:
    try:
        return any(record.WhichOneof("record_type") == "exit" for record in iter_records(path))
    except Exception:  # noqa: BLE001 - a file caught mid-write
        return False


def read_run(run_dir: str | Path) -> dict[str, Any]:
    """History rows, summary and config of an offline run directory (``wandb/offline-run-*``)."""
    files = sorted(Path(run_dir).glob("run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"no run-*.wandb file in {run_dir}")
    history: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    config: dict[str, Any] = {}
    for record in iter_records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            summary.update({_key(i): json.loads(i.value_json) for i in record.summary.update})
        elif kind == "config":
            config.update({_key(i): json.loads(i.value_json) for i in record.config.update})
    return {"history": history, "summary": summary, "config": config}


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)

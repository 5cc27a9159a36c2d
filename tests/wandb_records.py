"""Read an offline W&B run back: ``run-<id>.wandb`` is a log of protobuf ``Record``s in LevelDB's log
format (wandb 0.31 ships the message definitions, ``wandb.proto.wandb_internal_pb2``, but no reader).

Layout: a 7-byte header (``:W&B``, magic 0xBEE1, version 0), then 32 KiB blocks of chunks, each with a
7-byte header (CRC-32 of type + data, length, type: 1 full, 2 first, 3 middle, 4 last); a block's last
bytes, when fewer than 7, are padding.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BLOCK = 32768
HEADER = struct.Struct("<4sHB")
CHUNK = struct.Struct("<IHB")
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> Iterator[Any]:
    """Every ``Record`` of an offline run's ``.wandb`` file, in order (CRC-checked)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    ident, magic, version = HEADER.unpack_from(data, 0)
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), (ident, magic, version)
    pos, parts = HEADER.size, []
    while pos + CHUNK.size <= len(data):
        left = BLOCK - pos % BLOCK
        if left < CHUNK.size:  # padding at the end of a block
            pos += left
            continue
        crc, length, kind = CHUNK.unpack_from(data, pos)
        if length == 0 and kind == 0:  # zeros: the rest of a block never written
            pos += left
            continue
        body = data[pos + CHUNK.size : pos + CHUNK.size + length]
        assert zlib.crc32(body, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == crc, f"bad CRC at byte {pos} of {path}"
        pos += CHUNK.size + length
        parts.append(body)
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record


def summary(path: Path) -> dict[str, Any]:
    """What a test asks of a run: its id, name, group and tags, the config (``{key: value}``), the
    history (``{key: [(step, value), ...]}``; a table's fields under ``<key>/<field>``) and the
    artifacts (their records)."""
    out: dict[str, Any] = {"run": None, "config": {}, "history": {}, "artifacts": [], "exit": None}
    for r in records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out["run"] = r.run
            for item in r.run.config.update:
                out["config"][item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in r.config.update:
                key = item.key or ".".join(item.nested_key)
                out["config"][key] = json.loads(item.value_json)
        elif kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            step = items.get("trainer/global_step", items.get("_step"))
            for key, value in items.items():
                out["history"].setdefault(key, []).append((step, value))
        elif kind == "artifact":
            out["artifacts"].append(r.artifact)
        elif kind == "exit":
            out["exit"] = r.exit.exit_code
    return out

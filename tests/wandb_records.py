"""Read the records of an offline W&B run file (``run-<id>.wandb``) back, for the tracking tests.

The file is a LevelDB-style log: a 7-byte header (":W&B", magic, version), then 32 KiB blocks of chunks,
each with a 7-byte header (crc32 4, length 2, type 1: full/first/middle/last) and a piece of a serialized
``wandb_internal_pb2.Record``. wandb 0.2x+ has no Python reader for it any more.
"""

import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK, HEADER, FILE_HEADER = 32 * 1024, 7, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list[wandb_internal_pb2.Record]:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    records, pending, position = [], b"", FILE_HEADER
    while position + HEADER <= len(data):
        space_left = BLOCK - position % BLOCK
        if space_left < HEADER:  # block trailer padding
            position += space_left
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[position:position + HEADER])
        chunk = data[position + HEADER:position + HEADER + length]
        position += HEADER + length
        if kind in (FULL, FIRST):
            pending = chunk
        elif kind in (MIDDLE, LAST):
            pending += chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def logged_keys(path: Path) -> tuple[set[str], set[str]]:
    """(history metric keys, config keys) of a run file."""
    history, config = set(), set()
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history |= {item.key or "/".join(item.nested_key) for item in record.history.item}
        elif kind == "config":
            config |= {item.key or "/".join(item.nested_key) for item in record.config.update}
    return history, config

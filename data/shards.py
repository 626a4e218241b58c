"""The challenge's .bin token shards as data/ reads, writes and names them (every data/ module gets them here).

A shard is SHARD_HEADER_WORDS little-endian int32 header words (SHARD_MAGIC, SHARD_VERSION, the token count, then
zeros) followed by that many little-endian uint16 token ids; every document starts with BOS_ID (no EOS). The format
and its reader, load_data_shard, are training's own (train_gpt.py: one implementation) and are imported from there;
this module adds the header bytes, the writer, the header reader and the file names of a split's shards and of
their byte sidecars (data/caseops.py). See data/README.md.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]  # where train_gpt.py is
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from train_gpt import BOS_ID, SHARD_HEADER_WORDS, SHARD_MAGIC, SHARD_VERSION, load_data_shard  # noqa: E402

__all__ = [
    "BOS_ID",
    "SHARD_HEADER_WORDS",
    "SHARD_MAGIC",
    "SHARD_VERSION",
    "SIDECAR_TAG",
    "load_data_shard",
    "read_header",
    "shard_header",
    "shard_name",
    "sidecar_name",
    "write_shard",
]

SIDECAR_TAG = "_bytes_"  # fineweb_val_000000.bin -> fineweb_val_bytes_000000.bin


def shard_name(split: str, index: int, sidecar: bool = False) -> str:
    """The file name of a split's index-th shard (fineweb_val_000000.bin), or of its byte sidecar."""
    return f"fineweb_{split}{SIDECAR_TAG if sidecar else '_'}{index:06d}.bin"


def sidecar_name(val_name: str) -> str:
    """The byte sidecar's file name beside a validation shard's."""
    return val_name.replace("fineweb_val_", "fineweb_val" + SIDECAR_TAG, 1)


def shard_header(num_tokens: int) -> bytes:
    """The header bytes of a shard of num_tokens tokens."""
    header = np.zeros(SHARD_HEADER_WORDS, dtype="<i4")
    header[0], header[1], header[2] = SHARD_MAGIC, SHARD_VERSION, num_tokens
    return header.tobytes()


def read_header(path) -> np.ndarray:
    """The header words of the shard at path, unchecked (load_data_shard checks them)."""
    return np.fromfile(path, dtype="<i4", count=SHARD_HEADER_WORDS)


def write_shard(path, tokens) -> Path:
    """Write tokens (any integer array-like, values 0..65535) as one shard; the file appears atomically."""
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or (tokens.size and tokens.dtype.kind not in "iu"):
        raise ValueError(f"{path}: tokens must be a 1-D integer array, got shape {tokens.shape} {tokens.dtype}")
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) > 0xFFFF):
        raise ValueError(f"{path}: token ids must fit in uint16, got range {tokens.min()}..{tokens.max()}")
    if tokens.size >= 2**31:
        raise ValueError(f"{path}: {tokens.size} tokens do not fit the int32 count of the header")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(shard_header(int(tokens.size)))
        f.write(tokens.astype("<u2").tobytes())
    os.replace(tmp, path)
    return path

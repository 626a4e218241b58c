"""Token shard tools for the challenge's FineWeb export.

The shard *reader* is train_gpt.load_data_shard (one implementation, shared with training); this file adds
the writer and, as a command line tool, the downloader and inspector.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

DATA_DIR = Path(__file__).resolve().parent
REPO_ROOT = DATA_DIR.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from train_gpt import SHARD_HEADER_WORDS, SHARD_MAGIC, SHARD_VERSION, Fail, load_data_shard  # noqa: E402

HEADER_BYTES = SHARD_HEADER_WORDS * 4


def shard_header(num_tokens: int) -> bytes:
    header = np.zeros(SHARD_HEADER_WORDS, dtype="<i4")
    header[0], header[1], header[2] = SHARD_MAGIC, SHARD_VERSION, num_tokens
    return header.tobytes()


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

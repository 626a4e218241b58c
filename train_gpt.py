"""Parameter Golf record stack: SLOT + LeakyReLU^2 + legal score-first TTT + Parallel Muon.

One file: settings -> data -> model -> optimizer -> training -> export -> evaluation.
Launch: torchrun --standalone --nproc_per_node=8 train_gpt.py (or python train_gpt.py).
Every hyperparameter is an environment variable; see README.md for the table.
"""
from __future__ import annotations

import copy, difflib, glob, io, json, lzma, math, os, sys, time, uuid
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

# ----------------------------------------------------------------------------- settings

DEFAULTS = dict(
    DATA_PATH="./data/datasets/fineweb10B_sp1024", TOKENIZER_PATH="./data/tokenizers/fineweb_1024_bpe.model",
    RUN_ID="", SEED=1337, OUTPUT_DIR=".", DEVICE="auto", ATTN_BACKEND="auto", COMPILE="auto",
    ITERATIONS=9000, WARMUP_STEPS=20, WARMDOWN_ITERS=3500, MAX_WALLCLOCK_SECONDS=600.0,
    TRAIN_BATCH_TOKENS=786432, TRAIN_SEQ_LEN=2048, TRAIN_LOG_EVERY=500, VAL_LOSS_EVERY=4000,
    VAL_BATCH_SIZE=524288, VAL_MAX_TOKENS=0, EVAL_SEQ_LEN=2048, EVAL_STRIDE=64, EVAL_BATCH_SEQS=32,
    VOCAB_SIZE=1024, NUM_LAYERS=11, MODEL_DIM=512, NUM_HEADS=8, NUM_KV_HEADS=4, MLP_MULT=3.0,
    TIED_EMBED_INIT_STD=0.005, LOGIT_SOFTCAP=30.0, ROPE_BASE=10000.0, ROPE_DIMS=16, ROPE_TRAIN_SEQ_LEN=1024,
    QK_GAIN_INIT=1.5, LN_SCALE=1, XSA_LAST_N=4, BIGRAM_VOCAB_SIZE=1536, BIGRAM_DIM=128,
    VE_ENABLED=1, VE_DIM=128, VE_LAYERS="9,10",
    MATRIX_LR=0.025, SCALAR_LR=0.025, TIED_EMBED_LR=0.035, MUON_MOMENTUM=0.99,
    MUON_MOMENTUM_WARMUP_START=0.92, MUON_MOMENTUM_WARMUP_STEPS=1500, MUON_BACKEND_STEPS=5,
    MUON_WD=0.04, ADAM_WD=0.04, BETA1=0.9, BETA2=0.95, ADAM_EPS=1e-8, GRAD_CLIP_NORM=0.3, GRAD_CLIP_LOCAL=0,
    EMA_ENABLED=1, EMA_DECAY=0.997, SWA_ENABLED=1, SWA_EVERY=50, SWA_THRESHOLD=0.2,
    LATE_QAT=1, LATE_QAT_THRESHOLD=0.15, LATE_QAT_BANKS=1,
    COMPRESSOR="lzma", ARTIFACT_LIMIT_BYTES=16_000_000, EVAL_ONLY=0, ARTIFACT_PATH="",
    TTT_ENABLED=1, TTT_LR=0.002, TTT_EPOCHS=3, TTT_CHUNK_TOKENS=32768, TTT_FREEZE_BLOCKS=0,
    TTT_MOMENTUM=0.9, TTT_BATCH_SEQS=32, TTT_GRAD_CLIP=1.0,
    SLOT_ENABLED=1, SLOT_LR=0.003, SLOT_STEPS=5, SLOT_MODE="causal",
)
CHOICES = dict(DEVICE=("auto", "cuda", "cpu"), ATTN_BACKEND=("auto", "fa3", "fa2", "sdpa"),
               COMPILE=("auto", "0", "1"), COMPRESSOR=("lzma", "zstd", "best"), SLOT_MODE=("causal", "batch"))
LAUNCHER_VARS = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "GROUP_RANK", "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE"}


class Fail(Exception):
    """A problem with the user's input: reported as one line, no traceback."""


def parse_settings(env=os.environ) -> dict:
    for name in env:
        if name in DEFAULTS or name in LAUNCHER_VARS or name.startswith(("TORCHELASTIC_", "NCCL_", "TORCH_")):
            continue
        close = difflib.get_close_matches(name, DEFAULTS, n=1, cutoff=0.85)
        if close:
            raise Fail(f"unknown setting {name}: did you mean {close[0]}?")
    s = {}
    for name, default in DEFAULTS.items():
        raw = env.get(name)
        if raw is None:
            s[name] = default
            continue
        try:
            s[name] = type(default)(float(raw)) if type(default) is int and "." in raw else type(default)(raw)
            if type(default) is int and str(s[name]) != raw.strip().split(".")[0]:
                raise ValueError
        except ValueError:
            raise Fail(f"{name}={raw!r} is not a valid {type(default).__name__} (default {default!r})") from None
        if name in CHOICES and s[name] not in CHOICES[name]:
            raise Fail(f"{name}={raw!r} must be one of {', '.join(CHOICES[name])}")
    s["RUN_ID"] = s["RUN_ID"] or time.strftime("%Y%m%d_%H%M%S_") + uuid.uuid4().hex[:6]
    s["VE_LAYERS"] = [int(i) for i in s["VE_LAYERS"].split(",") if i.strip()] if s["VE_ENABLED"] else []
    if any(not 0 <= i < s["NUM_LAYERS"] for i in s["VE_LAYERS"]):
        raise Fail(f"VE_LAYERS={env.get('VE_LAYERS')!r} names a layer outside 0..NUM_LAYERS-1")
    if s["MODEL_DIM"] % s["NUM_HEADS"] or s["NUM_HEADS"] % s["NUM_KV_HEADS"]:
        raise Fail("MODEL_DIM must divide by NUM_HEADS, and NUM_HEADS by NUM_KV_HEADS")
    return s


# ----------------------------------------------------------------------------- data

SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_WORDS = 20240520, 1, 256


def load_data_shard(path) -> np.ndarray:
    """Tokens of one shard: 256 int32 header words (magic, version, count), then count uint16 tokens."""
    path = Path(path)
    size = path.stat().st_size
    if size < SHARD_HEADER_WORDS * 4:
        raise Fail(f"{path}: {size} bytes is shorter than the 1024-byte shard header (truncated file?)")
    header = np.fromfile(path, dtype="<i4", count=SHARD_HEADER_WORDS)
    if header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION:
        raise Fail(f"{path}: not a token shard (magic {header[0]}, version {header[1]}; "
                   f"expected {SHARD_MAGIC}, {SHARD_VERSION})")
    count = int(header[2])
    if size != SHARD_HEADER_WORDS * 4 + 2 * count:
        raise Fail(f"{path}: header says {count} tokens ({SHARD_HEADER_WORDS * 4 + 2 * count} bytes) "
                   f"but the file has {size} bytes (truncated or corrupt; download it again)")
    return np.fromfile(path, dtype="<u2", count=count, offset=SHARD_HEADER_WORDS * 4)


def shard_files(pattern: str) -> list[str]:
    files = sorted(glob.glob(pattern))
    if not files:
        raise Fail(f"no data files match {pattern}; fetch them with "
                   f"`python data/fineweb.py download --variant sp1024 --train-shards 10` or set DATA_PATH")
    return files


class TokenStream:
    """One pass through the shards in sorted order, wrapping around."""

    def __init__(self, pattern: str):
        self.files, self.file_idx = shard_files(pattern), 0
        self.tokens, self.pos = load_data_shard(self.files[0]), 0

    def take(self, n: int) -> np.ndarray:
        parts = []
        while n > 0:
            if self.pos == len(self.tokens):
                self.file_idx = (self.file_idx + 1) % len(self.files)
                self.tokens, self.pos = load_data_shard(self.files[self.file_idx]), 0
            k = min(n, len(self.tokens) - self.pos)
            parts.append(self.tokens[self.pos:self.pos + k])
            self.pos, n = self.pos + k, n - k
        return np.concatenate(parts)


class DistributedTokenLoader:
    """Each call takes world_size contiguous spans of local_tokens+1 and keeps this rank's span."""

    def __init__(self, pattern: str, rank: int, world_size: int, device):
        self.pattern, self.rank, self.world_size, self.device = pattern, rank, world_size, device
        self.stream = TokenStream(pattern)

    def next_batch(self, local_tokens: int, seq_len: int) -> tuple[Tensor, Tensor]:
        span = local_tokens + 1
        chunk = self.stream.take(span * self.world_size)[self.rank * span:(self.rank + 1) * span]
        t = torch.from_numpy(chunk.astype(np.int64)).to(self.device, non_blocking=True)
        return t[:-1].reshape(-1, seq_len), t[1:].reshape(-1, seq_len)


def load_validation_tokens(pattern: str, seq_len: int, max_tokens: int) -> Tensor:
    tokens = np.concatenate([load_data_shard(f) for f in shard_files(pattern)])
    if max_tokens > 0:
        tokens = tokens[:max_tokens + 1]
    usable = (len(tokens) - 1) // seq_len * seq_len
    if usable == 0:
        raise Fail(f"validation split {pattern} has {len(tokens)} tokens, fewer than one sequence of "
                   f"{seq_len}+1; lower EVAL_SEQ_LEN or raise VAL_MAX_TOKENS")
    return torch.from_numpy(tokens[:usable + 1].astype(np.int64))


def build_sentencepiece_luts(sp: spm.SentencePieceProcessor, vocab_size: int, device):
    """Per-token byte accounting for bpb: base UTF-8 bytes, leading-space flag, boundary flag."""
    base_bytes = np.zeros(vocab_size, dtype=np.int16)
    has_space = np.zeros(vocab_size, dtype=np.bool_)
    is_boundary = np.ones(vocab_size, dtype=np.bool_)
    for i in range(sp.vocab_size()):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        is_boundary[i] = False
        if sp.is_byte(i):
            base_bytes[i] = 1
            continue
        piece = sp.id_to_piece(i)
        has_space[i] = piece.startswith("\u2581")
        base_bytes[i] = len((piece[1:] if has_space[i] else piece).encode("utf-8"))
    return (torch.tensor(base_bytes, dtype=torch.int16, device=device),
            torch.tensor(has_space, device=device), torch.tensor(is_boundary, device=device))


def target_bytes(prev: Tensor, tgt: Tensor, luts) -> Tensor:
    base_bytes, has_space, is_boundary = luts
    return base_bytes[tgt].to(torch.int64) + (has_space[tgt] & ~is_boundary[prev]).to(torch.int64)


def load_tokenizer(s: dict) -> spm.SentencePieceProcessor:
    path = s["TOKENIZER_PATH"]
    if not os.path.isfile(path):
        raise Fail(f"tokenizer {path} not found; fetch it with `python data/fineweb.py download --variant sp1024` "
                   f"or set TOKENIZER_PATH")
    sp = spm.SentencePieceProcessor(model_file=path)
    if sp.vocab_size() != s["VOCAB_SIZE"]:
        raise Fail(f"tokenizer {path} has vocab {sp.vocab_size()} but VOCAB_SIZE={s['VOCAB_SIZE']}; make them agree")
    return sp

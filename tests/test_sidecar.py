"""bpb from the validation byte sidecar (CaseOps): every evaluation path counts each target's bytes from it."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
from conftest import ROOT

import train_gpt as tg

CASEOPS = ROOT / "data" / "datasets" / "sample_sp8192_caseops"
CASEOPS_TOK = ROOT / "data" / "tokenizers" / "sample_8192_bpe_caseops.model"
TINY_8192 = dict(
    VOCAB_SIZE=8192,
    DATA_PATH=CASEOPS,
    TOKENIZER_PATH=CASEOPS_TOK,
    VAL_MAX_TOKENS=512,
    TTT_CHUNK_TOKENS=256,
    TTT_BATCH_SEQS=2,
    TTT_EPOCHS=1,
    EVAL_STRIDE=64,
)


@pytest.mark.parametrize(
    "kw", [dict(stride=128, ttt=False, slot=False), dict(stride=64, ttt=True, slot=True)], ids=["plain", "ttt+slot"]
)
def test_every_path_counts_the_sidecar_bytes(tiny_settings, tmp_path, kw, one_thread):
    s = tiny_settings(**TINY_8192, OUTPUT_DIR=tmp_path)
    run = tg.Run(s)
    val = tg.load_validation_tokens(str(CASEOPS / tg.VAL_SHARDS), s.eval_seq_len, s.val_max_tokens)
    luts, what = tg.byte_counter(s, tg.load_tokenizer(s), val.numel(), run.device)
    assert what.startswith("sidecar") and len(luts) == 1
    torch.manual_seed(0)
    loss, bpb = tg.evaluate(tg.GPT(tg.ModelConfig.of(s)), run, val, luts, **kw)
    # bpb = sum(nll) / ln 2 / sum(bytes) with mean nll = loss over the n targets: the bytes counted, recovered
    n = val.numel() - 1
    counted = loss * n / math.log(2) / bpb
    sidecar = tg.load_data_shard(CASEOPS / "fineweb_val_bytes_000000.bin")[1 : n + 1]  # the bytes of targets 1..n
    assert counted == pytest.approx(float(sidecar.sum()), rel=1e-9)
    lut = tg.build_sentencepiece_luts(tg.load_tokenizer(s), 8192, run.device)
    assert float(tg.target_bytes(val[:-1], val[1:], lut).sum()) != float(sidecar.sum())  # operators count 0 here


def test_a_sidecar_not_parallel_to_its_shard_is_one_error(tiny_settings, tmp_path):
    data = tmp_path / "ds"
    shutil.copytree(CASEOPS, data)
    side = data / "fineweb_val_bytes_000000.bin"
    counts = tg.load_data_shard(side)
    header = np.zeros(256, dtype="<i4")
    header[:3] = (tg.SHARD_MAGIC, tg.SHARD_VERSION, len(counts) - 1)
    side.write_bytes(header.tobytes() + counts[:-1].astype("<u2").tobytes())
    s = tiny_settings(**dict(TINY_8192, DATA_PATH=data))
    with pytest.raises(tg.Fail, match="not parallel to its val shards"):
        tg.byte_counter(s, tg.load_tokenizer(s), 100, torch.device("cpu"))


def test_without_a_sidecar_the_lut_counts(tiny_settings):
    s = tiny_settings()
    luts, what = tg.byte_counter(s, tg.load_tokenizer(s), 100, torch.device("cpu"))
    assert what == "tokenizer LUT" and len(luts) == 3
    # the val shard pattern never takes a sidecar for tokens
    assert not any("bytes" in f for f in tg.shard_files(str(CASEOPS / tg.VAL_SHARDS)))


def test_the_log_says_which_bytes_it_counts(tmp_path, script_env, run_script):
    proc = run_script(script_env(tmp_path, **TINY_8192, ITERATIONS=1, TTT_ENABLED=0, SLOT_ENABLED=0))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "bpb_bytes:sidecar fineweb_val_bytes_[0-9]*.bin" in proc.stdout

"""Shared fixtures: the repository's paths, a tiny model configuration, and a clean way to run train_gpt.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import train_gpt  # noqa: E402

# Under pytest-xdist (.ci/run: `-n 2`, one worker per core) every worker, and every process a test starts from this
# environment, runs one intra-op thread: two 2-thread torch processes on 2 cores spin against each other.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"

TRAIN_GPT = ROOT / "train_gpt.py"
SAMPLE_DATA = ROOT / "data" / "datasets" / "sample_sp1024"
SAMPLE_TOKENIZER = ROOT / "data" / "tokenizers" / "sample_1024_bpe.model"

# A 4-layer, 64-wide version of the record stack: every component present (VE on 2 layers, XSA on 2, U-Net
# skips, bigram hash), small enough that a training step takes a fraction of a second on one CPU core.
TINY = dict(
    NUM_LAYERS="4",
    MODEL_DIM="64",
    NUM_HEADS="4",
    NUM_KV_HEADS="2",
    MLP_MULT="2",
    VE_LAYERS="2,3",
    XSA_LAST_N="2",
    BIGRAM_VOCAB_SIZE="256",
    BIGRAM_DIM="16",
    VE_DIM="16",
    TRAIN_SEQ_LEN="128",
    EVAL_SEQ_LEN="128",
    TRAIN_BATCH_TOKENS="1024",
    WARMUP_STEPS="0",
    MAX_WALLCLOCK_SECONDS="0",
    VAL_MAX_TOKENS="2048",
    TTT_ENABLED="0",
    SLOT_ENABLED="0",
    ITERATIONS="4",
    WARMDOWN_ITERS="0",
    TTT_LORA_RANK="8",  # phased TTT's adapters, where a test turns it on: at most the 32-wide key/value width
    VAL_LOSS_EVERY="0",
    TRAIN_LOG_EVERY="1",
    GPTQ_CALIB_SEQS="4",
    GPTQ_CALIB_LEN="64",
)


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared 2-core machine two threads spin against each other and run far slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_settings():
    """settings(**overrides) -> parse_settings of the tiny configuration on the embedded sample."""

    def make(**overrides):
        env = dict(TINY, DATA_PATH=str(SAMPLE_DATA), TOKENIZER_PATH=str(SAMPLE_TOKENIZER), RUN_ID="test")
        env.update({k: str(v) for k, v in overrides.items()})
        return train_gpt.parse_settings(env)

    return make


@pytest.fixture(scope="session")
def script_env():
    """env(out_dir, **overrides) -> an environment for `python train_gpt.py`: the tiny configuration, the sample
    data, no setting or launcher variable inherited from the caller's environment, one thread per process."""

    def make(out_dir, **overrides):
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in train_gpt.SETTING_NAMES
            and k not in train_gpt.LAUNCHER_VARS
            and not k.startswith("TORCHELASTIC_")
        }
        env.update(
            TINY,
            DATA_PATH=str(SAMPLE_DATA),
            TOKENIZER_PATH=str(SAMPLE_TOKENIZER),
            OUTPUT_DIR=str(out_dir),
            RUN_ID="test",
            OMP_NUM_THREADS="1",
        )
        env.update({k: str(v) for k, v in overrides.items()})
        return env

    return make


@pytest.fixture(scope="session")
def run_script():
    """run(env, *args, timeout=...) -> CompletedProcess of `python train_gpt.py` (text output captured)."""

    def run(env, *args, timeout=300, script=TRAIN_GPT):
        return subprocess.run(
            [sys.executable, str(script), *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
        )

    return run

"""Parameter Golf record stack: SLOT + LeakyReLU^2 + legal score-first TTT + Parallel Muon.

Launch: torchrun --standalone --nproc_per_node=8 train_gpt.py (or python3 train_gpt.py).
Every hyperparameter is an environment variable: `python3 train_gpt.py --help` lists them (docs/settings.md).
"""

import ast
import base64
import bisect
import copy
import difflib
import glob
import json
import lzma
import math
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import tracemalloc
import uuid
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import NamedTuple

import numpy as np
import safetensors.torch as st
import sentencepiece as spm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import nn

# -------------------- settings
# Every setting is an environment variable: the field's name in capitals (MATRIX_LR sets matrix_lr). Numbers must be
# >= 0 unless their bound says otherwise. `python3 train_gpt.py --help` lists them all; docs/settings.md is the same
# table, generated from these classes (tools/settings_doc.py).

FLAG, UNIT, POSITIVE, NON_NEGATIVE = "0 or 1", "in [0, 1]", "> 0", ">= 0"
BOUNDS = {
    FLAG: lambda v: v in (0, 1),
    UNIT: lambda v: 0 <= v <= 1,
    POSITIVE: lambda v: v > 0,
    NON_NEGATIVE: lambda v: v >= 0,
}


def setting(default, doc, bound=NON_NEGATIVE, choices=None):
    """A settings field: its default, what it does (one line), and the values it accepts."""
    meta = dict(doc=doc, bound=bound, choices=choices)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunSettings:
    """Where the run reads and writes, on what device, from what seed."""

    stack: str = setting("seed", "seed | pr1855 | pr2135: which record's values the other settings default to (STACKS)")
    run_id: str = setting("", "name of the log files (default: time + random suffix)")
    seed: int = setting(1337, "torch/numpy seed")
    output_dir: str = setting(".", "where the artifact and logs/ go")
    device: str = setting("auto", "auto | cuda | cpu", choices=("auto", "cuda", "cpu"))
    attn_backend: str = setting(
        "auto",
        "auto (the first that loads: fa3 installed, fa3 from the Hub, fa2, sdpa) | fa3 | fa2 | sdpa",
        choices=("auto", "fa3", "fa2", "sdpa"),
    )
    attn_kernel_repo: str = setting(
        "varunneal/flash-attention-3", "Hub repo of the FA3 kernel that the `kernels` package loads; empty: never ask"
    )
    attn_hub_timeout_seconds: float = setting(60.0, "longest wait for that kernel before falling back", POSITIVE)
    compile: str = setting("auto", "auto (on for CUDA) | 0 | 1: torch.compile the model", choices=("auto", "0", "1"))
    eval_only: int = setting(0, "1 = no training: evaluate ARTIFACT_PATH", FLAG)
    artifact_path: str = setting("", "for EVAL_ONLY: a final_model.int6.ptz, or a final_model.float.safetensors")


@dataclass
class DataSettings:
    """The token shards, the tokenizer, and how training reads them."""

    data_path: str = setting("./data/datasets/fineweb10B_sp1024", "folder of fineweb_train_*.bin, fineweb_val_*.bin")
    tokenizer_path: str = setting("./data/tokenizers/fineweb_1024_bpe.model", "SentencePiece model of VOCAB_SIZE")
    train_batch_tokens: int = setting(786432, "global batch in tokens (8 micro-batches split over the ranks)", POSITIVE)
    train_seq_len: int = setting(2048, "training sequence length", POSITIVE)
    val_max_tokens: int = setting(0, "0 = the whole val split, else only its first N tokens (quick runs)")


@dataclass
class ModelSettings:
    """The architecture (MODEL_KEYS: what an artifact records and is checked against)."""

    vocab_size: int = setting(1024, "tokenizer vocabulary", POSITIVE)
    num_layers: int = setting(11, "transformer blocks", POSITIVE)
    model_dim: int = setting(512, "width", POSITIVE)
    num_heads: int = setting(8, "query heads", POSITIVE)
    num_kv_heads: int = setting(4, "key/value heads (GQA)", POSITIVE)
    mlp_mult: float = setting(3.0, "MLP hidden = MLP_MULT x MODEL_DIM", POSITIVE)
    tied_embed_init_std: float = setting(0.005, "std of the tied embedding's init")
    init_draw_order: str = setting(
        "seed",
        "seed (layer by layer) | pr1855 (PR #1855's draws and order, its init rounded to bf16): the initial weights",
        choices=("seed", "pr1855"),
    )
    logit_softcap: float = setting(30.0, "logits = c tanh(z / c)", POSITIVE)
    asym_logit_rescale: int = setting(
        0, "1 = c learned apart for z >= 0 and z < 0, from LOGIT_SOFTCAP (no decay)", FLAG
    )
    rope_base: float = setting(10000.0, "rotary base", POSITIVE)
    rope_dims: int = setting(16, "head dims rotated (partial RoPE)")
    rope_train_seq_len: int = setting(0, "base raised by (len/this)^(d/(d-2)) past this length; 0 = never")
    rope_freq_bf16: int = setting(
        0, "1 = rotary frequencies rounded to bf16, as PR #1855's model.bfloat16() leaves them", FLAG
    )
    qk_gain_init: float = setting(1.5, "init of the per-head query gain")
    ln_scale: int = setting(1, "1 = scale block i's normed inputs by 1/sqrt(i+1)", FLAG)
    xsa_last_n: int = setting(4, "exclusive self-attention in the last N layers")
    bigram_vocab_size: int = setting(1536, "BigramHash table rows (0 = no BigramHash)")
    bigram_dim: int = setting(128, "BigramHash table width", POSITIVE)
    ve_enabled: int = setting(1, "value embeddings on/off", FLAG)
    ve_dim: int = setting(128, "value-embedding table width", POSITIVE)
    ve_layers: list = setting([9, 10], "layers that add the value embedding (comma list)")
    smear_fixed_enabled: int = setting(1, "the seed's SmearGate: (1-s(g)) x_t + s(g) x_t-1 after the first norm", FLAG)
    smear_gate_enabled: int = setting(0, "PR #1855's: e_t + l s(w.e_t[:GATE_WINDOW]) e_t-1, never at a BOS", FLAG)
    smear_gate_bos_fix: int = setting(
        1, "1 = the smear gate never mixes across a BOS (0 = PR #2135's launch: it leaks)", FLAG
    )
    gate_window: int = setting(12, "input channels of PR #1855's smear and sparse attention gates", POSITIVE)
    sparse_attn_gate_enabled: int = setting(0, "per-head gate s(SCALE W x[:GATE_WINDOW]) on the attention out", FLAG)
    sparse_attn_gate_scale: float = setting(1.0, "the sparse attention gate's SCALE")
    skip_gates_enabled: int = setting(0, "U-Net skips merged as s(g) x + (1-s(g)) w skip instead of x + w skip", FLAG)
    parallel_start_layer: int = setting(0, "decoder layers from this index on run two lanes; 0 = none")
    num_loops: int = setting(0, "depth recurrence: LOOP_START..LOOP_END run this many extra times once looping")
    loop_start: int = setting(0, "first looped layer")
    loop_end: int = setting(0, "last looped layer")
    doc_masked_attn: int = setting(0, "attention only within a document (and TRAIN_SEQ_LEN pieces of a long one)", FLAG)


@dataclass
class OptimizerSettings:
    """Muon on the four matrix banks, AdamW on the rest."""

    matrix_lr: float = setting(0.025, "Muon LR (the four banks)")
    scalar_lr: float = setting(0.025, "AdamW LR of scalars and control vectors")
    tied_embed_lr: float = setting(0.035, "AdamW LR of the embedding, bigram and VE tables")
    muon_momentum: float = setting(0.99, "Muon Nesterov momentum after warm-up", UNIT)
    muon_momentum_warmup_start: float = setting(0.92, "momentum at step 0", UNIT)
    muon_momentum_warmup_steps: int = setting(1500, "steps of the linear momentum warm-up")
    muon_backend_steps: int = setting(5, "Newton-Schulz iterations", POSITIVE)
    muon_wd: float = setting(0.04, "Muon decoupled weight decay")
    muon_row_normalize: int = setting(0, "MuonEq-R: each update row to unit norm before Newton-Schulz", FLAG)
    muon_polar_express: int = setting(0, "Polar Express: per-iteration Newton-Schulz coefficients (<= 5 steps)", FLAG)
    muon_bf16: int = setting(0, "1 = gradient, momentum buffer, update and Newton-Schulz in bf16 on any device", FLAG)
    embed_bf16: int = setting(0, "1 = the tied embedding stored and trained in bf16 (its AdamW state too)", FLAG)
    adam_fused: int = setting(
        0, "1 = torch's fused AdamW (fp32 math, one rounding: PR #1855's), else the default", FLAG
    )
    adam_wd: float = setting(0.04, "AdamW weight decay of the scalars and control vectors")
    embed_wd: float = setting(0.04, "AdamW weight decay of the embedding tables (STACK=seed: ADAM_WD unless set)")
    beta1: float = setting(0.9, "AdamW beta1", UNIT)
    beta2: float = setting(0.95, "AdamW beta2", UNIT)
    adam_eps: float = setting(1e-8, "AdamW epsilon")
    grad_clip_norm: float = setting(0.3, "global grad-norm clip (0 = off)")
    grad_clip_local: int = setting(0, "1 = clip each rank's local gradients before averaging (the reference's)", FLAG)


@dataclass
class ScheduleSettings:
    """How long training runs, the LR schedule, weight averaging and late QAT."""

    iterations: int = setting(9000, "training steps at most", POSITIVE)
    warmup_steps: int = setting(
        20, "steps run only to compile and warm kernels (then as many looped, with NUM_LOOPS); state restored after"
    )
    warmup_keeps_muon_momentum: int = setting(
        0,
        "1 = Muon's momentum is kept from the warm-up steps, as PR #1855's 8-GPU runs do (the rest is restored)",
        FLAG,
    )
    max_wallclock_seconds: float = setting(600.0, "training time cap, all ranks stop at the same step; 0 = none")
    train_clock: str = setting(
        "wall",
        "wall | simulated: the cap, warmdown and loop switch run on SIM_STEP_MS a step (the reference 8xH100's)",
        choices=("wall", "simulated"),
    )
    sim_step_ms: float = setting(84.0, "TRAIN_CLOCK=simulated: the reference 8xH100 step (the seed record's)", POSITIVE)
    sim_looped_step_ms: float = setting(84.0, "... and its step once the layers loop", POSITIVE)
    warmdown_iters: int = setting(3500, "length of the linear LR warmdown (time-based under a wallclock cap)")
    warmdown_frac: float = setting(0.0, "> 0: warmdown over this last fraction of training instead", UNIT)
    min_lr: float = setting(0.0, "floor of the LR multiplier", UNIT)
    enable_looping_at: float = setting(0.0, "training fraction at which looping switches on", UNIT)
    train_seq_schedule: str = setting(
        "", "document-piece caps by training fraction, e.g. 1024@0.1,2048@0.7,3072@1 (PR #2014); empty = TRAIN_SEQ_LEN"
    )
    seq_change_warmup_steps: int = setting(0, "after each TRAIN_SEQ_SCHEDULE switch the LR re-warms over N steps")
    train_log_every: int = setting(500, "step: train-loss line every N steps (and the first 10)")
    val_loss_every: int = setting(4000, "plain validation every N steps during training (0 = only at the end)")
    ema_enabled: int = setting(1, "EMA of all weights every step", FLAG)
    ema_decay: float = setting(0.997, "EMA decay", UNIT)
    swa_enabled: int = setting(0, "1 = final weights are the average of the SWA snapshots", FLAG)
    swa_every: int = setting(50, "SWA snapshot every N steps ...", POSITIVE)
    swa_threshold: float = setting(0.2, "... once the LR multiplier is below this", UNIT)
    late_qat: int = setting(1, "fake quantization at MATRIX_BITS once the LR multiplier is below the threshold", FLAG)
    late_qat_threshold: float = setting(0.15, "LR multiplier that starts late QAT", UNIT)
    late_qat_banks: int = setting(1, "1 = late QAT reaches the banked matrices; 0 = plain linears only", FLAG)


@dataclass
class ExportSettings:
    """Quantization, calibration and packing of the artifact."""

    quant: str = setting("gptq", "gptq (calibrated) | gptq_lite (per-row clip search)", choices=("gptq", "gptq_lite"))
    matrix_bits: int = setting(6, "bits of every attention/MLP matrix", choices=(5, 6, 7, 8))
    embed_bits: int = setting(8, "bits of the embedding tables", choices=(6, 7, 8))
    quant_scales: str = setting("search", "search (output-error clip search) | sdclip", choices=("search", "sdclip"))
    attn_clip_sigmas: float = setting(13.0, "SDClip's k for the attention matrices", POSITIVE)
    mlp_clip_sigmas: float = setting(11.5, "SDClip's k for the MLP matrices", POSITIVE)
    embed_clip_sigmas: float = setting(14.0, "SDClip's k for the GPTQ'd tied embedding", POSITIVE)
    gptq_calib: str = setting(
        "self", "self (own samples from BOS) | train (training tokens)", choices=("self", "train")
    )
    gptq_calib_seqs: int = setting(64, "GPTQ_CALIB=self: generated sequences ...", POSITIVE)
    gptq_calib_len: int = setting(2048, "... of this many tokens", POSITIVE)
    gptq_calibration_batches: int = setting(
        16, "GPTQ_CALIB=train: micro-batches (TRAIN_BATCH_TOKENS/8 tokens each)", POSITIVE
    )
    gptq_calib_temp: float = setting(0.8, "sampling temperature of the self-generated calibration text", POSITIVE)
    gptq_reserve_seconds: float = setting(0.0, "GPTQ_CALIB=train: seconds of MAX_WALLCLOCK_SECONDS kept for it")
    gptq_damp: float = setting(0.001, "damping added to H's diagonal, relative to its mean (x10 until positive)")
    gptq_block: int = setting(128, "columns per GPTQ block (lazy batch updates)", POSITIVE)
    gptq_actorder: int = setting(1, "quantize the columns with the largest H diagonal first", FLAG)
    gptq_embed: int = setting(0, "1 = GPTQ on the tied embedding with the final-norm outputs' Hessian", FLAG)
    gate_int8: int = setting(0, "1 = the attention gates as int8 rows with an fp16 scale", FLAG)
    awq_lite_enabled: int = setting(
        0, "1 = AWQ-lite (PR #1908): the GPTQ'd tensors' most salient column groups at AWQ_LITE_BITS", FLAG
    )
    awq_lite_bits: int = setting(8, "bits of the AWQ-lite groups (their own per-row scale)", choices=(6, 7, 8))
    awq_lite_group_top_k: int = setting(1, "how many groups, the most salient of the whole model", POSITIVE)
    awq_lite_group_size: int = setting(64, "contiguous input columns per AWQ-lite group", POSITIVE)
    lqer_enabled: int = setting(0, "1 = LQER low-rank correction of the largest-error GPTQ'd tensors", FLAG)
    lqer_rank: int = setting(4, "rank of each LQER correction", POSITIVE)
    lqer_top_k: int = setting(3, "how many tensors get one")
    lqer_asym_group: int = setting(64, "elements of flattened B per 4-bit scale group", POSITIVE)
    fit_to_limit: int = setting(1, "over the limit: zero the cheapest +-1 values until code + model fit", FLAG)
    artifact_limit_bytes: int = setting(16_000_000, "code + model bytes allowed", POSITIVE)


@dataclass
class EvalSettings:
    """The final evaluation: sliding windows, the seed's TTT and SLOT, PR #1855's phased LoRA TTT."""

    eval_seq_len: int = setting(2048, "evaluation window length", POSITIVE)
    eval_stride: int = setting(64, "sliding-window stride; equal to EVAL_SEQ_LEN = no sliding pass", POSITIVE)
    eval_batch_seqs: int = setting(32, "windows scored per batch (also the SLOT batch of SLOT_MODE=batch)", POSITIVE)
    eval_sliding_pass: int = setting(0, "1 = also the standalone sliding-window pass before TTT/SLOT", FLAG)
    eval_budget_seconds: float = setting(600.0, "evaluation budget: each pass's projected end is logged against it")
    eval_include_tail: int = setting(0, "1 = the val split's last partial EVAL_SEQ_LEN window is scored too", FLAG)
    ttt_enabled: int = setting(1, "the seed's score-first test-time training", FLAG)
    ttt_lr: float = setting(0.002, "TTT SGD LR (cosine-decayed over chunks)")
    ttt_epochs: int = setting(3, "epochs over each chunk", POSITIVE)
    ttt_chunk_tokens: int = setting(32768, "TTT chunk length", POSITIVE)
    ttt_freeze_blocks: int = setting(0, "blocks 0..N-1 (bank rows included) not adapted")
    ttt_momentum: float = setting(0.9, "TTT SGD momentum", UNIT)
    ttt_batch_seqs: int = setting(32, "global TTT batch in sequences", POSITIVE)
    ttt_grad_clip: float = setting(1.0, "TTT grad-norm clip")
    slot_enabled: int = setting(1, "SLOT: a hidden-state offset fitted while scoring", FLAG)
    slot_lr: float = setting(0.003, "SLOT AdamW LR")
    slot_steps: int = setting(5, "SLOT AdamW steps per batch")
    slot_mode: str = setting(
        "causal", "causal (legal: context only) | batch (the seed's, illegal)", choices=("causal", "batch")
    )
    phased_ttt_enabled: int = setting(0, "phased score-first LoRA TTT per document as the final pass", FLAG)
    ttt_lora_rank: int = setting(80, "rank r of every phased-TTT adapter", POSITIVE)
    ttt_lora_alpha: float = setting(144.0, "adapter scale alpha (delta = x A^T B^T alpha / r)")
    ttt_lora_lr: float = setting(1e-4, "AdamW LR of the adapters")
    ttt_chunk_size: int = setting(48, "targets per chunk: scored, then one adapter step", POSITIVE)
    ttt_short_score_first_enabled: int = setting(0, "smaller chunks for batches of short documents (PR #2014)", FLAG)
    ttt_short_score_first_steps: str = setting(
        "256:8,2000:24", "LENGTH:CHUNK,...: a batch whose longest document has <= LENGTH tokens takes CHUNK"
    )
    ttt_eval_seq_len: int = setting(
        2048, "at most this many tokens of a document's prefix as a chunk's context", POSITIVE
    )
    ttt_batch_size: int = setting(64, "documents per batch (one per row; adapters reset per batch)", POSITIVE)
    ttt_weight_decay: float = setting(0.5, "AdamW weight decay of the adapters")
    ttt_q_lora: int = setting(1, "phased TTT adapts the query projections", FLAG)
    ttt_k_lora: int = setting(1, "... the key projections", FLAG)
    ttt_v_lora: int = setting(1, "... the value projections", FLAG)
    ttt_o_lora: int = setting(1, "... the attention outputs (a bypass from the attention's input)", FLAG)
    ttt_mlp_lora: int = setting(1, "... the MLPs (a bypass from the MLP's input)", FLAG)
    ttt_head_lora: int = setting(1, "... the output head", FLAG)
    ttt_beta1: float = setting(0.0, "AdamW beta1 of the adapters", UNIT)
    ttt_beta2: float = setting(0.99, "AdamW beta2 of the adapters", UNIT)
    phased_ttt_prefix_docs: int = setting(2500, "documents (in scoring order) the global SGD phases train on in all")
    phased_ttt_num_phases: int = setting(3, "global SGD phases, at equal shares of the prefix documents", POSITIVE)
    global_ttt_lr: float = setting(1e-3, "SGD LR of a phase (cosine to 0 over its chunks)")
    global_ttt_momentum: float = setting(0.9, "SGD momentum of a phase", UNIT)
    global_ttt_epochs: int = setting(1, "epochs over each chunk in a phase")
    global_ttt_chunk_tokens: int = setting(32768, "tokens per global SGD chunk (the last one skipped)", POSITIVE)
    global_ttt_batch_seqs: int = setting(32, "sequences of EVAL_SEQ_LEN per global SGD step, across ranks", POSITIVE)
    global_ttt_grad_clip: float = setting(1.0, "gradient-norm clip of a phase's SGD (0 = none)")
    ngram_tilt_enabled: int = setting(0, "phased TTT's scores tilted toward a causal n-gram hint (PR #2135)", FLAG)
    token_order: int = setting(16, "the hint's n-gram order: its context is the TOKEN_ORDER-1 tokens before", POSITIVE)
    token_threshold: float = setting(
        0.8, "a hint is given where its share of the context's past is at least this", UNIT
    )
    token_boost: float = setting(2.625, "the tilt: p(hint) scaled by e^TOKEN_BOOST, then renormalized")


SETTING_GROUPS = (
    RunSettings,
    DataSettings,
    ModelSettings,
    OptimizerSettings,
    ScheduleSettings,
    ExportSettings,
    EvalSettings,
)


@dataclass
class Settings(
    EvalSettings, ExportSettings, ScheduleSettings, OptimizerSettings, ModelSettings, DataSettings, RunSettings
):
    """Every setting of a run, as one flat namespace (s.matrix_lr); the groups above only order and document them."""

    def by_env_name(self):
        """{ENV_NAME: value}, group by group: the log's settings line and the JSON log's settings."""
        return {f.name.upper(): getattr(self, f.name) for f in fields(self)}


SETTING_NAMES = tuple(f.name.upper() for f in fields(Settings))


@dataclass(frozen=True)
class SameAs:
    """A stack's value that follows another setting unless this one is set explicitly."""

    name: str


# Each stack: the values that differ from the classes' defaults (the seed's record run, PR #1128 on PR #549).
# pr1855: the values PR #1855's runs logged (not its script's defaults), on the SP8192 CaseOps export. Under the seed
# ADAM_WD decays every AdamW parameter (EMBED_WD follows it); PR #1855 scores whole windows (no sliding pass).
PR1855 = dict(
    eval_stride=SameAs("eval_seq_len"),
    data_path="./data/datasets/fineweb10B_sp8192_lossless_caps_caseops_v1_reserved",
    tokenizer_path="./data/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model",
    vocab_size=8192,
    mlp_mult=4.0,
    xsa_last_n=11,
    qk_gain_init=5.0,
    bigram_vocab_size=0,
    ve_enabled=0,
    iterations=20000,
    val_loss_every=0,
    warmdown_frac=0.85,
    min_lr=0.1,
    matrix_lr=0.026,
    tied_embed_lr=0.03,
    scalar_lr=0.02,
    muon_momentum=0.97,
    muon_wd=0.095,
    embed_wd=0.085,
    adam_wd=0.02,
    beta2=0.99,
    ema_decay=0.9965,
    grad_clip_local=1,
    late_qat=0,
    smear_fixed_enabled=0,
    smear_gate_enabled=1,
    sparse_attn_gate_enabled=1,
    sparse_attn_gate_scale=0.5,
    skip_gates_enabled=1,
    parallel_start_layer=8,
    num_loops=2,
    loop_start=3,
    loop_end=5,
    enable_looping_at=0.35,
    doc_masked_attn=1,
    muon_row_normalize=1,
    muon_polar_express=1,
    muon_bf16=1,
    embed_bf16=1,
    adam_fused=1,
    init_draw_order="pr1855",
    rope_freq_bf16=1,
    warmup_keeps_muon_momentum=1,
    sim_step_ms=96.0,
    sim_looped_step_ms=141.0,
    embed_bits=7,
    gptq_calib="train",
    gptq_reserve_seconds=0.5,
    gptq_damp=0.01,
    ttt_enabled=0,
    slot_enabled=0,
    quant_scales="sdclip",
    gptq_embed=1,
    gate_int8=1,
    lqer_enabled=1,
    phased_ttt_enabled=1,
)
# pr2135: PR #1855 plus what PR #2135's runs logged (its launch command), except where docs/stacks.md says why not:
# the smear gate's BOS mask stays on (the record's launch turns it off: a leak across documents), and the GPTQ reserve
# covers the calibration's 32 batches (the record's 0.5 s did not: its Hessians took 6.9 s).
PR2135 = PR1855 | dict(
    matrix_lr=0.028,
    lqer_asym_group=32,
    gptq_calibration_batches=32,
    gptq_reserve_seconds=8.0,
    gate_int8=0,
    val_loss_every=4000,
    eval_seq_len=2560,
    ttt_eval_seq_len=2560,
    ttt_k_lora=0,
    ttt_lora_lr=8e-5,
    ttt_weight_decay=2.0,
    phased_ttt_num_phases=1,
    ngram_tilt_enabled=1,
)
STACKS = dict(seed=dict(embed_wd=SameAs("adam_wd")), pr1855=PR1855, pr2135=PR2135)
LAUNCHER_VARS = set(
    "RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE MASTER_ADDR MASTER_PORT GROUP_RANK ROLE_RANK "
    "ROLE_NAME ROLE_WORLD_SIZE GROUP_WORLD_SIZE".split()
)


class Fail(Exception):
    """A user error: one line, no traceback."""


PROGRESS = dict(stage="start-up", on_disk="nothing yet", run=None)  # what a Ctrl-C reports


def parse_layers(raw):
    """A comma list of layer numbers ("9,10" -> [9, 10]); ValueError otherwise."""
    if not all(i.strip().isdigit() for i in raw.split(",") if i.strip()):
        raise ValueError(raw)
    return [int(i) for i in raw.split(",") if i.strip()]


def shown(value):
    """A setting's value as the environment writes it (lists as comma lists)."""
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def parse_value(f, raw):
    """Setting f's value from its environment string, checked against its type, choices and bound."""
    name, meta, default = f.name.upper(), f.metadata, getattr(DEFAULT_SETTINGS, f.name)
    if isinstance(default, list):
        try:
            return parse_layers(raw)
        except ValueError:
            raise Fail(f"{name}={raw!r} must be layer numbers separated by commas") from None
    try:
        value = type(default)(raw)
    except ValueError:
        raise Fail(f"{name}={raw!r} is not a valid {type(default).__name__} (default {default!r})") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise Fail(f"{name}={raw!r} must be a finite number")
    if meta["choices"] and value not in meta["choices"]:
        raise Fail(f"{name}={raw!r} must be one of {', '.join(map(str, meta['choices']))}")
    if isinstance(value, (int, float)) and not BOUNDS[meta["bound"]](value):
        raise Fail(f"{name}={raw!r} must be {meta['bound']}")
    return value


def parse_settings(env=os.environ):
    """The settings of a run: the stack's values over the defaults, then every variable set in env; Fail on an
    unknown name close to a setting's, a bad value, or settings that contradict each other."""
    for name in env:
        known = name in SETTING_NAMES or name in LAUNCHER_VARS or name.startswith(("TORCHELASTIC_", "NCCL_", "TORCH_"))
        if not known and (close := difflib.get_close_matches(name, SETTING_NAMES, n=1, cutoff=0.85)):
            raise Fail(f"unknown setting {name}: did you mean {close[0]}?")
    stack = env.get("STACK", "seed")
    if stack not in STACKS:
        raise Fail(f"STACK={stack!r} must be one of {', '.join(STACKS)}")
    preset = STACKS[stack]
    s = Settings(stack=stack, **{k: v for k, v in preset.items() if not isinstance(v, SameAs)})
    for f in fields(s):
        if (raw := env.get(f.name.upper())) is not None:
            setattr(s, f.name, parse_value(f, raw))
    for name, value in preset.items():
        if isinstance(value, SameAs) and name.upper() not in env:
            setattr(s, name, getattr(s, value.name))
    s.run_id = s.run_id or time.strftime("%Y%m%d_%H%M%S_") + uuid.uuid4().hex[:6]
    check_settings(s, env)
    if not s.ve_enabled:
        s.ve_layers = []
    return s


MAX_BATCH_TOKENS = 2**22  # one evaluation or TTT batch: 64x the record's 65,536 tokens, 64 GiB of logits at V 8192
MAX_RUN_ID_BYTES = 200  # the log files are logs/<RUN_ID>.txt and .json (+ .tmp while written): under 255 bytes
MAX_PATH_BYTES = 4000  # under Linux's PATH_MAX (4096), with room for the longest file name the run writes


def check_output_names(s):
    """Fail unless every file the run writes can be named: RUN_ID as one file name, OUTPUT_DIR's path short enough."""
    run_id = s.run_id.encode()
    if len(run_id) > MAX_RUN_ID_BYTES or "/" in s.run_id or "\0" in s.run_id or s.run_id in (".", ".."):
        raise Fail(
            f"RUN_ID ({len(run_id)} bytes) names the log files: it must be at most {MAX_RUN_ID_BYTES} bytes, "
            "without '/'; choose a shorter name"
        )
    longest = Path(s.output_dir).absolute() / "logs" / f"{s.run_id}.json.tmp"
    if any(len(part.encode()) > 255 for part in longest.parts) or len(str(longest).encode()) > MAX_PATH_BYTES:
        raise Fail(
            f"OUTPUT_DIR={s.output_dir[:80]}... gives file paths over {MAX_PATH_BYTES} bytes or a folder name over "
            "255 bytes; choose a shorter OUTPUT_DIR"
        )


def check_settings(s, env):
    """Fail on the first pair of settings that contradict each other."""
    check_output_names(s)
    head_dim, L = s.model_dim // s.num_heads, s.num_layers
    lora_width = min(s.model_dim, s.num_kv_heads * head_dim)  # the narrowest matrix a phased-TTT adapter factorizes
    for bad, msg in (
        (
            s.num_loops and not 0 <= s.loop_start <= s.loop_end < L,
            f"LOOP_START={s.loop_start}..LOOP_END={s.loop_end} must be layers with 0 <= start <= end < NUM_LAYERS={L}",
        ),
        (s.parallel_start_layer >= L, f"PARALLEL_START_LAYER={s.parallel_start_layer} must be < NUM_LAYERS={L}"),
        (
            s.smear_gate_enabled and s.smear_fixed_enabled,
            "SMEAR_GATE_ENABLED=1 and SMEAR_FIXED_ENABLED=1 exclude each other: set one to 0",
        ),
        (s.gate_window > s.model_dim, f"GATE_WINDOW={s.gate_window} must be at most MODEL_DIM={s.model_dim}"),
        (
            s.muon_polar_express and s.muon_backend_steps > len(POLAR_EXPRESS),
            f"MUON_POLAR_EXPRESS=1 needs MUON_BACKEND_STEPS <= {len(POLAR_EXPRESS)}",
        ),
        (
            s.warmdown_frac and "WARMDOWN_ITERS" in env and s.warmdown_iters > 0,
            "WARMDOWN_FRAC and WARMDOWN_ITERS both set: keep one",
        ),
        (
            s.ve_enabled and any(not 0 <= i < L for i in s.ve_layers),
            f"VE_LAYERS={shown(s.ve_layers)} names a layer outside 0..{L - 1} (NUM_LAYERS={L}): set VE_LAYERS to "
            "layers of this model, or VE_ENABLED=0",
        ),
        (
            s.model_dim % s.num_heads or s.num_heads % s.num_kv_heads,
            f"MODEL_DIM={s.model_dim} must divide by NUM_HEADS={s.num_heads}, and NUM_HEADS by "
            f"NUM_KV_HEADS={s.num_kv_heads}",
        ),
        (
            s.rope_dims % 2 or s.rope_dims > head_dim,
            f"ROPE_DIMS={s.rope_dims} must be even and at most the head dim {head_dim}",
        ),
        (
            s.train_batch_tokens < 8 * s.train_seq_len or s.train_batch_tokens // 8 % s.train_seq_len,
            f"TRAIN_BATCH_TOKENS={s.train_batch_tokens} must split into 8 micro-batches of whole "
            f"TRAIN_SEQ_LEN={s.train_seq_len} sequences",
        ),
        (
            s.eval_stride > s.eval_seq_len,
            f"EVAL_STRIDE={s.eval_stride} must be at most EVAL_SEQ_LEN={s.eval_seq_len}",
        ),
        (
            s.phased_ttt_enabled and s.slot_enabled and s.slot_mode == "batch",
            "SLOT_MODE=batch has no phased TTT form: use causal",
        ),
        (
            s.phased_ttt_enabled and s.ttt_lora_rank > lora_width,
            f"TTT_LORA_RANK={s.ttt_lora_rank} is more than the width {lora_width} of the narrowest matrix its adapters "
            f"factorize (MODEL_DIM={s.model_dim}, key/value width NUM_KV_HEADS x head dim): set TTT_LORA_RANK <= "
            f"{lora_width}",
        ),
        (
            s.train_clock == "simulated" and s.max_wallclock_seconds <= 0,
            "TRAIN_CLOCK=simulated runs the cap's schedule: set MAX_WALLCLOCK_SECONDS > 0 (the reference's, e.g. 600)",
        ),
        (
            s.awq_lite_enabled and s.quant != "gptq",
            "AWQ_LITE_ENABLED=1 chooses its groups from GPTQ's calibration: set QUANT=gptq or AWQ_LITE_ENABLED=0",
        ),
        (
            s.ttt_chunk_size > s.ttt_eval_seq_len,
            f"TTT_CHUNK_SIZE={s.ttt_chunk_size} must be at most TTT_EVAL_SEQ_LEN={s.ttt_eval_seq_len}",
        ),
        *(
            (
                n * length > MAX_BATCH_TOKENS,
                f"{name}={n} {unit}={length} make batches of {n * length:,} tokens, over {MAX_BATCH_TOKENS:,}: "
                f"lower {name}",
            )
            for name, n, unit, length in (
                ("EVAL_BATCH_SEQS", s.eval_batch_seqs, "windows of EVAL_SEQ_LEN", s.eval_seq_len),
                ("TTT_BATCH_SEQS", s.ttt_batch_seqs, "sequences of EVAL_SEQ_LEN", s.eval_seq_len),
                ("TTT_BATCH_SIZE", s.ttt_batch_size, "documents of up to TTT_EVAL_SEQ_LEN", s.ttt_eval_seq_len),
                ("GLOBAL_TTT_BATCH_SEQS", s.global_ttt_batch_seqs, "sequences of EVAL_SEQ_LEN", s.eval_seq_len),
            )
        ),
        (
            s.ttt_enabled and s.ttt_chunk_tokens % s.eval_seq_len,
            f"TTT_CHUNK_TOKENS={s.ttt_chunk_tokens} must be a multiple of EVAL_SEQ_LEN={s.eval_seq_len}",
        ),
        (
            s.gptq_calib == "train" and s.max_wallclock_seconds > 0 and s.gptq_reserve_seconds <= 0,
            "GPTQ_CALIB=train reads training tokens after training: set GPTQ_RESERVE_SECONDS > 0 (taken out of "
            "MAX_WALLCLOCK_SECONDS) or use GPTQ_CALIB=self",
        ),
        (
            s.phased_ttt_enabled and s.ttt_short_score_first_enabled and not short_doc_chunks(s),
            "TTT_SHORT_SCORE_FIRST_ENABLED=1 needs TTT_SHORT_SCORE_FIRST_STEPS, e.g. 256:8,2000:24",
        ),
        (
            seq_stages(s) and not s.doc_masked_attn,
            "TRAIN_SEQ_SCHEDULE caps document pieces: it needs DOC_MASKED_ATTN=1",
        ),
        (
            any(n > s.train_batch_tokens // 8 for _, n in seq_stages(s)),
            f"TRAIN_SEQ_SCHEDULE={s.train_seq_schedule} has a length over the packed row of TRAIN_BATCH_TOKENS/8="
            f"{s.train_batch_tokens // 8} tokens",
        ),
        (
            s.eval_only and not s.artifact_path,
            f"EVAL_ONLY=1 needs ARTIFACT_PATH=<a {ARTIFACT_NAME}, or a {FLOAT_NAME} to export again>",
        ),
    ):
        if bad:
            raise Fail(msg)


def help_text():
    """`python3 train_gpt.py --help`: every setting by group, its value under STACK=seed, what it does, and its value
    under each other stack that sets it."""
    lines = [
        "usage: [SETTING=value ...] torchrun --standalone --nproc_per_node=8 train_gpt.py  (or python3 train_gpt.py)",
        "Every setting is an environment variable. STACK picks the record whose values the others default to",
        "(seed unless set); a variable set explicitly wins. Below: SETTING=its value under STACK=seed, what it does,",
        "and [stack=value] for each other stack that sets it. docs/settings.md has the same table.",
    ]
    for group in SETTING_GROUPS:
        lines += ["", f"{group.__name__.removesuffix('Settings')}: {group.__doc__}"]
        for f in fields(group):
            others = " ".join(f"{k}={stack_value(k, f.name)}" for k in STACKS if k != "seed" and f.name in STACKS[k])
            lines.append(f"  {f.name.upper()}={stack_value('seed', f.name)}")
            lines.append(f"      {f.metadata['doc']}" + (f"  [{others}]" if others else ""))
    return "\n".join(lines)


def stack_value(stack, name):
    """A stack's value of a setting as the environment writes it; the other setting's name where it follows one."""
    if name == "stack":
        return stack
    value = STACKS[stack].get(name, getattr(DEFAULT_SETTINGS, name))
    return value.name.upper() if isinstance(value, SameAs) else shown(value) or '""'


DEFAULT_SETTINGS = Settings()


# -------------------- data

SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_WORDS = 20240520, 1, 256
# Validation shards, and their byte sidecars (CaseOps: per token, the UTF-8 bytes of the original text it covers)
VAL_SHARDS, VAL_BYTES = "fineweb_val_[0-9]*.bin", "fineweb_val_bytes_[0-9]*.bin"
BOS_ID = 1  # every document starts with it; no EOS


def load_data_shard(path):
    """256 int32 header words (magic, version, count), then count uint16 tokens."""
    path, head = Path(path), SHARD_HEADER_WORDS * 4
    size = path.stat().st_size
    if size < head:
        raise Fail(f"{path}: {size} bytes is shorter than the {head}-byte shard header (truncated file?)")
    magic, version, count = np.fromfile(path, dtype="<i4", count=3).tolist()
    if (magic, version) != (SHARD_MAGIC, SHARD_VERSION):
        raise Fail(
            f"{path}: not a token shard (magic {magic}, version {version}; expected {SHARD_MAGIC}, {SHARD_VERSION})"
        )
    if size != head + 2 * count:
        raise Fail(
            f"{path}: header says {count} tokens ({head + 2 * count} bytes) but the file has {size} "
            "(truncated or corrupt; download it again)"
        )
    return np.fromfile(path, dtype="<u2", count=count, offset=head)


FETCH = "fetch with `python data/fineweb.py download --variant sp1024`"


def shard_files(pattern):
    if not (files := sorted(glob.glob(pattern))):
        raise Fail(f"no data files match {pattern}; {FETCH} or set DATA_PATH")
    return files


class TokenStream:
    """The shards in sorted order, wrapping around."""

    def __init__(self, pattern):
        self.files, self.file_idx = shard_files(pattern), 0
        self.tokens, self.pos = load_data_shard(self.files[0]), 0

    def take(self, n):
        parts = []
        while n > 0:
            if self.pos == len(self.tokens):
                self.file_idx = (self.file_idx + 1) % len(self.files)
                self.tokens, self.pos = load_data_shard(self.files[self.file_idx]), 0
            k = min(n, len(self.tokens) - self.pos)
            parts.append(self.tokens[self.pos : self.pos + k])
            self.pos, n = self.pos + k, n - k
        return np.concatenate(parts)


class DistributedTokenLoader:
    """Each call takes world_size spans of local_tokens+1 and keeps this rank's."""

    def __init__(self, pattern, rank, world_size, device):
        self.rank, self.world_size, self.device = rank, world_size, device
        self.stream = TokenStream(pattern)

    def next_batch(self, local_tokens, seq_len):
        span = local_tokens + 1
        chunk = self.stream.take(span * self.world_size)[self.rank * span : (self.rank + 1) * span]
        t = torch.from_numpy(chunk.astype(np.int64)).to(self.device, non_blocking=True)
        return t[:-1].reshape(-1, seq_len), t[1:].reshape(-1, seq_len)


def load_validation_tokens(pattern, seq_len, max_tokens, include_tail=False):
    """The validation tokens (the first max_tokens + 1 when max_tokens > 0): whole seq_len windows of targets, and
    the last partial one too with include_tail (EVAL_INCLUDE_TAIL)."""
    tokens = np.concatenate([load_data_shard(f) for f in shard_files(pattern)])
    if max_tokens > 0:
        tokens = tokens[: max_tokens + 1]
    if not (whole := (len(tokens) - 1) // seq_len * seq_len):
        raise Fail(
            f"validation split {pattern} has {len(tokens)} tokens, fewer than one sequence of "
            f"{seq_len}+1; lower EVAL_SEQ_LEN or raise VAL_MAX_TOKENS"
        )
    usable = len(tokens) - 1 if include_tail else whole
    return torch.from_numpy(tokens[: usable + 1].astype(np.int64))


def build_sentencepiece_luts(sp, vocab_size, device):
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
        else:
            piece = sp.id_to_piece(i)
            has_space[i] = piece.startswith("\u2581")
            base_bytes[i] = len(piece.removeprefix("\u2581").encode("utf-8"))
    return tuple(torch.tensor(a, device=device) for a in (base_bytes, has_space, is_boundary))


def target_bytes(prev, tgt, luts, pos=None):
    """Bytes of each target token tgt (after prev, at val position pos): from the sidecar when luts is one, else
    the piece's bytes plus its leading space unless it follows a control token."""
    if len(luts) == 1:
        return luts[0][pos]
    base_bytes, has_space, is_boundary = luts
    return base_bytes[tgt].to(torch.int64) + (has_space[tgt] & ~is_boundary[prev]).to(torch.int64)


def byte_counter(s, sp, n_val, device):
    """(how bpb counts bytes, what it is): the validation byte sidecar when DATA_PATH has one, else the tokenizer's
    look-up tables. A sidecar must hold one count per token of its val shard."""
    files = sorted(glob.glob(os.path.join(s.data_path, VAL_BYTES)))
    if not files:
        return build_sentencepiece_luts(sp, s.vocab_size, device), "tokenizer LUT"
    shards = shard_files(os.path.join(s.data_path, VAL_SHARDS))
    counts = [load_data_shard(f) for f in files]
    if len(files) != len(shards) or any(len(c) != len(load_data_shard(t)) for c, t in zip(counts, shards)):
        raise Fail(
            f"the byte sidecars {VAL_BYTES} in {s.data_path} are not parallel to its val shards ({len(files)} "
            f"files for {len(shards)}, or a count differs); rebuild them with data/caseops.py prep"
        )
    return (torch.from_numpy(np.concatenate(counts)[:n_val].astype(np.int64)).to(device),), f"sidecar {VAL_BYTES}"


def load_tokenizer(s):
    """The SentencePiece model at TOKENIZER_PATH, checked against VOCAB_SIZE."""
    path = s.tokenizer_path
    if not os.path.isfile(path):
        raise Fail(f"tokenizer {path} not found; {FETCH} or set TOKENIZER_PATH")
    sp = spm.SentencePieceProcessor(model_file=path)
    if sp.vocab_size() != s.vocab_size:
        raise Fail(f"tokenizer {path} has vocab {sp.vocab_size()} but VOCAB_SIZE={s.vocab_size}")
    return sp


# -------------------- model


def rms_norm(x):
    """RMSNorm over the last dimension, no weight."""
    return F.rms_norm(x, (x.size(-1),))


def fake_quantize(w, bits):
    """Late QAT: per-row fake quantization to `bits` bits (scale = row max / q_max, q_max = 2^(bits-1) - 1; the
    integers -q_max-1..q_max), straight-through gradient."""
    max_q = 2 ** (bits - 1) - 1
    scale = w.detach().abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / max_q
    q = torch.clamp(torch.round(w / scale), -max_q - 1, max_q) * scale
    return w + (q - w).detach()


def apply_partial_rope(x, rope_dims, base, past=0, freq_bf16=False):
    """Rotate the first rope_dims of each head of x [B, T, H, D] at positions past.. (the two halves pair up); with
    freq_bf16 at frequencies rounded to bf16 (ROPE_FREQ_BF16)."""
    T, half = x.size(1), rope_dims // 2
    inv_freq = 1.0 / base ** (torch.arange(0, rope_dims, 2, device=x.device, dtype=torch.float32) / rope_dims)
    if freq_bf16:
        inv_freq = inv_freq.bfloat16().float()
    angles = torch.outer(torch.arange(past, past + T, device=x.device, dtype=torch.float32), inv_freq)
    cos, sin = angles.cos()[None, :, None, :].to(x.dtype), angles.sin()[None, :, None, :].to(x.dtype)
    x1, x2, rest = x[..., :half], x[..., half:rope_dims], x[..., rope_dims:]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin, rest), dim=-1)


def rope_base(c, seq_len):
    """The rotary base of model config c at seq_len: raised past ROPE_TRAIN_SEQ_LEN (1024 = the reference's)."""
    ref, base = c.rope_train_seq_len, c.rope_base
    return base if ref <= 0 or seq_len <= ref else base * (seq_len / ref) ** (c.rope_dims / (c.rope_dims - 2))


def doc_segments(idx, max_len):
    """Segment id of every position of idx [B, T]: a new segment at each BOS and every max_len tokens into a
    document (the record's split of long documents), and at each row start. Tokens only attend within a segment."""
    pos = torch.arange(idx.size(1), device=idx.device)
    doc_start = torch.where(idx == BOS_ID, pos, 0).cummax(dim=1).values
    return ((pos - doc_start) % max_len == 0).cumsum(dim=1)


def sdpa(q, k, v, seg=None):
    """Causal attention of q [B, T, H, D] over k, v [B, T, Hkv, D]; with seg, only within equal segment ids
    (a dense [B, 1, T, T] mask: the CPU's and the fallback's exact path)."""
    mask = None
    if seg is not None:
        mask = (seg[:, :, None] == seg[:, None, :]) & torch.ones(
            q.size(1), q.size(1), dtype=torch.bool, device=q.device
        ).tril()
    y = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=None if mask is None else mask[:, None],
        is_causal=seg is None,
        enable_gqa=True,
    )
    return y.transpose(1, 2)


def segment_sdpa(q, k, v, seg):
    """Document-masked attention one segment at a time, as the record's per-document kernel calls: the same numbers
    as sdpa's dense mask, without computing the masked scores (the CPU's path; under compile the dense mask)."""
    if torch.compiler.is_compiling():
        return sdpa(q, k, v, seg)
    rows = []
    for b in range(q.size(0)):
        cuts = (torch.nonzero(seg[b, 1:] != seg[b, :-1]).flatten() + 1).tolist()
        spans = zip([0] + cuts, cuts + [q.size(1)])
        rows.append(torch.cat([sdpa(q[b : b + 1, a:e], k[b : b + 1, a:e], v[b : b + 1, a:e]) for a, e in spans], 1))
    return torch.cat(rows)


def flex_attention_fn():
    """Document-masked causal attention through FlexAttention: block-sparse, so memory grows with T, not T^2."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def attend(q, k, v, seg):
        def doc_causal(b, h, qi, ki):  # torch 2.5 also asks about the block padding past T: clamped into the row
            return (qi >= ki) & (seg[b, qi.clamp_max(T - 1)] == seg[b, ki.clamp_max(T - 1)])

        B, T = seg.shape
        mask = create_block_mask(doc_causal, B, None, T, T, device=q.device)
        return flex_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask, enable_gqa=True
        ).transpose(1, 2)

    return attend


def first_output(y):
    """A FlashAttention call's output (some builds return (out, softmax_lse))."""
    return y[0] if isinstance(y, tuple) else y


def varlen_attention_fn(fa_varlen):
    """FlashAttention's varlen kernel on the flattened batch: every segment start (a static-size list, padded with
    empty segments at the end so that compile sees one shape) is a sequence boundary."""

    def attend(q, k, v, seg):
        B, T, H, D = q.shape
        starts = torch.ones_like(seg, dtype=torch.bool)
        starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
        # the start positions in order, then B*T for every other position, and a last B*T: B*T+1 entries
        # (torch.nonzero_static would say it in one call, but has no CUDA kernel before torch 2.6)
        end = torch.full((B * T,), B * T, device=seg.device)
        positions = torch.where(starts.flatten(), torch.arange(B * T, device=seg.device), end).sort().values
        cu = torch.cat((positions, end[:1])).to(torch.int32)
        y = fa_varlen(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cu, T, T, causal=True)
        return first_output(y).view(B, T, H, D)

    return attend


class Unavailable(Exception):
    """An attention kernel that cannot run here; the message says why (the log lists it)."""


def installed_kernel(module):
    """A FlashAttention module installed in this environment (a missing one, or a build that does not load)."""
    try:
        return __import__(module)
    except ImportError as e:
        raise Unavailable(f"import {module} failed ({e})") from None


def hub_kernel(repo, timeout_s):
    """FA3's interface from the Hugging Face Hub through the `kernels` package (as modded-nanogpt loads it),
    waiting at most timeout_s: the download runs in a daemon thread, left behind if the Hub does not answer."""
    if not repo:
        raise Unavailable("ATTN_KERNEL_REPO is empty")
    try:
        import kernels
    except ImportError:
        raise Unavailable("the kernels package is not installed (pip install kernels)") from None
    got = {}

    def load():
        try:
            got["module"] = kernels.get_kernel(repo).flash_attn_interface
        except Exception as e:  # no network, no build for this torch/CUDA, a broken repo: all mean "not here"
            got["error"] = ": ".join([type(e).__name__] + str(e).splitlines()[:1])

    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    loader.join(timeout_s)
    if loader.is_alive():
        raise Unavailable(f"the Hub did not answer for {repo} within {timeout_s:g} s (ATTN_HUB_TIMEOUT_SECONDS)")
    if "error" in got:
        raise Unavailable(f"kernels.get_kernel({repo!r}) failed: {got['error']}")
    return got["module"]


class Attention(NamedTuple):
    name: str  # the backend that runs: fa3, fa2 or sdpa
    source: str  # where it came from: installed, kernels hub <repo>, torch
    dense: object  # causal attention (q, k, v) of [B, T, H, D]
    documents: object  # document-masked attention (q, k, v, seg)
    documents_name: str
    passed_over: list  # "backend (source): why not" for each faster backend tried that cannot run here


def pick_attention(s, device, capability=None):
    """The attention kernels of this run: ATTN_BACKEND, or with auto the first of FlashAttention 3 installed, FA3
    from the Hub (`kernels`), FlashAttention 2, then PyTorch's (sdpa; document masks by FlexAttention on CUDA,
    segment by segment on the CPU). capability: the GPU's compute capability (default: asked of torch.cuda)."""
    candidates = (
        ("fa3", "installed", lambda: installed_kernel("flash_attn_interface")),
        (
            "fa3",
            f"kernels hub {s.attn_kernel_repo}".strip(),
            lambda: hub_kernel(s.attn_kernel_repo, s.attn_hub_timeout_seconds),
        ),
        ("fa2", "installed", lambda: installed_kernel("flash_attn")),
    )
    passed_over = []
    for name, source, load in candidates:
        if s.attn_backend not in ("auto", name):
            continue
        try:
            if device.type != "cuda":
                raise Unavailable("needs a CUDA device")
            major = (capability or torch.cuda.get_device_capability)(device)[0]
            if name == "fa3" and major != 9:
                raise Unavailable(f"FA3 runs on Hopper GPUs only (compute capability 9.x; this one is {major}.x)")
            fa = load()
        except Unavailable as e:
            passed_over.append(f"{name} ({source}): {e}")
            continue
        dense = lambda q, k, v, seg=None: first_output(fa.flash_attn_func(q, k, v, causal=True))
        documents = varlen_attention_fn(fa.flash_attn_varlen_func)
        return Attention(name, source, dense, documents, f"{name} varlen", passed_over)
    if s.attn_backend in ("fa3", "fa2"):
        raise Fail(f"ATTN_BACKEND={s.attn_backend} cannot run here: {'; '.join(passed_over)}; use sdpa or auto")
    if device.type == "cuda":
        return Attention("sdpa", "torch", sdpa, flex_attention_fn(), "flex_attention", passed_over)
    return Attention("sdpa", "torch", sdpa, segment_sdpa, "sdpa by segment", passed_over)


def check_same_attention(picked):
    """Every rank runs the same kernels (picked[r]: rank r's backend and source); ranks that saw the Hub differently
    (one timed out, another loaded FA3) would not, and a run that mixes them is refused."""
    if len(set(picked)) > 1:
        ranks = {p: [str(r) for r, q in enumerate(picked) if q == p] for p in dict.fromkeys(picked)}
        where = "; ".join(f"{p} on rank {','.join(r)}" for p, r in ranks.items())
        raise Fail(
            f"the ranks picked different attention backends ({where}); run again (a Hub kernel is cached once "
            "loaded), or set ATTN_BACKEND for all"
        )


BANK_ROWS = dict(
    qo_bank=("attn.c_q", "attn.proj"),
    kv_bank=("attn.c_k", "attn.c_v"),
    mlp_up_bank=("mlp.fc",),
    mlp_down_bank=("mlp.proj",),
)
TIED_EMBED = "tok_emb.weight"  # the token embedding, also the output head
EMBED_TABLES = (TIED_EMBED, "bigram_emb", "ve_emb")


def matrix_name(bank, j, num_layers):  # row j of a bank, as exported
    return f"blocks.{j % num_layers}.{BANK_ROWS[bank][j // num_layers]}.weight"


@dataclass(frozen=True)
class ModelConfig:
    """What GPT is built from: the architecture (the settings of the same names: ModelSettings), and the training
    sequence length, the piece length of long documents under document-masked attention. Nothing else of the run
    reaches the model: training and evaluation set its modes (GPT's docstring) and pass what else it needs."""

    vocab_size: int
    num_layers: int
    model_dim: int
    num_heads: int
    num_kv_heads: int
    mlp_mult: float
    tied_embed_init_std: float
    init_draw_order: str
    logit_softcap: float
    asym_logit_rescale: int
    rope_base: float
    rope_dims: int
    rope_train_seq_len: int
    rope_freq_bf16: int
    qk_gain_init: float
    ln_scale: int
    xsa_last_n: int
    bigram_vocab_size: int
    bigram_dim: int
    ve_dim: int
    ve_layers: tuple  # empty without value embeddings
    smear_fixed_enabled: int
    smear_gate_enabled: int
    smear_gate_bos_fix: int
    gate_window: int
    sparse_attn_gate_enabled: int
    sparse_attn_gate_scale: float
    skip_gates_enabled: int
    parallel_start_layer: int
    num_loops: int
    loop_start: int
    loop_end: int
    doc_masked_attn: int
    train_seq_len: int

    @classmethod
    def of(cls, s):
        """The model config of settings s."""
        return cls(**{f.name: getattr(s, f.name) for f in fields(cls)} | dict(ve_layers=tuple(s.ve_layers)))


class Block(nn.Module):
    """Per-layer scales and gains; the layer's matrices live in the GPT's banks."""

    def __init__(self, c, dim, num_heads):
        super().__init__()
        self.attn_scale = nn.Parameter(torch.ones(dim))
        self.mlp_scale = nn.Parameter(torch.ones(dim))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))))
        self.q_gain = nn.Parameter(torch.full((num_heads,), c.qk_gain_init))
        if c.sparse_attn_gate_enabled:  # per-head output gate from the first GATE_WINDOW input channels
            self.attn_gate_w = nn.Parameter(torch.zeros(num_heads, c.gate_window))


def layer_schedule(c, looped):
    """Physical layer of each virtual layer of model config c, split into encoder and decoder halves. Looped, layers
    LOOP_START..LOOP_END run NUM_LOOPS extra times (PR #1855: [0,1,2,3,4,5,3,4] and [5,3,4,5,6,7,8,9,10])."""
    L, a, b = c.num_layers, c.loop_start, c.loop_end
    order = list(range(L))
    if looped and c.num_loops:
        order = order[:a] + order[a : b + 1] * (c.num_loops + 1) + order[b + 1 :]
    return order[: len(order) // 2], order[len(order) // 2 :]


class GPT(nn.Module):
    """The whole model: embeddings, NUM_LAYERS blocks whose matrices live in four banks (the Muon parameters), U-Net
    skips, optional lanes and loops, and the tied head, built from a ModelConfig. forward_hidden + compute_logits is
    the one forward path.

    Modes, set by training, export and evaluation between forward passes (each changes what runs):
      looping      depth recurrence on: LOOP_START..LOOP_END repeated (training from ENABLE_LOOPING_AT; evaluation
                   and calibration always)
      qat_bits     late QAT: 0 = off, else every matrix fake-quantized to this many bits in the forward pass ...
      qat_banks    ... the banked attention/MLP matrices too (LATE_QAT_BANKS), not only the plain linears
      input_hook   None, or hook(name, x) called with the input of every bank matrix as the export names it
                   (GPTQ calibration collects its Hessians through it)
      piece_len    the longest document piece under document-masked attention: TRAIN_SEQ_LEN, or during training
                   the stage of TRAIN_SEQ_SCHEDULE (a 0-d buffer, not saved: a new value recompiles nothing)"""

    def __init__(self, config, attention=None):
        """attention: the run's Attention kernels (pick_attention); None: sdpa with a dense document mask."""
        super().__init__()
        c = self.config = config
        self.attention, self.doc_attention = (attention.dense, attention.documents) if attention else (sdpa, sdpa)
        V, d, L = c.vocab_size, c.model_dim, c.num_layers
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, d // c.num_heads
        kv_dim, hidden = self.num_kv_heads * self.head_dim, int(c.mlp_mult * d)
        self.looping, self.qat_bits, self.qat_banks, self.input_hook = False, 0, True, None
        self.register_buffer("piece_len", torch.tensor(c.train_seq_len), persistent=False)
        self.tok_emb = nn.Embedding(V, d)
        record = c.init_draw_order == "pr1855"
        if record and c.smear_gate_enabled:  # PR #1855's smear gate is a Linear whose constructor draws, then zeroes
            nn.init.kaiming_uniform_(torch.empty(1, c.gate_window), a=math.sqrt(5))
        nn.init.normal_(self.tok_emb.weight, std=c.tied_embed_init_std)
        if c.asym_logit_rescale:  # PR #1923's two caps, trained here by the scalars' AdamW (the records' never were)
            self.softcap_pos = nn.Parameter(torch.tensor(c.logit_softcap))
            self.softcap_neg = nn.Parameter(torch.tensor(c.logit_softcap))
        if c.bigram_vocab_size:
            self.bigram_emb = nn.Parameter(torch.zeros(c.bigram_vocab_size, c.bigram_dim))
            # Orthogonal as the reference's init leaves them (zero table x zero projection: no gradient)
            self.bigram_proj = nn.Parameter(nn.init.orthogonal_(torch.empty(d, c.bigram_dim)))
            self.bigram_scale = nn.Parameter(torch.tensor(0.05))
        if c.smear_fixed_enabled:  # the seed's: a learned per-channel mix with the previous position
            self.smear_gate = nn.Parameter(torch.zeros(d))
        if c.smear_gate_enabled:  # the record's: lambda * sigmoid(w . e_t[:GATE_WINDOW]), identity at init
            self.smear_w = nn.Parameter(torch.zeros(c.gate_window))
            self.smear_lambda = nn.Parameter(torch.zeros(()))
        self.qo_bank = nn.Parameter(torch.empty(2 * L, d, d))
        self.kv_bank = nn.Parameter(torch.empty(2 * L, kv_dim, d))
        self.mlp_up_bank = nn.Parameter(torch.empty(L, hidden, d))
        self.mlp_down_bank = nn.Parameter(torch.zeros(L, d, hidden))
        qo, kv, up = self.qo_bank.data, self.kv_bank.data, self.mlp_up_bank.data
        for i in range(L):  # PR #1855 draws every layer's attention first, then the MLPs
            for w in (qo[i], kv[i], kv[L + i]) if record else (qo[i], kv[i], kv[L + i], up[i]):
                nn.init.orthogonal_(w)
        for i in range(L if record else 0):
            nn.init.orthogonal_(up[i])
        qo[L:].zero_()  # output projections (and MLP down, above) start at exactly zero
        self.blocks = nn.ModuleList(Block(c, d, self.num_heads) for _ in range(L))
        self.num_skips = min(map(len, layer_schedule(c, looped=True)))
        self.skip_weights = nn.Parameter(torch.ones(self.num_skips, d))
        if c.skip_gates_enabled:  # sigmoid(0) = 1/2: the skip merge starts as an even blend
            self.skip_gates = nn.Parameter(torch.zeros(self.num_skips, d))
        if c.parallel_start_layer:  # two-lane decoder: residual and routing weights of each lane
            self.parallel_resid_lambdas = nn.Parameter(torch.full((L, 2), 1.1))
            self.parallel_post_lambdas = nn.Parameter(torch.ones(L, 2, 2))
        self.ve_layers = list(c.ve_layers)
        if self.ve_layers:
            self.ve_emb = nn.Parameter(torch.randn(V, c.ve_dim) * 0.01)
            self.ve_proj = nn.Parameter(nn.init.orthogonal_(torch.empty(kv_dim, c.ve_dim)))
            self.ve_scale = nn.Parameter(torch.tensor(0.1))
            self.ve_layer_scales = nn.Parameter(torch.ones(len(self.ve_layers)))
        if record:  # as PR #1855's model.bfloat16() + restore_fp32_params leaves them
            with torch.no_grad():
                for p in self.parameters():
                    p.copy_(p.bfloat16())

    def weight(self, w, dtype, bank=False):
        """A matrix as the forward pass uses it: fake-quantized under late QAT (a bank's only with qat_banks)."""
        if self.qat_bits and (self.qat_banks or not bank):
            w = fake_quantize(w, self.qat_bits)
        return w.to(dtype)

    def bank_linear(self, x, bank, j, dtype):
        if self.input_hook is not None:  # per physical matrix: a looped layer's is seen once per virtual use
            self.input_hook(matrix_name(bank, j, len(self.blocks)), x)
        return F.linear(x, self.weight(getattr(self, bank)[j], dtype, bank=True))

    def bigram_hash(self, idx):
        mod = self.config.bigram_vocab_size - 1
        h = torch.bitwise_xor(36313 * idx[:, 1:], 27191 * idx[:, :-1]) % mod
        return torch.cat((torch.full_like(idx[:, :1], mod), h), dim=1)

    def embed(self, idx, dtype):
        """x0: token embedding (+ bigram hash), the record's smear gate, RMSNorm, the seed's smear gate."""
        x = self.tok_emb.weight.to(dtype)[idx]
        if self.config.bigram_vocab_size:
            big = self.bigram_emb.to(dtype)[self.bigram_hash(idx)]
            x = x + F.linear(big, self.weight(self.bigram_proj, dtype)) * self.bigram_scale.to(dtype)
        if self.config.smear_gate_enabled:
            g = self.smear_lambda.to(dtype) * torch.sigmoid(
                x[:, 1:, : self.config.gate_window] @ self.smear_w.to(dtype)
            )
            if self.config.smear_gate_bos_fix:  # never across a BOS: the previous document must not reach this one
                g = g * (idx[:, 1:] != BOS_ID).to(dtype)
            x = torch.cat((x[:, :1], x[:, 1:] + g[..., None] * x[:, :-1]), dim=1)
        x = rms_norm(x)
        if self.config.smear_fixed_enabled:
            g = torch.sigmoid(self.smear_gate.to(dtype))
            x = (1 - g) * x + g * torch.cat((torch.zeros_like(x[:, :1]), x[:, :-1]), dim=1)
        return x

    def adapted(self, lora, name, x, y):
        """y plus phased TTT's LoRA term (x A^T) B^T scale of adapter name (one A, B per row: a document); y
        itself without adapters (no extra op on the other paths) or where TTT_*_LORA switched this one off."""
        if lora is None or name not in lora.adapters:
            return y
        A, B = (t.to(x.dtype) for t in lora.adapters[name])
        return y + (x @ A.mT) @ B.mT * lora.scale

    def attn(self, i, x, ve, dtype, cache=None, seg=None, slot=0, lora=None):
        """Layer i's attention on normed input x; slot is its virtual index (its generation-cache entry, its LoRA
        adapters: Q, K, V, and an O bypass from x, as PR #1855)."""
        B, T, _ = x.shape
        L, H, Hkv, D = len(self.blocks), self.num_heads, self.num_kv_heads, self.head_dim
        q = self.adapted(lora, f"q{slot}", x, self.bank_linear(x, "qo_bank", i, dtype)).view(B, T, H, D)
        k = self.adapted(lora, f"k{slot}", x, self.bank_linear(x, "kv_bank", i, dtype)).view(B, T, Hkv, D)
        v = self.adapted(lora, f"v{slot}", x, self.bank_linear(x, "kv_bank", L + i, dtype))
        if ve is not None:
            v = v + ve * self.ve_layer_scales[self.ve_layers.index(i)].to(dtype)
        v = v.view(B, T, Hkv, D)
        past = cache["len"] if cache else 0
        base, rd = rope_base(self.config, past + T), self.config.rope_dims
        bf16 = self.config.rope_freq_bf16
        q, k = (apply_partial_rope(rms_norm(t), rd, base, past, bf16) for t in (q, k))
        q = q * self.blocks[i].q_gain.to(dtype)[None, None, :, None]
        if cache is not None:  # generation: this call's keys and values after the cached ones
            cache[slot] = kv = [torch.cat(t, 1) for t in zip(cache.get(slot, (k[:, :0], v[:, :0])), (k, v))]
        if past:  # the new position attends to every cached one
            y = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, *kv)), enable_gqa=True).transpose(1, 2)
        elif seg is not None:
            y = self.doc_attention(q, k, v, seg)
        else:
            y = self.attention(q, k, v)
        if i >= L - self.config.xsa_last_n:  # XSA: remove each head's component along its own value vector
            y = y.view(B, T, Hkv, H // Hkv, D)
            vn = F.normalize(v, dim=-1).unsqueeze(-2)
            y = (y - (y * vn).sum(-1, keepdim=True) * vn).view(B, T, H, D)
        if self.config.sparse_attn_gate_enabled:
            gate = torch.sigmoid(
                self.config.sparse_attn_gate_scale
                * F.linear(x[..., : self.config.gate_window], self.blocks[i].attn_gate_w.to(dtype))
            )
            y = y * gate[..., None]
        return self.adapted(lora, f"o{slot}", x, self.bank_linear(y.reshape(B, T, H * D), "qo_bank", L + i, dtype))

    def mlp(self, i, x, dtype):
        h = F.leaky_relu(self.bank_linear(x, "mlp_up_bank", i, dtype), negative_slope=0.5)
        return self.bank_linear(h.square(), "mlp_down_bank", i, dtype)

    def block(self, i, x, x0, dtype, sub, ffn):
        """One sequential block: attention then MLP, each added back scaled. sub(x) runs layer i's attention, ffn(x)
        its MLP."""
        blk, ln = self.blocks[i], 1 / math.sqrt(i + 1) if self.config.ln_scale else 1.0
        mix = blk.resid_mix.to(dtype)
        x = mix[0] * x + mix[1] * x0
        x = x + blk.attn_scale.to(dtype) * sub(rms_norm(x) * ln)
        return x + blk.mlp_scale.to(dtype) * ffn(rms_norm(x) * ln)

    def parallel_block(self, i, lanes, x0, dtype, sub, ffn):
        """Two-lane block: attention reads lane 0 (mixed with x0), the MLP lane 1; both write both lanes."""
        blk, ln = self.blocks[i], 1 / math.sqrt(i + 1) if self.config.ln_scale else 1.0
        mix = blk.resid_mix.to(dtype)
        a = blk.attn_scale.to(dtype) * sub(rms_norm(mix[0] * lanes[0] + mix[1] * x0) * ln)
        m = blk.mlp_scale.to(dtype) * ffn(rms_norm(lanes[1]) * ln)
        r, post = self.parallel_resid_lambdas[i].to(dtype), self.parallel_post_lambdas[i].to(dtype)
        return [r[j] * lanes[j] + post[0, j] * a + post[1, j] * m for j in (0, 1)]

    def merge_skip(self, j, x, skip, dtype):
        """Decoder layer j's U-Net skip: added, or with skip gates a sigmoid interpolation between x and it."""
        skip = self.skip_weights[j].to(dtype) * skip
        if not self.config.skip_gates_enabled:
            return x + skip
        return torch.lerp(skip, x, torch.sigmoid(self.skip_gates[j].to(dtype)))

    def forward_hidden(self, idx, cache=None, lora=None):
        """The last block's output [B, T, d]; with a cache (generation) only for the positions not yet cached; with
        lora (phased TTT) plus each row's adapters. Every path runs through here: training, every evaluation, TTT,
        SLOT and calibration."""
        dtype = self.tok_emb.weight.dtype if idx.device.type == "cpu" else torch.bfloat16
        past = cache["len"] if cache else 0
        ctx = max(past - 2, 0)  # the bigram hash and the smear gates look back up to two tokens
        x = x0 = self.embed(idx[:, ctx:], dtype)[:, past - ctx :]
        ve = None
        if self.ve_layers:
            ve = F.linear(self.ve_emb.to(dtype)[idx[:, past:]], self.weight(self.ve_proj, dtype)) * self.ve_scale.to(
                dtype
            )
        seg = doc_segments(idx, self.piece_len) if self.config.doc_masked_attn and cache is None else None
        encoder, decoder = layer_schedule(self.config, self.looping)

        def layer(i, slot):
            """Physical layer i's attention and MLP as its virtual layer slot runs them (slot picks the generation
            cache entry and the LoRA adapters; the MLP adds phased TTT's bypass from the same normed input)."""
            ve_i = ve if i in self.ve_layers else None
            return (
                lambda h: self.attn(i, h, ve_i, dtype, cache, seg, slot, lora),
                lambda h: self.adapted(lora, f"mlp{slot}", h, self.mlp(i, h, dtype)),
            )

        skips, lanes, start = [], None, self.config.parallel_start_layer
        for slot, i in enumerate(encoder):
            x = self.block(i, x, x0, dtype, *layer(i, slot))
            skips.append(x)
        for j, i in enumerate(decoder):
            sub, ffn = layer(i, len(encoder) + j)
            if start and i >= start and lanes is None:
                lanes = [x, x]
            if j < self.num_skips and skips:  # into lane 0 once there are two
                if lanes:
                    lanes[0] = self.merge_skip(j, lanes[0], skips.pop(), dtype)
                else:
                    x = self.merge_skip(j, x, skips.pop(), dtype)
            if lanes:
                lanes = self.parallel_block(i, lanes, x0, dtype, sub, ffn)
            else:
                x = self.block(i, x, x0, dtype, sub, ffn)
        if cache is not None:
            cache["len"] = idx.size(1)
        return 0.5 * (lanes[0] + lanes[1]) if lanes else x

    def compute_logits(self, h, lora=None):
        """Final RMSNorm, the tied head (plus phased TTT's head adapter), and the softcap c * tanh(z / c), in fp32 (with
        ASYM_LOGIT_RESCALE, c is one learned value for positive logits and another for negative ones)."""
        n = rms_norm(h)
        z = self.adapted(lora, "head", n, F.linear(n, self.tok_emb.weight.to(h.dtype))).float()
        cap = self.config.logit_softcap
        if self.config.asym_logit_rescale:
            cap = torch.where(z >= 0, self.softcap_pos, self.softcap_neg)
        return cap * torch.tanh(z / cap)

    def forward(self, idx, targets):
        """Mean cross-entropy: the training loss (and TTT's)."""
        logits = self.compute_logits(self.forward_hidden(idx))
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


# -------------------- optimizer

NS_QUINTIC = (3.4445, -4.7750, 2.0315)  # the seed's, every iteration
# Polar Express (PR #1344 via #1787): one minimax-optimal (a, b, c) per iteration
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def zeropower_via_newtonschulz5(G, steps, polar_express=False):
    """Approximate orthogonalization of a batch of matrices [N, rows, cols]: X <- aX + (bA + cA^2)X, A = XX^T,
    on X scaled to unit Frobenius norm (bf16 on CUDA)."""
    X = G.bfloat16() if G.is_cuda else G  # on the CPU in G's own dtype (bf16 under MUON_BF16)
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for a, b, c in POLAR_EXPRESS[:steps] if polar_express else [NS_QUINTIC] * steps:
        A = X @ X.mT
        cAA = c * (A @ A) if polar_express else c * A @ A  # each record's grouping: in bf16 they round apart
        X = a * X + (b * A + cAA) @ X
    return (X.mT if tall else X).to(G.dtype)


class ParallelMuon(torch.optim.Optimizer):
    """Muon over 3-D banks, each rank orthogonalizing its shard (no DDP): launch_reduce_scatter(), then step()."""

    def __init__(
        self, banks, lr, momentum, backend_steps, weight_decay, row_normalize=False, polar_express=False, bf16=False
    ):
        super().__init__(
            sorted(banks, key=lambda p: -p.numel()),
            dict(
                lr=lr,
                momentum=momentum,
                backend_steps=backend_steps,
                weight_decay=weight_decay,
                row_normalize=row_normalize,
                polar_express=polar_express,
                bf16=bf16,
            ),
        )
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.pending = []

    def padded_rows(self, p):
        return -(-p.size(0) // self.world) * self.world

    def launch_reduce_scatter(self):
        """Average each bank's gradient into this rank's shard of it (biggest bank first)."""
        self.pending = []
        for p in self.param_groups[0]["params"]:
            pad = self.padded_rows(p) - p.size(0)
            shard = g = F.pad(p.grad, (0, 0, 0, 0, 0, pad)) if pad else p.grad
            work = None
            if self.world > 1:
                shard = torch.empty_like(g[: g.size(0) // self.world])
                work = dist.reduce_scatter_tensor(shard, g, op=dist.ReduceOp.SUM, async_op=True)
            self.pending.append((shard, work))

    def wait_shards(self):
        for shard, work in self.pending:
            if work is not None:
                work.wait()
                shard.div_(self.world)
        return [shard for shard, _ in self.pending]

    @torch.no_grad()
    def step(self, shards):
        group = self.param_groups[0]
        lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
        updates = []
        for p, g in zip(group["params"], shards):
            if group["bf16"]:  # PR #1855's: the momentum buffer and every step of the update in bf16
                g = g.bfloat16()
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(g)
            buf = state["momentum_buffer"].mul_(mom).add_(g)
            update = g.add(buf, alpha=mom)  # Nesterov
            if group["row_normalize"]:  # MuonEq-R: every row to unit norm before orthogonalizing
                update = update / update.float().norm(dim=-1, keepdim=True).clamp_min(1e-7).to(update.dtype)
            update = zeropower_via_newtonschulz5(update, group["backend_steps"], group["polar_express"])
            update *= max(1.0, update.size(-2) / update.size(-1)) ** 0.5
            full, work = update, None
            if self.world > 1:
                full = update.new_empty(self.padded_rows(p), *p.shape[1:])
                work = dist.all_gather_into_tensor(full, update.contiguous(), async_op=True)
            updates.append((p, full, work))
        for p, full, work in updates:  # the gathers run while later banks orthogonalize
            if work is not None:
                work.wait()
            p.mul_(1 - lr * wd).add_(full[: p.size(0)].to(p.dtype), alpha=-lr)


def build_optimizers(model, s):
    """Muon on the four banks; AdamW on the embedding tables (TIED_EMBED_LR, EMBED_WD) and on everything else, the
    scalars and control vectors (SCALAR_LR, ADAM_WD; ASYM_LOGIT_RESCALE's two caps at SCALAR_LR, not decayed).
    Returns them and the AdamW parameters."""
    banks = [model.qo_bank, model.kv_bank, model.mlp_up_bank, model.mlp_down_bank]
    embeds = [getattr(model, k) for k in ("bigram_emb", "ve_emb") if hasattr(model, k)]
    embeds.insert(0, model.tok_emb.weight)
    caps = [getattr(model, k) for k in ("softcap_pos", "softcap_neg") if hasattr(model, k)]
    ids = {id(p) for p in banks + embeds + caps}
    scalars = [p for p in model.parameters() if id(p) not in ids]
    groups = [
        dict(params=embeds, lr=s.tied_embed_lr, weight_decay=s.embed_wd),
        dict(params=scalars, lr=s.scalar_lr, weight_decay=s.adam_wd),
    ]
    if caps:  # decay would pull the caps toward 0, a hard clamp of every logit
        groups.append(dict(params=caps, lr=s.scalar_lr, weight_decay=0.0))
    adam = torch.optim.AdamW(groups, betas=(s.beta1, s.beta2), eps=s.adam_eps, fused=bool(s.adam_fused) or None)
    muon = ParallelMuon(
        banks,
        s.matrix_lr,
        s.muon_momentum,
        s.muon_backend_steps,
        s.muon_wd,
        s.muon_row_normalize,
        s.muon_polar_express,
        s.muon_bf16,
    )
    for group in adam.param_groups + muon.param_groups:
        group["base_lr"] = group["lr"]
    return muon, adam, scalars + caps + embeds


def all_reduce_(tensors, mean):
    """Sum (or average) tensors over ranks in one collective."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    if mean:
        flat /= world
    for t, chunk in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(chunk.view_as(t))


def clip_coefficient(grads, bank_shards, max_norm):
    """Global clip factor: bank shards are disjoint across ranks, the other gradients replicated."""
    sq = sum((g.float().square().sum() for g in bank_shards), torch.zeros((), device=grads[0].device))
    if dist.is_initialized():
        dist.all_reduce(sq)
    sq = sq + sum(g.float().square().sum() for g in grads)
    return torch.clamp(max_norm / (sq.sqrt() + 1e-6), max=1.0)


def optimizer_step(muon, adam, others, s):
    """One step: the banks' reduce-scatter in flight while the other gradients are averaged in one all-reduce,
    the global (or per-rank) clip, AdamW, then Muon on this rank's shard of each bank."""
    clip = s.grad_clip_norm
    if clip > 0 and s.grad_clip_local:  # the reference: each rank clips its own gradients before averaging
        torch.nn.utils.clip_grad_norm_(others + muon.param_groups[0]["params"], clip)
    muon.launch_reduce_scatter()
    grads = [p.grad for p in others]
    all_reduce_(grads, mean=True)
    shards = muon.wait_shards()
    if clip > 0 and not s.grad_clip_local:
        torch._foreach_mul_(grads + shards, clip_coefficient(grads, shards, clip))
    adam.step()
    muon.step(shards)


# -------------------- training


# The oldest torch this file runs on (tools/install.py says the same): scaled_dot_product_attention's and
# flex_attention's enable_gqa (grouped-query attention without copying K and V) came in torch 2.5.
MIN_TORCH = (2, 5)


def check_torch_version(version):
    have = tuple(int(x) for x in re.findall(r"\d+", version.split("+")[0])[:2])
    if have < MIN_TORCH:
        raise Fail(
            f"torch {version} is too old: train_gpt.py needs torch >= {'.'.join(map(str, MIN_TORCH))} "
            "(scaled_dot_product_attention's enable_gqa); install a newer torch (python3 tools/install.py says which)"
        )


class Run:  # settings, rank, device, log file
    def __init__(self, s):
        check_torch_version(torch.__version__)
        self.s = s
        self.rank, self.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        if 8 % self.world:
            raise Fail(f"WORLD_SIZE={self.world} does not divide 8 (the micro-batches); use 1, 2, 4 or 8")
        cuda = torch.cuda.is_available()
        use_cuda = s.device == "cuda" or (s.device == "auto" and cuda)
        if use_cuda and not cuda:
            raise Fail("DEVICE=cuda but no CUDA device is visible; use DEVICE=cpu or auto")
        self.cuda = use_cuda
        self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        if "RANK" in os.environ and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=self.device if use_cuda else None)
        self.master = self.rank == 0
        self.compile = s.compile == "1" or (s.compile == "auto" and use_cuda)
        self.compiled_fns = {}
        self.attn = pick_attention(s, self.device)
        if dist.is_initialized() and self.world > 1:
            picked = [None] * self.world
            dist.all_gather_object(picked, f"{self.attn.name} ({self.attn.source})")
            check_same_attention(picked)
        self.out = Path(s.output_dir)
        self.logfile = self.out / "logs" / f"{s.run_id}.txt"
        try:
            self.logfile.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise Fail(
                f"OUTPUT_DIR={s.output_dir} cannot be created ({e.strerror}); set it to a writable folder"
            ) from None
        self.summary = dict(run_id=s.run_id, seed=s.seed, metrics={}, train_curve=[], val_curve=[])

    def log(self, msg, console=True):
        if self.master:
            if console:
                print(msg, flush=True)
            with open(self.logfile, "a", encoding="utf-8") as f:
                print(msg, file=f)

    def compiled(self, fn, dynamic=False):
        """torch.compile each function (or bound method) once; by default on CUDA only."""
        if self.compile and fn not in self.compiled_fns:
            self.compiled_fns[fn] = torch.compile(fn, dynamic=dynamic, fullgraph=True)
        return self.compiled_fns.get(fn, fn)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cuda)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def enter(self, stage):
        """A new stage of the run: what a Ctrl-C names, and what the JSON log records when the run stops there."""
        PROGRESS["stage"] = stage
        self.write_summary()

    def write_summary(self):
        """logs/<RUN_ID>.json, atomically: written at start-up and at every stage (a killed run leaves what it had)."""
        self.summary["stage"] = PROGRESS["stage"]
        if self.master:
            try:
                write_atomic(self.logfile.with_suffix(".json"), json.dumps(self.summary, indent=1).encode())
            except Fail as e:  # the scores still print and log
                self.log(f"warning: {e}")


def build_model(run, state=None):
    """A GPT on the run's device with its attention backends, from a state dict when given. EMBED_BF16 keeps the
    tied embedding in bf16, as PR #1855's model.bfloat16() + restore_fp32_params leaves it (on the CPU the forward
    pass then runs in bf16, as the record's code does there)."""
    model = GPT(ModelConfig.of(run.s), run.attn).to(run.device)
    if run.s.embed_bf16:
        model.tok_emb.to(torch.bfloat16)
    if state is not None:
        model.load_state_dict(state)
    return model


def train_cap_ms(s):
    """The wallclock cap less the GPTQ_CALIB=train reserve."""
    reserve = s.gptq_reserve_seconds if s.quant == "gptq" and s.gptq_calib == "train" else 0.0
    return 1000 * (s.max_wallclock_seconds - reserve) if s.max_wallclock_seconds > 0 else 0.0


def training_fraction(s, step, elapsed_ms):
    """How far training is: of the wallclock cap when there is one, else of ITERATIONS."""
    cap_ms = train_cap_ms(s)
    return elapsed_ms / cap_ms if cap_ms > 0 else step / s.iterations


def lr_multiplier(s, step, elapsed_ms):
    """1, then a linear warmdown: over the last WARMDOWN_FRAC of training (the record's), or the last
    WARMDOWN_ITERS steps (the seed's; by projected step time under a cap); never below MIN_LR."""
    warmdown, cap_ms = s.warmdown_iters, train_cap_ms(s)
    if s.warmdown_frac > 0:
        mult = min((1 - training_fraction(s, step, elapsed_ms)) / s.warmdown_frac, 1.0)
    elif warmdown <= 0:
        mult = 1.0
    elif cap_ms <= 0:
        mult = min(max((s.iterations - step) / warmdown, 0.0), 1.0)
    else:
        mult = min(max(cap_ms - elapsed_ms, 0.0) / max(warmdown * elapsed_ms / max(step, 1), 1e-9), 1.0)
    return max(mult, s.min_lr)


def muon_momentum(s, step):
    """Muon's momentum at a step: linear from MUON_MOMENTUM_WARMUP_START to MUON_MOMENTUM over the warm-up steps."""
    frac = min(step / s.muon_momentum_warmup_steps, 1.0) if s.muon_momentum_warmup_steps > 0 else 1.0
    return (1 - frac) * s.muon_momentum_warmup_start + frac * s.muon_momentum


def seq_stages(s):
    """TRAIN_SEQ_SCHEDULE as [(fraction, piece length)] in order of fraction, ending at 1 (the last length goes on);
    [] without one. Fail on a malformed stage."""
    stages = []
    for stage in filter(None, (x.strip() for x in s.train_seq_schedule.split(","))):
        length, _, frac = stage.partition("@")
        try:
            length, frac = int(length), float(frac)
        except ValueError:
            length = frac = -1
        if length <= 0 or not 0 < frac <= 1:
            raise Fail(
                f"TRAIN_SEQ_SCHEDULE stage {stage!r} must be LENGTH@FRACTION, a positive length and a fraction in "
                "(0, 1], e.g. 1024@0.1,2048@0.7,3072@1"
            )
        stages.append((frac, length))
    stages.sort()
    return stages + [(1.0, stages[-1][1])] if stages and stages[-1][0] < 1 else stages


def stage_length(stages, frac):
    """The piece length of training fraction frac: that of the first stage whose fraction it has not passed."""
    return next((length for end, length in stages if frac <= end), stages[-1][1])


class WeightAverages:
    """EMA of all weights every step; SWA snapshots (of the EMA when on) late in warmdown."""

    def __init__(self, model, s):
        self.s, self.swa, self.swa_count = s, None, 0
        self.ema = {k: v.detach().float().clone() for k, v in model.state_dict().items()} if s.ema_enabled else None

    @torch.no_grad()
    def update(self, model, step, lr_mul):
        current = model.state_dict()
        if self.ema is not None:
            torch._foreach_lerp_(list(self.ema.values()), [current[k].float() for k in self.ema], 1 - self.s.ema_decay)
        if self.s.swa_enabled and lr_mul < self.s.swa_threshold and step % self.s.swa_every == 0:
            src = self.ema if self.ema is not None else {k: v.float() for k, v in current.items()}
            if self.swa is None:
                self.swa = {k: v.clone() for k, v in src.items()}
            else:
                torch._foreach_add_(list(self.swa.values()), [src[k] for k in self.swa])
            self.swa_count += 1

    def final_weights(self, model):
        if self.swa_count:
            return {k: v / self.swa_count for k, v in self.swa.items()}, f"swa({self.swa_count} snapshots)"
        return (self.ema, "ema") if self.ema is not None else (model.state_dict(), "raw")


def train_step(run, model, optimizers, next_batch, step, lr_mul):
    """One optimizer step: the global batch as 8 micro-batches (8 // world of them on each rank) forward and backward
    through the compiled model; Muon's momentum on its warm-up ramp and every group's LR at lr_mul; optimizer_step.
    Returns the mean loss as a tensor (no sync). tools/bench.py times this same function."""
    s, (muon, adam, others) = run.s, optimizers
    grad_accum, local_tokens = 8 // run.world, s.train_batch_tokens // 8
    row = local_tokens if s.doc_masked_attn else s.train_seq_len  # documents packed into one masked row
    train_model = run.compiled(model)
    total = torch.zeros((), device=run.device)
    for _ in range(grad_accum):
        x, y = next_batch(local_tokens, row)
        with run.autocast():
            loss = train_model(x, y)
        (loss / grad_accum).backward()
        total += loss.detach()
    muon.param_groups[0]["momentum"] = muon_momentum(s, step)
    for group in muon.param_groups + adam.param_groups:
        group["lr"] = group["base_lr"] * lr_mul
    optimizer_step(muon, adam, others, s)
    model.zero_grad(set_to_none=True)
    return total / grad_accum


def train(model, run, val, luts):
    """Warm-up (compiles every graph, then restores the initial state), then steps until ITERATIONS or the wallclock
    cap, with validation every VAL_LOSS_EVERY; returns the final weights (EMA, SWA or raw)."""
    s = run.s
    optimizers = build_optimizers(model, s)
    muon, adam, _ = optimizers
    model.qat_banks = bool(s.late_qat_banks)
    pattern = os.path.join(s.data_path, "fineweb_train_*.bin")
    loader = DistributedTokenLoader(pattern, run.rank, run.world, run.device)
    if s.warmup_steps > 0:  # compile and warm the kernels, then start again from the initial state
        initial = [copy.deepcopy(m.state_dict()) for m in (model, muon, adam)]
        for looped in (False, True) if s.num_loops else (False,):  # the record's: WARMUP_STEPS, then as many looped
            for i in range(s.warmup_steps):  # the late-QAT graph is compiled now, too
                model.qat_bits = s.matrix_bits if s.late_qat and 2 * i >= s.warmup_steps else 0
                model.looping = looped
                train_step(run, model, optimizers, loader.next_batch, 0, 1.0)
                run.log(f"{'loop_' if looped else ''}warmup_step:{i + 1}/{s.warmup_steps}")
        kept = {}  # PR #1855's sharded momentum is not in the state its warm-up restores
        if s.warmup_keeps_muon_momentum:
            kept = {p: muon.state[p]["momentum_buffer"] for p in muon.param_groups[0]["params"]}
        for m, state in zip((model, muon, adam), initial):
            m.load_state_dict(state)
        for p, buf in kept.items():
            muon.state[p]["momentum_buffer"] = buf
        model.qat_bits, model.looping = 0, False
        loader = DistributedTokenLoader(pattern, run.rank, run.world, run.device)
    averages, cap_ms = WeightAverages(model, s), train_cap_ms(s)
    train_ms, step, stopping = 0.0, 0, False
    stages, rewarm_from = seq_stages(s), None  # the piece length's stages, the step of the last switch's re-warm
    piece = stages[0][1] if stages else s.train_seq_len
    model.piece_len.fill_(piece)
    run.enter("training")
    simulated_ms, simulated = 0.0, s.train_clock == "simulated"
    if simulated:
        run.log(f"train_clock:simulated step_ms:{s.sim_step_ms:g} looped_step_ms:{s.sim_looped_step_ms:g}")

    def clock_ms():  # the training clock: this machine's wall time in the loop, or the reference's step times
        return simulated_ms if simulated else train_ms + 1000 * (time.perf_counter() - t0)

    run.sync()
    t0 = time.perf_counter()
    while True:
        last = step == s.iterations or stopping
        if last or (s.val_loss_every > 0 and step % s.val_loss_every == 0):
            run.sync()
            train_ms += 1000 * (time.perf_counter() - t0)
            val_loss, val_bpb = evaluate(model, run, val, luts)
            run.log(
                f"step:{step}/{s.iterations} val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f} "
                f"train_time:{train_ms:.0f}ms step_avg:{train_ms / max(step, 1):.2f}ms"
            )
            run.summary["val_curve"].append(dict(step=step, val_loss=val_loss, val_bpb=val_bpb, time_ms=train_ms))
            run.write_summary()
            run.sync()
            t0 = time.perf_counter()
        if last:
            break
        elapsed = clock_ms()
        lr_mul, frac = lr_multiplier(s, step, elapsed), training_fraction(s, step, elapsed)
        if s.num_loops and not model.looping and frac >= s.enable_looping_at:
            model.looping = True
            run.log(
                f"layer_loop:enabled step:{step} frac:{frac:.3f} "
                f"encoder:{layer_schedule(model.config, True)[0]} decoder:{layer_schedule(model.config, True)[1]}"
            )
        if stages and (length := stage_length(stages, frac)) != piece:  # longer pieces, same rows: no recompile
            piece, rewarm_from = length, step
            model.piece_len.fill_(piece)
            run.log(f"growth_stage:seq_len:{piece} progress:{frac:.3f} step:{step}")
        rewarm = 1.0  # each group's LR times (steps since the switch + 1) / SEQ_CHANGE_WARMUP_STEPS, up to 1
        if rewarm_from is not None and s.seq_change_warmup_steps:
            rewarm = min((step - rewarm_from + 1) / s.seq_change_warmup_steps, 1.0)
        if s.late_qat and not model.qat_bits and lr_mul < s.late_qat_threshold:
            model.qat_bits = s.matrix_bits
            run.log(f"late_qat:enabled step:{step} scale:{lr_mul:.4f}")
        PROGRESS["stage"] = f"training step {step + 1}"  # said by a Ctrl-C; not written: the hot loop
        loss = train_step(run, model, optimizers, loader.next_batch, step, lr_mul * rewarm)
        step += 1
        simulated_ms += s.sim_looped_step_ms if model.looping else s.sim_step_ms
        averages.update(model, step, lr_mul)
        loss_value = loss.item()
        elapsed = clock_ms()
        # One collective: all ranks stop at the same step, and on any rank's non-finite loss
        flags = torch.tensor(
            [float(cap_ms > 0 and elapsed >= cap_ms), float(not math.isfinite(loss_value))], device=run.device
        )
        if dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        stopping, nonfinite = flags.tolist()
        if nonfinite:
            raise Fail(f"non-finite train loss at step {step}; lower the learning rates or check the data")
        if s.train_log_every > 0 and (step <= 10 or step % s.train_log_every == 0):
            run.log(
                f"step:{step}/{s.iterations} train_loss:{loss_value:.4f} train_time:{elapsed:.0f}ms "
                f"step_avg:{elapsed / step:.2f}ms"
            )
            run.summary["train_curve"].append(dict(step=step, train_loss=loss_value, time_ms=elapsed))
        if stopping:
            run.log(f"stopping_early: wallclock_cap train_time:{elapsed:.0f}ms step:{step}/{s.iterations}")
    model.piece_len.fill_(s.train_seq_len)
    weights, source = averages.final_weights(model)
    run.log(f"final_weights:{source}")
    if simulated:  # the schedule ran on the reference's clock: its training time, and this machine's
        seconds = f"reference_8xh100:{simulated_ms / 1000:.1f}s wall:{train_ms / 1000:.1f}s"
        run.log(f"train_clock:simulated steps:{step} {seconds}")
        run.summary.update(simulated_train_time_ms=simulated_ms)
    run.summary.update(steps=step, train_time_ms=train_ms, step_avg_ms=train_ms / max(step, 1))
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    return {k: v.to(dtypes[k]) for k, v in weights.items()}


# -------------------- export (GPTQ at MATRIX_BITS, context-coded rANS)

ARTIFACT_NAME, FLOAT_NAME = "final_model.int6.ptz", "final_model.float.safetensors"
# The model settings an artifact records and is checked against: ModelConfig's, less those that only shape the
# initialization or the training rows
MODEL_KEYS = tuple(
    f.name.upper()
    for f in fields(ModelConfig)
    if f.name not in ("tied_embed_init_std", "init_draw_order", "qk_gain_init", "train_seq_len")
)


def artifact_config(s):
    """The model settings by their environment names, as an artifact records them."""
    return {k: getattr(s, k.lower()) for k in MODEL_KEYS}


MATRIX_PERCENTILES, EMBED_PERCENTILES = (99.9, 99.95, 99.99, 99.999, 100), (99.99984,)
GPTQ_CLIPS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6)  # row clip as a fraction of the row's max |w|


def unbank(state, num_layers):  # one 2-D matrix per layer and role
    out = {k: v for k, v in state.items() if k not in BANK_ROWS}
    for bank, rows in state.items():
        if bank in BANK_ROWS:
            out.update((matrix_name(bank, j, num_layers), w) for j, w in enumerate(rows))
    return out


def rebank(flat, num_layers):
    out = {k: v for k, v in flat.items() if not (k.startswith("blocks.") and k.endswith(".weight"))}
    for bank, roles in BANK_ROWS.items():
        out[bank] = torch.stack([flat[matrix_name(bank, j, num_layers)] for j in range(len(roles) * num_layers)])
    return out


def write_atomic(path, data):
    """Through a temporary file, removed if the write fails (a full disk): one line says which file, what is on disk."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise Fail(f"could not write {path} ({e.strerror}); on disk: {PROGRESS['on_disk']}") from None


def add_on_disk(path):
    PROGRESS["on_disk"] = str(path) if PROGRESS["on_disk"] == "nothing yet" else f"{PROGRESS['on_disk']} and {path}"


def check_room(s, out):  # room in OUTPUT_DIR for what the run writes, from the model's size
    n = sum(map(math.prod, model_shapes(s).values()))
    export = not s.eval_only or s.artifact_path.endswith(".safetensors")
    need = (0 if s.eval_only else 4 * n + 2**16) + (2 * n + 2**20 if export else 0) + 2**21
    if (free := shutil.disk_usage(out).free) < need:
        raise Fail(
            f"OUTPUT_DIR={s.output_dir} has {free / 1e6:.1f} MB free but this run writes about "
            f"{need / 1e6:.1f} MB (float weights, artifact, logs); free some space or set OUTPUT_DIR elsewhere"
        )


def save_float_weights(state, s, path):
    """For re-exporting without retraining."""
    meta = json.dumps(dict(format="pgolf-float-v1", config=artifact_config(s)))
    write_atomic(path, st.save({k: v.detach().float().cpu().contiguous() for k, v in state.items()}, {"pgolf": meta}))


def calibration_shape(s):
    """(sequences, length) of the calibration text: GPTQ_CALIB_SEQS x GPTQ_CALIB_LEN generated, or
    GPTQ_CALIBRATION_BATCHES micro-batches of training tokens in TRAIN_SEQ_LEN rows (PR #1855: 16 x 48 rows of 2,048
    tokens at its shape), so that a small model calibrates on as many batches as the record, not as many tokens."""
    if s.gptq_calib == "train":
        return s.gptq_calibration_batches * (s.train_batch_tokens // 8) // s.train_seq_len, s.train_seq_len
    return s.gptq_calib_seqs, s.gptq_calib_len


@torch.no_grad()
def calibration_tokens(model, run):
    """GPTQ calibration text: the model's own samples from BOS, or (GPTQ_CALIB=train) training tokens."""
    s, dev = run.s, run.device
    n, T = calibration_shape(s)
    if s.gptq_calib == "train":
        tokens = TokenStream(os.path.join(s.data_path, "fineweb_train_*.bin")).take(n * T)
        return torch.from_numpy(tokens.astype(np.int64)).view(n, T).to(dev)
    gen = torch.Generator(dev).manual_seed(s.seed)
    idx = torch.full((n, 1), BOS_ID, dtype=torch.int64, device=dev)
    cache = dict(len=0)
    for _ in range(T - 1):
        with run.autocast():
            logits = model.compute_logits(model.forward_hidden(idx, cache)[:, -1:])[:, -1]
        probs = torch.softmax(logits.float() / s.gptq_calib_temp, dim=-1)
        idx = torch.cat((idx, torch.multinomial(probs, 1, generator=gen)), dim=1)
    return idx


@torch.no_grad()
def collect_hessians(model, run):
    """Sum of x^T x of each attention/MLP matrix's inputs; with GPTQ_EMBED=1 also the tied embedding's, the head's
    inputs: the final-norm outputs rms_norm(h) that compute_logits multiplies by it (the seed's default leaves the
    embedding to round-to-nearest: measured worse there). Also each input channel's RMS over every row seen
    (AWQ-lite's activation statistic, PR #1908's): sqrt(diag(H) / rows)."""
    tokens = calibration_tokens(model, run)
    hessians, rows = {}, {}

    def add(name, x):  # a looped layer's matrix sums the inputs of every virtual use
        x = x.reshape(-1, x.size(-1)).float()
        hessians[name] = hessians.get(name, 0) + x.T @ x
        rows[name] = rows.get(name, 0) + len(x)

    model.input_hook = add
    try:
        for b in range(0, len(tokens), 8):
            with run.autocast():
                h = model.forward_hidden(tokens[b : b + 8])
            if run.s.gptq_embed:
                add(TIED_EMBED, rms_norm(h))
    finally:
        model.input_hook = None
    input_rms = {k: (H.diagonal() / rows[k]).sqrt().cpu() for k, H in hessians.items()}
    return {k: H.cpu() for k, H in hessians.items()}, input_rms


def round_q(w, scale, max_q):
    return torch.clamp(torch.round(w / scale), -max_q, max_q)


def best_scales(w, clips, max_q, H=None):
    """Per row, the scale (clip / max_q, fp16) of least rounding error: squared, or with H d H d^T."""
    best, best_err = None, None
    for clip in clips:
        scale = (clip / max_q).clamp_min(1e-7).half().float()
        d = w - round_q(w, scale[:, None], max_q) * scale[:, None]
        err = ((d @ H) * d).sum(dim=1) if H is not None else d.square().sum(dim=1)
        best, best_err = (
            (scale, err) if best is None else (torch.where(err < best_err, scale, best), torch.minimum(err, best_err))
        )
    return best


def quantize_rows(w, max_q, percentiles):
    """GPTQ-lite: per-row round-to-nearest at the clip percentile of |w| with the least squared error."""
    w = w.float()
    a = w.abs()
    scale = best_scales(
        w, [a.amax(dim=1) if p >= 100 else torch.quantile(a, p / 100, dim=1) for p in percentiles], max_q
    )
    return round_q(w, scale[:, None], max_q).to(torch.int8).contiguous(), scale.half().contiguous()


def sdclip_scales(w, k, max_q):
    """SDClip (PR #1855): k standard deviations of the row at the top level, rounded to fp16 first."""
    return (k * w.float().std(dim=1) / max_q).clamp_min(1e-7).half().float()


def clip_sigmas(name, s):
    """SDClip's k of a tensor by its role under QUANT_SCALES=sdclip; else 0 (the scale search)."""
    if s.quant_scales != "sdclip":
        return 0
    return s.attn_clip_sigmas if ".attn." in name else s.mlp_clip_sigmas if ".mlp." in name else s.embed_clip_sigmas


def awq_scales(w, k, max_q):
    """The AWQ-lite groups' own row scales: SDClip with k sigmas if k (PR #1908's), else max|w| of the row."""
    return sdclip_scales(w, k, max_q) if k else (w.float().abs().amax(dim=1) / max_q).clamp_min(1e-7).half().float()


def gptq_rows(w, H, max_q, s, k=0, hi=None):
    """Full GPTQ: columns one at a time (most active first), the error spread on by the Cholesky factor of H^-1.
    Row scales: SDClip with k sigmas if k, else the output-error search over GPTQ_CLIPS. hi: None, or (columns,
    their row scales, their max_q): AWQ-lite's columns, rounded on their own grid inside the same solve."""
    W, H = w.float().clone(), H.float().clone()
    rows, cols = W.shape
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    scale = sdclip_scales(w, k, max_q) if k else best_scales(W, [W.abs().amax(dim=1) * f for f in GPTQ_CLIPS], max_q, H)
    perm = torch.argsort(H.diagonal(), descending=True) if s.gptq_actorder else torch.arange(cols)
    grid = [(scale, max_q)] * cols
    if hi is not None:
        for c in hi[0].tolist():
            grid[c] = hi[1:]
    grid = [grid[c] for c in perm.tolist()]
    W, H, damp = W[:, perm], H[perm][:, perm], s.gptq_damp
    while True:  # damping until H is safely positive definite
        chol, info = torch.linalg.cholesky_ex(H + damp * H.diagonal().mean() * torch.eye(cols))
        if info == 0 and chol.diagonal().min() > 1e-6 * chol.diagonal().max():
            break
        damp *= 10
    U = torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)
    Q = torch.zeros_like(W)
    for a in range(0, cols, s.gptq_block):
        b = min(a + s.gptq_block, cols)
        Wb, E = W[:, a:b].clone(), torch.zeros(rows, b - a)
        for j in range(b - a):
            col_scale, col_max_q = grid[a + j]
            Q[:, a + j] = q = round_q(Wb[:, j], col_scale, col_max_q)
            E[:, j] = (Wb[:, j] - q * col_scale) / U[a + j, a + j]
            Wb[:, j + 1 :] -= E[:, j : j + 1] * U[a + j, a + j + 1 : b]
        W[:, b:] -= E @ U[a:b, b:]
    return Q[:, torch.argsort(perm)].to(torch.int8).contiguous(), scale.half().contiguous()


def precision_of(name, t, s):
    """Attention and MLP matrices at MATRIX_BITS, embedding tables at EMBED_BITS, the rest fp16."""
    if not t.is_floating_point():
        return "raw"
    if name.endswith("attn_gate_w") and s.gate_int8:
        return "int8"
    if ".attn." in name or ".mlp." in name:
        return f"int{s.matrix_bits}"
    return f"int{s.embed_bits}" if name in EMBED_TABLES else "fp16"


def max_q_of(kind):
    return 2 ** (int(kind[3:]) - 1) - 1


def coded_names(scheme):
    return [k for k, v in scheme.items() if v.startswith("int")]


def awq_groups(flat, input_rms, s):
    """AWQ-lite (PR #1908): in every GPTQ'd tensor below AWQ_LITE_BITS, each run of AWQ_LITE_GROUP_SIZE input columns
    scored by the sum over its columns of input RMS x mean |w| of the column; the AWQ_LITE_GROUP_TOP_K best of the
    whole model, as {name: its groups' columns}."""
    size, scored = s.awq_lite_group_size, []
    for name, rms in input_rms.items():
        w = flat[name].detach().cpu().float()
        if int(precision_of(name, w, s)[3:]) < s.awq_lite_bits:
            n = w.size(1) // size
            scores = (rms * w.abs().mean(dim=0))[: n * size].view(n, size).sum(dim=1)
            scored += [(float(v), name, g * size) for g, v in enumerate(scores)]
    starts = {}
    for _, name, start in sorted(scored, key=lambda c: -c[0])[: s.awq_lite_group_top_k]:
        starts.setdefault(name, []).append(start)
    return {
        name: torch.tensor([c for a in sorted(v) for c in range(a, a + size)], dtype=torch.int16)
        for name, v in starts.items()
    }


def quantize_state(state, s, hessians=None, input_rms=None):
    """name.q (int8) and name.scale (fp16 per row) per quantized tensor, and each one's precision; with AWQ_LITE_ENABLED
    the chosen groups' columns (name.awq, int16) and their row scales (name.awq_s, fp16) at AWQ_LITE_BITS inside the
    same GPTQ solve; with LQER_ENABLED the LQER factors of the LQER_TOP_K GPTQ'd tensors of largest error
    (lqer_factors), fitted to the error that remains with the AWQ-lite groups in place."""
    tensors, scheme, flat, hessians = {}, {}, unbank(state, s.num_layers), hessians or {}
    groups = awq_groups(flat, {k: input_rms[k] for k in hessians}, s) if s.awq_lite_enabled and input_rms else {}
    for name, t in flat.items():
        t = t.detach().cpu()
        kind = scheme[name] = precision_of(name, t, s)
        if kind in ("raw", "fp16"):
            tensors[name] = (t.half() if kind == "fp16" else t).contiguous()
        elif name in hessians:
            hi = None
            if name in groups:  # AWQ-lite's columns on their own grid
                max_q, cols = max_q_of(f"int{s.awq_lite_bits}"), groups[name]
                hi_scale = awq_scales(t, clip_sigmas(name, s), max_q)
                tensors[name + ".awq"], tensors[name + ".awq_s"], hi = cols, hi_scale.half(), (cols, hi_scale, max_q)
            tensors[name + ".q"], tensors[name + ".scale"] = gptq_rows(
                t, hessians[name], max_q_of(kind), s, clip_sigmas(name, s), hi
            )
        else:  # QUANT=gptq_lite: the seed's single clip for embeddings; gates max|row| / 127; else a per-row search
            pcts = (
                EMBED_PERCENTILES
                if name in EMBED_TABLES and s.quant == "gptq_lite"
                else (100,)
                if name.endswith("attn_gate_w")
                else MATRIX_PERCENTILES
            )
            tensors[name + ".q"], tensors[name + ".scale"] = quantize_rows(t, max_q_of(kind), pcts)
    if s.lqer_enabled:  # the LQER_TOP_K GPTQ'd tensors of largest ||W - Q s||_F
        err = {k: flat[k].detach().cpu().float() - dequantize(tensors, k) for k in hessians if k + ".q" in tensors}
        for k in sorted(err, key=lambda k: -err[k].norm())[: s.lqer_top_k]:
            tensors.update(lqer_factors(k, err[k], s.lqer_rank, s.lqer_asym_group))
    return tensors, scheme


def lqer_factors(name, E, rank, group):
    """LQER asymmetric: the rank-`rank` SVD of the error E, A = U S (rows x r) on the 2-bit grid -2..1 with one fp16
    scale max|A| / 1.5, and B = V^T (r x cols) flattened into rows of `group` (zero-padded) at 4 bits -8..7, each row
    with an fp16 scale max / 7.5. Stored as name.lqa, .lqa_s, .lqb, .lqb_s; added to the weight once at load."""
    U, S, Vh = torch.linalg.svd(E, full_matrices=False)
    A, B = (U[:, :rank] * S[:rank]).contiguous(), Vh[:rank].flatten()
    B = F.pad(B, (0, -len(B) % group)).view(-1, group)
    sa = (A.abs().amax() / 1.5).clamp_min(1e-7).half().view(1)
    sb = (B.abs().amax(dim=1) / 7.5).clamp_min(1e-7).half()
    return {
        name + ".lqa": torch.clamp(torch.round(A / sa.float()), -2, 1).to(torch.int8),
        name + ".lqa_s": sa,
        name + ".lqb": torch.clamp(torch.round(B / sb.float()[:, None]), -8, 7).to(torch.int8),
        name + ".lqb_s": sb,
    }


def lqer_delta(tensors, name, cols):  # A B of an LQER'd tensor, from its packed factors
    A = tensors[name + ".lqa"].float() * tensors[name + ".lqa_s"].float()
    B = tensors[name + ".lqb"].float() * tensors[name + ".lqb_s"].float()[:, None]
    return A @ B.flatten()[: A.size(1) * cols].view(-1, cols)


def dequantize(tensors, name):
    """q * scale per row (AWQ-lite's columns by their own scale), plus LQER's A B where the tensor has factors."""
    q = tensors[name + ".q"].float()
    w = q * tensors[name + ".scale"].float()[:, None]
    if name + ".awq" in tensors:
        cols = tensors[name + ".awq"].long()
        if len(cols) and not (0 <= cols.min() and cols.max() < w.size(1)):
            raise ValueError("its AWQ-lite columns are outside the matrix")
        w[:, cols] = q[:, cols] * tensors[name + ".awq_s"].float()[:, None]
    return w + lqer_delta(tensors, name, w.size(1)) if name + ".lqa" in tensors else w


def dequantize_state(tensors, scheme, num_layers):
    flat = {}
    for name, kind in scheme.items():
        if kind.startswith("int"):
            flat[name] = dequantize(tensors, name)
        else:
            flat[name] = tensors[name].float() if kind == "fp16" else tensors[name]
    return rebank(flat, num_layers)


# rANS: all coded symbols in one stream, each with its table, by interleaved lanes (numpy-vectorized).
# 32-bit states in [2^16, 2^32), 16-bit words, frequencies summing to 2^14.
RANS_MAGIC, RANS_PREC, RANS_LOW, RANS_ALPHABET = b"PGRANS3\n", 14, 1 << 16, 511
RANS_HEAD = ("freq", "states", "counts")


def rans_tables(counts):
    """Symbol counts (a row per table) scaled to sum 2^RANS_PREC, each symbol that occurs at least 1."""
    M, freq = 1 << RANS_PREC, np.zeros(counts.shape, np.int64)
    for i, c in enumerate(counts):
        f = np.where(c > 0, np.maximum(1, np.round(c * M / c.sum())), 0).astype(np.int64)
        while f.sum() != M:  # the most frequent symbols absorb the rounding
            j = f.argmax()
            f[j] += max(M - f.sum(), 1 - f[j])
        freq[i] = f
    return freq


def rans_codes(freq):
    """Frequency and start of each key (table * alphabet + symbol), then the identity (2^P, 0)."""
    f = np.append(freq.ravel(), 1 << RANS_PREC).astype(np.uint64)
    return f, np.append((np.cumsum(freq, axis=1) - freq).ravel(), 0).astype(np.uint64)


def rans_encode(keys, freq, lanes):
    """Final states, each lane's word count, and the words lane by lane in the decoder's reading order."""
    P, steps = RANS_PREC, -(-len(keys) // lanes)
    padded = np.pad(keys, (0, steps * lanes - len(keys)), constant_values=freq.size)  # padding: the identity
    f_all, c_all = (codes[padded].reshape(steps, lanes) for codes in rans_codes(freq))
    x = np.full(lanes, RANS_LOW, np.uint64)
    out_lanes, out_words = [], []
    for t in range(steps - 1, -1, -1):
        f = f_all[t]
        emit = np.flatnonzero(x >= f << np.uint64(32 - P))
        out_lanes.append(emit)
        out_words.append((x[emit] & np.uint64(0xFFFF)).astype(np.uint16))
        x[emit] >>= np.uint64(16)
        x = (x // f << np.uint64(P)) + x % f + c_all[t]
    lane, words = np.concatenate(out_lanes[::-1]), np.concatenate(out_words[::-1])
    return x, np.bincount(lane, minlength=lanes), words[np.argsort(lane, kind="stable")]


def rans_decode(tables, freq, states, counts, words):
    """Inverse of rans_encode; ValueError unless the stream decodes cleanly."""
    P, M, A = RANS_PREC, 1 << RANS_PREC, freq.shape[1]
    lanes, n = len(states), len(tables)
    steps = -(-n // lanes)
    lookup = np.concatenate([np.repeat(np.arange(A), f) for f in freq])  # table * M + slot -> symbol
    f_flat, c_flat = rans_codes(freq)
    tab = np.pad(tables, (0, steps * lanes - n)).reshape(steps, lanes)
    ptr, end = np.cumsum(counts) - counts, np.cumsum(counts)
    words = np.append(words, 0).astype(np.uint64)
    x = states.astype(np.uint64)
    out = np.zeros((steps, lanes), np.int64)
    for t in range(steps):
        slot = (x & np.uint64(M - 1)).astype(np.int64)
        sym = lookup[tab[t] * M + slot]
        key = tab[t] * A + sym
        nx = f_flat[key] * (x >> np.uint64(P)) + slot.astype(np.uint64) - c_flat[key]
        if t == steps - 1 and n % lanes:
            nx[n % lanes :] = x[n % lanes :]  # padding
        read = np.flatnonzero(nx < RANS_LOW)
        nx[read] = (nx[read] << np.uint64(16)) | words[np.minimum(ptr[read], len(words) - 1)]
        ptr[read] += 1
        x, out[t] = nx, sym
    if not ((x == RANS_LOW).all() and (ptr == end).all()):
        raise ValueError("its rANS stream does not decode to its declared end: corrupt")
    return out.ravel()[:n]


def xz_safetensors(tensors, meta):
    """LZMA with 2-byte literal contexts (most of what it packs is 16-bit: scales, fp16 tensors, the coder tables)."""
    return lzma.compress(
        st.save(tensors, metadata={"pgolf": json.dumps(meta)}),
        filters=[dict(id=lzma.FILTER_LZMA2, preset=9, lc=0, lp=1, pb=1)],
    )


# Context coding. The tensors of one role (one name but for the layer, one shape) form a group, side by side: rows x
# (layers * cols). Each row of a layer's matrix (a unit) is coded as residuals from a prediction out of the rows above
# it: (wa x the symbol above + wm x the mean of the symbols above) / 4, with the (wa, wm) and the rANS table of the
# unit's mode, one of up to CTX_MODES per group. Each matrix is coded with its longer side as rows (the units; a wide
# mlp.proj's hidden units get modes of their own). The encoder fits modes and tables by alternation and picks, per
# group, the mode count and row order (as stored, or a greedy nearest-neighbour chain, kept as Lehmer digits) of fewest
# bytes.
CTX_MODES, CTX_ITERS, CHAIN_MAX_ROWS, TABLE_BYTES = (1, 4, 16), 4, 8192, 300


def coder_groups(scheme, shapes):
    """Coded tensor names by role: one group per name with the layer index left out and shape, in first-seen order."""
    groups = {}
    for k in coded_names(scheme):
        groups.setdefault((re.sub(r"\.\d+\.", ".", k), tuple(shapes[k])), []).append(k)
    return list(groups.values())


def predict(above, total, i, wa, wm, max_q):
    """The prediction of row i from the row above and the sum of all rows above: floor of an exact integer over 4i
    (one float division, exact at these magnitudes; 0 for row 0)."""
    return np.clip(np.floor((wa * above * i + wm * total + 2 * i) / (4 * np.maximum(i, 1))), -max_q, max_q).astype(
        np.int64
    )


def chain_order(q):
    """Rows in a greedy nearest-neighbour chain from row 0: each next row the nearest of those left. Euclidean, not the
    record's L1: a matmul (exact in float32 for these small integers), 12x faster, and it codes smaller (measured)."""
    d = torch.cdist(*[torch.from_numpy(q).float()] * 2)
    d[:, 0], order = math.inf, [0]
    for _ in range(len(q) - 1):
        order.append(int(d[order[-1]].argmin()))
        d[:, order[-1]] = math.inf
    return np.array(order)


def lehmer_code(order):
    """Each row's rank among the rows not yet taken: a permutation's digits, the i-th below rows - i, that LZMA packs
    in 1.5 bytes a row where the row indices themselves take 1.65 (8,192 rows)."""
    return np.array([(order[i + 1 :] < order[i]).sum() for i in range(len(order))])


def from_lehmer(digits):  # the row order of a Lehmer code; IndexError if a digit is past the rows left
    left = list(range(len(digits)))
    return [left.pop(d) for d in digits]


def fit_modes(G, L, max_q, K):
    """Modes of a group matrix's units: start from K quantiles of the units' spread, then CTX_ITERS times fit each
    mode's (wa, wm) by least squares on its units, and move each unit to the mode whose table codes it in the fewest
    bits. Modes (rows, L), their (wa, wm), the residuals, and the estimated bytes of the residuals."""
    rows, W = G.shape
    above, total = (np.vstack([0 * a[:1], a[:-1]]) for a in (G, np.cumsum(G, 0)))
    i, units = np.arange(rows)[:, None], lambda a: a.reshape(rows, L, -1)
    X = (above, total / np.maximum(i, 1), G)
    moments = np.stack([units(a * b).sum(-1) for a in X[:2] for b in X], -1)  # per unit: aa am ag ma mm mg
    modes = (np.argsort(np.argsort(units(G).std(-1), axis=None)) * K // (rows * L)).reshape(rows, L)
    residuals = {}  # by (wa, wm): modes often share them, differing in their tables
    for _ in range(CTX_ITERS):
        w, bits = np.zeros((K, 2), np.int64), np.full((K, rows, L), np.inf)
        for k in range(K):
            if (sel := modes == k).any():
                m = moments[sel].sum(0).reshape(2, 3)
                w[k] = np.clip(np.round(4 * np.linalg.lstsq(m[:, :2], m[:, 2], rcond=None)[0]), 0, 8)
                if (E := residuals.get(key := tuple(w[k]))) is None:  # int16: a quarter of int64's memory
                    E = residuals[key] = units(G - predict(above, total, i, *w[k], max_q) + RANS_ALPHABET // 2).astype(
                        np.int16
                    )
                p = np.bincount(E[sel].ravel(), minlength=RANS_ALPHABET) + 0.02
                bits[k] = -np.log2(p / p.sum())[E].sum(-1)
        modes = bits.argmin(0)
    used, modes = np.unique(modes, return_inverse=True)
    wa, wm = np.repeat(w[used][modes.reshape(rows, L)], W // L, axis=1).transpose(2, 0, 1)
    return modes.reshape(rows, L), w[used], G - predict(above, total, i, wa, wm, max_q), bits.min(0).sum() / 8


def code_group(qs, max_q):
    """(row orders or None, modes, (wa, wm) per mode, residuals) of a group's matrices, each with its longer side as
    rows (the units: mlp.proj's hidden units get modes of their own). Of the options (rows in order or chained; each
    mode count of CTX_MODES), the one of fewest estimated bytes (residuals and tables on the first 2 matrices; row
    orders), fitted then on all."""
    qs = [q.T if len(q) < q.shape[1] else q for q in qs]
    rows, L, m, best = len(qs[0]), len(qs), min(len(qs), 2), (math.inf,)
    for chain in (False, True) if rows <= CHAIN_MAX_ROWS else (False,):
        order = np.stack([chain_order(q) for q in qs]) if chain else None
        G = np.concatenate([q[o] for q, o in zip(qs, order)] if chain else qs, axis=1)
        for K in {min(k, rows * L // 64 + 1) for k in CTX_MODES}:
            _, w, _, est = fit_modes(G[:, : G.shape[1] // L * m], m, max_q, K)
            # a chain's cost at log2(rows) bits a row: an upper bound, its Lehmer digits pack smaller
            chain_bytes = rows * L * math.log2(rows) / 8 if chain else 0
            est = est * L / m + TABLE_BYTES * len(w) + chain_bytes
            best = min(best, (est, K, order, G), key=lambda b: b[0])
    return best[2], *fit_modes(best[3], L, max_q, best[1])[:3]


def pack(tensors, scheme, s):
    """Serialized (safetensors, no pickle) and context-coded, reproducibly: magic, head length, LZMA(safetensors of
    the unquantized tensors, scales, the coder's modes, (wa, wm), row orders as Lehmer digits and tables), rANS
    words."""
    meta = dict(
        format="pgolf-int-v3",
        scheme=scheme,
        config=artifact_config(s),
        shapes={k: list(tensors[k + ".q"].shape) for k in coded_names(scheme)},
    )
    if lqer := {
        k: [tensors[k + ".lqa"].shape[1], tensors[k + ".lqb"].shape[1]]
        for k in coded_names(scheme)
        if k + ".lqa" in tensors
    }:
        meta["lqer"] = lqer  # name: [rank, group], for the shape check before decoding
    if awq := {k: len(tensors[k + ".awq"]) for k in coded_names(scheme) if k + ".awq" in tensors}:
        meta["awq"] = awq  # name: how many AWQ-lite columns, likewise
    rest, keys, n_tables = {k: v for k, v in tensors.items() if not k.endswith(".q")}, [], 0
    for g, names in enumerate(coder_groups(scheme, meta["shapes"])):
        order, modes, w, E = code_group(
            [tensors[k + ".q"].numpy().astype(np.int64) for k in names], max_q_of(scheme[names[0]])
        )
        keys.append(
            (
                (n_tables + np.repeat(modes, E.shape[1] // len(names), axis=1)) * RANS_ALPHABET + E + RANS_ALPHABET // 2
            ).ravel()
        )
        n_tables += len(w)
        rest[f"ctx.{g}.modes"], rest[f"ctx.{g}.w"] = torch.from_numpy(modes.astype(np.uint8)), torch.from_numpy(w)
        if order is not None:
            rest[f"ctx.{g}.order"] = torch.from_numpy(np.stack([lehmer_code(o) for o in order]).astype(np.int16))
    keys = np.concatenate(keys)
    freq = rans_tables(np.bincount(keys, minlength=n_tables * RANS_ALPHABET).reshape(n_tables, RANS_ALPHABET))
    states, counts, words = rans_encode(keys, freq, min(1024, max(1, len(keys) // 16384)))
    for k, v, dtype in zip(RANS_HEAD, (freq, states, counts), (np.int16, np.int64, np.int32)):
        rest[f"rans.{k}"] = torch.from_numpy(v.astype(dtype))
    head = xz_safetensors(rest, meta)
    return RANS_MAGIC + len(head).to_bytes(4, "little") + head + words.astype("<u2").tobytes()


def read_safetensors(raw, shapes=None):
    """Tensors and header; refused before any tensor is read unless shapes(header, head) are the declared ones."""
    head = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    header = json.loads(head.pop("__metadata__")["pgolf"])
    if shapes and {k: tuple(v["shape"]) for k, v in head.items()} != shapes(header, head):
        raise ValueError("its tensors are not those of this model")
    return st.load(raw), header


def model_shapes(s, flat=False):  # built on the meta device: nothing allocated
    with torch.device("meta"):
        state = GPT(ModelConfig.of(s)).state_dict()
    return {k: tuple(v.shape) for k, v in (unbank(state, s.num_layers) if flat else state).items()}


def artifact_bound(s):  # more bytes than any artifact of these settings holds, packed or not
    return 8 * sum(map(math.prod, model_shapes(s).values())) + 2**21


def inflate(data, limit):
    """LZMA stopped at limit bytes: an xz bomb costs no more memory than a real artifact."""
    d = lzma.LZMADecompressor()
    out = d.decompress(data, max_length=limit)
    if not d.eof and len(out) == limit:
        raise ValueError(f"it inflates past {limit} bytes, more than any artifact of these settings")
    if not d.eof:
        raise ValueError("its compressed head ends early: the file is truncated")
    return out


def unpack(blob, s=None, check=None):
    """Tensors and header of a packed artifact; ValueError (or a parser's) if malformed. With settings s: check(header)
    first, then the declared shapes must be the model's, before decoding; decompression stops at the model's size."""
    flat, limit = (model_shapes(s, True), artifact_bound(s)) if s else ({}, -1)

    def declared(header, head):  # the tensors the safetensors part must hold, by the header's scheme
        if check:
            check(header)
        scheme = header["scheme"]
        if set(scheme) != set(flat) or {k: tuple(v) for k, v in header["shapes"].items()} != {
            k: flat[k] for k in coded_names(scheme)
        }:
            raise ValueError("its tensors are not those of this model")
        out = {k: tuple(v["shape"]) for k, v in head.items() if k[:4] in ("rans", "ctx.")}  # checked when decoded
        for k, kind in scheme.items():
            out.update({k + ".scale": flat[k][:1]} if kind.startswith("int") else {k: flat[k]})
        for k, (r, g) in header.get("lqer", {}).items():  # LQER factors: rank and group bounded by the matrix
            rows, cols = flat[k]
            if not scheme[k].startswith("int") or not 0 < r <= min(rows, cols) or not 0 < g <= r * cols:
                raise ValueError("its tensors are not those of this model")
            n = -(-r * cols // g)
            out.update({k + ".lqa": (rows, r), k + ".lqa_s": (1,), k + ".lqb": (n, g), k + ".lqb_s": (n,)})
        for k, n in header.get("awq", {}).items():  # AWQ-lite columns: at most the matrix's (their values: dequantize)
            rows, cols = flat[k]
            if not scheme[k].startswith("int") or not 0 < n <= cols:
                raise ValueError("its tensors are not those of this model")
            out.update({k + ".awq": (n,), k + ".awq_s": (rows,)})
        return out

    n = int.from_bytes(blob[8:12], "little")
    if blob[:8] != RANS_MAGIC:
        raise ValueError(f"it does not start with {RANS_MAGIC!r}: not an artifact of this version of the script")
    if 12 + n > len(blob) or (len(blob) - n) % 2:
        raise ValueError(f"its head length {n} does not fit its {len(blob)} bytes: truncated or corrupt")
    tensors, header = read_safetensors(inflate(blob[12 : 12 + n], limit), s and declared)
    freq, states, counts = (tensors.pop(f"rans.{k}").numpy().astype(np.int64) for k in RANS_HEAD)
    words, scheme, shapes = np.frombuffer(blob[12 + n :], "<u2"), header["scheme"], header["shapes"]
    groups, tables, n_tables = coder_groups(scheme, shapes), [], 0
    ctx = [
        [sorted(shapes[names[0]])[::-1]] + [tensors.pop(f"ctx.{g}.{k}", None) for k in ("modes", "w", "order")]
        for g, names in enumerate(groups)
    ]  # as coded: the longer side as rows
    for names, ((rows, cols), modes, w, order) in zip(groups, ctx):
        if modes.shape != (rows, len(names)) or order is not None and order.shape != modes.T.shape:
            # checked before anything their size sets is allocated
            raise ValueError("its coder's modes or row orders do not match the declared shapes")
        tables.append((n_tables + np.repeat(modes.numpy().astype(np.int64), cols, axis=1)).ravel())
        n_tables += len(w)
    if (
        freq.shape != (n_tables, RANS_ALPHABET)
        or (freq < 0).any()
        or (freq.sum(axis=1) != 1 << RANS_PREC).any()
        or not 0 < len(states) == len(counts)
        or (counts < 0).any()
        or counts.sum() != len(words)
        or not ((RANS_LOW <= states) & (states < 1 << 32)).all()
    ):
        raise ValueError("its rANS tables, states or word counts are inconsistent")
    sym, at = rans_decode(np.concatenate(tables), freq, states, counts, words) - RANS_ALPHABET // 2, 0
    for names, ((rows, cols), modes, w, order) in zip(groups, ctx):
        max_q, E = max_q_of(scheme[names[0]]), sym[at : at + rows * cols * len(names)].reshape(rows, -1)
        at += E.size
        wa, wm = np.repeat(w.numpy()[modes.numpy()], cols, axis=1).transpose(2, 0, 1)
        G, above, total = np.zeros_like(E), np.zeros(E.shape[1], np.int64), np.zeros(E.shape[1], np.int64)
        for i in range(rows):  # undo the prediction row by row, as the encoder made it
            G[i] = above = E[i] + predict(above, total, i, wa[i], wm[i], max_q)
            total += above
        for j, k in enumerate(names):
            q = G[:, j * cols : (j + 1) * cols]
            if order is not None:
                q = q[np.argsort(from_lehmer(order[j].tolist()))]
            tensors[k + ".q"] = torch.from_numpy((q if cols == shapes[k][1] else q.T).astype(np.int8))
    return tensors, header


def check_config(path, config, s, what="the artifact"):
    ours = artifact_config(s)
    theirs = {k: config.get(k, getattr(DEFAULT_SETTINGS, k.lower())) for k in MODEL_KEYS}  # a key it predates: seed's
    if wrong := [f"{k}={theirs[k]!r} in {what} but {ours[k]!r} here" for k in MODEL_KEYS if theirs[k] != ours[k]]:
        raise Fail(f"{path} does not match the model settings: " + "; ".join(wrong))


FILE_KINDS = (
    ("S_ISCHR", "a character device"),
    ("S_ISBLK", "a block device"),
    ("S_ISFIFO", "a FIFO (named pipe)"),
    ("S_ISSOCK", "a socket"),
)


def check_file(path, what):
    """ARTIFACT_PATH as a regular file, or Fail saying what it is instead."""
    path = Path(path)
    if path.is_dir():
        raise Fail(f"ARTIFACT_PATH={path} is a directory; set it to {what} file")
    if not path.exists():
        raise Fail(f"artifact {path} not found; set ARTIFACT_PATH to {what} file")
    if not path.is_file():
        kind = next(
            (name for test, name in FILE_KINDS if getattr(stat, test)(path.stat().st_mode)), "not a regular file"
        )
        raise Fail(f"ARTIFACT_PATH={path} is {kind}, not a regular file; set it to {what} file")
    return path


def load_artifact(path, s):
    """An artifact as a GPT state dict, unless malformed or of other model settings (checked before decoding)."""
    path = check_file(path, f"a {ARTIFACT_NAME}")
    try:
        if path.stat().st_size > artifact_bound(s):
            raise ValueError("it is larger than any artifact of these settings")
        tensors, header = unpack(path.read_bytes(), s, lambda h: check_config(path, h["config"], s))
        if not set(header["scheme"].values()) <= {"raw", "fp16", "int5", "int6", "int7", "int8"}:
            raise ValueError("it names a precision this script does not know")
        return dequantize_state(tensors, header["scheme"], s.num_layers)
    except (
        SafetensorError,
        lzma.LZMAError,
        ValueError,
        KeyError,
        TypeError,
        IndexError,
        OverflowError,
        RuntimeError,
        AttributeError,
    ) as e:
        why = str(e) if str(e).startswith("it") else "truncated, corrupt or another format"
        raise Fail(f"{path} is not an intact artifact of this script ({why}; nothing in it was run)") from None


def load_float_weights(path, s):
    path = check_file(path, f"a {FLOAT_NAME} or {ARTIFACT_NAME}")
    try:
        with safe_open(str(path), "pt") as f:
            config = json.loads(f.metadata()["pgolf"])["config"]
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            check_config(path, config, s, "the float weights")
            if shapes != model_shapes(s):  # before any tensor is read
                raise Fail(f"{path}: its tensors are not those of a model of these settings")
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, ValueError, KeyError, TypeError, OSError, AttributeError):
        raise Fail(f"{path} is not a {FLOAT_NAME} file of this script") from None
    return state


def entropy_bytes(counts):
    """Order-0 entropy in bytes of symbols with these counts (a row per tensor)."""
    c = counts.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.nansum(c * np.log2(c.sum(axis=-1, keepdims=True) / c)) / 8)


def fit_to_limit(run, tensors, scheme, hessians, budget):
    """Pack; over budget, zero the +-1 values that cost least (scale^2 x normalized H diagonal) to fit."""
    blob = pack(tensors, scheme, run.s)
    if len(blob) <= budget or not run.s.fit_to_limit:
        return blob
    names = coded_names(scheme)
    original, cost, cells = {k: tensors[k + ".q"] for k in names}, [], []
    for i, k in enumerate(names):
        q = original[k]
        h = (
            hessians[k].diagonal() / hessians[k].diagonal().mean()
            if hessians and k in hessians
            else torch.ones(q.size(1))
        )
        r, c = (q.abs() == 1).nonzero(as_tuple=True)
        scale = tensors[k + ".scale"].float()[r]
        if k + ".awq" in tensors:  # in AWQ-lite's columns, their own row scale
            scale = torch.where(torch.isin(c, tensors[k + ".awq"].long()), tensors[k + ".awq_s"].float()[r], scale)
        cost.append((scale.square() * h[c]).numpy())
        cells.append(np.stack([np.full(len(r), i), r.numpy(), c.numpy(), q[r, c].long().numpy() + 127]))
    order = np.argsort(np.concatenate(cost), kind="stable")
    cost, cells = np.concatenate(cost)[order], np.concatenate(cells, axis=1)[:, order]
    counts = np.stack([np.bincount(original[k].numpy().astype(np.int64).ravel() + 127, minlength=255) for k in names])

    def saving(n):  # order-0 bytes saved by zeroing the n cheapest values
        m = np.bincount(cells[0, :n] * 255 + cells[3, :n], minlength=counts.size).reshape(counts.shape)
        return entropy_bytes(counts) - entropy_bytes(counts - m + np.outer(m.sum(1), np.eye(255, dtype=np.int64)[127]))

    need = len(blob) - budget
    for _ in range(8):  # the estimate is order-0: ask for more while still over budget
        n = bisect.bisect_left(range(len(cost)), True, key=lambda k: saving(k) >= need)
        for i, k in enumerate(names):
            q = tensors[k + ".q"] = original[k].clone()
            q[tuple(cells[1:3, :n][:, cells[0, :n] == i])] = 0
        fitted = pack(tensors, scheme, run.s)
        if len(fitted) <= budget or n == len(cost):
            break
        need = int(need * 1.25) + 64
    run.log(f"fit_to_limit: zeroed {n} of {len(cost)} +-1 values, bytes {len(blob)} -> {len(fitted)} (budget {budget})")
    return fitted


def export_artifact(run, state, path, code_bytes):
    """Calibrate (GPTQ), quantize by role, pack within the limit left by the packed code, write the artifact."""
    s, hessians, input_rms, t0 = run.s, None, None, time.perf_counter()
    if s.quant == "gptq":
        calib_model = build_model(run, state)
        calib_model.looping = bool(s.num_loops)
        hessians, input_rms = collect_hessians(calib_model, run)
        calib_s, cap = time.perf_counter() - t0, s.max_wallclock_seconds
        seqs, seq_len = calibration_shape(s)
        # of the training clock, as the record counts (a simulated clock's training time, then this machine's seconds)
        ended = run.summary.get("simulated_train_time_ms", run.summary.get("train_time_ms", 0)) / 1000 + calib_s
        run.log(
            f"gptq_calibration source:{s.gptq_calib} seqs:{seqs} len:{seq_len} "
            f"time:{calib_s:.1f}s train_plus_calibration:{ended:.1f}s cap:{cap:g}s"
        )
        if s.gptq_calib == "train" and 0 < cap < ended:
            run.log(
                f"!!! GPTQ_RESERVE_SECONDS={s.gptq_reserve_seconds} too short: training tokens read after the cap !!!"
            )
    t1 = time.perf_counter()
    tensors, scheme = quantize_state(state, s, hessians, input_rms)
    run.log(f"quantize:{s.quant} time:{time.perf_counter() - t1:.1f}s")
    for k in (k for k in scheme if k + ".awq" in tensors):
        starts = tensors[k + ".awq"][:: s.awq_lite_group_size].tolist()
        run.log(f"awq_lite bits:{s.awq_lite_bits} tensor:{k} group_starts:{shown(starts)}")
    if lqer := [k for k in scheme if k + ".lqa" in tensors]:
        run.log(f"lqer rank:{s.lqer_rank} group:{s.lqer_asym_group} tensors:{','.join(lqer)}")
    t2 = time.perf_counter()
    blob = fit_to_limit(run, tensors, scheme, hessians, s.artifact_limit_bytes - code_bytes)
    run.log(f"pack:rans time:{time.perf_counter() - t2:.1f}s")
    write_atomic(path, blob)
    return len(blob)


# -------------------- code bytes: the packed, self-extracting train_gpt.py that a record ships and counts

PACKED_NAME = "train_gpt.packed.py"
PACK_STUB = 'import base64,lzma\nexec(compile(lzma.decompress(base64.b85decode("{}")),__file__,"exec"))\n'


def strip_source(source):
    """The program without comments, docstrings or other literal statements (ast round trip: each statement on one
    line, every string literal one-line, adjacent literals joined), one space per indentation level, and within a line
    a space between tokens only where two word characters meet (pyminify's whitespace, nothing renamed; 500 bytes
    fewer packed). What the packed file runs."""
    tree = ast.parse(source)
    for node in ast.walk(tree):  # a literal statement (a docstring) does nothing: gone, as pyminify removes them
        if isinstance(body := getattr(node, "body", None), list):
            node.body = [b for b in body if not (isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant))] or [
                ast.Pass()
            ]
    text = re.sub(r"(?m)^(?:    )+", lambda m: " " * (len(m[0]) // 4), ast.unparse(tree)) + "\n"
    out = re.sub(
        r"""([rbuf]*'(?:\\.|[^'\\])*'|[rbuf]*"(?:\\.|[^"\\])*")|(?<=\S) +(?=\S)""",
        lambda m: m[1] or (" " if re.match(r"\w\w", text[m.start() - 1] + text[m.end()]) else ""),
        text,
    )
    try:  # the same program, or (a Python whose unparse writes strings this cannot read) the unminified one
        return out if ast.dump(ast.parse(out)) == ast.dump(tree) else text
    except SyntaxError:
        return text


def pack_code(source):
    """Deterministic: LZMA (.lzma container, preset 9e, pb=0: text has no 4-byte alignment, 95 bytes fewer) of the
    stripped program as base85 in a two-line stub that executes it in the stub's own namespace, so __name__ and
    __file__ are the packed file's."""
    blob = lzma.compress(
        strip_source(source).encode(),
        format=lzma.FORMAT_ALONE,
        filters=[dict(id=lzma.FILTER_LZMA1, preset=9 | lzma.PRESET_EXTREME, pb=0)],
    )
    return PACK_STUB.format(base64.b85encode(blob).decode())


def unpack_code(packed):
    """The program a packed file runs; ValueError if it is not one."""
    head, tail = PACK_STUB.split("{}")
    try:
        if not (packed.startswith(head) and packed.endswith(tail)):
            raise ValueError("no packing stub")
        return lzma.decompress(base64.b85decode(packed[len(head) : -len(tail)])).decode()
    except (ValueError, lzma.LZMAError) as e:
        raise ValueError(f"not a packed train_gpt.py: {e}") from None


def code_forms(path):
    """(packed text, readable text) of this script; run from a packed file, the readable text is its program."""
    text = Path(path).read_text(encoding="utf-8")
    if text.startswith(PACK_STUB.split("{}")[0]):
        return text, unpack_code(text)
    return pack_code(text), text


# -------------------- evaluation

SCORE_HOOK = None  # tools/audit_causality.py sees every scored distribution


def sliding_windows(n, seq_len, stride):
    """(start, end, first scored) of windows scoring each of n positions once: the first all, later the last stride."""
    return [(0, min(seq_len, n), 0)] + [
        (a, min(a + seq_len, n), a + seq_len - stride) for a in range(stride, n - seq_len + stride, stride)
    ]


def slot_delta(model, H, y, fit, s, shared, lora=None):
    """SLOT: a hidden-state offset fitted on the CE at fit, one for the batch (the seed's) or per window, by AdamW
    (wd 1e-8, eps 1e-5) written out so that it compiles whole; eager, the head only at fit (compiled, or with phased
    TTT's per-row head adapter: every position, weighted)."""
    B, T, d = H.shape
    weight = fit.float() / (fit.sum() if shared else fit.sum(dim=1, keepdim=True)).clamp_min(1)
    at = (slice(None),) * 2 if lora is not None or torch.compiler.is_compiling() else fit.nonzero(as_tuple=True)

    def loss(delta):  # of delta alone: no gradient reaches the weights
        logits = model.compute_logits(H[at] + delta.expand(B, T, d)[at], lora)
        return (
            F.cross_entropy(logits.reshape(-1, logits.size(-1)), y[at].reshape(-1), reduction="none")
            * weight[at].reshape(-1)
        ).sum()

    lr, b1, b2 = s.slot_lr, 0.9, 0.999
    delta = H.new_zeros(1 if shared else B, 1, d, dtype=torch.float32)
    m, v = torch.zeros_like(delta), torch.zeros_like(delta)
    for t in range(1, s.slot_steps + 1):
        g = torch.func.grad(loss)(delta)
        m, v = m.lerp(g, 1 - b1), v * b2 + (1 - b2) * g * g
        delta = delta * (1 - lr * 1e-8) - lr / (1 - b1**t) * m / (v.sqrt() / math.sqrt(1 - b2**t) + 1e-5)
    return delta


@torch.no_grad()
def score_windows(model, run, val, wins, luts, slot, hidden_fn):
    """Sums of NLL, tokens and bytes scored in windows, compiled padded to a fixed shape (nothing recompiles)."""
    pad = run.s.eval_batch_seqs - len(wins) if run.compile else 0  # eager: no padding
    w = torch.tensor(list(wins) + [(0, 0, 0)] * pad)
    starts, lens, first = w[:, 0], w[:, 1] - w[:, 0], w[:, 2] - w[:, 0]
    pos = torch.arange(run.s.eval_seq_len)
    idx = (starts[:, None] + pos).clamp_max(val.numel() - 2)  # padding is never scored
    x, y = val[idx].to(run.device), val[idx + 1].to(run.device)
    scored = ((pos >= first[:, None]) & (pos < lens[:, None])).to(run.device)
    with run.autocast():
        if run.s.doc_masked_attn and not first.any():  # consecutive whole windows: one packed row, as the record
            H = hidden_fn(x.reshape(1, -1)).view(*x.shape, -1)
        else:
            H = hidden_fn(x)
        delta = 0.0
        if slot:
            batch = run.s.slot_mode == "batch"
            fit = (pos < (lens if batch else first)[:, None]).to(run.device)
            delta = run.compiled(slot_delta)(model, H, y, fit, run.s, batch)
        logits = model.compute_logits((H + delta)[scored])  # the head only where a target is scored
    logp = F.log_softmax(logits.float(), dim=-1)
    tgt = y[scored]
    if SCORE_HOOK is not None:
        SCORE_HOOK((idx + 1).to(run.device)[scored], logp)
    nll = -logp.gather(1, tgt[:, None]).squeeze(1)
    nbytes = target_bytes(x[scored], tgt, luts, (idx + 1).to(run.device)[scored])
    return torch.stack((nll.double().sum(), nll.new_tensor(tgt.numel(), dtype=torch.float64), nbytes.double().sum()))


@dataclass(frozen=True)
class ChunkSGD:
    """The SGD that score-first TTT runs on each chunk once it is scored: the seed's TTT (TTT_*) or a phase of phased
    TTT (GLOBAL_TTT_*)."""

    chunk_tokens: int
    lr: float  # cosine-decayed over the chunks
    epochs: int
    batch_seqs: int  # global, split across ranks
    grad_clip: float  # 0 = none
    freeze_blocks: int = 0  # blocks 0..N-1 (bank rows included) not adapted


def seed_ttt_sgd(s):
    return ChunkSGD(s.ttt_chunk_tokens, s.ttt_lr, s.ttt_epochs, s.ttt_batch_seqs, s.ttt_grad_clip, s.ttt_freeze_blocks)


def global_ttt_sgd(s):
    return ChunkSGD(
        s.global_ttt_chunk_tokens, s.global_ttt_lr, s.global_ttt_epochs, s.global_ttt_batch_seqs, s.global_ttt_grad_clip
    )


def ttt_train_chunk(model, run, val, c, n_chunks, opt, loss_fn, sgd):
    """Score-first TTT: train on chunk c (already scored) by the ChunkSGD sgd, its sequences split across ranks."""
    L = run.s.eval_seq_len
    start, batch = c * sgd.chunk_tokens, sgd.batch_seqs
    n_seqs = (min(start + sgd.chunk_tokens, val.numel() - 1) - start) // L
    for group in opt.param_groups:
        group["lr"] = sgd.lr * 0.5 * (1 + math.cos(math.pi * c / max(n_chunks - 1, 1)))
    params = [p for g in opt.param_groups for p in g["params"]]
    frozen = sgd.freeze_blocks
    for _ in range(sgd.epochs):
        for bs in range(0, n_seqs, batch):
            be = min(bs + batch, n_seqs)
            lo, hi = bs + (be - bs) * run.rank // run.world, bs + (be - bs) * (run.rank + 1) // run.world
            for p in params:
                p.grad = torch.zeros_like(p) if p.grad is None else p.grad.zero_()
            if hi > lo:
                tok = val[start + lo * L : start + hi * L + 1].to(run.device)
                with run.autocast():
                    loss = loss_fn(tok[:-1].view(-1, L), tok[1:].view(-1, L))
                (loss * (hi - lo) / (be - bs)).backward()
            all_reduce_([p.grad for p in params], mean=False)
            if frozen:  # the frozen blocks' parameters and bank rows
                for p in model.blocks[:frozen].parameters():
                    p.grad.zero_()
                for bank in BANK_ROWS:
                    g = getattr(model, bank).grad
                    g.view(-1, len(model.blocks), *g.shape[1:])[:, :frozen].zero_()
            if sgd.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, sgd.grad_clip)
            opt.step()


def evaluate(model, run, val, luts, stride=0, ttt=False, slot=False, tag="", phased=False):
    """Sliding windows (stride 0: EVAL_SEQ_LEN, plain), with SLOT, with legal TTT (score a chunk, then train); or
    phased TTT per document."""
    s = run.s
    if phased:
        return evaluate_phased(model, run, val, luts, tag, slot)
    wins = sliding_windows(val.numel() - 1, s.eval_seq_len, stride or s.eval_seq_len)
    chunk = s.ttt_chunk_tokens if ttt else val.numel()
    n_chunks = (val.numel() - 2) // chunk + 1
    groups = [[] for _ in range(n_chunks)]
    for w in wins:
        groups[w[2] // chunk].append(w)
    hidden_fn = run.compiled(model.forward_hidden)
    if ttt:
        opt = torch.optim.SGD(list(model.parameters()), lr=s.ttt_lr, momentum=s.ttt_momentum)
        loss_fn = run.compiled(model)
    stats = torch.zeros(3, dtype=torch.float64, device=run.device)
    bs = s.eval_batch_seqs
    mine = [g[len(g) * run.rank // run.world : len(g) * (run.rank + 1) // run.world] for g in groups]
    n_batches, done = sum(-(-len(m) // bs) for m in mine), 0
    t0 = time.perf_counter()
    for c, group in enumerate(mine):
        for b in range(0, len(group), bs):
            stats += score_windows(model, run, val, group[b : b + bs], luts, slot, hidden_fn)
            done += 1
            if tag and not ttt and done == max(1, n_batches // 20):
                project_pass(run, tag, done / n_batches, t0)
        if ttt:
            if c < n_chunks - 1:
                ttt_train_chunk(model, run, val, c, n_chunks, opt, loss_fn, seed_ttt_sgd(s))
            if tag and c + 1 == min(3, n_chunks):
                project_pass(run, tag, (c + 1) / n_chunks, t0)
            run.log(
                f"{tag}_chunk:{c + 1}/{n_chunks} running_bpb:{bpb_of(stats):.4f} "
                f"elapsed:{time.perf_counter() - t0:.1f}s",
                console=c % 50 == 0 or c == n_chunks - 1,
            )
    if dist.is_initialized():
        dist.all_reduce(stats)
    return (stats[0] / stats[1]).item(), bpb_of(stats)


# -------------------- phased TTT (PR #1855's evaluation): score-first LoRA TTT per document, global SGD phases

TTT_LANES = 8  # chains of warm LoRA A, batch q in lane q % 8: the record's 8 ranks, the same on any world size


def find_docs(val):
    """(start, length) of every document: from its BOS to the next BOS, included as its last target (PR #1855), so
    that every target after the first BOS is scored once."""
    bos = (val[:-1] == BOS_ID).nonzero().flatten().tolist()
    return [(a, b - a + 1) for a, b in zip(bos, bos[1:] + [val.numel() - 1])]


def phased_batches(docs, size):
    """Batches of documents in scoring order: sorted by length (stable), cut into batches, the longest first."""
    docs = sorted(docs, key=lambda d: d[1])
    return sorted((docs[i : i + size] for i in range(0, len(docs), size)), key=lambda b: -b[-1][1])


def lora_shapes(model, s):
    """(name, in, out) of every adapter the TTT_*_LORA switches keep: Q, K, V, the O and MLP bypasses of each virtual
    layer, and the head. A switched-off adapter does not exist: its projection runs unadapted."""
    d, kv = model.tok_emb.embedding_dim, model.kv_bank.size(1)
    n = len(sum(layer_schedule(model.config, model.looping), []))
    roles = dict(
        q=(d, s.ttt_q_lora), k=(kv, s.ttt_k_lora), v=(kv, s.ttt_v_lora), o=(d, s.ttt_o_lora), mlp=(d, s.ttt_mlp_lora)
    )
    shapes = [(f"{r}{j}", d, o) for j in range(n) for r, (o, on) in roles.items() if on]
    return shapes + ([("head", d, model.tok_emb.num_embeddings)] if s.ttt_head_lora else [])


def fresh_lane(model, run, lane, phase, rows=None):
    """A lane's first LoRA A of a phase for batches of rows documents (TTT_BATCH_SIZE unless fewer), U(+-1/sqrt(in))
    per row, seeded by (SEED, phase, lane): rank-independent."""
    g = torch.Generator().manual_seed(run.s.seed * 1000 + phase * TTT_LANES + lane)
    rows = rows or run.s.ttt_batch_size
    return {
        name: ((torch.rand(rows, run.s.ttt_lora_rank, i, generator=g) * 2 - 1) / i**0.5).to(run.device)
        for name, i, _ in lora_shapes(model, run.s)
    }


class LoRA(NamedTuple):
    """Phased TTT's adapters of one batch of documents: name -> (A [rows, r, in], B [rows, out, r]), one pair per
    row (a document); each adds (x A^T) B^T scale, scale = TTT_LORA_ALPHA / TTT_LORA_RANK."""

    adapters: dict
    scale: float


def chunk_nll(model, x, y, at, lora, fit=None, s=None):
    """Log-probabilities of the targets y at row positions at, and their NLL, from each row's own context x; with
    causal SLOT (fit given), the hidden states plus each row's offset fitted on its targets at fit (those scored
    before) by slot_delta with the settings s."""
    h = model.forward_hidden(x, lora=lora)
    if fit is not None:  # fitted outside the graph: the adapters' step sees the offset as a constant
        with torch.no_grad():
            delta = slot_delta(model, h.detach(), y, fit, s, False, lora)
        h = h + delta
    logp = F.log_softmax(model.compute_logits(h.gather(1, at[..., None].expand(-1, -1, h.size(-1))), lora), dim=-1)
    return logp, -logp.gather(2, y.gather(1, at)[..., None])[..., 0]


NGRAM_HASH_TRIES = 4  # context hashes tried before giving up on one whose equal keys are all equal contexts


def context_keys(stream, k, seed):
    """A 64-bit hash of each context stream[t : t+k], t = 0 .. len-k-1: sum_j stream[t+j] c_j modulo 2^64, with odd
    random c_j drawn from seed."""
    m, tokens = stream.size - k, stream.view(np.uint64)
    coef = np.random.default_rng(seed).integers(1, 2**63, size=k, dtype=np.uint64) | np.uint64(1)
    key, term = np.zeros(m, np.uint64), np.empty(m, np.uint64)
    for j in range(k):
        np.multiply(tokens[j : j + m], coef[j], out=term)
        key += term
    return key


def context_groups(stream, k, seed):
    """Positions i >= k of stream sorted by their context stream[i-k:i], equal contexts together in stream order:
    (positions, where a new context starts). None if two different contexts share a key of seed's hash (then
    another seed's is tried)."""
    key = context_keys(stream, k, seed)
    order = np.argsort(key, kind="stable")
    key = key[order]
    starts = np.concatenate(([True], key[1:] != key[:-1]))
    del key
    a, b = order[:-1][~starts[1:]], order[1:][~starts[1:]]  # neighbours with equal keys: their contexts must match
    if any((stream[a + j] != stream[b + j]).any() for j in range(k)):
        return None
    return order + k, starts


def ngram_hints(tokens, order, threshold):
    """The n-gram tilt's hint for the target at each position p >= 1 of tokens (-1: none), from the targets before p
    only, in stream order (tokens[1:], across documents, as PR #2135): the token that most often followed the same
    ORDER-1 tokens before (on a tie the one that got there first), where its share of those earlier occurrences is at
    least threshold. Vectorized: one sort groups equal contexts, a second counts each (context, next token) pair."""
    stream = np.ascontiguousarray(tokens[1:], dtype=np.int64)
    n, k = stream.size, order - 1
    hints = np.full(n + 1, -1, np.int32)
    if n <= k:
        return hints
    for seed in range(NGRAM_HASH_TRIES):
        if (groups := context_groups(stream, k, seed)) is not None:
            break
    else:
        raise Fail(f"the n-gram tilt's context hash collided {NGRAM_HASH_TRIES} times: set NGRAM_TILT_ENABLED=0")
    pos, starts = groups
    group = np.cumsum(starts) - 1
    repeated = np.bincount(group)[group] > 1  # a context seen once gives no hint: drop those first
    pos, group, starts = pos[repeated], group[repeated], starts[repeated]
    nxt, i = stream[pos], np.arange(pos.size)
    seen = i - np.maximum.accumulate(np.where(starts, i, 0))  # earlier occurrences of the same context
    pair = group * (int(stream.max()) + 1) + nxt
    by_pair = np.argsort(pair, kind="stable")
    new_pair = np.concatenate(([True], pair[by_pair][1:] != pair[by_pair][:-1]))
    count = np.empty_like(i)  # occurrences of (context, next token) up to and including this one
    count[by_pair] = i - np.maximum.accumulate(np.where(new_pair, i, 0)) + 1
    offset = np.cumsum(starts) * (pos.size + 1)  # keeps each context's running maximum to itself
    top_count = np.maximum.accumulate(count + offset) - offset
    before = np.concatenate(([0], top_count[:-1]))
    top_at = np.maximum.accumulate(np.where(starts | (count > before), i, 0))  # a strictly higher count takes the top
    given = ~starts & (before >= threshold * seen)
    hints[1 + pos[given]] = nxt[top_at[np.flatnonzero(given) - 1]]
    return hints


def shared_ngram_hints(run, tokens):
    """ngram_hints of the validation tokens, built once on rank 0 and sent to the others, as a tensor on the device;
    the build's time, memory and gated fraction are logged."""
    s, t0 = run.s, time.perf_counter()
    if run.master:
        tracemalloc.start()
        hints = torch.from_numpy(ngram_hints(tokens.cpu().numpy(), s.token_order, s.token_threshold))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        hints = hints.to(run.device)
    else:
        hints, peak = torch.empty(tokens.numel(), dtype=torch.int32, device=run.device), 0
    if dist.is_initialized():
        dist.broadcast(hints, 0)
    gated, run.summary["ngram_hints_s"] = int((hints >= 0).sum()), time.perf_counter() - t0
    run.log(
        f"ngram_tilt:hints total:{tokens.numel() - 1} gated:{gated} fraction:{gated / max(tokens.numel() - 1, 1):.4f} "
        f"order:{s.token_order} build:{run.summary['ngram_hints_s']:.1f}s peak_memory:{peak / 2**20:.0f}MiB"
    )
    return hints


def tilt(logp, hints, boost):
    """Log-probability rows [..., V] tilted toward their hints (>= 0; -1 leaves a row as it is): p'(a) = p(a)
    e^(boost [a = hint]) / (1 + p(hint)(e^boost - 1)), normalized over the whole vocabulary."""
    given, h = hints >= 0, hints.clamp_min(0)[..., None].long()
    log_norm = torch.log1p(logp.gather(-1, h).exp() * math.expm1(boost))
    tilted = logp.scatter_add(-1, h, torch.full_like(h, boost, dtype=logp.dtype)) - log_norm
    return torch.where(given[..., None], tilted, logp)


def short_doc_chunks(s):
    """TTT_SHORT_SCORE_FIRST_STEPS as [(longest document, chunk)] in order of length; Fail on a malformed pair."""
    steps = []
    for pair in filter(None, (x.strip() for x in s.ttt_short_score_first_steps.split(","))):
        length, _, chunk = pair.partition(":")
        if not (length.isdigit() and chunk.isdigit() and int(length) > 0 and 0 < int(chunk) <= s.ttt_eval_seq_len):
            raise Fail(
                f"TTT_SHORT_SCORE_FIRST_STEPS pair {pair!r} must be LENGTH:CHUNK, positive, the chunk at most "
                f"TTT_EVAL_SEQ_LEN={s.ttt_eval_seq_len}, e.g. 256:8,2000:24"
            )
        steps.append((int(length), int(chunk)))
    return sorted(steps)


def chunk_size_of(s, longest):
    """Phased TTT's chunk for a batch whose longest document has longest tokens: TTT_CHUNK_SIZE, or with
    TTT_SHORT_SCORE_FIRST_ENABLED the chunk of the first TTT_SHORT_SCORE_FIRST_STEPS length it fits."""
    if not s.ttt_short_score_first_enabled:
        return s.ttt_chunk_size
    return next((chunk for length, chunk in short_doc_chunks(s) if longest <= length), s.ttt_chunk_size)


def score_documents(model, run, tokens, luts, batch, warm_a, stats, slot=False, hints=None):
    """One batch of documents, chunk by chunk (chunk_size_of targets): chunk c of every document is scored from the
    last <= TTT_EVAL_SEQ_LEN tokens of its own prefix (with slot: plus an offset fitted on the window's targets
    before the chunk; with hints: its scores tilted toward them), then the documents that go on take one AdamW step
    (beta1 0) on it, on the untilted loss. Adapters start from the lane's warm A (updated in place) with B = 0 and a
    fresh optimizer."""
    s, dev, n = run.s, run.device, len(batch)
    C, Lt = chunk_size_of(s, max(length for _, length in batch)), s.ttt_eval_seq_len
    adapters = {
        k: (
            warm_a[k][:n].clone().requires_grad_(),
            torch.zeros(n, o, s.ttt_lora_rank, device=dev, requires_grad=True),
        )
        for k, _, o in lora_shapes(model, s)
    }
    lora = LoRA(adapters, s.ttt_lora_alpha / s.ttt_lora_rank)
    opt = torch.optim.AdamW(
        [t for ab in adapters.values() for t in ab],
        lr=s.ttt_lora_lr,
        eps=1e-10,
        betas=(s.ttt_beta1, s.ttt_beta2),
        weight_decay=s.ttt_weight_decay,
    )
    starts, preds = torch.tensor([d[0] for d in batch]), torch.tensor([d[1] - 1 for d in batch])
    fn = run.compiled(chunk_nll, dynamic=True)
    for c in range(-(-int(preds.max()) // C)):
        end = preds.clamp_max((c + 1) * C)  # each document's chunk: its targets c*C .. end-1
        first = (end - Lt).clamp_min(0)  # its window's first token, in the document
        T, j = min((c + 1) * C, Lt), torch.arange(C)
        at = (c * C - first[:, None] + j).clamp_max(T - 1)  # the chunk's positions in the row (>= 0: C <= Lt)
        tgt = (starts + first + 1)[:, None] + at  # their targets' positions in tokens
        x, y = (
            tokens[((starts + first)[:, None] + torch.arange(T) + k).clamp_max(tokens.numel() - 1)].to(dev)
            for k in (0, 1)
        )
        scored, learn, tgt, at = (
            (j < end[:, None] - c * C).to(dev),
            (preds > (c + 1) * C).to(dev),
            tgt.to(dev),
            at.to(dev),
        )
        fit = (torch.arange(T) < (c * C - first)[:, None]).to(dev) if slot else None
        with torch.set_grad_enabled(bool(learn.any())), run.autocast():
            logp, nll = fn(model, x, y, at, lora, fit, s)
        score = nll.detach()
        if hints is not None:
            logp = tilt(logp.detach(), hints[tgt.clamp_max(tokens.numel() - 1)], s.token_boost)
            score = -logp.gather(2, y.gather(1, at)[..., None])[..., 0]
        if SCORE_HOOK is not None:
            SCORE_HOOK(tgt[scored], logp.detach()[scored])
        nb = target_bytes(x.gather(1, at)[scored], y.gather(1, at)[scored], luts, tgt[scored])
        stats += torch.stack((score[scored].double().sum(), scored.sum().double(), nb.double().sum()))
        if learn.any():  # the documents that go on learn from it: the sum of each one's mean chunk loss
            opt.zero_grad(set_to_none=True)
            (nll * learn[:, None]).sum().div(C).backward()
            opt.step()
    for k, (a, _) in adapters.items():
        warm_a[k][:n] = a.detach()


def global_sgd(model, run, tokens, docs):
    """A phase's SGD of every base parameter on the documents scored so far (each from its BOS, concatenated), in
    GLOBAL_TTT_CHUNK_TOKENS chunks with cosine LR, the last chunk skipped, as the seed's TTT trains (PR #1855)."""
    docs_tokens = torch.cat([tokens[a : a + n - 1] for a, n in docs])
    model.requires_grad_(True)
    opt = torch.optim.SGD(model.parameters(), lr=run.s.global_ttt_lr, momentum=run.s.global_ttt_momentum)
    n_chunks = (docs_tokens.numel() - 2) // run.s.global_ttt_chunk_tokens + 1
    for c in range(n_chunks - 1):
        ttt_train_chunk(model, run, docs_tokens, c, n_chunks, opt, run.compiled(model), global_ttt_sgd(run.s))
    model.zero_grad(set_to_none=True)
    model.requires_grad_(False)


def evaluate_phased(model, run, tokens, luts, tag="", slot=False):
    """Phased TTT: documents scored in batches, longest first; batch q on rank q % world, in lane q % 8. Phase p's
    global SGD runs on the first PHASED_TTT_PREFIX_DOCS * (p+1) / PHASED_TTT_NUM_PHASES documents in scoring order,
    after the batch that scores the last of them, and a fresh A follows. Which documents, batches and A a score
    sees depends on indices only: 1, 2 or 8 ranks give the same score up to float summation order."""
    s = run.s
    batches = phased_batches(find_docs(tokens), s.ttt_batch_size)
    order = [d for b in batches for d in b]
    rows = min(s.ttt_batch_size, len(order))
    if rows < s.ttt_batch_size:
        run.log(
            f"ttt_phased: TTT_BATCH_SIZE={s.ttt_batch_size} is more than the {len(order)} validation documents: "
            f"one batch of {rows}"
        )
    cum = np.cumsum([len(b) for b in batches])
    prefix, P = min(s.phased_ttt_prefix_docs, len(order)), s.phased_ttt_num_phases
    if prefix < s.phased_ttt_prefix_docs:
        run.log(
            f"ttt_phased: PHASED_TTT_PREFIX_DOCS={s.phased_ttt_prefix_docs} is more than the {len(order)} "
            f"validation documents: every document is in the phases (prefix_docs:{prefix})"
        )
    phases = [(bisect.bisect_left(cum, m), m) for m in (prefix * (p + 1) // P for p in range(P)) if m]
    run.log(
        f"ttt_phased: total_docs:{len(order)} prefix_docs:{prefix} batches:{len(batches)} "
        f"boundaries:{[m for _, m in phases]}"
    )
    hints = shared_ngram_hints(run, tokens) if s.ngram_tilt_enabled else None
    stats = torch.zeros(3, dtype=torch.float64, device=run.device)
    model.requires_grad_(False)
    # tokens this rank scores, per batch
    mine = [sum(n for _, n in b) if q % run.world == run.rank else 0 for q, b in enumerate(batches)]
    t0, done, lanes = time.perf_counter(), 0, {}
    for phase, (last, m) in enumerate(phases + [(len(batches) - 1, 0)]):
        for q in range(done, last + 1):
            if mine[q]:
                if q % TTT_LANES not in lanes:
                    lanes[q % TTT_LANES] = fresh_lane(model, run, q % TTT_LANES, phase, rows)
                score_documents(model, run, tokens, luts, batches[q], lanes[q % TTT_LANES], stats, slot, hints)
            if tag and q == min(2 * run.world, len(batches) - 1):  # the longest batches: an upper bound
                project_pass(run, tag, sum(mine[: q + 1]) / max(sum(mine), 1), t0)
        done = last + 1
        if m:
            run.log(f"ttt_phase:{phase + 1}/{len(phases)} global_sgd_docs:{m} elapsed:{time.perf_counter() - t0:.1f}s")
            global_sgd(model, run, tokens, order[:m])
            lanes = {}
    model.requires_grad_(True)
    if dist.is_initialized():
        dist.all_reduce(stats)
    return (stats[0] / stats[1]).item(), bpb_of(stats)


def project_pass(run, tag, fraction, t0):
    """A pass's projected seconds; loud if the evaluation would exceed its budget."""
    run.sync()
    pass_s, budget = (time.perf_counter() - t0) / fraction, run.s.eval_budget_seconds
    total = run.summary.get("eval_time_s", 0) + pass_s
    run.log(f"{tag}_projected_seconds:{pass_s:.1f} eval_total_projected:{total:.1f} budget:{budget:.0f}")
    if total > budget:
        run.log(
            f"!!! EVAL BUDGET: {tag} is projected to end the evaluation after {total:.0f}s > "
            f"EVAL_BUDGET_SECONDS={budget:.0f} !!!"
        )


def bpb_of(stats):
    """Bits per byte of summed (nats, tokens, bytes)."""
    return (stats[0] / math.log(2) / stats[2].clamp_min(1)).item()


def eval_paths(s):
    """The evaluations of a finished model; the last one is the final score."""
    L, stride, ttt, slot = s.eval_seq_len, s.eval_stride, bool(s.ttt_enabled), bool(s.slot_enabled)
    phased = bool(s.phased_ttt_enabled)
    adaptive = ttt or slot and not phased  # with phased TTT, SLOT runs inside it
    paths = [("final_int6_roundtrip", dict(stride=L, ttt=False, slot=False))]
    if stride < L and (s.eval_sliding_pass or not adaptive):  # an adaptive pass scores these windows itself
        paths.append(("final_int6_sliding_window", dict(stride=stride, ttt=False, slot=False)))
    if adaptive:
        paths.append(("legal_ttt" if ttt else "slot_sliding_window", dict(stride=stride, ttt=ttt, slot=slot)))
    if phased:
        paths.append(("quantized_ttt_phased", dict(stride=L, ttt=False, slot=slot, phased=True)))
    return paths


def eval_name(s, stride, ttt, slot, phased=False):
    """The final score's eval: name (roundtrip, sliding, ttt, phased_ttt; +slot_MODE)."""
    base = "phased_ttt" if phased else "ttt" if ttt else "sliding" if stride < s.eval_seq_len else "roundtrip"
    return base + (f"+slot_{s.slot_mode}" if slot else "")


def final_evaluation(run, model, val, luts, float_bpb, load_s=0.0):
    """Every pass of eval_paths on the artifact's weights, each logged as `<label> …` and `<label>_exact …`; the last
    one is the final score (`final_score_exact`). The evaluation's clock starts at the artifact's loading (load_s)."""
    s, metrics, weights = run.s, run.summary["metrics"], copy.deepcopy(model.state_dict())
    run.summary["eval_time_s"] = load_s
    run.log(f"artifact_load_seconds:{load_s:.1f}")
    for label, kw in eval_paths(s):
        run.enter(f"evaluation ({label})")
        model.load_state_dict(weights)  # every pass from the artifact's weights: TTT passes change them
        run.sync()
        t0 = time.perf_counter()
        loss, bpb = evaluate(model, run, val, luts, tag=label, **kw)
        ms = 1000 * (time.perf_counter() - t0)
        run.log(f"{label} val_loss:{loss:.4f} val_bpb:{bpb:.4f} eval_time:{ms:.0f}ms")
        run.log(f"{label}_exact val_loss:{loss:.8f} val_bpb:{bpb:.8f}")
        metrics[f"{label}_exact"] = dict(val_loss=loss, val_bpb=bpb, eval_time_s=ms / 1000)
        if label == "final_int6_roundtrip" and float_bpb is not None:
            run.summary["quant_gap_bpb"] = bpb - float_bpb
            run.log(f"quant_gap_bpb:{bpb - float_bpb:.8f}")
        run.summary["eval_time_s"] = run.summary.get("eval_time_s", 0) + ms / 1000
    run.summary["final_eval_seconds"] = ms / 1000
    run.log(f"final_eval_seconds:{ms / 1000:.1f} eval_total_seconds:{run.summary['eval_time_s']:.1f}")
    name, causal = eval_name(s, **kw), not (kw["slot"] and s.slot_mode == "batch")
    log_eval_clock(run, load_s)
    run.log(f"final_score_exact eval:{name} val_loss:{loss:.8f} val_bpb:{bpb:.8f} causal:{'yes' if causal else 'no'}")
    run.summary["final"] = dict(eval=name, val_loss=loss, val_bpb=bpb, causal=causal)


def log_eval_clock(run, load_s):
    """Every part of the evaluation and whether the evaluation's clock (against EVAL_BUDGET_SECONDS) counts it: the
    artifact's loading and every pass, each with its compile warm-up and precomputation inside; not the validation
    tokens read at start-up nor the float weights' diagnostic score (docs/legality.md compares the records')."""
    sm = run.summary
    parts = [("artifact_load", load_s, "counted", "read, decompress, dequantize")]
    for label, _ in eval_paths(run.s):
        parts.append((label, sm["metrics"][label + "_exact"]["eval_time_s"], "counted", "its compile warm-up inside"))
    if "ngram_hints_s" in sm:
        parts.append(("ngram_hints", sm["ngram_hints_s"], "counted", "part of quantized_ttt_phased's time"))
    parts.append(
        ("val_load", sm.get("val_load_s", 0.0), "not_counted", "at start-up, before training, as every record")
    )
    if "final_float_exact" in sm["metrics"]:
        parts.append(
            ("final_float_exact", sm.get("float_eval_s", 0.0), "not_counted", "the float weights, not the artifact")
        )
    for part, seconds, kind, note in parts:
        run.log(f"eval_clock part:{part} seconds:{seconds:.1f} {kind} ({note})")
    run.log(f"eval_clock counted_total:{sm['eval_time_s']:.1f}s budget:{run.s.eval_budget_seconds:.0f}s")


# -------------------- main


def git_state():
    """(commit, dirty) of the checkout this script is in; (None, None) outside one or without git."""
    here = Path(__file__).resolve().parent

    def git(*args):
        return subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=10, check=True).stdout

    try:
        return git("rev-parse", "HEAD").strip(), bool(git("status", "--porcelain", "--untracked-files=no").strip())
    except (OSError, subprocess.SubprocessError):
        return None, None


def machine_info(run):
    """What ran it: torch and CUDA versions, the GPUs and their driver, the git commit (and whether the checkout had
    uncommitted changes), the host and the world size."""
    commit, dirty = git_state()
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if run.cuda else []
    driver = None
    if run.cuda:
        try:
            query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
            driver = subprocess.run(query, capture_output=True, text=True, timeout=10).stdout.split("\n")[0] or None
        except (OSError, subprocess.SubprocessError):
            pass
    return dict(
        torch=torch.__version__,
        cuda=torch.version.cuda,
        gpus=gpus,
        driver=driver,
        commit=commit,
        dirty=dirty,
        host=socket.gethostname(),
        world_size=run.world,
    )


def log_header(run, code, packed):
    s = run.s
    run.log(code, console=False)
    run.log("=" * 100, console=False)
    hw = torch.cuda.get_device_name(run.device) if run.cuda else f"cpu ({os.cpu_count()} cores)"
    run.log(
        f"torch:{torch.__version__} device:{hw} world_size:{run.world} grad_accum_steps:{8 // run.world} "
        f"attention:{run.attn.name} compile:{int(run.compile)}"
    )
    run.log(f"attention_backend:{run.attn.name} source:{run.attn.source} documents:{run.attn.documents_name}")
    for why in run.attn.passed_over:
        run.log(f"attention_passed_over:{why}")
    run.log("settings: " + " ".join(f"{k}={shown(v)}" for k, v in s.by_env_name().items()))
    changed = " ".join(
        f"{k}={os.environ[k]}" for k in SETTING_NAMES if k in os.environ and k not in ("RUN_ID", "OUTPUT_DIR")
    )
    launcher = f"torchrun --standalone --nproc_per_node={run.world}" if "RANK" in os.environ else "python"
    run.summary.update(settings=s.by_env_name(), run_command=f"{changed} {launcher} train_gpt.py".strip())
    run.log(f"run_command: {run.summary['run_command']}")
    run.log(f"seed:{s.seed}")
    run.log(f"Code size: {len(packed.encode())} bytes (packed; source {len(code.encode())} bytes)")
    if run.master:
        run.summary["machine"] = machine_info(run)
    run.write_summary()


def main():
    s = parse_settings()
    run = PROGRESS["run"] = Run(s)
    check_room(s, run.out)
    packed, code = code_forms(__file__)
    log_header(run, code, packed)
    if run.master:  # what the byte count counts, on disk beside the artifact
        write_atomic(run.out / PACKED_NAME, packed.encode())
    torch.manual_seed(s.seed)
    np.random.seed(s.seed)
    t_val = time.perf_counter()
    val = load_validation_tokens(
        os.path.join(s.data_path, VAL_SHARDS), s.eval_seq_len, s.val_max_tokens, s.eval_include_tail
    )
    luts, counted = byte_counter(s, load_tokenizer(s), val.numel(), run.device)
    run.summary["val_load_s"] = time.perf_counter() - t_val
    run.log(f"val_tokens:{val.numel() - 1} bpb_bytes:{counted}")
    if s.val_max_tokens > val.numel() - 1 + s.eval_seq_len:  # more than the split holds, not only its partial window
        run.log(f"val_tokens: VAL_MAX_TOKENS={s.val_max_tokens} is more than the validation split: all of it is used")
    state, float_bpb, code_bytes = None, None, len(packed.encode())
    model = build_model(run)  # trained here, then every evaluation loads its weights: one model, compiled once
    if s.eval_only:
        artifact = Path(s.artifact_path)
        if artifact.name.endswith(".safetensors"):
            state = load_float_weights(artifact, s)
    else:
        run.log(f"model_params:{sum(p.numel() for p in model.parameters())}")
        state = train(model, run, val, luts)
    model.qat_bits, model.looping = 0, bool(s.num_loops)  # every evaluation runs the looped model, as the record
    if state is not None:
        artifact = run.out / ARTIFACT_NAME
        run.enter("export")
        if run.master:  # the artifact (the counted result) first, then the optional float weights
            export_artifact(run, state, artifact, code_bytes)
        add_on_disk(artifact)
        if run.master and not s.eval_only:
            try:
                save_float_weights(state, s, run.out / FLOAT_NAME)
                add_on_disk(run.out / FLOAT_NAME)
            except Fail as e:  # not needed for the score: evaluation goes on
                run.log(f"warning: {e}")
        if dist.is_initialized():
            dist.barrier()
        PROGRESS["stage"] = "evaluation"
        model.load_state_dict(state)
        t_float = time.perf_counter()
        float_loss, float_bpb = evaluate(model, run, val, luts)
        run.summary["float_eval_s"] = time.perf_counter() - t_float
        run.log(f"final_float_exact val_loss:{float_loss:.8f} val_bpb:{float_bpb:.8f}")
        run.summary["metrics"]["final_float_exact"] = dict(val_loss=float_loss, val_bpb=float_bpb)
    t_load = time.perf_counter()
    model.load_state_dict(load_artifact(artifact, s))
    load_s = time.perf_counter() - t_load
    model_bytes, limit = artifact.stat().st_size, s.artifact_limit_bytes
    total = model_bytes + code_bytes
    run.log(f"Serialized model int6+rans: {model_bytes} bytes")
    run.log(f"Total submission size int6+rans: {total} bytes (packed code {code_bytes} + model {model_bytes})")
    if over := total > limit:
        run.log(
            f"!!! OVER THE LIMIT: {total} bytes > ARTIFACT_LIMIT_BYTES={limit}; "
            f"kept and evaluated, not a valid submission !!!"
        )
    run.summary.update(
        artifact=str(artifact),
        over_limit=over,
        bytes=dict(model=model_bytes, code=code_bytes, code_source=len(code.encode()), total=total, limit=limit),
    )
    run.write_summary()
    final_evaluation(run, model, val, luts, float_bpb, load_s)
    if over:
        run.log(f"!!! OVER THE LIMIT: {total} bytes; the scores above are not a valid submission !!!")
    run.write_summary()
    return 1 if over else 0


def leave(code):
    """Ends the process; once every rank has finished (exit 0 or 1) they leave together. os._exit skips the C++
    runtime's teardown: gloo's threads, torn down while a peer leaves, now and then abort (SIGABRT) a rank whose
    work is all done, and torchrun then reports the finished run as failed."""
    if dist.is_initialized() and code in (0, 1):
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def on_sigterm(signum, frame):  # torchrun, Slurm, pre-emption: said as a Ctrl-C is, exit 128 + 15
    # A repeat (torchrun terminates the other ranks once one has exited) must not kill the shutdown under way
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    PROGRESS["exit"] = 128 + signum
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    if sys.argv[1:] in (["--help"], ["-h"]):
        print(help_text())
        sys.exit(0)
    rank0 = int(os.environ.get("RANK", 0)) == 0
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        code = main()
    except Fail as e:  # the same on every rank: rank 0 says it
        if rank0:
            print(f"error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        msg = f"interrupted during {PROGRESS['stage']}; on disk: {PROGRESS['on_disk']}"
        if PROGRESS["run"] is not None:
            PROGRESS["run"].log(msg)
        elif rank0:
            print(msg, file=sys.stderr)
        code = PROGRESS.get("exit", 130)
    leave(code)

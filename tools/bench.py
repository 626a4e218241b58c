#!/usr/bin/env python3
"""Throughput, FLOPs and MFU of train_gpt.py's training step and of each pass of its final evaluation.

Same environment settings as train_gpt.py (parse_settings), on whatever device train_gpt.Run picks: the CPU,
one GPU, or every rank under torchrun. After warm-up it times
  - training steps (the real step: 8 micro-batches split over the ranks, Muon + AdamW, EMA update);
  - each pass of the configured final evaluation (train_gpt.eval_paths: plain round trip, standalone sliding,
    TTT with SLOT) and, when the final pass fits SLOT, the same pass without SLOT (marked extra),
on a val slice, and prints per phase: time, tokens/s, seconds per 1M scored tokens, model FLOPs per token from
an analytic count (docs/performance.md), achieved TFLOP/s, MFU against a matmul peak measured here on this
device (bf16 on GPU, fp32 on CPU), compile time apart from run time, and peak memory.

  python3 tools/bench.py [--json PATH] [--project-8xh100] [--baseline REV [--rounds N]]
  python3 tools/bench.py --ngram-build [N]

--ngram-build times only the n-gram tilt's hint build (train_gpt.ngram_hints at TOKEN_ORDER, TOKEN_THRESHOLD)
over a synthetic stream of N tokens (default: the SP8192 validation split's 47,851,520): Zipf-distributed tokens
with 5% of the stream copies of earlier 64-token spans, so that contexts repeat. It prints the seconds, the
build's peak memory (tracemalloc: its own arrays, not the stream) and the gated fraction.

--baseline REV checks REV out in a git worktree and runs this same measurement, in fresh processes, on the
current train_gpt.py and on REV's, interleaved (A, B, A, B, ...), then prints time ratios per phase: speed claims
in this project are ratios measured side by side. The last line is for scripts:
  bench train_ms_per_step:X train_mfu:Y final_eval_tokens_per_s:Z final_eval_mfu:W slot_time_share:A
        slot_flop_share:B projected_8xh100_eval_s:P
"""

from __future__ import annotations

import argparse
import copy
import glob
import importlib.util
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
RECORD_VAL_TOKENS = 62_021_632  # the challenge's full validation split, in usable tokens
RECORD_VAL_TOKENS_SP8192 = 47_851_520  # the same 50,000 documents tokenized by SP8192 CaseOps (MODERN_STACK §4.2)
H100_MATMUL_TFLOPS = 800.0  # achieved dense bf16 matmul rate assumed for an H100 when none was measured on one
GPU_PEAK_N, CPU_PEAK_N = 8192, 1024


def load_train_gpt(path: Path):
    """Import train_gpt.py from a given file (the current tree's, or a baseline worktree's) as `train_gpt`."""
    loaded = sys.modules.get("train_gpt")
    if loaded is not None and Path(loaded.__file__).resolve() == Path(path).resolve():
        return loaded
    spec = importlib.util.spec_from_file_location("train_gpt", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_gpt"] = module
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- analytic FLOP count
# Multiply-adds count 2 FLOPs. Only matmuls and attention are counted (norms, rotary, softcap, softmax, the
# optimizer's Newton-Schulz are not): the usual "model FLOPs" of MFU. Padding is never counted.


def dims(s) -> dict:
    d, H = s.model_dim, s.num_heads
    kv = s.num_kv_heads * (d // H)
    return dict(d=d, kv=kv, hidden=int(s.mlp_mult * d), L=s.num_layers, V=s.vocab_size)


def virtual_layers(s, looped: bool = True) -> int:
    """Layers one forward runs: NUM_LAYERS, and once looping is on NUM_LOOPS more passes of LOOP_START..LOOP_END
    (STACK=pr1855: 11 + 2 x 3 = 17). Settings of a revision without depth recurrence count NUM_LAYERS."""
    extra = s.num_loops * (s.loop_end - s.loop_start + 1) if looped else 0
    return s.num_layers + extra


def layer_matmul_flops(s) -> int:
    """Per token and layer: q (d->d), k and v (d->kv), out (d->d), MLP up (d->hidden) and down (hidden->d), and the
    sparse attention gate (GATE_WINDOW -> heads) when on."""
    m = dims(s)
    d, kv, h = m["d"], m["kv"], m["hidden"]
    gate = 2 * s.gate_window * s.num_heads if s.sparse_attn_gate_enabled else 0
    return 2 * d * (d + kv + kv + d + h) + 2 * h * d + gate


def attention_flops(s, T: int, causal: bool = True) -> int:
    """Per layer, for one sequence of T positions: QK^T and AV, each 2*d FLOPs per (query, key) pair over all
    heads (d = heads x head dim); causal attention has T(T+1)/2 pairs, full attention T^2."""
    pairs = T * (T + 1) // 2 if causal else T * T
    return 2 * (2 * s.model_dim * pairs)


def embed_flops(s) -> int:
    """Per token: the BigramHash projection and the value embeddings' projection (once), each when on. (The smear
    gate's 2 x GATE_WINDOW is a matrix-vector product, which FlopCounterMode does not count either.)"""
    m = dims(s)
    return (2 * s.bigram_dim * m["d"] if s.bigram_vocab_size else 0) + (2 * s.ve_dim * m["kv"] if s.ve_layers else 0)


def head_flops(s) -> int:
    """Per token: the tied output head, d -> vocab."""
    return 2 * s.model_dim * s.vocab_size


def hidden_flops(s, T: int, causal: bool = True, looped: bool = True) -> int:
    """forward_hidden on one sequence of T positions (document-masked: an upper bound, as if one document)."""
    n = virtual_layers(s, looped)
    return T * (embed_flops(s) + n * layer_matmul_flops(s)) + n * attention_flops(s, T, causal)


def forward_flops(s, T: int, looped: bool = True) -> int:
    return hidden_flops(s, T, looped=looped) + T * head_flops(s)


def train_flops(s, T: int, looped: bool = True) -> int:
    """Forward + backward (input and weight gradients, each as costly as the forward) = 3x forward."""
    return 3 * forward_flops(s, T, looped)


def slot_flops_per_position(s) -> int:
    """Per fitted position: SLOT_STEPS x (head forward + backward to the hidden state only, no weight gradient)
    = 2 head forwards a step."""
    return s.slot_steps * 2 * head_flops(s)


def slot_fit_positions(s, window: tuple[int, int, int]) -> int:
    """Positions a SLOT fit needs logits at: causal fits on the window's context (before its first scored
    position), batch on every position."""
    start, end, first = window
    return first - start if s.slot_mode == "causal" else end - start


def ttt_sequences(s, n: int) -> list[int]:
    """Sequences of EVAL_SEQ_LEN trained on after each chunk but the last, as train_gpt.ttt_train_chunk does."""
    chunk, L = s.ttt_chunk_tokens, s.eval_seq_len
    n_chunks = (n - 1) // chunk + 1
    return [(min(c * chunk + chunk, n) - c * chunk) // L for c in range(n_chunks - 1)]


def lora_flops(s) -> tuple[int, int]:
    """Per token: phased TTT's adapters of one virtual layer (Q d->d, K and V d->kv, the O and MLP bypasses d->d, each
    x A^T then B^T, 2 FLOPs a multiply-add) and the head adapter's (d -> vocab), those the TTT_*_LORA switches keep."""
    d, r, kv = s.model_dim, s.ttt_lora_rank, dims(s)["kv"]
    on = dict(q=s.ttt_q_lora, k=s.ttt_k_lora, v=s.ttt_v_lora, o=s.ttt_o_lora, mlp=s.ttt_mlp_lora)
    out = dict(q=d, k=kv, v=kv, o=d, mlp=d)
    return 2 * r * sum(d + out[role] for role in out if on[role]), 2 * r * (d + s.vocab_size) * s.ttt_head_lora


def phased_flops(tg, s, lengths: list[int], causal: bool = True) -> dict:
    """Phased TTT over documents of these lengths, as train_gpt.evaluate_phased runs it: for every batch (in its
    order) and chunk, each row a forward over its padded context T = min((c+1) C, TTT_EVAL_SEQ_LEN) with the adapters,
    the head at the C chunk positions; where a document goes on, the backward (chunk_backward_flops); then each
    phase's global SGD on its prefix documents (3x forward a sequence)."""
    C, Lt, B = s.ttt_chunk_size, s.ttt_eval_seq_len, s.ttt_batch_size
    layer_lora, head_lora = lora_flops(s)
    n_layers = virtual_layers(s)
    batches = [[n for _, n in b] for b in tg.phased_batches(list(enumerate(lengths)), B)]  # train_gpt's own order
    score = learn = 0.0
    for b in batches:
        for c in range(-(-(b[-1] - 1) // C)):
            T = min((c + 1) * C, Lt)
            score += len(b) * (hidden_flops(s, T, causal) + T * n_layers * layer_lora + C * (head_flops(s) + head_lora))
            learn += len(b) * chunk_backward_flops(s, T, causal) if b[-1] - 1 > (c + 1) * C else 0
    order = [n for b in batches for n in b]
    prefix, P, chunk = (
        min(s.phased_ttt_prefix_docs, len(order)),
        s.phased_ttt_num_phases,
        s.global_ttt_chunk_tokens,
    )
    sgd = 0.0
    for m in (prefix * (p + 1) // P for p in range(P)):
        tokens = sum(n - 1 for n in order[:m])
        n_chunks = (tokens - 2) // chunk + 1 if tokens > 1 else 0
        seqs = sum((min(c * chunk + chunk, tokens - 1) - c * chunk) // s.eval_seq_len for c in range(n_chunks - 1))
        sgd += (
            seqs * s.global_ttt_epochs * 3 * (hidden_flops(s, s.eval_seq_len, causal) + s.eval_seq_len * head_flops(s))
        )
    return dict(
        score=score,
        slot=0.0,
        ttt=learn + sgd,
        total=score + learn + sgd,
        windows=len(lengths),
        positions=float(sum(lengths)),
        scored=sum(lengths) - len(lengths),
    )


def chunk_backward_flops(s, T: int, causal: bool = True) -> int:
    """One row's backward of a phased-TTT chunk, the base model frozen: every matrix's input gradient but the first
    virtual layer's Q, K, V and gate (their input, the embedding, needs none); attention's two products twice
    (both operands; in the first layer only those that reach an adapter); every adapter's two gradients per product,
    but the input one of the first layer's Q, K, V and O;
    the head's input gradient at the C chunk positions and its adapter's two."""
    m, r, C = dims(s), s.ttt_lora_rank, s.ttt_chunk_size
    layer_lora, head_lora = lora_flops(s)
    gate = 2 * s.gate_window * s.num_heads if s.sparse_attn_gate_enabled else 0
    n, first = virtual_layers(s), s.ttt_q_lora + s.ttt_k_lora + s.ttt_v_lora + s.ttt_o_lora  # adapters on x0's norm
    # the first layer's attention products backward: dQ, dK where their adapters are, dP for either, dV with V's
    q, k, v = s.ttt_q_lora, s.ttt_k_lora, s.ttt_v_lora
    skipped = 4 - (q + k + max(q, k) + v)
    return (
        T * (n * layer_matmul_flops(s) - 2 * m["d"] * (m["d"] + 2 * m["kv"]) - gate)
        + 2 * n * attention_flops(s, T, causal)
        - skipped * attention_flops(s, T, causal) // 2
        + T * (2 * n * layer_lora - 2 * r * m["d"] * first)
        + C * (head_flops(s) + 2 * head_lora)
    )


def record_scale_docs(tg, s, n: int) -> list[int]:
    """Document lengths for n validation tokens: the configured val split's own (its first n tokens) when it holds
    that many, else its length distribution repeated up to n tokens (a projection's assumption, said in its output)."""
    val = tg.load_validation_tokens(os.path.join(s.data_path, tg.VAL_SHARDS), s.eval_seq_len, n)
    lengths = [d for _, d in tg.find_docs(val)]
    out, total = [], 0
    while total < n and lengths:
        for d in lengths:
            out.append(d)
            total += d
            if total >= n:
                break
    return out


def pass_flops(
    tg, s, n: int, stride: int, ttt: bool, slot: bool, phased: bool = False, docs: list[int] | None = None
) -> dict:
    """Model FLOPs of one evaluation pass over n scored positions, split into scoring, SLOT fit and TTT training.
    Only the work the pass needs: forward_hidden over every window position, the head only where a target is
    scored (n positions) or, for SLOT, fitted. Phased TTT: over the documents docs (lengths)."""
    if phased:
        return phased_flops(tg, s, docs if docs is not None else record_scale_docs(tg, s, n))
    wins = tg.sliding_windows(n, s.eval_seq_len, stride)
    lens = np.array([e - b for b, e, _ in wins], dtype=np.float64)
    n_layers = virtual_layers(s)  # evaluation always runs the looped model
    per_tok = embed_flops(s) + n_layers * layer_matmul_flops(s)
    score = float((lens * per_tok).sum() + n_layers * (4 * s.model_dim * lens * (lens + 1) / 2).sum())
    score += float(n) * head_flops(s)
    slot_f = float(sum(slot_fit_positions(s, w) for w in wins)) * slot_flops_per_position(s) if slot else 0.0
    ttt_f = float(sum(ttt_sequences(s, n))) * s.ttt_epochs * train_flops(s, s.eval_seq_len) if ttt else 0.0
    return dict(
        score=score,
        slot=slot_f,
        ttt=ttt_f,
        total=score + slot_f + ttt_f,
        windows=len(lens),
        positions=float(lens.sum()),
        scored=n,
    )


# ----------------------------------------------------------------------------- measurement helpers


def matmul_peak(device: torch.device) -> tuple[float, str]:
    """Best achieved rate of a large square matmul: bf16 on GPU, fp32 on CPU (the model's compute dtypes)."""
    cuda = device.type == "cuda"
    n, dtype = (GPU_PEAK_N, torch.bfloat16) if cuda else (CPU_PEAK_N, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    reps = 10 if cuda else 2
    best = float("inf")
    for trial in range(12):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            c = a @ b
        if cuda:
            torch.cuda.synchronize()
        if trial:  # the first one warms up
            best = min(best, time.perf_counter() - t0)
    del c
    return 2 * n**3 * reps / best, f"{'bf16' if cuda else 'fp32'} {n}x{n} matmul"


def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process max RSS"


class Timed:
    """Wraps a train_gpt function to add up the seconds spent in it (device-synchronized), and with units(*a, **k)
    the units of work its calls did (phased TTT's chunk steps)."""

    def __init__(self, tg, name: str, run, units=None):
        self.tg, self.name, self.run, self.fn, self.seconds = tg, name, run, getattr(tg, name, None), 0.0
        self.units, self.count = units, 0

    def __enter__(self):
        if self.fn is not None:

            def timed(*a, **k):
                self.run.sync()
                t0 = time.perf_counter()
                out = self.fn(*a, **k)
                self.run.sync()
                self.seconds += time.perf_counter() - t0
                self.count += self.units(*a, **k) if self.units else 1
                return out

            setattr(self.tg, self.name, timed)
        return self

    def __exit__(self, *exc):
        if self.fn is not None:
            setattr(self.tg, self.name, self.fn)


def load_data(tg, s, run, n_val: int):
    """Val slice, bpb tables, a training batch source and a description: the real data when DATA_PATH holds it,
    else random tokens (throughput only; scores meaningless)."""
    val_pattern = os.path.join(s.data_path, getattr(tg, "VAL_SHARDS", "fineweb_val_*.bin"))  # older revisions
    train_pattern = os.path.join(s.data_path, "fineweb_train_*.bin")
    L, V = s.eval_seq_len, s.vocab_size
    try:
        luts = tg.build_sentencepiece_luts(tg.load_tokenizer(s), V, run.device)
        have_tok = True
    except tg.Fail:
        ones = torch.ones(V, dtype=torch.int16, device=run.device)
        luts, have_tok = (
            (
                ones,
                torch.zeros(V, dtype=torch.bool, device=run.device),
                torch.zeros(V, dtype=torch.bool, device=run.device),
            ),
            False,
        )
    gen = torch.Generator().manual_seed(s.seed)
    if have_tok and glob.glob(val_pattern):
        val, source = tg.load_validation_tokens(val_pattern, L, n_val), f"val {val_pattern}"
    else:
        val = torch.randint(0, V, ((n_val // L) * L + 1,), generator=gen)
        source = f"val RANDOM tokens (no tokenizer + {val_pattern})"
    if glob.glob(train_pattern):
        loader = tg.DistributedTokenLoader(train_pattern, run.rank, run.world, run.device)
        batches, tsource = loader.next_batch, f"train {train_pattern}"
    else:

        def batches(local_tokens, seq_len):
            t = torch.randint(0, V, (local_tokens // seq_len, seq_len + 1), generator=gen).to(run.device)
            return t[:, :-1], t[:, 1:]

        tsource = f"train RANDOM tokens (no {train_pattern})"
    return val, luts, batches, f"{tsource}; {source}"


# ----------------------------------------------------------------------------- phases


def bench_train(tg, run, model, s, batches, steps: int, warmup: int) -> dict:
    """train_gpt.train_step itself, timed: warm-up steps, then the median of the steps (LR multiplier 1, looping on)."""
    optimizers = tg.build_optimizers(model, s)
    seq_len = s.train_seq_len
    model.looping = bool(s.num_loops)  # the steady state after ENABLE_LOOPING_AT
    averages = tg.WeightAverages(model, s)
    times = []
    reset_peak_memory(run.device)
    for i in range(warmup + steps):
        run.sync()
        t0 = time.perf_counter()
        loss_value = tg.train_step(run, model, optimizers, batches, i, 1.0).item()
        averages.update(model, i + 1, 1.0)
        run.sync()
        times.append(time.perf_counter() - t0)
    steady = statistics.median(times[warmup:])
    flops = train_flops(s, seq_len) * (s.train_batch_tokens // seq_len)
    model.looping = False
    mem, mem_kind = peak_memory_mib(run.device)
    return dict(
        name="train",
        kind="train",
        seconds=steady,
        first_s=times[0],
        all_s=times,
        steps=steps,
        tokens=s.train_batch_tokens,
        flops=flops,
        flops_parts=dict(train=flops),
        peak_mem_mib=mem,
        peak_mem_kind=mem_kind,
        loss=loss_value,
    )


def chunk_steps(tg, s):
    """units for Timed: the chunk steps of one train_gpt.score_documents call (a batch of phased TTT): as many as
    the longest document's targets fill chunks of its batch's chunk size."""

    def count(model, run, tokens, luts, batch, *rest, **kw):
        longest = max(length for _, length in batch)
        return -(-(longest - 1) // tg.chunk_size_of(s, longest))

    return count


def bench_eval(tg, run, model, state: dict, val, luts, name: str, kw: dict, repeats: int, extra: bool) -> dict:
    s = run.s
    n = val.numel() - 1
    times, parts = [], []
    reset_peak_memory(run.device)
    for r in range(1 + repeats):  # the first pass warms up (and compiles)
        model.load_state_dict(state)
        model.zero_grad(set_to_none=True)
        with (
            Timed(tg, "slot_delta", run) as slot_t,
            Timed(tg, "ttt_train_chunk", run) as ttt_t,
            Timed(tg, "score_documents", run, chunk_steps(tg, s)) as chunk_t,
        ):
            run.sync()
            t0 = time.perf_counter()
            loss, bpb = tg.evaluate(model, run, val, luts, tag=name, **kw)
            run.sync()
            times.append(time.perf_counter() - t0)
        parts.append(dict(slot=slot_t.seconds, ttt=ttt_t.seconds, chunk_s=chunk_t.seconds, chunks=chunk_t.count))
    mid = sorted(range(1, len(times)), key=lambda i: times[i])[(len(times) - 2) // 2]  # the (lower) median pass
    steady = times[mid]
    chunks = parts[mid]["chunks"]  # phased TTT: every chunk step scores, and trains unless it is a document's last
    seconds_parts = dict(slot=parts[mid]["slot"], ttt=parts[mid]["ttt"])
    seconds_parts["score"] = max(times[mid] - seconds_parts["slot"] - seconds_parts["ttt"], 0.0)
    f = pass_flops(tg, s, n, **kw, docs=[d for _, d in tg.find_docs(val)])
    mem, mem_kind = peak_memory_mib(run.device)
    return dict(
        name=name,
        kind="eval",
        extra=extra,
        config=kw,
        seconds=steady,
        first_s=times[0],
        all_s=times,
        tokens=n,
        flops=f["total"],
        flops_parts=dict(score=f["score"], slot=f["slot"], ttt=f["ttt"]),
        seconds_parts=seconds_parts,
        windows=f["windows"],
        positions=f["positions"],
        peak_mem_mib=mem,
        peak_mem_kind=mem_kind,
        val_bpb=bpb,
        chunk_steps=chunks,
        chunk_step_ms=1000 * parts[mid]["chunk_s"] / chunks if chunks else None,
    )


def derive(p: dict, peak: float, world: int, compiling: bool) -> dict:
    """Rates from a phase's seconds and FLOPs; peak is one device's, the MFU is against all ranks' devices."""
    p["tokens_per_s"] = p["tokens"] / p["seconds"]
    p["s_per_1m_tokens"] = p["seconds"] / p["tokens"] * 1e6
    p["flops_per_token"] = p["flops"] / p["tokens"]
    p["tflops"] = p["flops"] / p["seconds"] / 1e12
    p["mfu"] = p["flops"] / p["seconds"] / (peak * world)
    p["compile_s"] = max(p["first_s"] - p["seconds"], 0.0) if compiling else None
    if p["kind"] == "eval":
        p["mfu_parts"] = {
            k: (
                p["flops_parts"][k] / p["seconds_parts"][k] / (peak * world)
                if p["flops_parts"][k] and p["seconds_parts"][k] > 0
                else None
            )
            for k in p["flops_parts"]
        }
    return p


def project(tg, s, evals: dict, measured: bool, stated_mfu: float, h100: float, gpus: int = 8) -> dict:
    """Seconds of each configured final-evaluation pass on `gpus` H100s at the full validation size: its FLOP
    count (scoring, SLOT, TTT apart) divided by MFU x H100 matmul rate x gpus. MFU: this run's, per part, on a
    GPU; the stated one elsewhere. Assumes perfect scaling over the GPUs."""
    L = s.eval_seq_len
    n = (s.val_max_tokens or (RECORD_VAL_TOKENS_SP8192 if s.vocab_size == 8192 else RECORD_VAL_TOKENS)) // L * L
    rows = []
    for label, kw in tg.eval_paths(s):
        f = pass_flops(tg, s, n, **kw)
        secs = 0.0
        mfus = {}
        for part in ("score", "slot", "ttt"):
            if not f[part]:
                continue
            mfu = stated_mfu
            if measured and label in evals:
                m = evals[label]
                mfu = m["mfu_parts"].get(part) or m["mfu"]
            mfus[part] = mfu
            secs += f[part] / (mfu * h100 * gpus)
        rows.append(
            dict(
                name=label,
                tokens=n,
                flops=f["total"],
                flops_parts={k: f[k] for k in ("score", "slot", "ttt")},
                mfu=mfus,
                seconds=secs,
            )
        )
    train = dict()
    steps = s.train_batch_tokens // s.train_seq_len
    mfu = evals["train"]["mfu"] if measured and "train" in evals else stated_mfu
    for looped in (False, True):
        train["looped" if looped else "plain"] = (
            1000 * train_flops(s, s.train_seq_len, looped) * steps / (mfu * h100 * gpus)
        )
    on = s.enable_looping_at if s.num_loops else 1.0  # share of the clock before looping
    train["mean"] = 1 / (on / train["plain"] + (1 - on) / train["looped"])  # time-weighted: steps / clock
    train["mfu"] = mfu
    return dict(
        tokens=n,
        gpus=gpus,
        h100_tflops=h100 / 1e12,
        mfu_source="measured" if measured else "stated",
        passes=rows,
        total_s=sum(r["seconds"] for r in rows),
        train_ms_per_step=train,
        budget_s=float(s.eval_budget_seconds),
    )


# ----------------------------------------------------------------------------- one measurement


def synthetic_stream(n: int, vocab: int, seed: int = 0) -> np.ndarray:
    """n Zipf-distributed tokens below vocab, 5% of them overwritten by copies of earlier 64-token spans."""
    rng = np.random.default_rng(seed)
    tokens = rng.zipf(1.2, n).astype(np.int64) % vocab
    dst = rng.integers(min(1000, n // 2), max(n - 64, min(1000, n // 2) + 1), n // 20 // 64)
    src = (rng.random(dst.size) * dst).astype(np.int64)
    for d, s in zip(dst, src):
        tokens[d : d + 64] = tokens[s : s + 64]
    return tokens


def ngram_build(args) -> int:
    """Time the n-gram tilt's hint build over a synthetic stream (--ngram-build N)."""
    import tracemalloc

    tg = load_train_gpt(Path(args.module))
    s = tg.parse_settings()
    tokens = synthetic_stream(args.ngram_build, s.vocab_size)
    t0 = time.perf_counter()
    tracemalloc.start()
    hints = tg.ngram_hints(tokens, s.token_order, s.token_threshold)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(
        f"ngram_build tokens:{tokens.size} order:{s.token_order} seconds:{time.perf_counter() - t0:.1f} "
        f"peak_memory_mib:{peak / 2**20:.0f} gated_fraction:{(hints >= 0).mean():.4f}"
    )
    return 0


def project_only(args) -> int:
    """The configured final evaluation's FLOPs and projected 8xH100 seconds at the stated MFU, nothing measured."""
    tg = load_train_gpt(Path(args.module))
    s = tg.parse_settings()
    pr = project(tg, s, {}, False, args.mfu, args.h100_tflops * 1e12)
    pr["h100_rate_source"] = "assumed (--h100-tflops)"
    T = s.train_seq_len
    print(
        f"model FLOPs per token: forward {forward_flops(s, s.eval_seq_len) / s.eval_seq_len / 1e6:.2f} M at "
        f"{s.eval_seq_len} positions; training {train_flops(s, T) / T / 1e6:.2f} M at {T}; "
        f"training step {train_flops(s, T) * (s.train_batch_tokens // T) / 1e12:.1f} TFLOP"
    )
    print_report(dict(projection=pr), True, phases=False)
    return 0


def attention_of(run) -> dict:
    """The attention that ran (a baseline revision before pick_attention's record names only the backend)."""
    a = getattr(run, "attn", None)
    if a is None:
        return dict(attention=run.attn_name, attention_source="?", documents_attention="?", attention_passed_over=[])
    return dict(
        attention=a.name,
        attention_source=a.source,
        documents_attention=a.documents_name,
        attention_passed_over=a.passed_over,
    )


def measure(args) -> dict:
    tg = load_train_gpt(Path(args.module))
    s = tg.parse_settings()
    if not 0 < s.eval_stride <= s.eval_seq_len:
        raise tg.Fail(f"EVAL_STRIDE={s.eval_stride} must be between 1 and EVAL_SEQ_LEN={s.eval_seq_len}")
    tmp = tempfile.mkdtemp(prefix="bench_")
    s.output_dir, s.run_id = tmp, "bench"
    run = tg.Run(s)
    run.log = lambda *a, **k: None  # evaluate's per-chunk lines are not part of the benchmark's output
    torch.manual_seed(s.seed)
    L = s.eval_seq_len
    n_default = max(4 * L, 2 * s.ttt_chunk_tokens if s.ttt_enabled else 0)
    n_val = args.val_tokens or n_default
    if s.val_max_tokens:
        n_val = min(n_val, s.val_max_tokens)
    val, luts, batches, data_source = load_data(tg, s, run, n_val)
    n = val.numel() - 1
    notes = []
    if s.ttt_enabled and n <= s.ttt_chunk_tokens:
        notes.append(f"the val slice ({n} tokens) is one TTT chunk: TTT never trains in it; raise --val-tokens")
    peak, peak_what = (args.peak_tflops * 1e12, "given") if args.peak_tflops else matmul_peak(run.device)
    on_gpu = run.device.type == "cuda"
    hw = (
        torch.cuda.get_device_name(run.device)
        if on_gpu
        else f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    )
    result = dict(
        module=str(args.module),
        stack=getattr(s, "stack", "seed"),
        torch=torch.__version__,
        device=hw,
        world=run.world,
        **attention_of(run),
        compile=bool(run.compile),
        peak_flops=peak,
        peak_what=peak_what,
        data=data_source,
        val_tokens=n,
        settings_changed={k: os.environ[k] for k in tg.SETTING_NAMES if k in os.environ},
        notes=notes,
        phases=[],
        partial=True,  # until every phase is measured
    )

    def measured(phase: dict):
        """Keep a measured phase; with --json, write what is measured so far (it survives a later timeout)."""
        result["phases"].append(derive(phase, peak, run.world, run.compile))
        if args.json and run.master:
            Path(args.json).write_text(json.dumps(result, indent=1))

    model = tg.build_model(run)
    if args.train_steps > 0:
        measured(bench_train(tg, run, model, s, batches, args.train_steps, args.train_warmup))
    state = copy.deepcopy(model.state_dict())
    paths = tg.eval_paths(s)
    for label, kw in paths:
        measured(bench_eval(tg, run, model, state, val, luts, label, kw, args.eval_repeats, extra=False))
    final_label, final_kw = paths[-1]
    if final_kw["slot"] and not args.no_extra:
        noslot = dict(final_kw, slot=False)
        measured(bench_eval(tg, run, model, state, val, luts, final_label + "_noslot", noslot, args.eval_repeats, True))
    phases = result["phases"]
    hopper = on_gpu and any(k in torch.cuda.get_device_name(run.device) for k in ("H100", "H200"))
    h100 = peak if hopper else args.h100_tflops * 1e12
    projection = project(tg, s, {p["name"]: p for p in phases}, on_gpu, args.mfu, h100)
    projection["h100_rate_source"] = "measured on this Hopper GPU" if hopper else "assumed (--h100-tflops)"
    shutil.rmtree(tmp, ignore_errors=True)
    result.update(projection=projection, summary=summary(phases, projection), partial=False)
    return dict(result, master=run.master)


def summary(phases: list, projection: dict) -> dict:
    train = next((p for p in phases if p["kind"] == "train"), None)
    final = [p for p in phases if p["kind"] == "eval" and not p["extra"]][-1]
    flops = final["flops_parts"]
    return dict(
        train_ms_per_step=1000 * train["seconds"] if train else float("nan"),
        train_mfu=train["mfu"] if train else float("nan"),
        final_eval_tokens_per_s=final["tokens_per_s"],
        final_eval_mfu=final["mfu"],
        slot_time_share=final["seconds_parts"]["slot"] / final["seconds"],
        slot_flop_share=flops["slot"] / final["flops"],
        projected_8xh100_eval_s=projection["total_s"],
    )


# ----------------------------------------------------------------------------- printing


def fmt_mem(p):
    return f"{p['peak_mem_mib']:.0f}"


def print_report(r: dict, show_projection: bool, phases: bool = True):
    if phases:
        print_phases(r)
    if show_projection:
        print_projection(r["projection"])


def print_phases(r: dict):
    print(
        f"bench: torch {r['torch']}, {r['device']}, world {r['world']}, attention {r['attention']}, "
        f"compile {'on' if r['compile'] else 'off'}"
    )
    print(
        f"matmul peak: {r['peak_flops'] / 1e12:.3f} TFLOP/s per device ({r['peak_what']}); "
        "MFU = achieved / (peak x world)"
    )
    print(f"data: {r['data']}; val slice {r['val_tokens']} tokens")
    if r["settings_changed"]:
        print("settings: " + " ".join(f"{k}={v}" for k, v in r["settings_changed"].items()))
    for note in r["notes"]:
        print(f"NOTE: {note}")
    mem_kind = r["phases"][0]["peak_mem_kind"]
    print()
    print(
        "| phase | time | tokens/s | s per 1M tokens | GFLOP/token | TFLOP/s | MFU | compile s "
        f"| peak MiB ({mem_kind}) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for p in r["phases"]:
        t = f"{1000 * p['seconds']:.1f} ms/step" if p["kind"] == "train" else f"{p['seconds']:.3f} s"
        name = p["name"] + (" (extra)" if p.get("extra") else "")
        comp = f"{p['compile_s']:.1f}" if p["compile_s"] is not None else "-"
        print(
            f"| {name} | {t} | {p['tokens_per_s']:,.0f} | {p['s_per_1m_tokens']:.2f} "
            f"| {p['flops_per_token'] / 1e9:.4f} | "
            f"{p['tflops']:.4f} | {100 * p['mfu']:.1f}% | {comp} | {fmt_mem(p)} |"
        )
    print()
    print("eval passes by part (seconds measured around slot_delta / ttt_train_chunk; scoring = the rest):")
    print("| pass | part | seconds | time share | GFLOP | FLOP share | MFU |")
    print("|---|---|---|---|---|---|---|")
    for p in r["phases"]:
        if p["kind"] != "eval":
            continue
        for part in ("score", "slot", "ttt"):
            f, sec = p["flops_parts"][part], p["seconds_parts"][part]
            if not f and not sec:
                continue
            mfu = p["mfu_parts"][part]
            print(
                f"| {p['name']} | {part} | {sec:.3f} | {100 * sec / p['seconds']:.1f}% | {f / 1e9:.2f} | "
                f"{100 * f / p['flops']:.1f}% | {'-' if mfu is None else f'{100 * mfu:.1f}%'} |"
            )


def print_projection(pr: dict):
    print()
    print(
        f"projection: {pr['gpus']}xH100 at {pr['tokens']:,} val tokens, H100 matmul rate {pr['h100_tflops']:.0f} "
        f"TFLOP/s ({pr['h100_rate_source']}), MFU {pr['mfu_source']}, perfect scaling assumed"
    )
    print("| pass | PFLOP | of which SLOT | of which TTT | MFU | projected s |")
    print("|---|---|---|---|---|---|")
    for row in pr["passes"]:
        mfu = ", ".join(f"{k} {100 * v:.0f}%" for k, v in row["mfu"].items())
        fp = row["flops_parts"]
        print(
            f"| {row['name']} | {row['flops'] / 1e15:.4g} | {100 * fp['slot'] / row['flops']:.1f}% | "
            f"{100 * fp['ttt'] / row['flops']:.1f}% | {mfu} | {row['seconds']:.3g} |"
        )
    t = pr["train_ms_per_step"]
    print(
        f"training step at MFU {100 * t['mfu']:.0f}%: {t['plain']:.1f} ms before looping, {t['looped']:.1f} ms "
        f"looped, {t['mean']:.1f} ms mean over the clock (PR #1855 logged ~96, ~141 and 121.7 ms on 8xH100)"
    )
    verdict = "within" if pr["total_s"] <= pr["budget_s"] else "OVER"
    print(
        f"| total (configured final evaluation) | {sum(x['flops'] for x in pr['passes']) / 1e15:.4g} | | | | "
        f"{pr['total_s']:.3g} ({verdict} the {pr['budget_s']:.0f} s budget) |"
    )


def last_line(summ: dict) -> str:
    keys = (
        "train_ms_per_step",
        "train_mfu",
        "final_eval_tokens_per_s",
        "final_eval_mfu",
        "slot_time_share",
        "slot_flop_share",
        "projected_8xh100_eval_s",
    )
    return "bench " + " ".join(f"{k}:{summ[k]:.6g}" for k in keys)


def readme_block(paths: list[str]) -> str:
    """The summary block of tools/gpu_check.sh, ready to paste into docs/performance.md (GPU figures): one section
    per bench --json file (named <stack>/bench.json), each followed by the train_gpt.py summary JSONs after it."""
    sections = []
    for path in paths:
        if Path(path).name == "bench.json":
            sections.append(bench_section(path))
        else:
            sections.append(run_line(path))
    return "\n".join(sections)


def bench_section(bench_json: str) -> str:
    stack = Path(bench_json).parent.name
    try:
        r = json.loads(Path(bench_json).read_text())
    except (OSError, ValueError):
        return (
            f"\n### STACK={stack}\n\nbenchmark: no result ({bench_json} missing or unreadable: it failed or timed out)"
        )
    phases = {p["name"]: p for p in r["phases"]}
    train = phases.get("train")
    evals = [p for p in r["phases"] if p["kind"] == "eval"]
    pr = r.get("projection")
    proj = {row["name"]: row for row in pr["passes"]} if pr else {}
    comp = lambda p: f"{p['compile_s']:.0f} s" if p.get("compile_s") is not None else "not compiled"
    lines = [
        f"\n### STACK={r.get('stack', stack)}\n",
        f"`tools/gpu_check.sh` on {r['device']} (torch {r['torch']}, attention {r['attention']} "
        f"({r.get('attention_source', '?')}), document-masked attention {r.get('documents_attention', '?')}, "
        f"compile {'on' if r['compile'] else 'off'}, matmul peak measured {r['peak_flops'] / 1e12:.3g} TFLOP/s "
        f"{r['peak_what']}); {r['data']}; eval slice {r['val_tokens']:,} tokens.",
        "",
        "| phase | time | tokens/s | TFLOP/s | MFU | compile + warm-up | peak memory | projected 8×H100 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    if train:
        lines.append(
            f"| train (one GPU, {train['tokens']:,}-token step) | {1000 * train['seconds']:.1f} ms/step | "
            f"{train['tokens_per_s']:,.0f} | {train['tflops']:.1f} | {100 * train['mfu']:.1f}% | {comp(train)} | "
            f"{train['peak_mem_mib']:,.0f} MiB | - |"
        )
    for p in evals:
        projected = f"{proj[p['name']]['seconds']:.0f} s" if p["name"] in proj else "-"
        lines.append(
            f"| {p['name']}{' (extra)' if p.get('extra') else ''} | {p['seconds']:.2f} s "
            f"| {p['tokens_per_s']:,.0f} | "
            f"{p['tflops']:.1f} | {100 * p['mfu']:.1f}% | {comp(p)} | {p['peak_mem_mib']:,.0f} MiB | {projected} |"
        )
    lines.append("")
    if pr is None:
        lines.append(
            "Partial: the benchmark stopped after the phases above (it failed or ran out of time; its output is in "
            f"{Path(bench_json).with_name('bench.txt')}), so there is no projection."
        )
    else:
        verdict = "within" if pr["total_s"] <= pr["budget_s"] else "OVER"
        s = r["summary"]
        lines.append(
            f"Projected configured final evaluation on 8×H100 at {pr['tokens']:,} val tokens: "
            f"{pr['total_s']:.0f} s ({verdict} the {pr['budget_s']:.0f} s budget; MFU {pr['mfu_source']}, "
            f"H100 rate {pr['h100_tflops']:.0f} TFLOP/s {pr['h100_rate_source']}). SLOT: "
            f"{100 * s['slot_time_share']:.1f}% of the final pass's time, "
            f"{100 * s['slot_flop_share']:.1f}% of its FLOPs."
        )
    for p in evals:
        if p.get("chunk_steps"):
            lines.append(
                f"Phased TTT ({p['name']}): {p['chunk_steps']:,} chunk steps (score, then the adapters' step), "
                f"{p['chunk_step_ms']:.1f} ms each."
            )
    return "\n".join(lines)


def run_line(run_json: str) -> str:
    try:
        run = json.loads(Path(run_json).read_text())
        rt = run["metrics"].get("final_int6_roundtrip_exact", {})
        return (
            f"Short run: {run.get('steps', '?')} steps on the sample, {run.get('step_avg_ms', float('nan')):.1f} "
            f"ms/step, round trip val_bpb {rt.get('val_bpb', float('nan')):.4f}, artifact "
            f"{run.get('bytes', {}).get('total', '?'):,} bytes."
        )
    except (OSError, ValueError, KeyError, AttributeError):
        return f"Short run: no result ({run_json} missing or unreadable)"


# ----------------------------------------------------------------------------- baseline comparison


def worker_argv(args, module: Path, json_path: str) -> list[str]:
    argv = [
        str(Path(__file__).resolve()),
        "--module",
        str(module),
        "--json",
        json_path,
        "--train-steps",
        str(args.train_steps),
        "--train-warmup",
        str(args.train_warmup),
        "--eval-repeats",
        str(args.eval_repeats),
        "--mfu",
        str(args.mfu),
        "--h100-tflops",
        str(args.h100_tflops),
    ]
    if args.val_tokens:
        argv += ["--val-tokens", str(args.val_tokens)]
    if args.peak_tflops:
        argv += ["--peak-tflops", str(args.peak_tflops)]
    if args.no_extra:
        argv.append("--no-extra")
    launcher = [sys.executable]
    if args.nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
    return launcher + argv


def phase_times(result: dict) -> dict:
    times = {p["name"]: p["seconds"] for p in result["phases"]}
    times["final_eval_total"] = sum(p["seconds"] for p in result["phases"] if p["kind"] == "eval" and not p["extra"])
    return times


def compare(args) -> dict:
    rev = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--verify", args.baseline + "^{commit}"], capture_output=True, text=True
    )
    if rev.returncode:
        raise SystemExit(f"error: --baseline {args.baseline!r} is not a revision of {ROOT}")
    sha = rev.stdout.strip()
    tree = Path(tempfile.mkdtemp(prefix="bench_baseline_"))
    wt = tree / "worktree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet", str(wt), sha], check=True)
    sides = dict(current=Path(args.module), baseline=wt / "train_gpt.py")
    runs = {k: [] for k in sides}
    try:
        for r in range(args.rounds):
            for side, module in sides.items():  # A, B, A, B, ...: drift on a shared machine hits both alike
                out = str(tree / f"{side}_{r}.json")
                proc = subprocess.run(worker_argv(args, module, out), cwd=ROOT, capture_output=True, text=True)
                if proc.returncode:
                    sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
                    raise SystemExit(f"error: the {side} measurement ({module}) failed with exit {proc.returncode}")
                runs[side].append(json.loads(Path(out).read_text()))
                print(f"round {r + 1}/{args.rounds} {side}: done", flush=True)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(wt)], capture_output=True)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "prune"], capture_output=True)
        shutil.rmtree(tree, ignore_errors=True)
    times = {side: [phase_times(x) for x in rs] for side, rs in runs.items()}
    names = list(dict.fromkeys([k for t in times["current"][:1] + times["baseline"][:1] for k in t]))
    ratios = {}
    print()
    print(
        f"current ({sides['current']}) vs baseline {args.baseline} ({sha[:10]}), {args.rounds} interleaved rounds, "
        f"median seconds; ratio = current / baseline time (< 1: current is faster). Noisy on a shared machine."
    )
    print("| phase | current s | baseline s | ratio | current rounds | baseline rounds |")
    print("|---|---|---|---|---|---|")
    for name in names:
        cur = [t[name] for t in times["current"] if name in t]
        base = [t[name] for t in times["baseline"] if name in t]
        if cur and base:
            ratios[name] = statistics.median(cur) / statistics.median(base)
        med = lambda xs: f"{statistics.median(xs):.4f}" if xs else "-"
        print(
            f"| {name} | {med(cur)} | {med(base)} | {ratios[name]:.3f} | "
            if name in ratios
            else f"| {name} | {med(cur)} | {med(base)} | - | ",
            end="",
        )
        print(f"{' '.join(f'{x:.4f}' for x in cur)} | {' '.join(f'{x:.4f}' for x in base)} |")
    cur_p = statistics.median(x["projection"]["total_s"] for x in runs["current"])
    base_p = statistics.median(x["projection"]["total_s"] for x in runs["baseline"])
    print(
        f"projected 8xH100 final evaluation: current {cur_p:.3g} s, baseline {base_p:.3g} s, ratio {cur_p / base_p:.3f}"
    )
    for name in names:
        if name in ratios:
            print(f"ratio {name} current/baseline:{ratios[name]:.4f}")
    return dict(
        baseline=args.baseline,
        baseline_sha=sha,
        rounds=args.rounds,
        ratios=ratios,
        runs=runs,
        projected_ratio=cur_p / base_p,
    )


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="Settings come from the environment, as for train_gpt.py."
    )
    p.add_argument("--json", help="write every figure to this file")
    p.add_argument("--train-steps", type=int, default=5, help="timed training steps (default 5; 0 = no training phase)")
    p.add_argument("--train-warmup", type=int, default=2, help="untimed training steps first (default 2)")
    p.add_argument(
        "--val-tokens",
        type=int,
        default=0,
        help="val slice for the eval passes (default: 2 TTT chunks, at least 4 EVAL_SEQ_LEN)",
    )
    p.add_argument("--eval-repeats", type=int, default=1, help="timed passes after the warm-up pass (default 1)")
    p.add_argument("--no-extra", action="store_true", help="skip the final pass without SLOT")
    p.add_argument("--project-8xh100", action="store_true", help="print the projected 8xH100 eval seconds per pass")
    p.add_argument(
        "--project-only",
        action="store_true",
        help="measure nothing: print the FLOP count and projection of the configured evaluation at --mfu",
    )
    p.add_argument("--mfu", type=float, default=0.35, help="MFU assumed for the projection off a GPU (default 0.35)")
    p.add_argument(
        "--h100-tflops",
        type=float,
        default=H100_MATMUL_TFLOPS,
        help="H100 bf16 matmul rate for the projection unless measured on a Hopper GPU "
        f"(default {H100_MATMUL_TFLOPS:.0f})",
    )
    p.add_argument("--peak-tflops", type=float, default=0, help="use this matmul peak instead of measuring it")
    p.add_argument(
        "--ngram-build",
        type=int,
        nargs="?",
        const=RECORD_VAL_TOKENS_SP8192,
        default=0,
        metavar="N",
        help=f"time only the n-gram tilt's hint build over N synthetic tokens (default {RECORD_VAL_TOKENS_SP8192:,})",
    )
    p.add_argument("--baseline", help="also measure this git revision, interleaved, and print ratios")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds per side with --baseline (default 2)")
    p.add_argument(
        "--nproc", type=int, default=1, help="with --baseline: run each side under torchrun with N processes"
    )
    p.add_argument(
        "--summary",
        nargs="+",
        metavar="JSON",
        help="print tools/gpu_check.sh's docs block from <stack>/bench.json files (bench --json), each followed by "
        "the train_gpt.py summary JSONs of that stack",
    )
    p.add_argument("--module", default=str(ROOT / "train_gpt.py"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.eval_repeats < 1 or args.train_steps < 0 or args.train_warmup < 0 or args.rounds < 1:
        p.error("--eval-repeats and --rounds must be >= 1, step counts >= 0")
    if args.train_steps == 0 and args.train_warmup:
        args.train_warmup = 0
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.summary:
        print(readme_block(args.summary))
        return 0
    if args.project_only:
        return project_only(args)
    if args.ngram_build:
        return ngram_build(args)
    if args.baseline:
        if "RANK" in os.environ:
            raise SystemExit("error: run --baseline as one plain process; --nproc N launches each side under torchrun")
        result = compare(args)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
        summ = summary(result["runs"]["current"][-1]["phases"], result["runs"]["current"][-1]["projection"])
        print(last_line(summ))
        return 0
    try:
        result = measure(args)
    except Exception as e:
        if type(e).__name__ == "Fail":
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise
    if result.pop("master"):
        print_report(result, args.project_8xh100)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
        print(last_line(result["summary"]))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

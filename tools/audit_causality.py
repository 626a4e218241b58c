#!/usr/bin/env python3
"""Mechanical legality audit of the configured final evaluation of train_gpt.py (conditions: docs/evaluation.md).

    [settings...] python tools/audit_causality.py [--positions K] [--seed S] [--tol T]

It reads the same environment variables as train_gpt.py, builds the evaluation that train_gpt.py
would report as its final score (the last entry of train_gpt.eval_paths: sliding window, score-first
TTT, SLOT in the configured SLOT_MODE), and runs it on a short slice of the validation tokens
(VAL_MAX_TOKENS, or 4 x EVAL_SEQ_LEN when that is 0) while train_gpt.SCORE_HOOK captures every
distribution that scores a token. Then:

  causality      for K positions u spread over the slice (one in each of K-1 equal segments, in turn the
                 first scored target of a window, the first target after a TTT chunk boundary, a random
                 one; then the final token; so every TTT chunk gets one when K > the chunks), replace
                 the token at u by a random other token and rerun the whole pipeline from the same
                 starting weights (TTT updates and SLOT fits included). No scored distribution of a
                 target t <= u may move by more than --tol (max abs difference of the log-prob rows).
                 An unperturbed rerun shows the noise floor (it must be 0 up to --tol), and the row of
                 target u+1, whose context did change, must move, or the audit would prove nothing.
                 Condition 3 (score before update) is covered too: an update made with a token before
                 it is scored moves that token's own score, or an earlier one.
  normalization  every scored row is a full distribution over the vocabulary: logsumexp within 1e-4 of 0.
  coverage       every target 1..N of the slice is scored exactly once.

Model: ARTIFACT_PATH (a final_model.int6.ptz of train_gpt.py with matching model settings), or, without
one, a randomly initialized model of the configured size with small Gaussian noise added to every
parameter. The noise matters: the output and MLP-down banks and several projections start at zero, and
such a model hardly mixes information across positions, so a leak could hide. Use tiny settings, e.g.

    DATA_PATH=./data/datasets/sample_sp1024 TOKENIZER_PATH=./data/tokenizers/sample_1024_bpe.model \\
    NUM_LAYERS=4 MODEL_DIM=64 NUM_HEADS=4 NUM_KV_HEADS=2 MLP_MULT=2 VE_LAYERS=2,3 XSA_LAST_N=2 \\
    BIGRAM_VOCAB_SIZE=256 BIGRAM_DIM=16 VE_DIM=16 EVAL_SEQ_LEN=128 EVAL_STRIDE=32 VAL_MAX_TOKENS=1024 \\
    TTT_CHUNK_TOKENS=256 TTT_BATCH_SEQS=4 TTT_EPOCHS=1 python tools/audit_causality.py

which runs in 4-12 s on a CPU (on a small shared machine add OMP_NUM_THREADS=1: oversubscribed threads
can make it 5x slower) (SLOT_MODE=batch must FAIL; SLOT_ENABLED=0 and/or TTT_ENABLED=0 and the
default causal SLOT must PASS). Runs as one process (no torchrun). Exit status: 0 when every condition
passes, 1 when one fails, 2 for bad settings (one line on stderr).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_gpt as tg  # noqa: E402

NORM_TOL = 1e-4


def noised_random_model(s: dict, run, seed: int) -> tg.GPT:
    """The configured model, randomly initialized, plus noise on every parameter (zero-initialized ones too)."""
    torch.manual_seed(seed)
    model = tg.GPT(tg.ModelConfig.of(s), run.attention)
    with torch.no_grad():
        for p in model.parameters():
            std = 0.5 / p.shape[-1] ** 0.5 if p.dim() >= 2 else 0.05
            p.add_(torch.randn_like(p) * std)
    return model.to(run.device)


def perturbed_positions(n: int, k: int, edges: dict[str, list[int]], gen: torch.Generator) -> list[tuple[int, str]]:
    """k token positions in 1..n with their kind: the last is n (no scored distribution may depend on it); the
    others lie one in each of k-1 equal segments of 1..n-1 and cycle through the kinds in edges (a leak by
    one position shows only when u sits exactly on such an edge), then a uniformly random one."""
    if n < 2 or k < 2:
        return [(n, "last")]
    kinds = [kind for kind, where in edges.items() if where] + ["random"]
    picks = {}
    for j in range(k - 1):
        lo, hi = 1 + (n - 1) * j // (k - 1), max(1 + (n - 1) * (j + 1) // (k - 1), 2 + (n - 1) * j // (k - 1))
        kind = kinds[j % len(kinds)]
        inside = [u for u in edges.get(kind, []) if lo <= u < hi]
        if not inside:
            kind, inside = "random", range(lo, hi)
        u = inside[int(torch.randint(len(inside), (1,), generator=gen))]
        picks.setdefault(u, kind)
    return sorted(picks.items()) + [(n, "last")]


class Capture:
    """SCORE_HOOK target: collects (target index, log-prob row) of every scored token."""

    def __init__(self):
        self.idx, self.rows = [], []

    def __call__(self, target_idx, logp):
        self.idx.append(target_idx.detach().to("cpu", torch.int64).clone())
        self.rows.append(logp.detach().to("cpu", torch.float32).clone())

    def sorted(self):
        idx = torch.cat(self.idx) if self.idx else torch.zeros(0, dtype=torch.int64)
        rows = torch.cat(self.rows) if self.rows else torch.zeros(0, 0)
        order = torch.argsort(idx, stable=True)
        return idx[order], rows[order]


def run_pipeline(model, start_state, run, val, luts, label, kw):
    """One full evaluation from the starting weights; returns the scored (indices, rows) sorted by index."""
    model.load_state_dict(start_state)
    model.zero_grad(set_to_none=True)
    cap = Capture()
    tg.SCORE_HOOK = cap
    try:
        tg.evaluate(model, run, val, luts, tag=label, **kw)
    finally:
        tg.SCORE_HOOK = None
    return cap.sorted()


def audit(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--positions", type=int, default=6, help="number of perturbed token positions (default 6)")
    ap.add_argument("--seed", type=int, default=None, help="seed of the random model and perturbations (default SEED)")
    ap.add_argument("--tol", type=float, default=1e-5, help="max abs change of a log-prob row counted as equal")
    args = ap.parse_args(argv)
    if args.positions < 1:
        raise tg.Fail(f"--positions={args.positions} must be at least 1")
    if "RANK" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) != 1:
        raise tg.Fail("run the audit as one process: python tools/audit_causality.py (not under torchrun)")
    s = tg.parse_settings()
    L = s.eval_seq_len  # parse_settings has checked the stride, the TTT chunk and every other range
    seed = s.seed if args.seed is None else args.seed
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="audit_causality_") as tmp:
        s.output_dir = tmp  # Run() makes a logs/ folder there; the audit writes no log
        run = tg.Run(s)
        run.log = lambda msg, console=True: None
        if run.device.type == "cuda":  # a nondeterministic kernel would read as a leak
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
        luts = tg.build_sentencepiece_luts(tg.load_tokenizer(s), s.vocab_size, run.device)
        max_tokens = s.val_max_tokens if s.val_max_tokens > 0 else 4 * L
        val = tg.load_validation_tokens(os.path.join(s.data_path, tg.VAL_SHARDS), L, max_tokens, s.eval_include_tail)
        n = val.numel() - 1
        if s.artifact_path:
            model = tg.GPT(tg.ModelConfig.of(s), run.attention).to(run.device)
            model.load_state_dict(tg.load_artifact(s.artifact_path, s))
            source = f"artifact {s.artifact_path}"
        else:
            model = noised_random_model(s, run, seed)
            source = f"random init + noise (seed {seed})"
        start_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        label, kw = tg.eval_paths(s)[-1]
        name = tg.eval_name(s, **kw)
        desc = f"stride {kw['stride']}"
        if kw["ttt"]:
            n_chunks = (val.numel() - 2) // s.ttt_chunk_tokens + 1
            desc += f", {n_chunks} TTT chunk{'s' * (n_chunks != 1)} of {s.ttt_chunk_tokens}"
        if kw["slot"]:
            desc += f", SLOT {s.slot_mode} ({s.slot_steps} steps, lr {s.slot_lr})"
        print(
            f"audit: eval:{name} ({label}: {desc}) on {n} val targets; model: {source}; device: {run.device.type}",
            flush=True,
        )
        if kw["ttt"] and n_chunks < 2:
            print(
                "note: the slice is one TTT chunk, so TTT never trains here; lower TTT_CHUNK_TOKENS "
                "or raise VAL_MAX_TOKENS to audit the updates",
                flush=True,
            )

        base_idx, base_rows = run_pipeline(model, start_state, run, val, luts, label, kw)
        V = s.vocab_size

        # 2. normalization
        norm_ok = base_rows.dim() == 2 and base_rows.size(1) == V and base_rows.size(0) > 0
        lse_max = float("nan")
        if norm_ok:
            finite = not torch.isnan(base_rows).any().item() and not torch.isposinf(base_rows).any().item()
            lse = torch.logsumexp(base_rows.double(), dim=1)
            lse_max = lse.abs().max().item()
            bad = int((~(lse.abs() <= NORM_TOL)).sum())
            norm_ok = finite and bad == 0
            norm_line = (
                f"{base_rows.size(0)} rows of {V}, max |logsumexp| {lse_max:.2e} (tol {NORM_TOL:g}), "
                f"{bad} off" + ("" if finite else ", NaN or +inf entries")
            )
        else:
            norm_line = f"scored rows have shape {tuple(base_rows.shape)}, expected [*, {V}]"

        # 4. coverage
        counts = torch.bincount(base_idx.clamp(0, n + 1), minlength=n + 2)
        outside = int(((base_idx < 1) | (base_idx > n)).sum())
        missing = int((counts[1 : n + 1] == 0).sum())
        duplicated = int((counts[1 : n + 1] > 1).sum())
        cov_ok = outside == 0 and missing == 0 and duplicated == 0
        cov_line = (
            f"{int((counts[1 : n + 1] == 1).sum())}/{n} targets scored exactly once "
            f"(missing {missing}, more than once {duplicated}, outside 1..{n} {outside})"
        )

        # 1. causality (and 3, score before update)
        gen = torch.Generator().manual_seed(seed)
        tol = args.tol

        def compare(idx, rows):
            if not torch.equal(idx, base_idx) or rows.shape != base_rows.shape:
                return None
            return (rows - base_rows).abs().amax(dim=1) if rows.numel() else torch.zeros(0)

        noise = compare(*run_pipeline(model, start_state, run, val, luts, label, kw))
        noise_max = float("inf") if noise is None else (noise.max().item() if noise.numel() else 0.0)
        checked = changed = moved_next = 0
        worst, first_leak, index_changes = 0.0, None, 0
        # edges: the first scored target of each window (its SLOT fit ends just before it), and the first
        # target after each TTT chunk boundary (the first one the training on the chunk before must not see)
        edges = dict(window=sorted({w[2] + 1 for w in tg.sliding_windows(n, L, kw["stride"])[1:]}))
        if kw["ttt"]:
            edges["chunk"] = list(range(s.ttt_chunk_tokens + 1, n, s.ttt_chunk_tokens))
        picked = perturbed_positions(n, args.positions, edges, gen)
        positions = [u for u, _ in picked]
        for u in positions:
            old = int(val[u])
            new = (old + 1 + int(torch.randint(V - 1, (1,), generator=gen))) % V
            pval = val.clone()
            pval[u] = new
            diff = compare(*run_pipeline(model, start_state, run, pval, luts, label, kw))
            if diff is None:
                index_changes += 1
                continue
            before = base_idx <= u
            checked += int(before.sum())
            d = diff[before]
            if d.numel():
                worst = max(worst, d.max().item())
                leaks = d > tol
                changed += int(leaks.sum())
                if leaks.any() and first_leak is None:
                    j = int(torch.nonzero(leaks)[0])
                    first_leak = (u, int(base_idx[before][j]), d[j].item())
            nxt = base_idx == u + 1
            if u == n or (nxt.any() and diff[nxt].max().item() > tol):
                moved_next += 1  # the final token predicts nothing: nothing after it to move
        sensitive = moved_next == len(positions)
        caus_ok = changed == 0 and index_changes == 0 and noise_max <= tol and sensitive and checked > 0
        caus_line = (
            f"{len(positions)} perturbed positions (u={','.join(f'{u}:{kind}' for u, kind in picked)}), "
            f"{checked} rows at t<=u compared, {changed} changed, max |diff| {worst:.3e} (tol {tol:g}); "
            f"unperturbed rerun max |diff| {noise_max:.3e}; target u+1 moved in {moved_next}/{len(positions)}"
        )
        if index_changes:
            caus_line += f"; the set of scored targets changed in {index_changes} reruns"
        if first_leak:
            caus_line += f"; first leak: token {first_leak[0]} moved target {first_leak[1]} by {first_leak[2]:.3e}"
        if noise_max > tol:
            caus_line += "; the pipeline is not reproducible at this tol, so causality cannot be shown"
        if not sensitive:
            caus_line += "; the model ignores the perturbed tokens, so this audit shows nothing"

    results = [("causality", caus_ok, caus_line), ("normalization", norm_ok, norm_line), ("coverage", cov_ok, cov_line)]
    for cond, ok, line in results:
        print(f"{cond}: {'PASS' if ok else 'FAIL'} {line}")
    failed = [cond for cond, ok, _ in results if not ok]
    elapsed = time.perf_counter() - t_start
    if failed:
        print(f"verdict: FAIL eval:{name} breaks {', '.join(failed)} ({elapsed:.1f}s)")
        return 1
    print(f"verdict: PASS eval:{name} is causal, normalized and scores every target once ({elapsed:.1f}s)")
    return 0


def main() -> int:
    try:
        return audit()
    except tg.Fail as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Mechanical legality audit of the configured final evaluation of train_gpt.py (docs/legality.md).

    [settings...] python3 tools/audit_causality.py [ARTIFACT] [--log LOG] [--json OUT] [--positions K] [--seed S]
                                                   [--tol T]

A reviewer's form: `python3 tools/audit_causality.py final_model.int6.ptz --log logs/<RUN_ID>.json` audits the
evaluation that run scored, with the settings its log records (the .json or the .txt; the run's size and machine
settings, RUN_LOCAL below, are the audit's own); a train_gpt.py setting in the environment still wins, to audit
another evaluation of the same artifact (e.g. SLOT_MODE=batch). Without --log it reads the same environment
variables as train_gpt.py. It builds the evaluation that train_gpt.py
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
  documents      with DOC_MASKED_ATTN=1 only: on the plain pass (packed rows of several documents), replacing the
                 last token of a document moves no row whose context ends in another document (the smear gate
                 without its BOS mask fails this: PR #1797).

Each condition prints one line (a failure names its first offending target); the verdict line repeats the failing
conditions' figures; --json OUT writes the verdict, the settings and every figure.

Model: ARTIFACT_PATH (a final_model.int6.ptz of train_gpt.py with matching model settings), or, without
one, a randomly initialized model of the configured size with small Gaussian noise added to every
parameter. The noise matters: the output and MLP-down banks and several projections start at zero, and
such a model hardly mixes information across positions, so a leak could hide. Use tiny settings, e.g.

    DATA_PATH=./data/datasets/sample_sp1024 TOKENIZER_PATH=./data/tokenizers/sample_1024_bpe.model \\
    NUM_LAYERS=4 MODEL_DIM=64 NUM_HEADS=4 NUM_KV_HEADS=2 MLP_MULT=2 VE_LAYERS=2,3 XSA_LAST_N=2 \\
    BIGRAM_VOCAB_SIZE=256 BIGRAM_DIM=16 VE_DIM=16 EVAL_SEQ_LEN=128 EVAL_STRIDE=32 VAL_MAX_TOKENS=1024 \\
    TTT_CHUNK_TOKENS=256 TTT_BATCH_SEQS=4 TTT_EPOCHS=1 python3 tools/audit_causality.py

which runs in 4-12 s on a CPU (on a small shared machine add OMP_NUM_THREADS=1: oversubscribed threads
can make it 5x slower) (SLOT_MODE=batch must FAIL; SLOT_ENABLED=0 and/or TTT_ENABLED=0 and the
default causal SLOT must PASS). Runs as one process (no torchrun). Exit status: 0 when every condition
passes, 1 when one fails, 2 for bad settings (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_gpt as tg  # noqa: E402

NORM_TOL = 1e-4
DOCUMENTS_SCAN_ROWS = 64  # the documents check looks for document ends in the first 64 x EVAL_SEQ_LEN tokens
# Settings of a run's log that describe where and how big that run was, not the evaluation it scored: the audit
# takes its own (a slice of VAL_MAX_TOKENS, this machine's device, attention backend and compile).
RUN_LOCAL = {
    "RUN_ID",
    "OUTPUT_DIR",
    "ARTIFACT_PATH",
    "EVAL_ONLY",
    "VAL_MAX_TOKENS",
    "DEVICE",
    "ATTN_BACKEND",
    "ATTN_KERNEL_REPO",
    "ATTN_HUB_TIMEOUT_SECONDS",
    "COMPILE",
}


def logged_settings(path: Path) -> dict[str, str]:
    """The settings a run logged, by environment name: the "settings" of its logs/<RUN_ID>.json, or the `settings:`
    line of its logs/<RUN_ID>.txt."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise tg.Fail(f"--log {path}: cannot read it ({e}); pass the run's logs/<RUN_ID>.json or .txt") from None
    if path.suffix == ".json":
        try:
            logged = json.loads(text)["settings"]
        except (ValueError, KeyError, TypeError):
            raise tg.Fail(f"--log {path}: not a train_gpt.py JSON log (no settings in it)") from None
        return {k: tg.shown(v) for k, v in logged.items()}
    line = next((ln for ln in text.splitlines() if ln.startswith("settings: ")), None)
    if line is None:
        raise tg.Fail(f"--log {path}: no 'settings: ' line in it; pass the run's logs/<RUN_ID>.txt or .json")
    return dict(re.findall(r"([A-Z][A-Z0-9_]*)=(.*?)(?= [A-Z][A-Z0-9_]*=|$)", line[len("settings: ") :]))


def audit_env(artifact: str | None, log: Path | None) -> tuple[dict[str, str], str]:
    """The settings to audit with and where they came from: the log's (less RUN_LOCAL), then every train_gpt.py
    setting of this environment on top (to audit another evaluation of the same artifact, e.g. SLOT_MODE=batch),
    then ARTIFACT."""
    env = {k: v for k, v in os.environ.items() if k not in tg.SETTING_NAMES}
    source = "the environment"
    if log is not None:
        env.update({k: v for k, v in logged_settings(log).items() if k not in RUN_LOCAL})
        source = f"{log} (environment settings on top)"
    env.update({k: v for k, v in os.environ.items() if k in tg.SETTING_NAMES})
    if artifact is not None:
        env["ARTIFACT_PATH"] = artifact
    return env, source


def noised_random_model(s: dict, run, seed: int) -> tg.GPT:
    """The configured model, randomly initialized, plus noise on every parameter (zero-initialized ones too)."""
    torch.manual_seed(seed)
    model = tg.GPT(tg.ModelConfig.of(s), run.attn)
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


def check_normalization(idx, rows, V: int) -> tuple[bool, str, dict]:
    """Every scored row a full distribution over the vocabulary: logsumexp within NORM_TOL of 0."""
    if rows.dim() != 2 or rows.size(1) != V or rows.size(0) == 0:
        return False, f"scored rows have shape {tuple(rows.shape)}, expected [*, {V}]", {}
    finite = not torch.isnan(rows).any().item() and not torch.isposinf(rows).any().item()
    lse = torch.logsumexp(rows.double(), dim=1)
    off = ~(lse.abs() <= NORM_TOL)
    figures = dict(max_abs_logsumexp=lse.abs().max().item(), rows_off=int(off.sum()))
    line = (
        f"{rows.size(0)} rows of {V}, max |logsumexp| {figures['max_abs_logsumexp']:.2e} (tol {NORM_TOL:g}), "
        f"{figures['rows_off']} off" + ("" if finite else ", NaN or +inf entries")
    )
    if off.any():
        j = int(torch.nonzero(off)[0])
        figures["first_off"] = dict(target=int(idx[j]), logsumexp=lse[j].item())
        line += f"; first off: target {int(idx[j])} sums to exp({lse[j].item():.3e})"
    return finite and not off.any(), line, figures


def check_coverage(idx, n: int) -> tuple[bool, str, dict]:
    """Every target 1..n scored exactly once."""
    counts = torch.bincount(idx.clamp(0, n + 1), minlength=n + 2)
    figures = dict(
        missing=int((counts[1 : n + 1] == 0).sum()),
        more_than_once=int((counts[1 : n + 1] > 1).sum()),
        outside=int(((idx < 1) | (idx > n)).sum()),
    )
    line = (
        f"{int((counts[1 : n + 1] == 1).sum())}/{n} targets scored exactly once (missing {figures['missing']}, "
        f"more than once {figures['more_than_once']}, outside 1..{n} {figures['outside']})"
    )
    if repeated := torch.nonzero(counts[1 : n + 1] > 1).flatten().tolist():
        figures["first_repeated"] = repeated[0] + 1
        line += f"; first scored more than once: target {repeated[0] + 1}"
    return not any(figures[k] for k in ("missing", "more_than_once", "outside")), line, figures


def perturb(val, u: int, V: int, gen: torch.Generator, avoid: int | None = None):
    """val with the token at u replaced by a random other one (never `avoid`)."""
    old, pval = int(val[u]), val.clone()
    new = old
    while new == old or new == avoid:
        new = (old + 1 + int(torch.randint(V - 1, (1,), generator=gen))) % V
    pval[u] = new
    return pval


def check_documents(model, start_state, run, luts, positions: int, gen, tol: float) -> tuple[bool, str, dict]:
    """With document-masked attention, a document's scores depend on nothing outside it: on the plain pass (the packed
    rows of several documents; its own slice, from the start of the split to just past the first `positions`
    document ends), the last token u of a document is replaced (never by a BOS) and no row whose context ends in
    another document may move, while the row of target u+1 (its context is u's document) must."""
    s = run.s
    L, V, kw = s.eval_seq_len, s.vocab_size, dict(stride=s.eval_seq_len, ttt=False, slot=False)
    val = tg.load_validation_tokens(os.path.join(s.data_path, tg.VAL_SHARDS), L, DOCUMENTS_SCAN_ROWS * L)
    ends = [b - 1 for b in torch.nonzero(val[2:] == tg.BOS_ID).flatten().add(2).tolist() if val[b - 1] != tg.BOS_ID]
    picks = ends[:positions]
    if not picks:
        return True, f"no document boundary in the first {val.numel() - 1} tokens: nothing to show", {}
    val = val[: (picks[-1] // L + 2) * L + 1]  # whole rows, past the last document end
    doc = torch.cumsum(val == tg.BOS_ID, 0)  # the document of each position
    base_idx, base_rows = run_pipeline(model, start_state, run, val, luts, "final_int6_roundtrip", kw)
    moved_other, moved_next, worst, first = 0, 0, 0.0, None
    for u in sorted(set(picks)):
        idx, rows = run_pipeline(model, start_state, run, perturb(val, u, V, gen, tg.BOS_ID), luts, "", kw)
        diff = (rows - base_rows).abs().amax(dim=1)
        other = doc[base_idx - 1] != doc[u]
        d = diff[other]
        if d.numel() and d.max().item() > tol:
            moved_other += int((d > tol).sum())
            worst = max(worst, d.max().item())
            if first is None:
                j = int(torch.nonzero(d > tol)[0])
                first = (u, int(base_idx[other][j]), d[j].item())
        moved_next += int(diff[base_idx == u + 1].max().item() > tol)
    k = len(set(picks))
    figures = dict(positions=k, targets=val.numel() - 1, rows_moved_in_other_documents=moved_other, max_abs_diff=worst)
    line = (
        f"{k} documents' last tokens perturbed on {val.numel() - 1} targets, {moved_other} rows of other documents "
        f"moved (max |diff| {worst:.3e}, tol {tol:g}); the row after u moved in {moved_next}/{k}"
    )
    if first:
        figures["first_leak"] = dict(token=first[0], target=first[1], diff=first[2])
        line += f"; first leak: token {first[0]} (last of its document) moved target {first[1]} by {first[2]:.3e}"
    if moved_next < k:
        line += "; the model ignores the perturbed tokens, so this shows nothing"
    return moved_other == 0 and moved_next == k, line, figures


def audit(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("artifact", nargs="?", help="a final_model.int6.ptz (default: ARTIFACT_PATH, or a random model)")
    ap.add_argument("--log", type=Path, help="the run's logs/<RUN_ID>.json or .txt: audit with its settings")
    ap.add_argument("--json", type=Path, help="also write the verdict and its figures to this JSON file")
    ap.add_argument("--positions", type=int, default=6, help="number of perturbed token positions (default 6)")
    ap.add_argument("--seed", type=int, default=None, help="seed of the random model and perturbations (default SEED)")
    ap.add_argument("--tol", type=float, default=1e-5, help="max abs change of a log-prob row counted as equal")
    args = ap.parse_args(argv)
    if args.positions < 1:
        raise tg.Fail(f"--positions={args.positions} must be at least 1")
    if "RANK" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) != 1:
        raise tg.Fail("run the audit as one process: python3 tools/audit_causality.py (not under torchrun)")
    env, settings_source = audit_env(args.artifact, args.log)
    s = tg.parse_settings(env)
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
            model = tg.GPT(tg.ModelConfig.of(s), run.attn).to(run.device)
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
            f"audit: eval:{name} ({label}: {desc}) on {n} val targets; model: {source}; settings: {settings_source}; "
            f"device: {run.device.type}",
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
        norm = check_normalization(base_idx, base_rows, V)
        cov = check_coverage(base_idx, n)

        # causality (and score before update)
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
            diff = compare(*run_pipeline(model, start_state, run, perturb(val, u, V, gen), luts, label, kw))
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
        caus_fig = dict(rows_compared=checked, rows_changed=changed, max_abs_diff=worst, rerun_max_abs_diff=noise_max)
        if index_changes:
            caus_line += f"; the set of scored targets changed in {index_changes} reruns"
        if first_leak:
            caus_fig["first_leak"] = dict(token=first_leak[0], target=first_leak[1], diff=first_leak[2])
            caus_line += f"; first leak: token {first_leak[0]} moved target {first_leak[1]} by {first_leak[2]:.3e}"
        if noise_max > tol:
            caus_line += "; the pipeline is not reproducible at this tol, so causality cannot be shown"
        if not sensitive:
            caus_line += "; the model ignores the perturbed tokens, so this audit shows nothing"
        results = dict(causality=(caus_ok, caus_line, caus_fig), normalization=norm, coverage=cov)
        if s.doc_masked_attn:
            results["documents"] = check_documents(model, start_state, run, luts, args.positions, gen, tol)

    for cond, (ok, line, _) in results.items():
        print(f"{cond}: {'PASS' if ok else 'FAIL'} {line}")
    failed = [cond for cond, (ok, _, _) in results.items() if not ok]
    elapsed = time.perf_counter() - t_start
    if failed:
        leaks = "; ".join(f"{c}: {results[c][1]}" for c in failed)
        verdict = f"FAIL eval:{name} breaks {', '.join(failed)} ({elapsed:.1f}s) [{leaks}]"
    else:
        what = "causal, normalized" + (", document-isolated" if "documents" in results else "")
        verdict = f"PASS eval:{name} is {what} and scores every target once ({elapsed:.1f}s)"
    print(f"verdict: {verdict}")
    if args.json:
        report = dict(
            verdict="FAIL" if failed else "PASS",
            eval=name,
            path=label,
            model=source,
            settings_source=settings_source,
            settings=s.by_env_name(),
            targets=n,
            seconds=elapsed,
            conditions={c: dict(ok=ok, line=line, **fig) for c, (ok, line, fig) in results.items()},
        )
        args.json.write_text(json.dumps(report, indent=1, default=str))
    return 1 if failed else 0


def main() -> int:
    try:
        return audit()
    except tg.Fail as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

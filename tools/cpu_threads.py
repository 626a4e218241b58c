#!/usr/bin/env python3
"""CPU thread settings measured: training-step time of one run alone and of two runs at once, per option.

Each option is a set of environment variables given to fresh worker processes before they import torch (OpenMP
reads them when torch loads it). A worker times train_gpt.py's real training step (8 micro-batches, Muon +
AdamW) on random tokens at a tiny shape after a few warm-up steps and reports the median step. Per repeat and
option it runs one worker alone, then two started together; options are interleaved within each repeat so that
drift on a shared machine hits all alike. It prints, per option, the medians over the repeats with their range,
the two-at-once/alone ratio and the alone time against `default` (OpenMP as torch leaves it).

  python3 tools/cpu_threads.py [--repeats 3] [--steps 8] [--warmup 2] [--options default,passive,...]

Run it on an otherwise idle machine: any other job changes the two-at-once figures. Settings (NUM_LAYERS,
TRAIN_BATCH_TOKENS, ...) come from the environment as for train_gpt.py, on top of a small default shape.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORES = len(os.sched_getaffinity(0))
OPTIONS = {  # name -> environment (None: removed)
    "default": dict(OMP_WAIT_POLICY=None, OMP_NUM_THREADS=None, GOMP_SPINCOUNT=None),
    "passive": dict(OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS=None, GOMP_SPINCOUNT=None),
    "affinity": dict(OMP_WAIT_POLICY=None, OMP_NUM_THREADS=str(CORES), GOMP_SPINCOUNT=None),
    "passive+affinity": dict(OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS=str(CORES), GOMP_SPINCOUNT=None),
    "spin10k": dict(OMP_WAIT_POLICY=None, OMP_NUM_THREADS=None, GOMP_SPINCOUNT="10000"),
    "spin100k": dict(OMP_WAIT_POLICY=None, OMP_NUM_THREADS=None, GOMP_SPINCOUNT="100000"),
    "spin1M": dict(OMP_WAIT_POLICY=None, OMP_NUM_THREADS=None, GOMP_SPINCOUNT="1000000"),
    "active": dict(OMP_WAIT_POLICY="ACTIVE", OMP_NUM_THREADS=None, GOMP_SPINCOUNT=None),
    "one_thread": dict(OMP_WAIT_POLICY=None, OMP_NUM_THREADS="1", GOMP_SPINCOUNT=None),
}
SHAPE = dict(
    NUM_LAYERS="4",
    MODEL_DIM="128",
    NUM_HEADS="4",
    NUM_KV_HEADS="2",
    MLP_MULT="2",
    VE_LAYERS="2,3",
    XSA_LAST_N="2",
    BIGRAM_VOCAB_SIZE="256",
    BIGRAM_DIM="16",
    VE_DIM="16",
    TRAIN_SEQ_LEN="128",
    TRAIN_BATCH_TOKENS="4096",
    RUN_ID="threads",
)


def worker(steps: int, warmup: int) -> None:
    import torch  # first: the environment above is what OpenMP sees

    sys.path.insert(0, str(ROOT))
    import train_gpt as tg

    s = tg.parse_settings({**SHAPE, **{k: v for k, v in os.environ.items() if k in tg.SETTING_NAMES}})
    torch.manual_seed(0)
    model = tg.GPT(tg.ModelConfig.of(s))
    muon, adam, others = tg.build_optimizers(model, s)
    local, T, V = s.train_batch_tokens // 8, s.train_seq_len, s.vocab_size
    times = []
    for _ in range(warmup + steps):
        t0 = time.perf_counter()
        for _ in range(8):
            t = torch.randint(0, V, (local // T, T + 1))
            model(t[:, :-1], t[:, 1:]).div(8).backward()
        tg.optimizer_step(muon, adam, others, s)
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    print(json.dumps(dict(step_s=statistics.median(times[warmup:]), threads=torch.get_num_threads())))


def launch(option: str, n: int, args) -> list[dict]:
    env = dict(os.environ)
    for k, v in OPTIONS[option].items():
        env.pop(k, None) if v is None else env.__setitem__(k, v)
    argv = [sys.executable, __file__, "--worker", "--steps", str(args.steps), "--warmup", str(args.warmup)]
    procs = [subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True) for _ in range(n)]
    out = []
    for p in procs:
        stdout, _ = p.communicate()
        if p.returncode:
            raise SystemExit(f"error: a worker for {option} failed with exit {p.returncode}")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=8, help="timed steps per worker (after --warmup)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--options", default=",".join(OPTIONS), help=f"comma-separated, of: {', '.join(OPTIONS)}")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.steps, args.warmup)
        return 0
    names = args.options.split(",")
    if unknown := [n for n in names if n not in OPTIONS]:
        p.error(f"unknown option(s) {', '.join(unknown)}; choose from {', '.join(OPTIONS)}")
    alone, pair, threads = {n: [] for n in names}, {n: [] for n in names}, {}
    for r in range(args.repeats):
        for n in names:
            one = launch(n, 1, args)[0]
            two = launch(n, 2, args)
            alone[n].append(one["step_s"])
            pair[n].append(statistics.mean(w["step_s"] for w in two))
            threads[n] = one["threads"]
            both = " ".join(f"{w['step_s'] * 1000:.0f}" for w in two)
            print(
                f"repeat {r + 1}/{args.repeats} {n}: alone {one['step_s'] * 1000:.0f} ms, two at once {both} ms",
                flush=True,
            )
    med = statistics.median
    base = med(alone["default"]) if "default" in alone else None
    print(f"\n{CORES} usable cores; median step ms over {args.repeats} repeats [min-max]; ratio = two at once / alone")
    print("| option | env | threads | alone ms | two at once ms | two/alone | alone vs default |")
    print("|---|---|---|---|---|---|---|")
    for n in names:
        env = " ".join(f"{k}={v}" for k, v in OPTIONS[n].items() if v is not None) or "(none set)"
        rng = lambda xs: f"{med(xs) * 1000:.0f} [{min(xs) * 1000:.0f}-{max(xs) * 1000:.0f}]"  # noqa: E731
        vs = f"{med(alone[n]) / base:.3f}" if base else "-"
        print(
            f"| {n} | {env} | {threads[n]} | {rng(alone[n])} | {rng(pair[n])} "
            f"| {med(pair[n]) / med(alone[n]):.2f} | {vs} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

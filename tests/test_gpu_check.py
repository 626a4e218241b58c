"""tools/gpu_check.sh end to end on the CPU at tiny shapes: every stack's benchmark, the seed's short run, and the
summary block, which must print even when a part fails or runs out of time (it must not be the first thing to fail
when a GPU is lent)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import train_gpt as tg

ROOT = Path(__file__).resolve().parent.parent

# One tiny shape for every stack (any train_gpt.py setting in the environment applies to all of them): 11 layers
# keep the later stacks' loop and parallel-residual layers where they are; everything else is shrunk.
TINY_ALL_STACKS = dict(
    MODEL_DIM="32",
    NUM_HEADS="2",
    NUM_KV_HEADS="1",
    MLP_MULT="2",
    BIGRAM_VOCAB_SIZE="64",
    BIGRAM_DIM="8",
    VE_DIM="8",
    TRAIN_SEQ_LEN="64",
    EVAL_SEQ_LEN="64",
    TTT_EVAL_SEQ_LEN="64",
    TTT_LORA_RANK="8",
    TRAIN_BATCH_TOKENS="512",
    GPTQ_CALIB_SEQS="2",
    GPTQ_CALIB_LEN="64",
    ITERATIONS="2",
    WARMUP_STEPS="0",
    WARMDOWN_ITERS="0",
    BENCH_VAL_TOKENS="1024",
    BENCH_TRAIN_STEPS="1",
    BENCH_TRAIN_WARMUP="0",
    RUN_VAL_TOKENS="1024",
    OMP_NUM_THREADS="1",
)


def gpu_check(out: Path, **over) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in tg.SETTING_NAMES and k not in tg.LAUNCHER_VARS}
    env.update(TINY_ALL_STACKS, **over)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # python3 is this suite's Python
    return subprocess.run(
        ["bash", "tools/gpu_check.sh", str(out)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=400
    )


def test_gpu_check_runs_every_stack_on_the_cpu_and_prints_its_summary(tmp_path):
    r = gpu_check(tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for stack in ("seed", "pr1855", "pr2135"):
        assert f"bench STACK={stack} exit: 0" in r.stdout, r.stdout[-3000:]
    assert "train_gpt STACK=seed exit: 0" in r.stdout
    summary = (tmp_path / "summary.md").read_text()
    assert r.stdout.rstrip().endswith(summary.rstrip())
    assert "no result" not in summary
    sections = summary.split("\n### STACK=")[1:]
    assert [s.split("\n")[0] for s in sections] == ["seed", "pr1855", "pr2135"]
    for section, stack in zip(sections, ("seed", "pr1855", "pr2135")):
        bench = json.loads((tmp_path / stack / "bench.json").read_text())
        assert bench["stack"] == stack and bench["attention"] == "sdpa"
        documents = "sdpa by segment"  # the CPU's document-masked attention (the later stacks mask documents)
        assert f"document-masked attention {documents}" in section
        train = next(p for p in bench["phases"] if p["name"] == "train")
        assert f"| train (one GPU, {train['tokens']:,}-token step) | {1000 * train['seconds']:.1f} ms/step" in section
        assert "Projected configured final evaluation on 8×H100" in section
        final = [p for p in bench["phases"] if p["kind"] == "eval" and not p["extra"]][-1]
        if stack == "seed":
            assert final["chunk_steps"] == 0 and "Phased TTT" not in section  # the seed's TTT is not phased
            assert "Short run: 2 steps on the sample" in section
        else:
            assert final["config"]["phased"] and final["chunk_steps"] > 0
            assert f"Phased TTT ({final['name']}): {final['chunk_steps']:,} chunk steps" in section
            assert f"{final['chunk_step_ms']:.1f} ms each" in section


def test_a_part_that_times_out_still_leaves_the_summary(tmp_path):
    r = gpu_check(tmp_path, GPU_CHECK_STACKS="pr1855", BENCH_TIMEOUT="0.01")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "bench STACK=pr1855 exit: 124" in r.stdout
    summary = (tmp_path / "summary.md").read_text()
    missing = tmp_path / "pr1855" / "bench.json"
    assert (
        summary.strip()
        == f"### STACK=pr1855\n\nbenchmark: no result ({missing} missing or unreadable: it failed or timed out)"
    )

"""tools/bench.py: its analytic FLOP count against torch's FlopCounterMode, its report, and --baseline."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import types
from dataclasses import replace

import pytest
import torch
from conftest import ROOT, TINY
from torch.utils.flop_counter import FlopCounterMode

import train_gpt as tg

sys.path.insert(0, str(ROOT / "tools"))
import bench  # noqa: E402

LAST_LINE = re.compile(
    r"^bench train_ms_per_step:(\S+) train_mfu:(\S+) final_eval_tokens_per_s:(\S+) "
    r"final_eval_mfu:(\S+) slot_time_share:(\S+) slot_flop_share:(\S+) projected_8xh100_eval_s:(\S+)$"
)


def explicit_attention(q, k, v):
    """Causal GQA attention written as two plain matmuls, so that FlopCounterMode sees every FLOP of it
    (it does not count the CPU's fused scaled_dot_product_attention). It computes the full T x T scores."""
    T, D, rep = q.size(1), q.size(3), q.size(2) // k.size(2)
    q, k, v = (t.transpose(1, 2) for t in (q, k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)))
    scores = (q @ k.transpose(-1, -2)) / D**0.5
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)


def counted(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


# The explicit attention for the model's every attention call (the document mask costs no FLOP: none is applied).
EXPLICIT = tg.Attention(
    "explicit", "test", explicit_attention, lambda q, k, v, seg: explicit_attention(q, k, v), "explicit", []
)


def model_of(tiny_settings, **overrides):
    torch.manual_seed(0)
    s = tiny_settings(**overrides)
    return s, tg.GPT(tg.ModelConfig.of(s), EXPLICIT)


def test_one_layer_flops_match_flop_counter(tiny_settings, one_thread):
    B, T = 2, 128
    x = torch.randint(0, 1024, (B, T))
    (s1, m1), (s2, m2) = (model_of(tiny_settings, NUM_LAYERS=n, VE_LAYERS="0", XSA_LAST_N=1) for n in (1, 2))
    one_layer = counted(lambda: m2.forward_hidden(x)) - counted(lambda: m1.forward_hidden(x))
    # q, k, v, out, MLP up and down per token, plus full T x T attention scores and their values for each sequence
    assert one_layer == B * (T * bench.layer_matmul_flops(s2) + bench.attention_flops(s2, T, causal=False))
    assert one_layer == B * (T * 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 2 * 64 * 128) + 2 * 2 * T * T * 64)
    # the causal count keeps the T(T+1)/2 query-key pairs that are not masked
    assert bench.attention_flops(s2, T) * 2 * T == bench.attention_flops(s2, T, causal=False) * (T + 1)


def test_forward_training_and_slot_flops_match_flop_counter(tiny_settings, one_thread):
    s, model = model_of(tiny_settings, SLOT_STEPS=3)
    B, T = 3, s.eval_seq_len
    x, y = torch.randint(0, 1024, (B, T)), torch.randint(0, 1024, (B, T))
    full_hidden = bench.hidden_flops(s, T, causal=False)
    assert counted(lambda: model.forward_hidden(x)) == B * full_hidden
    assert counted(lambda: model(x, y)) == B * (full_hidden + T * bench.head_flops(s))
    # training = forward + backward = 3 x forward
    assert counted(lambda: model(x, y).backward()) == 3 * B * (full_hidden + T * bench.head_flops(s))
    H = model.forward_hidden(x).detach()
    fit = torch.ones(B, T, dtype=torch.bool)
    assert counted(lambda: tg.slot_delta(model, H, y, fit, s, shared=True)) == B * T * bench.slot_flops_per_position(s)
    assert bench.forward_flops(s, T) < full_hidden + T * bench.head_flops(s)  # causal halving


def test_eager_evaluation_does_only_the_counted_work(tiny_settings, one_thread):
    """Eager (the CPU default), the SLOT fit runs the head at its fitted positions only, as the FLOP count says, and a
    batch of fewer than EVAL_BATCH_SEQS windows is not padded; compiled, both keep their static shapes."""
    s, model = model_of(tiny_settings, SLOT_STEPS=2)
    B, T = 3, s.eval_seq_len
    H, y = torch.randn(B, T, s.model_dim), torch.randint(0, 1024, (B, T))
    fit = torch.rand(B, T) < 0.4
    for shared in (False, True):
        assert counted(lambda: tg.slot_delta(model, H, y, fit, s, shared)) == int(
            fit.sum()
        ) * bench.slot_flops_per_position(s)
    shapes = []
    val = torch.randint(0, 1024, (4 * T + 1,))
    luts = (
        torch.ones(1024, dtype=torch.int16),
        torch.zeros(1024, dtype=torch.bool),
        torch.zeros(1024, dtype=torch.bool),
    )
    wins = tg.sliding_windows(4 * T, T, 64)[:3]
    for compile_ in (False, True):
        run = types.SimpleNamespace(
            s=s,
            device=torch.device("cpu"),
            compile=compile_,
            autocast=lambda: torch.autocast("cpu", enabled=False),
            compiled=lambda fn: fn,
        )
        tg.score_windows(
            model, run, val, wins, luts, True, lambda x: shapes.append(tuple(x.shape)) or model.forward_hidden(x)
        )
    assert shapes == [(3, T), (s.eval_batch_seqs, T)]


@pytest.mark.parametrize("chunk", [256, 384])  # 640 tokens: chunks of 256, 256, 128 / 384, 256 (the last never trains)
def test_ttt_flops_count_the_sequences_evaluate_trains_on(tiny_settings, one_thread, chunk):
    s = tiny_settings(TTT_ENABLED=1, TTT_EPOCHS=2, TTT_CHUNK_TOKENS=chunk, TTT_BATCH_SEQS=2, EVAL_STRIDE=64)
    run = tg.Run(replace(s, output_dir=str(ROOT / "out" / "test_bench")))
    run.log = lambda *a, **k: None
    model = tg.GPT(tg.ModelConfig.of(s), run.attn)
    trained = []
    model.register_forward_pre_hook(lambda mod, args: trained.append(args[0].size(0)))
    val = torch.randint(0, 1024, (5 * 128 + 1,))
    luts = (
        torch.ones(1024, dtype=torch.int16),
        torch.zeros(1024, dtype=torch.bool),
        torch.zeros(1024, dtype=torch.bool),
    )
    tg.evaluate(model, run, val, luts, stride=64, ttt=True, slot=False)
    assert sum(trained) == s.ttt_epochs * sum(bench.ttt_sequences(s, 640)) > 0
    f = bench.pass_flops(tg, s, 640, stride=64, ttt=True, slot=False)
    assert f["ttt"] == sum(trained) * bench.train_flops(s, 128)
    windows = tg.sliding_windows(640, 128, 64)
    # every window position through forward_hidden, the head only at the 640 scored positions
    assert f["score"] == sum(bench.hidden_flops(s, e - b) for b, e, _ in windows) + 640 * bench.head_flops(s)
    # a causal SLOT fit needs the head on each window's context, the seed's batch SLOT on all its positions
    causal = bench.pass_flops(tg, replace(s, slot_mode="causal"), 640, stride=64, ttt=False, slot=True)["slot"]
    batch = bench.pass_flops(tg, replace(s, slot_mode="batch"), 640, stride=64, ttt=False, slot=True)["slot"]
    assert causal == (len(windows) - 1) * 64 * bench.slot_flops_per_position(s)
    assert batch == sum(e - b for b, e, _ in windows) * bench.slot_flops_per_position(s)


def test_record_shape_counts(one_thread):
    s = tg.parse_settings({})
    # 76.2 MFLOP per token forward at 2048 tokens; the sliding pass over the record val set is ~151 PFLOP
    assert bench.forward_flops(s, 2048) / 2048 == pytest.approx(76.23e6, rel=1e-3)
    f = bench.pass_flops(tg, s, bench.RECORD_VAL_TOKENS, stride=64, ttt=True, slot=True)
    windows = bench.RECORD_VAL_TOKENS // 64 - 31
    head = bench.RECORD_VAL_TOKENS * 2 * 512 * 1024
    assert f["score"] / 1e15 == pytest.approx(151.3 - 2.1 + head / 1e15, abs=0.05)  # the head only where scored
    assert f["ttt"] / 1e15 == pytest.approx(42.5, abs=0.1)
    assert f["slot"] == (windows - 1) * (2048 - 64) * 5 * 2 * 2 * 512 * 1024
    assert f["windows"] == len(tg.sliding_windows(bench.RECORD_VAL_TOKENS, 2048, 64))


def tiny_env(monkeypatch, **overrides):
    for name in list(os.environ):
        if name in tg.SETTING_NAMES or name in tg.LAUNCHER_VARS:
            monkeypatch.delenv(name)
    for k, v in dict(TINY, TTT_ENABLED="1", SLOT_ENABLED="1", TTT_CHUNK_TOKENS="256", **overrides).items():
        monkeypatch.setenv(k, str(v))


def test_report_json_and_last_line_on_random_tokens(monkeypatch, capsys, tmp_path, one_thread):
    # VAL_MAX_TOKENS=0: the projection is at the record's full val size; the timed slice is --val-tokens
    tiny_env(monkeypatch, DATA_PATH=tmp_path / "none", TOKENIZER_PATH=tmp_path / "none.model", VAL_MAX_TOKENS=0)
    out = tmp_path / "bench.json"
    assert (
        bench.main(
            ["--json", str(out), "--train-steps", "2", "--train-warmup", "1", "--project-8xh100", "--val-tokens", "640"]
        )
        == 0
    )
    text = capsys.readouterr().out
    r = json.loads(out.read_text())
    assert "RANDOM" in r["data"] and "RANDOM" in text and r["val_tokens"] == 640
    s = tg.parse_settings()
    labels = [label for label, _ in tg.eval_paths(s)]
    assert [p["name"] for p in r["phases"]] == ["train"] + labels + [labels[-1] + "_noslot"]
    train = r["phases"][0]
    assert train["flops_per_token"] == bench.train_flops(s, 128) / 128
    assert train["mfu"] == pytest.approx(train["flops"] / train["seconds"] / r["peak_flops"])
    final, noslot = r["phases"][-2], r["phases"][-1]
    assert final["val_bpb"] == pytest.approx(noslot["val_bpb"], abs=0.05) and final["flops"] > noslot["flops"]
    assert (
        final["seconds_parts"]["slot"] > 0
        and final["seconds_parts"]["ttt"] > 0
        and noslot["seconds_parts"]["slot"] == 0
    )
    # the projection is of the configured final evaluation at the record val size, one row per pass
    assert [row["name"] for row in r["projection"]["passes"]] == labels
    assert r["projection"]["tokens"] == bench.RECORD_VAL_TOKENS
    m = LAST_LINE.match(text.strip().splitlines()[-1])
    assert m, text.strip().splitlines()[-1]
    values = [float(v) for v in m.groups()]
    assert values[0] == pytest.approx(1000 * train["seconds"], rel=1e-4)
    assert values[6] == pytest.approx(r["projection"]["total_s"], rel=1e-4)
    assert 0 < values[4] < 1 and values[5] == pytest.approx(final["flops_parts"]["slot"] / final["flops"], rel=1e-4)
    assert "projected s" in text and "budget" in text


def test_a_benchmark_that_stops_leaves_the_phases_it_measured(monkeypatch, tmp_path, one_thread):
    """--json is written after every phase: an evaluation that fails (or a timeout) keeps the training figures, and
    gpu_check's summary prints them, marked partial, without a projection."""
    tiny_env(monkeypatch, DATA_PATH=tmp_path / "none", TOKENIZER_PATH=tmp_path / "none.model")

    def broken(*a, **k):
        raise RuntimeError("out of memory in the evaluation")

    monkeypatch.setattr(bench, "bench_eval", broken)
    out = tmp_path / "seed" / "bench.json"
    out.parent.mkdir()
    with pytest.raises(RuntimeError, match="out of memory"):
        bench.main(["--json", str(out), "--train-steps", "1", "--train-warmup", "0", "--val-tokens", "640"])
    r = json.loads(out.read_text())
    assert r["partial"] and [p["name"] for p in r["phases"]] == ["train"] and "projection" not in r
    train = r["phases"][0]
    assert train["mfu"] == pytest.approx(train["flops"] / train["seconds"] / r["peak_flops"])
    block = bench.readme_block([str(out)])
    assert block.startswith("\n### STACK=seed\n")
    assert f"| train (one GPU, {train['tokens']:,}-token step) | {1000 * train['seconds']:.1f} ms/step" in block
    assert "Partial: the benchmark stopped after the phases above" in block and "Projected" not in block


def test_baseline_head_reports_ratios_near_one(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in tg.SETTING_NAMES and k not in tg.LAUNCHER_VARS}
    env.update(
        TINY,
        TTT_ENABLED="1",
        SLOT_ENABLED="1",
        TTT_CHUNK_TOKENS="256",
        OMP_NUM_THREADS="1",
        DATA_PATH=str(ROOT / "data" / "datasets" / "sample_sp1024"),
        TOKENIZER_PATH=str(ROOT / "data" / "tokenizers" / "sample_1024_bpe.model"),
    )
    out = tmp_path / "cmp.json"
    # The current side is HEAD's train_gpt.py too (not the working tree's, which may be mid-edit): same code twice.
    head_module = tmp_path / "train_gpt.py"
    head_module.write_bytes(
        subprocess.run(["git", "show", "HEAD:train_gpt.py"], cwd=ROOT, capture_output=True, check=True).stdout
    )
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "bench.py"),
            "--module",
            str(head_module),
            "--baseline",
            "HEAD",
            "--rounds",
            "1",
            "--train-steps",
            "3",
            "--train-warmup",
            "1",
            "--eval-repeats",
            "2",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ratios = dict(
        (k, float(v)) for k, v in re.findall(r"^ratio (\S+) current/baseline:(\S+)$", proc.stdout, flags=re.M)
    )
    assert {"train", "final_eval_total", "final_int6_roundtrip"} <= set(ratios)
    # The same code on both sides; generous bounds for a noisy shared machine: the step and the evaluation's
    # total (a second or so each), and looser ones for single passes of a few hundredths of a second.
    for name, ratio in ratios.items():
        bound = 4 if name in ("train", "final_eval_total") else 10
        assert 1 / bound < ratio < bound, (name, ratio, proc.stdout[-3000:])
    r = json.loads(out.read_text())
    assert r["ratios"] == pytest.approx(ratios, rel=1e-3)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert r["baseline_sha"] == head
    assert LAST_LINE.match(proc.stdout.strip().splitlines()[-1])
    worktrees = subprocess.run(["git", "worktree", "list"], cwd=ROOT, capture_output=True, text=True).stdout
    assert "bench_baseline_" not in worktrees  # cleaned up


def test_pr1855_looped_flops_match_flop_counter(tiny_settings, one_thread):
    """17 virtual layers once looping is on, the gates counted, no bigram or value embeddings."""
    from test_pr1855 import TINY_PR

    s = tiny_settings(**TINY_PR)
    torch.manual_seed(0)
    model = tg.GPT(tg.ModelConfig.of(s), EXPLICIT)
    B, T = 2, s.eval_seq_len
    x = torch.randint(0, 1024, (B, T))
    assert bench.virtual_layers(s) == 17 and bench.virtual_layers(s, looped=False) == 11
    for looped in (False, True):
        model.looping = looped
        assert counted(lambda: model.forward_hidden(x)) == B * bench.hidden_flops(s, T, causal=False, looped=looped)
    pr = bench.project(tg, s, {}, False, 0.4, 800e12)
    t = pr["train_ms_per_step"]
    assert t["plain"] < t["mean"] < t["looped"]
    assert t["looped"] / t["plain"] == pytest.approx(bench.train_flops(s, T, True) / bench.train_flops(s, T, False))


@pytest.mark.parametrize("switched", [{}, dict(TTT_K_LORA=0, TTT_HEAD_LORA=0)])
def test_phased_ttt_flops_match_flop_counter(tmp_path, one_thread, switched):
    """bench.phased_flops against FlopCounterMode over a whole phased-TTT pass (adapters' forward and backward with
    the base frozen, the global SGD phases), with attention as plain matmuls (full T x T, hence causal=False); with
    every adapter, and with the K and head adapters switched off."""
    import test_phased_ttt as tp

    s, run, model, luts = tp.setup(tmp_path, **switched)
    model.attention, model.doc_attention = explicit_attention, lambda q, k, v, seg: explicit_attention(q, k, v)
    val = tp.synthetic_val(tp.LENGTHS * 2)
    with FlopCounterMode(display=False) as fc:
        tg.evaluate(model, run, val, luts, phased=True)
    f = bench.phased_flops(tg, s, [n for _, n in tg.find_docs(val)], causal=False)
    assert f["ttt"] > 0.3 * f["total"]  # the backward and the global phases are a large share: both are counted
    assert fc.get_total_flops() == pytest.approx(f["total"], rel=1e-4)


def test_phased_chunk_steps_are_the_chunk_calls_of_the_pass(tmp_path, monkeypatch, one_thread):
    """The chunk steps that gpu_check reports per phased-TTT pass (Timed over score_documents, counted from each
    batch's longest document and chunk size) are the chunk_nll calls the pass makes."""
    import test_phased_ttt as tp

    s, run, model, luts = tp.setup(tmp_path)
    calls = []
    chunk_nll = tg.chunk_nll
    monkeypatch.setattr(tg, "chunk_nll", lambda *a, **k: calls.append(1) or chunk_nll(*a, **k))
    val = tp.synthetic_val(tp.LENGTHS * 2)
    with bench.Timed(tg, "score_documents", run, bench.chunk_steps(tg, s)) as timed:
        tg.evaluate(model, run, val, luts, phased=True)
    assert timed.count == len(calls) > len(tp.LENGTHS) and timed.seconds > 0

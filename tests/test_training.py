"""Training runs of train_gpt.py on the embedded sample: the whole script end to end, determinism, 2-process
Parallel Muon against 1 process, the artifact limit, and every user error as one line on stderr."""

from __future__ import annotations

import copy
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F
from conftest import TINY

import train_gpt as tg

ROOT = Path(__file__).resolve().parent.parent
TRAIN_GPT = ROOT / "train_gpt.py"
SAMPLE_DATA = ROOT / "data" / "datasets" / "sample_sp1024"
SAMPLE_TRAIN = SAMPLE_DATA / "fineweb_train_000000.bin"
SAMPLE_VAL = SAMPLE_DATA / "fineweb_val_000000.bin"
SAMPLE_TOKENIZER = ROOT / "data" / "tokenizers" / "sample_1024_bpe.model"

# 16 steps of 2,048 tokens with a warmdown over the last 8, so that late QAT (multiplier < 0.15) and one SWA
# snapshot (< 0.2) happen; a fast EMA so that 16 steps show in the exported weights.
E2E = dict(ITERATIONS=16, WARMDOWN_ITERS=8, SWA_ENABLED=1, SWA_EVERY=2, EMA_DECAY=0.9, TRAIN_BATCH_TOKENS=2048)


def read_tokens(path: Path) -> np.ndarray:
    """A shard read from SPEC §3 directly: 256 int32 header words, then header[2] uint16 tokens."""
    header = np.fromfile(path, dtype="<i4", count=256)
    assert (header[0], header[1]) == (20240520, 1)
    return np.fromfile(path, dtype="<u2", offset=1024, count=int(header[2])).astype(np.int64)


def write_shard(path: Path, tokens) -> Path:
    header = np.zeros(256, dtype="<i4")
    header[:3] = (20240520, 1, len(tokens))
    path.write_bytes(header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes())
    return path


def log_parts(out_dir: Path, run_id: str = "test") -> tuple[str, list[str]]:
    """The log file: the script's source, a line of 100 '=', then the run's own lines."""
    text = (out_dir / "logs" / f"{run_id}.txt").read_text(encoding="utf-8")
    code, sep, rest = text.partition("\n" + "=" * 100 + "\n")
    assert sep, "no separator after the source code in the log"
    return code, rest.splitlines()


def log_lines(out_dir: Path, run_id: str = "test") -> list[str]:
    return log_parts(out_dir, run_id)[1]


def summary(out_dir: Path, run_id: str = "test") -> dict:
    return json.loads((out_dir / "logs" / f"{run_id}.json").read_text(encoding="utf-8"))


def metric_line(lines: list[str], label: str) -> tuple[float, float]:
    found = [ln for ln in lines if ln.startswith(f"{label} ")]
    assert len(found) == 1, (label, found)
    m = re.search(r"val_loss:(\S+) val_bpb:(\S+)", found[0])
    return float(m.group(1)), float(m.group(2))


def assert_clean(proc):
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr[-3000:]


# ----------------------------------------------------------------------------- the whole script, end to end


@pytest.fixture(scope="module")
def e2e(tmp_path_factory, script_env, run_script):
    out = tmp_path_factory.mktemp("e2e")
    proc = run_script(script_env(out, **E2E))
    return out, proc


def test_end_to_end_final_lines_match_the_summary(e2e, tiny_settings):
    out, proc = e2e
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_clean(proc)
    lines, js = log_lines(out), summary(out)
    labels = ("final_int6_roundtrip_exact", "final_int6_sliding_window_exact")  # EVAL_STRIDE 64 < EVAL_SEQ_LEN 128
    assert set(js["metrics"]) == set(labels) | {"final_float_exact"}
    for label in labels:
        loss, bpb = metric_line(lines, label)
        assert loss == pytest.approx(js["metrics"][label]["val_loss"], abs=6e-9)
        assert bpb == pytest.approx(js["metrics"][label]["val_bpb"], abs=6e-9)
        assert f"{label} val_loss:{loss:.8f} val_bpb:{bpb:.8f}" in proc.stdout
    final = [ln for ln in lines if ln.startswith("final_score_exact ")]
    assert len(final) == 1 and lines[-1] == final[0]
    # The attention that ran, and why each faster backend did not (on the CPU: none of them can).
    assert "attention_backend:sdpa source:torch documents:sdpa by segment" in lines
    assert [ln.split(":")[1] for ln in lines if ln.startswith("attention_passed_over:")] == [
        "fa3 (installed)",
        "fa3 (kernels hub varunneal/flash-attention-3)",
        "fa2 (installed)",
    ]
    loss, bpb = metric_line(lines, "final_score_exact")
    assert (loss, bpb) == metric_line(lines, "final_int6_sliding_window_exact")
    assert js["final"]["val_loss"] == js["metrics"]["final_int6_sliding_window_exact"]["val_loss"]
    assert js["final"]["causal"] is True
    # Sizes: the code counted is the packed file written beside the artifact (it runs this very train_gpt.py, which
    # is logged in full), the model bytes are the artifact's.
    source_bytes, code_bytes = TRAIN_GPT.stat().st_size, (out / tg.PACKED_NAME).stat().st_size
    assert tg.unpack_code((out / tg.PACKED_NAME).read_text()) == tg.strip_source(TRAIN_GPT.read_text())
    assert log_parts(out)[0] == TRAIN_GPT.read_text(encoding="utf-8")
    assert [ln for ln in lines if ln.startswith("Code size:")] == [
        f"Code size: {code_bytes} bytes (packed; source {source_bytes} bytes)"
    ]
    artifact = out / tg.ARTIFACT_NAME
    model_bytes = artifact.stat().st_size
    assert js["bytes"] == dict(
        model=model_bytes, code=code_bytes, code_source=source_bytes, total=model_bytes + code_bytes, limit=16_000_000
    )
    assert f"Serialized model int6+rans: {model_bytes} bytes" in lines
    assert (
        f"Total submission size int6+rans: {model_bytes + code_bytes} bytes "
        f"(packed code {code_bytes} + model {model_bytes})"
    ) in lines
    # The float weights are scored before the round trip, and the gap between the two is logged and summarized.
    float_loss, float_bpb = metric_line(lines, "final_float_exact")
    assert lines.index(next(ln for ln in lines if ln.startswith("final_float_exact"))) < lines.index(
        next(ln for ln in lines if ln.startswith("final_int6_roundtrip "))
    )
    assert js["metrics"]["final_float_exact"]["val_bpb"] == pytest.approx(float_bpb, abs=6e-9)
    gap = js["metrics"]["final_int6_roundtrip_exact"]["val_bpb"] - js["metrics"]["final_float_exact"]["val_bpb"]
    assert js["quant_gap_bpb"] == pytest.approx(gap, abs=1e-12)
    assert f"quant_gap_bpb:{gap:.8f}" in lines
    # The precision summary counts every parameter once: the tiny model's matrices are int6 whatever their size.
    n_params = sum(p.numel() for p in tg.GPT(tg.ModelConfig.of(tiny_settings(**E2E))).parameters())
    counts = {}
    for k, kind in tg.unpack(artifact.read_bytes())[1]["scheme"].items():
        counts[kind] = counts.get(kind, 0) + math.prod(tg.model_shapes(tiny_settings(**E2E), True)[k])
    assert sum(counts.values()) == n_params and counts["int6"] > n_params // 2
    assert js["over_limit"] is False and not any("OVER THE LIMIT" in ln for ln in lines)
    assert js["steps"] == 16 and js["settings"]["NUM_LAYERS"] == 4 and js["settings"]["VE_LAYERS"] == [2, 3]
    # The stages of the schedule showed up. Step-count warmdown: multiplier(k) = min(1, (16 - k)/8) before step k+1;
    # late QAT from the first k with multiplier < 0.15, an SWA snapshot after each step k+1 that is even with < 0.2.
    mult = [min(1.0, (16 - k) / 8) for k in range(16)]
    qat = next(k for k in range(16) if mult[k] < 0.15)
    snapshots = sum(1 for k in range(16) if mult[k] < 0.2 and (k + 1) % 2 == 0)
    assert snapshots >= 1
    assert [ln for ln in lines if ln.startswith("late_qat")] == [f"late_qat:enabled step:{qat} scale:{mult[qat]:.4f}"]
    assert f"final_weights:swa({snapshots} snapshots)" in lines


def test_loss_falls(e2e):
    out, proc = e2e
    curve = summary(out)["train_curve"]
    assert [c["step"] for c in curve] == list(range(1, 17))
    losses = [c["train_loss"] for c in curve]
    assert all(math.isfinite(x) for x in losses)
    assert abs(losses[0] - math.log(1024)) < 0.05  # near-uniform predictions at initialization
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.4, losses
    logged = [float(m.group(1)) for ln in log_lines(out) if (m := re.match(r"step:\d+/16 train_loss:(\S+) ", ln))]
    assert logged == [round(x, 4) for x in losses]
    # The exported model predicts the validation text clearly better than uniform guessing.
    assert summary(out)["metrics"]["final_int6_roundtrip_exact"]["val_loss"] < math.log(1024) - 0.5


def test_reported_score_is_that_of_the_artifact(e2e, tiny_settings, one_thread):
    """Re-score the written artifact here: plain evaluation over 128-token windows, bytes per SPEC §4."""
    out, proc = e2e
    s = tiny_settings(**E2E)
    model = tg.GPT(tg.ModelConfig.of(s))
    model.load_state_dict(tg.load_artifact(out / tg.ARTIFACT_NAME, s))
    val = torch.from_numpy(read_tokens(SAMPLE_VAL)[:2049])
    x, y = val[:-1].view(16, 128), val[1:].view(16, 128)
    with torch.no_grad():
        logits = model.compute_logits(model.forward_hidden(x)).double()
    nll = F.cross_entropy(logits.reshape(-1, 1024), y.reshape(-1), reduction="sum").item()
    sp = spm.SentencePieceProcessor(model_file=str(SAMPLE_TOKENIZER))
    special = lambda t: sp.is_control(t) or sp.is_unknown(t) or sp.is_unused(t)  # noqa: E731
    n_bytes = 0
    for prev, tgt in zip(x.reshape(-1).tolist(), y.reshape(-1).tolist()):
        if special(tgt):
            continue
        if sp.is_byte(tgt):
            n_bytes += 1
            continue
        piece = sp.id_to_piece(tgt)
        space = piece.startswith("\u2581")
        n_bytes += len(piece[1:].encode() if space else piece.encode()) + (1 if space and not special(prev) else 0)
    got = summary(out)["metrics"]["final_int6_roundtrip_exact"]
    assert got["val_loss"] == pytest.approx(nll / 2048, rel=1e-5)
    assert got["val_bpb"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-5)


# ----------------------------------------------------------------------------- determinism (in process)


def train_in_process(s: dict, monkeypatch):
    for name in tg.LAUNCHER_VARS:
        monkeypatch.delenv(name, raising=False)
    run = tg.Run(s)
    torch.manual_seed(s.seed)
    model = tg.GPT(tg.ModelConfig.of(s), run.attn)
    initial = copy.deepcopy(model)
    luts = tg.build_sentencepiece_luts(tg.load_tokenizer(s), s.vocab_size, run.device)
    val = tg.load_validation_tokens(os.path.join(s.data_path, "fineweb_val_*.bin"), s.eval_seq_len, s.val_max_tokens)
    return tg.train(model, run, val, luts), run.summary, initial


def test_same_seed_same_run(tiny_settings, tmp_path, monkeypatch, one_thread):
    kw = dict(ITERATIONS=4, WARMDOWN_ITERS=8, SWA_ENABLED=1, SWA_EVERY=1, EMA_DECAY=0.9, OUTPUT_DIR=tmp_path)
    a, sum_a, init_a = train_in_process(tiny_settings(SEED=7, RUN_ID="a", **kw), monkeypatch)
    b, sum_b, _ = train_in_process(tiny_settings(SEED=7, RUN_ID="b", **kw), monkeypatch)
    c, sum_c, _ = train_in_process(tiny_settings(SEED=8, RUN_ID="c", **kw), monkeypatch)
    assert set(a) == set(b) == set(init_a.state_dict())
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [x["train_loss"] for x in sum_a["train_curve"]] == [x["train_loss"] for x in sum_b["train_curve"]]
    assert sum_a["val_curve"][-1]["val_loss"] == sum_b["val_curve"][-1]["val_loss"]
    assert max((a[k] - c[k]).abs().max().item() for k in a) > 1e-3  # another seed, other weights
    # The first step's loss is the mean over 8 micro-batches of consecutive, non-overlapping 129-token windows
    # from the start of the train shard (SPEC §3), scored by the initial model.
    tokens = torch.from_numpy(read_tokens(SAMPLE_TRAIN)[: 8 * 129]).view(8, 129)
    with torch.no_grad():
        first = np.mean([init_a(w[None, :-1], w[None, 1:]).item() for w in tokens])
    assert sum_a["train_curve"][0]["train_loss"] == pytest.approx(first, rel=1e-5)


# ----------------------------------------------------------------------------- 2 processes (gloo) = 1 process

DRIVER = """
import os, sys
import torch
sys.path.insert(0, sys.argv[2])
import train_gpt as tg

s = tg.parse_settings()
run = tg.Run(s)
torch.manual_seed(s.seed)
model = tg.GPT(tg.ModelConfig.of(s), run.attn)
initial = {k: v.clone() for k, v in model.state_dict().items()}
luts = tg.build_sentencepiece_luts(tg.load_tokenizer(s), s.vocab_size, run.device)
val_files = os.path.join(s.data_path, "fineweb_val_*.bin")
val = tg.load_validation_tokens(val_files, s.eval_seq_len, s.val_max_tokens)
state = tg.train(model, run, val, luts)
torch.save(dict(state=state, initial=initial, world=run.world, val_curve=run.summary["val_curve"]),
           f"{sys.argv[1]}.rank{run.rank}.pt")
tg.leave(0)  # as train_gpt.py's own exit: together, past the C++ teardown that can abort a finished rank
"""


@pytest.mark.slow
def test_two_process_gloo_run_matches_one_process(tmp_path, script_env):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    # 3 layers: the MLP banks have 3 matrices, so the 2-rank reduce-scatter pads them to 4.
    kw = dict(
        NUM_LAYERS=3,
        VE_LAYERS="1,2",
        XSA_LAST_N=2,
        ITERATIONS=1000,  # the simulated clock stops both at 600 / 100 = 6 steps, whatever each machine's speed
        TRAIN_CLOCK="simulated",
        MAX_WALLCLOCK_SECONDS=0.6,
        SIM_STEP_MS=100,
        WARMDOWN_ITERS=8,
        SWA_ENABLED=1,
        SWA_EVERY=1,
        EMA_DECAY=0.9,
    )
    results = {}
    for world, launcher in (
        (1, [sys.executable]),
        (2, [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]),
    ):
        out = tmp_path / f"w{world}"
        proc = subprocess.run(
            [*launcher, str(driver), str(out), str(ROOT)],
            env=script_env(tmp_path, **kw),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=400,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[world] = [torch.load(f"{out}.rank{r}.pt") for r in range(world)]
    one, two = results[1][0], results[2][0]
    assert (one["world"], two["world"]) == (1, 2)
    assert one["val_curve"][-1]["step"] == two["val_curve"][-1]["step"] == 6
    assert one["val_curve"][-1]["val_loss"] == pytest.approx(two["val_curve"][-1]["val_loss"], abs=1e-5)
    # Both ranks of the 2-process run end with the very same weights.
    assert all(torch.equal(two["state"][k], results[2][1]["state"][k]) for k in two["state"])
    # The same initialization, training that moved the weights, and the same end point within float tolerance.
    assert all(torch.equal(one["initial"][k], two["initial"][k]) for k in one["initial"])
    moved = max((one["state"][k] - one["initial"][k]).abs().max().item() for k in one["state"])
    assert moved > 1e-2
    for k in one["state"]:
        a, b = one["state"][k], two["state"][k]
        scale = max(1.0, a.abs().max().item())
        assert (a - b).abs().max().item() <= 1e-5 * scale, k


# ----------------------------------------------------------------------------- user errors: one line, exit 2


def case_missing_data(tmp):
    where = tmp / "nowhere"
    return dict(DATA_PATH=where), [str(where), "python data/fineweb.py download"]


def case_vocab_mismatch(tmp):
    vocab = spm.SentencePieceProcessor(model_file=str(SAMPLE_TOKENIZER)).vocab_size()
    return dict(VOCAB_SIZE=vocab // 2), [f"VOCAB_SIZE={vocab // 2}", str(vocab), str(SAMPLE_TOKENIZER)]


def case_truncated_shard(tmp):
    ds = tmp / "ds"
    ds.mkdir()
    (ds / SAMPLE_VAL.name).write_bytes(SAMPLE_VAL.read_bytes())
    raw = SAMPLE_TRAIN.read_bytes()
    count = int(np.frombuffer(raw[:12], dtype="<i4")[2])
    cut = raw[: len(raw) // 2 + 1]
    (ds / SAMPLE_TRAIN.name).write_bytes(cut)
    return dict(DATA_PATH=ds), [str(ds / SAMPLE_TRAIN.name), str(count), str(len(cut))]


def case_short_validation(tmp):
    ds = tmp / "ds"
    ds.mkdir()
    (ds / SAMPLE_TRAIN.name).symlink_to(SAMPLE_TRAIN)
    write_shard(ds / SAMPLE_VAL.name, read_tokens(SAMPLE_VAL)[:100])
    return dict(DATA_PATH=ds), [str(ds), r"\b100\b", r"\b128\b"]


def case_world_size_3(tmp):
    return dict(WORLD_SIZE=3, RANK=0, LOCAL_RANK=0), ["WORLD_SIZE=3"]


def case_setting_typo(tmp):
    return dict(SLOT_LRR="0.01"), ["SLOT_LRR", r"\bSLOT_LR\b"]


def case_bad_int(tmp):
    return dict(NUM_LAYERS="4.5"), ["NUM_LAYERS", "4.5"]


def case_bad_float(tmp):
    return dict(MATRIX_LR="fast"), ["MATRIX_LR", "fast"]


def case_bad_choice(tmp):
    return dict(QUANT="gzip"), ["QUANT", "gzip"]


def case_zero_heads(tmp):
    return dict(NUM_HEADS=0), ["NUM_HEADS=", "> 0"]


def case_negative_width(tmp):
    return dict(MODEL_DIM=-5), ["MODEL_DIM=", "> 0"]


def case_zero_kv_heads(tmp):
    return dict(NUM_KV_HEADS=0), ["NUM_KV_HEADS=", "> 0"]


def case_decay_above_one(tmp):
    return dict(EMA_DECAY=1.5), ["EMA_DECAY=", "[0, 1]"]


def case_negative_lr(tmp):
    return dict(MATRIX_LR=-0.1), ["MATRIX_LR=", ">= 0"]


def case_bits(tmp):
    return dict(MATRIX_BITS=4), ["MATRIX_BITS=", "5, 6, 7, 8"]


def case_ve_layers(tmp):
    return dict(VE_LAYERS="2,x"), ["VE_LAYERS='2,x'", "layer numbers"]


def case_long_sequence(tmp):
    return dict(TRAIN_SEQ_LEN=100000), ["TRAIN_BATCH_TOKENS=", "TRAIN_SEQ_LEN=100000"]


def case_output_dir(tmp):
    return dict(OUTPUT_DIR="/proc/nope"), ["OUTPUT_DIR=/proc/nope"]


def case_nan_setting(tmp):
    return dict(MATRIX_LR="nan"), ["MATRIX_LR='nan'", "finite"]


def case_inf_setting(tmp):
    return dict(EMA_DECAY="-inf"), ["EMA_DECAY='-inf'", "finite"]


def case_artifact_is_a_directory(tmp):
    return dict(EVAL_ONLY=1, ARTIFACT_PATH=tmp), [f"ARTIFACT_PATH={tmp} is a directory"]


def case_artifact_is_a_device(tmp):
    return dict(EVAL_ONLY=1, ARTIFACT_PATH="/dev/zero"), ["ARTIFACT_PATH=/dev/zero is a character device"]


def case_long_run_id(tmp):
    return dict(RUN_ID="r" * 300), ["RUN_ID (300 bytes)", "at most 200 bytes"]


def case_run_id_with_a_slash(tmp):
    return dict(RUN_ID="a/b"), ["RUN_ID (3 bytes)", "without '/'"]


def case_ve_layers_past_the_model(tmp):  # the tiny configuration's VE_LAYERS=2,3 on a 3-layer model
    return dict(NUM_LAYERS=3), ["VE_LAYERS=2,3 names a layer outside 0..2", "VE_ENABLED=0"]


def case_lora_rank_past_the_width(tmp):  # the tiny model: 64 wide, key/value 2 heads x 16
    return dict(STACK="pr1855", NUM_LAYERS=11, TTT_LORA_RANK=100000), ["TTT_LORA_RANK=100000", "TTT_LORA_RANK <= 32"]


def case_eval_batch_past_the_bound(tmp):  # the tiny configuration's 128-token windows
    return dict(EVAL_BATCH_SEQS=10**6), ["EVAL_BATCH_SEQS=1000000 windows of EVAL_SEQ_LEN=128", "4,194,304", "lower"]


def case_ttt_batch_size_past_the_bound(tmp):
    over = dict(STACK="pr1855", NUM_LAYERS=11, TTT_BATCH_SIZE=10**5)
    return over, ["TTT_BATCH_SIZE=100000 documents of up to TTT_EVAL_SEQ_LEN=2048", "lower TTT_BATCH_SIZE"]


def case_truncated_artifact(tmp):
    good = tmp / "good.ptz"
    s = tg.parse_settings(dict(TINY))
    torch.manual_seed(0)
    good.write_bytes(tg.pack(*tg.quantize_state(tg.GPT(tg.ModelConfig.of(s)).state_dict(), s), s))
    cut = tmp / "cut.bin"
    cut.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    good.unlink()
    return dict(EVAL_ONLY=1, ARTIFACT_PATH=cut), [str(cut), "not an intact artifact"]


SETTINGS_ONLY = [
    case_world_size_3,
    case_setting_typo,
    case_bad_int,
    case_bad_float,
    case_bad_choice,
    case_zero_heads,
    case_negative_width,
    case_zero_kv_heads,
    case_decay_above_one,
    case_negative_lr,
    case_bits,
    case_long_sequence,
    case_ve_layers,
    case_nan_setting,
    case_inf_setting,
    case_long_run_id,
    case_run_id_with_a_slash,
    case_ve_layers_past_the_model,
    case_lora_rank_past_the_width,
    case_eval_batch_past_the_bound,
    case_ttt_batch_size_past_the_bound,
]
ERROR_CASES = [
    case_missing_data,
    case_vocab_mismatch,
    case_truncated_shard,
    case_short_validation,
    case_output_dir,
    case_truncated_artifact,
    case_artifact_is_a_directory,
    case_artifact_is_a_device,
] + SETTINGS_ONLY


def assert_one_line_error(proc) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert_clean(proc)
    lines = proc.stderr.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("case", ERROR_CASES, ids=[c.__name__[5:] for c in ERROR_CASES])
def test_user_error_is_one_line(case, tmp_path, script_env, run_script):
    overrides, expected = case(tmp_path)
    proc = run_script(script_env(tmp_path / "out", **overrides), timeout=120)
    line = assert_one_line_error(proc)
    for want in expected:
        if want.startswith(r"\b"):
            assert re.search(want, line), (want, line)
        else:
            assert want in line, (want, line)
    assert not list(tmp_path.rglob("*.ptz"))
    if case in SETTINGS_ONLY:  # refused from the settings alone: no log opened, so no data read and no model built
        assert not (tmp_path / "out").exists()


def test_world_size_error_is_said_by_rank_zero_only(tmp_path, script_env, run_script):
    proc = run_script(script_env(tmp_path / "out", WORLD_SIZE=3, RANK=1, LOCAL_RANK=1), timeout=120)
    assert proc.returncode == 2 and proc.stderr == "" and proc.stdout == ""


def default_sigint():
    """In the child, before exec: SIGINT handled by default, even when the suite itself was started with SIGINT
    ignored (a background job, nohup), which Python would otherwise pass on and never turn into KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def children(pid):
    """The processes whose parent is pid (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def interrupt_at_step_3(argv, env, sig, ranks=0):
    """Start argv, wait for its step-3 line, then send sig to it, or (ranks > 0) to each of the ranks it launched."""
    proc = subprocess.Popen(
        argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint
    )
    for line in proc.stdout:
        if line.startswith("step:3/"):
            break
    if ranks:
        workers = children(proc.pid)
        assert len(workers) == ranks, workers
        for pid in workers:
            os.kill(pid, sig)
    else:
        proc.send_signal(sig)
    rest, err = proc.communicate(timeout=120)
    return proc.returncode, rest, err


def test_ctrl_c_says_where_and_what_is_on_disk(tmp_path, script_env):
    out = tmp_path / "out"
    code, rest, err = interrupt_at_step_3(
        [sys.executable, str(TRAIN_GPT)], script_env(out, ITERATIONS=100000), signal.SIGINT
    )
    assert code == 130, err[-3000:]
    assert "Traceback" not in err + rest
    said = [ln for ln in rest.splitlines() if ln.startswith("interrupted during training step ")]
    assert len(said) == 1 and "on disk: nothing yet" in said[0] and said[0] in log_lines(out)


def test_a_killed_run_leaves_a_json_log_that_parses(tmp_path, script_env):
    """SIGKILL mid-training (nothing can run at exit): logs/<RUN_ID>.json, written at start-up and at each stage,
    parses, with the stage it reached and the machine: torch, the checkout's commit and dirty flag, host, world."""
    out = tmp_path / "out"
    code, _, err = interrupt_at_step_3(
        [sys.executable, str(TRAIN_GPT)], script_env(out, ITERATIONS=100000, VAL_LOSS_EVERY=2), signal.SIGKILL
    )
    assert code == -signal.SIGKILL, err[-3000:]
    js = summary(out)
    assert js["stage"].startswith("training") and js["settings"]["ITERATIONS"] == 100000
    assert [v["step"] for v in js["val_curve"]][:2] == [0, 2]  # the validations it had reached
    machine = js["machine"]
    assert machine["torch"] == torch.__version__ and machine["world_size"] == 1 and machine["host"]
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if git.returncode == 0:  # a checkout: its commit; dirty is whether tracked files differ from it
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True)
        assert machine["commit"] == git.stdout.strip() and machine["dirty"] == bool(dirty.stdout.strip())
    assert not (out / "logs" / "test.json.tmp").exists()


@pytest.mark.parametrize("world", [1, 2])
def test_sigterm_says_what_ctrl_c_says_and_exits_143(world, tmp_path, script_env):
    """SIGTERM (Slurm, pre-emption, torchrun passing on its own) to the process, or to each rank under torchrun."""
    out = tmp_path / "out"
    launcher = [sys.executable] + (
        ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if world > 1 else []
    )
    code, rest, err = interrupt_at_step_3(
        [*launcher, str(TRAIN_GPT)], script_env(out, ITERATIONS=100000), signal.SIGTERM, ranks=world if world > 1 else 0
    )
    said = [ln for ln in rest.splitlines() if ln.startswith("interrupted during training step ")]
    assert len(said) == 1 and "on disk: nothing yet" in said[0] and said[0] in log_lines(out), (
        rest[-2000:] + err[-2000:]
    )
    if world == 1:
        assert code == 143 and "Traceback" not in err + rest, err[-3000:]
    else:  # each rank's own exit status, as torchrun reports it: every rank where newer torchruns wait for all,
        # the first to exit only where an older one (2.5) sends the rest its own SIGTERM and lists no other failure
        assert code != 0 and "Traceback" not in rest, err[-3000:]
        statuses = dict(re.findall(r"\brank\s+:\s+(\d+) \(local_rank: \d+\)\n\s*exitcode\s+:\s+(-?\d+)", err))
        assert set(statuses) <= {"0", "1"} and set(statuses.values()) == {"143"}, err[-3000:]
        assert len(statuses) == 2 or "<NO_OTHER_FAILURES>" in err, err[-3000:]


def test_non_finite_loss_names_the_step(tmp_path, script_env, run_script):
    out = tmp_path / "out"
    proc = run_script(script_env(out, ITERATIONS=6, MATRIX_LR="1e30", TIED_EMBED_LR="1e30", SCALAR_LR="1e30"))
    line = assert_one_line_error(proc)
    assert "non-finite" in line
    step = int(re.search(r"\bstep (\d+)\b", line).group(1))
    logged = [float(m.group(1)) for ln in log_lines(out) if (m := re.match(r"step:\d+/6 train_loss:(\S+) ", ln))]
    # Every step before it logged a finite loss (TRAIN_LOG_EVERY=1); the named step is the first that did not.
    assert step >= 2 and len(logged) == step - 1 and all(math.isfinite(x) for x in logged)
    assert not (out / tg.ARTIFACT_NAME).exists()


def test_over_the_artifact_limit(tmp_path, script_env, run_script):
    out = tmp_path / "out"
    proc = run_script(script_env(out, ITERATIONS=2, ARTIFACT_LIMIT_BYTES=1000))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert_clean(proc)
    assert "error:" not in proc.stderr
    lines, js = log_lines(out), summary(out)
    artifact = out / tg.ARTIFACT_NAME
    assert artifact.is_file() and artifact.stat().st_size == js["bytes"]["model"]
    total = js["bytes"]["total"]
    assert total == artifact.stat().st_size + (out / tg.PACKED_NAME).stat().st_size and total > 1000  # packed code
    loud = [ln for ln in lines if "OVER THE LIMIT" in ln]
    assert len(loud) == 2 and str(total) in loud[0] and "1000" in loud[0] and loud[0] in proc.stdout
    assert lines[-1] == loud[1] and str(total) in loud[1]  # said again after the scores
    assert any(ln.startswith("fit_to_limit: zeroed ") for ln in lines)  # it tried to fit first
    assert js["over_limit"] is True and js["bytes"]["limit"] == 1000
    # Evaluation still ran on the kept artifact.
    loss, bpb = metric_line(lines, "final_int6_roundtrip_exact")
    assert loss == pytest.approx(js["metrics"]["final_int6_roundtrip_exact"]["val_loss"], abs=6e-9)
    assert lines[-2].startswith("final_score_exact ") and math.isfinite(bpb)


# ----------------------------------------------------------------------------- a full disk

PATCHED = """
import errno, pathlib, runpy, shutil, sys
what, script = sys.argv[1], sys.argv[2]
if what == "small_disk":
    shutil.disk_usage = lambda path: shutil._ntuple_diskusage(10 ** 9, 10 ** 9 - 400_000, 400_000)
else:  # the disk fills up halfway through writing the float weights
    write = pathlib.Path.write_bytes
    def full(self, data):
        if self.name.startswith("final_model.float"):
            write(self, data[:len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(self, data)
    pathlib.Path.write_bytes = full
sys.argv = [script]
runpy.run_path(script, run_name="__main__")
"""


def run_patched(tmp_path, what, env):
    driver = tmp_path / "patched.py"
    driver.write_text(PATCHED)
    return subprocess.run(
        [sys.executable, str(driver), what, str(TRAIN_GPT)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_too_little_room_for_the_outputs_is_refused_at_start_up(tmp_path, script_env):
    out = tmp_path / "out"
    line = assert_one_line_error(run_patched(tmp_path, "small_disk", script_env(out)))
    assert f"OUTPUT_DIR={out} has 0.4 MB free" in line and "float weights, artifact, logs" in line
    assert not (out / "logs" / "test.txt").exists()  # before any work: not even the log's header


def test_a_full_disk_costs_the_float_weights_not_the_result(tmp_path, script_env):
    out = tmp_path / "out"
    proc = run_patched(tmp_path, "full_disk", script_env(out, ITERATIONS=2))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_clean(proc)
    artifact, floats = out / tg.ARTIFACT_NAME, out / tg.FLOAT_NAME
    warned = [ln for ln in proc.stdout.splitlines() if "could not write" in ln]
    assert warned == [f"warning: could not write {floats} (No space left on device); on disk: {artifact}"]
    assert warned[0] in log_lines(out)
    assert (
        artifact.is_file()
        and not floats.exists()
        and sorted(p.name for p in out.iterdir()) == sorted([tg.ARTIFACT_NAME, "logs", tg.PACKED_NAME])
    )
    assert log_lines(out)[-1].startswith("final_score_exact ")  # the artifact was still evaluated


def test_a_failed_write_removes_its_partial_file_and_says_what_is_on_disk(tmp_path, monkeypatch):
    write = Path.write_bytes

    def full(self, data):
        write(self, data[:3])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)
    monkeypatch.setitem(tg.PROGRESS, "on_disk", "nothing yet")
    with pytest.raises(tg.Fail) as err:
        tg.write_atomic(tmp_path / tg.ARTIFACT_NAME, b"123456")
    assert (
        str(err.value)
        == f"could not write {tmp_path / tg.ARTIFACT_NAME} (No space left on device); on disk: nothing yet"
    )
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- the simulated training clock


def simulated_run(tiny_settings, tmp_path, monkeypatch, sleep_s=0.0):
    """train() with the step itself stubbed (a zero loss, optionally a sleep): the steps taken and the loop switch."""
    s = tiny_settings(
        OUTPUT_DIR=tmp_path,
        RUN_ID="sim",
        DEVICE="cpu",
        ITERATIONS=1000,
        NUM_LOOPS=1,
        LOOP_START=1,
        LOOP_END=2,
        ENABLE_LOOPING_AT=0.35,
        TRAIN_CLOCK="simulated",
        MAX_WALLCLOCK_SECONDS=1.0,
        SIM_STEP_MS=100,
        SIM_LOOPED_STEP_MS=150,
    )
    run = tg.Run(s)
    model = tg.build_model(run)
    looped = []

    def step(run_, model_, optimizers, next_batch, step, lr_mul):
        time.sleep(sleep_s)
        looped.append(model_.looping)
        return torch.zeros(())

    monkeypatch.setattr(tg, "train_step", step)
    monkeypatch.setattr(tg, "evaluate", lambda *a, **k: (0.0, 0.0))
    luts = tg.build_sentencepiece_luts(tg.load_tokenizer(s), s.vocab_size, run.device)
    tg.train(model, run, torch.randint(2, 1024, (257,)), luts)
    return looped, run.summary, (tmp_path / "logs" / "sim.txt").read_text()


def test_simulated_clock_gives_the_step_models_schedule_whatever_the_machine(tiny_settings, tmp_path, monkeypatch):
    """The step-time model's arithmetic: 1,000 ms at 100 ms a step until the loop switch at 35% (steps 0-3 start at
    0-300 ms; step 4 starts at 400 ms, past 350), then 150 ms a step: 400 + 4 x 150 = 1,000 ms, the cap, after 8
    steps. A machine 50 ms slower a step (the sleep) takes the same steps; the log says which clock ran."""
    fast = simulated_run(tiny_settings, tmp_path / "fast", monkeypatch)
    slow = simulated_run(tiny_settings, tmp_path / "slow", monkeypatch, sleep_s=0.05)
    for looped, summary, log in (fast, slow):
        assert looped == [False] * 4 + [True] * 4
        assert summary["steps"] == 8 and summary["simulated_train_time_ms"] == 1000.0
        assert "train_clock:simulated step_ms:100 looped_step_ms:150" in log
        assert "layer_loop:enabled step:4 frac:0.400" in log
        assert "stopping_early: wallclock_cap train_time:1000ms step:8/1000" in log
        assert re.search(r"train_clock:simulated steps:8 reference_8xh100:1\.0s wall:[\d.]+s", log)
    assert slow[1]["train_time_ms"] >= 8 * 50  # its wall time is its own
    with pytest.raises(tg.Fail, match="TRAIN_CLOCK=simulated .* MAX_WALLCLOCK_SECONDS > 0"):
        tg.parse_settings({"TRAIN_CLOCK": "simulated", "MAX_WALLCLOCK_SECONDS": "0"})
    pr = tg.parse_settings({"STACK": "pr1855"})
    assert (pr.train_clock, pr.sim_step_ms, pr.sim_looped_step_ms) == ("wall", 96.0, 141.0)

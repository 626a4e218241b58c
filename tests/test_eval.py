"""Tests of train_gpt.py's evaluation (sliding windows, score-first TTT, SLOT) and tools/audit_causality.py.

Every number checked comes from the code under test and is compared with an independent derivation:
an enumeration of the windows written here, an instrumented event log of TTT, a plain-torch SLOT loop
with AdamW written out by hand, a 2-process run against a 1-process one, and the audit's verdicts.
All runs use a tiny model on the embedded sample (data/datasets/sample_sp1024).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "datasets" / "sample_sp1024"
TOKENIZER = ROOT / "data" / "tokenizers" / "sample_1024_bpe.model"
AUDIT = ROOT / "tools" / "audit_causality.py"
sys.path.insert(0, str(ROOT))
import train_gpt as tg  # noqa: E402

Tensor = torch.Tensor

TINY = dict(
    DATA_PATH=str(DATA),
    TOKENIZER_PATH=str(TOKENIZER),
    DEVICE="cpu",
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
    EVAL_STRIDE="32",
    EVAL_BATCH_SEQS="8",
    TRAIN_BATCH_TOKENS="8192",
    WARMUP_STEPS="0",
    MAX_WALLCLOCK_SECONDS="0",
    VAL_MAX_TOKENS="1024",
    VAL_LOSS_EVERY="0",
    TTT_CHUNK_TOKENS="256",
    TTT_BATCH_SEQS="4",
    TTT_EPOCHS="1",
    ITERATIONS="20",
    GPTQ_CALIB_SEQS="4",
    GPTQ_CALIB_LEN="128",  # the default 64 x 2048 self-generated tokens took 2 minutes a run
    TTT_LORA_RANK="8",  # phased TTT's adapters: at most the 32-wide key/value projections
)
L, STRIDE = 128, 32
needs_sample = pytest.mark.skipif(
    not (DATA / "fineweb_val_000000.bin").is_file() or not TOKENIZER.is_file(),
    reason="the embedded sample data/datasets/sample_sp1024 is missing",
)


def tiny_env(**over) -> dict:
    return {**TINY, **{k: str(v) for k, v in over.items()}}


def subprocess_env(**over) -> dict:
    """The parent environment without stray train_gpt settings or launcher variables, plus the tiny ones."""
    env = {k: v for k, v in os.environ.items() if k not in tg.SETTING_NAMES and k not in tg.LAUNCHER_VARS}
    env.update(tiny_env(**over), OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    return env


def noised_model(s: dict, seed: int = 0) -> tg.GPT:
    """A random tiny model with noise on every parameter, so that every layer mixes positions."""
    torch.manual_seed(seed)
    model = tg.GPT(tg.ModelConfig.of(s))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.5 / p.shape[-1] ** 0.5 if p.dim() >= 2 else 0.05))
    return model


@pytest.fixture(scope="module")
def eval_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: oversubscription makes the tiny runs several times slower
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def base(eval_threads, tmp_path_factory):
    """Output folder, luts, a 1024-target val slice and the starting weights of the tiny model."""
    out = tmp_path_factory.mktemp("eval_out")
    s = tg.parse_settings(tiny_env(OUTPUT_DIR=out))
    luts = tg.build_sentencepiece_luts(tg.load_tokenizer(s), s.vocab_size, torch.device("cpu"))
    val = tg.load_validation_tokens(str(DATA / "fineweb_val_*.bin"), L, 1024)
    return dict(out=out, luts=luts, val=val, state=noised_model(s).state_dict())


def make_run(base, **over):
    s = tg.parse_settings(tiny_env(OUTPUT_DIR=base["out"], **over))
    run = tg.Run(s)
    run.log = lambda msg, console=True: None
    model = tg.GPT(tg.ModelConfig.of(s), run.attn)
    model.load_state_dict(base["state"])
    return s, run, model


class Capture:
    def __init__(self):
        self.idx, self.rows = [], []

    def __call__(self, idx, logp):
        self.idx.append(idx.clone())
        self.rows.append(logp.detach().clone())

    def by_index(self) -> dict[int, Tensor]:
        out = {}
        for idx, rows in zip(self.idx, self.rows):
            for i, r in zip(idx.tolist(), rows):
                assert i not in out, f"target {i} scored twice"
                out[i] = r
        return out


# ----------------------------------------------------------------------------- sliding windows


def my_windows(n: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """Independent enumeration: window 0 covers [0, seq_len); window k >= 1 starts at k*stride, keeps
    seq_len - stride positions of context and scores what the previous windows left; as many as needed."""
    later = max(0, math.ceil((n - seq_len) / stride))
    wins = [(0, min(seq_len, n), 0)]
    for k in range(1, later + 1):
        start = k * stride
        wins.append((start, min(start + seq_len, n), start + seq_len - stride))
    return wins


@pytest.mark.parametrize(
    "n,seq_len,stride",
    [
        (1024, 128, 32),
        (1000, 128, 32),
        (1001, 128, 48),
        (100, 128, 32),
        (128, 128, 32),
        (129, 128, 32),
        (4096, 2048, 64),
        (5000, 2048, 2048),
        (300, 64, 1),
        (257, 64, 64),
        (1, 16, 4),
        (700, 128, 127),
    ],
)
def test_sliding_windows_score_every_position_once(n, seq_len, stride):
    wins = tg.sliding_windows(n, seq_len, stride)
    assert wins == my_windows(n, seq_len, stride)
    count = [0] * n
    for k, (start, end, first) in enumerate(wins):
        assert 0 <= start <= first < end <= n and end - start <= seq_len
        for p in range(first, end):
            count[p] += 1
        if k == 0:
            assert first == 0 and end == min(seq_len, n)
        else:
            assert first - start == seq_len - stride  # full context before the scored part
            if end - start == seq_len:
                assert end - first == stride  # the scored part is the last stride positions
            else:
                assert k == len(wins) - 1 and end == n  # only the final window is cut short
            assert first == wins[k - 1][1]  # it scores exactly what the previous window left
    assert count == [1] * n


# ----------------------------------------------------------------------------- score-first TTT


@needs_sample
@pytest.mark.parametrize("chunk,epochs,batch", [(256, 2, 1), (512, 1, 4), (384, 2, 2)])
def test_ttt_trains_on_a_chunk_only_after_scoring_it(base, monkeypatch, chunk, epochs, batch):
    s, run, model = make_run(base, TTT_CHUNK_TOKENS=chunk, TTT_EPOCHS=epochs, TTT_BATCH_SEQS=batch)
    val = base["val"]
    n = val.numel() - 1
    grams = val.unfold(0, L + 1, 1)  # every (input sequence + last target) a training batch can hold
    counts = torch.zeros(n + 2, dtype=torch.int64)
    events = []
    state = dict(chunk=None, batch=[])

    def hook(idx, logp):
        assert state["chunk"] is None, "scored while training"
        counts[idx] += 1
        events.append(("score", int(idx.max())))

    def locate(x: Tensor, y: Tensor) -> list[int]:
        """Target indices of a training batch, found by matching its sequences in val."""
        targets = []
        for xr, yr in zip(x, y):
            hits = torch.nonzero((grams == torch.cat((xr, yr[-1:]))).all(dim=1)).flatten()
            assert hits.numel() == 1 and torch.equal(yr[:-1], xr[1:])
            targets += range(int(hits[0]) + 1, int(hits[0]) + L + 1)
        return targets

    original_train = tg.ttt_train_chunk

    def train_chunk(model_, run_, val_, c, n_chunks, opt, loss_fn, sgd):
        def recording_loss(x, y):
            state["batch"] += locate(x, y)
            return loss_fn(x, y)

        scored = torch.nonzero(counts[1 : n + 1]).flatten() + 1
        events.append(("train", c, n_chunks, scored.tolist()))
        state["chunk"] = c
        original_train(model_, run_, val_, c, n_chunks, opt, recording_loss, sgd)
        state["chunk"] = None

    class RecordingSGD(torch.optim.SGD):
        def step(self, closure=None):
            assert state["chunk"] is not None, "an SGD step outside ttt_train_chunk"
            events.append(
                (
                    "step",
                    state["chunk"],
                    sorted(set(state["batch"])),
                    int(torch.nonzero(counts).max()) if counts.any() else 0,
                    counts.clone(),
                )
            )
            state["batch"] = []
            return super().step(closure)

    monkeypatch.setattr(tg, "ttt_train_chunk", train_chunk)
    monkeypatch.setattr(tg, "SCORE_HOOK", hook)
    monkeypatch.setattr(torch.optim, "SGD", RecordingSGD)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tg.evaluate(model, run, val, base["luts"], STRIDE, ttt=True, slot=False, tag="t")

    n_chunks = (n - 1) // chunk + 1  # position p (target p+1) belongs to chunk p // chunk
    trains = [e for e in events if e[0] == "train"]
    assert [e[1] for e in trains] == list(range(n_chunks - 1))  # in order, never the last chunk
    assert all(e[2] == n_chunks for e in trains)
    for _, c, _, scored in trains:
        top = max(scored, default=0)
        assert scored == list(range(1, top + 1))  # a prefix of the targets, left to right
        assert (c + 1) * chunk <= top < (c + 1) * chunk + STRIDE + 1  # the whole chunk, and no further window
    steps = [e for e in events if e[0] == "step"]
    per_chunk = epochs * math.ceil((chunk // L) / batch)  # whole sequences of the chunk, in batches
    assert len(steps) == per_chunk * (n_chunks - 1)
    for _, c, targets, top_scored, cnt in steps:
        assert targets, "a step without a training batch"
        assert min(targets) > c * chunk
        assert max(targets) <= min((c + 1) * chunk, n) and max(targets) <= top_scored
        assert bool((cnt[targets] == 1).all()), f"chunk {c} trained on a target not yet scored"
    assert bool((counts[1 : n + 1] == 1).all()) and counts[0] == 0 and counts[n + 1] == 0
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items()), "TTT changed nothing"


# ----------------------------------------------------------------------------- SLOT against a plain loop


def adamw_by_hand(loss_of, shape, lr, steps, wd=1e-8, eps=1e-5, b1=0.9, b2=0.999) -> Tensor:
    p, m, v = torch.zeros(shape), torch.zeros(shape), torch.zeros(shape)
    for t in range(1, steps + 1):
        leaf = p.clone().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(loss_of(leaf), leaf)
        p = p * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
    return p


@torch.no_grad()
def slot_by_hand(model, s, val, mode: str) -> dict[int, Tensor]:
    """Sliding-window SLOT written out window by window; returns the scored log-prob row per target."""
    n = val.numel() - 1
    wins = my_windows(n, L, STRIDE)
    per = [(val[a:b], val[a + 1 : b + 1], model.forward_hidden(val[None, a:b])[0], f - a, b) for a, b, f in wins]
    rows = {}
    for i in range(0, len(per), s.eval_batch_seqs):
        batch = per[i : i + s.eval_batch_seqs]
        if mode == "batch":  # one delta for the batch, on the mean CE of every position of every window

            def loss(delta):
                nll = [
                    F.cross_entropy(model.compute_logits(H + delta[0]), y, reduction="sum") for _, y, H, _, _ in batch
                ]
                return sum(nll) / sum(len(y) for _, y, _, _, _ in batch)

            deltas = [adamw_by_hand(loss, (1, 1, s.model_dim), s.slot_lr, s.slot_steps)[0, 0]] * len(batch)
        else:  # one delta per window, on the mean CE of its positions before its first scored one
            deltas = []
            for _, y, H, first, _ in batch:

                def loss(delta, H=H, y=y, first=first):
                    return F.cross_entropy(model.compute_logits(H[:first] + delta), y[:first])

                deltas.append(
                    adamw_by_hand(loss, (H.size(-1),), s.slot_lr, s.slot_steps) if first else torch.zeros(H.size(-1))
                )
        for (x, y, H, first, end), delta in zip(batch, deltas):
            logp = F.log_softmax(model.compute_logits(H + delta), dim=-1)
            for p in range(first, len(y)):
                rows[end - len(y) + p + 1] = logp[p]
    return rows


@needs_sample
@pytest.mark.parametrize("mode", ["batch", "causal"])
def test_slot_matches_a_plain_reimplementation(base, monkeypatch, mode):
    s, run, model = make_run(base, SLOT_MODE=mode)
    val, n = base["val"], base["val"].numel() - 1
    cap, plain = Capture(), Capture()
    monkeypatch.setattr(tg, "SCORE_HOOK", cap)
    loss, bpb = tg.evaluate(model, run, val, base["luts"], STRIDE, ttt=False, slot=True)
    monkeypatch.setattr(tg, "SCORE_HOOK", plain)
    plain_loss, _ = tg.evaluate(model, run, val, base["luts"], STRIDE, ttt=False, slot=False)
    got, without = cap.by_index(), plain.by_index()
    want = slot_by_hand(model, s, val, mode)
    assert sorted(got) == sorted(want) == list(range(1, n + 1))
    diff = max((got[t] - want[t]).abs().max().item() for t in want)
    moved = max((got[t] - without[t]).abs().max().item() for t in want)
    assert diff < 2e-5 and moved > 1e-3, (diff, moved)  # SLOT moved the rows, and exactly as written out
    my_nll = -sum(want[t][val[t]].double().item() for t in want)
    assert loss == pytest.approx(my_nll / n, rel=1e-6)
    assert abs(loss - plain_loss) > 1e-4


@needs_sample
def test_causal_delta_ignores_the_scored_tokens(base):
    s, run, model = make_run(base)
    val = base["val"]
    wins = tg.sliding_windows(val.numel() - 1, L, STRIDE)[:5]  # the first window (nothing to fit) and 4 more
    starts = torch.tensor([w[0] for w in wins])
    first = torch.tensor([w[2] - w[0] for w in wins])
    pos = torch.arange(L)
    x, y = val[starts[:, None] + pos], val[starts[:, None] + pos + 1]
    with torch.no_grad():
        H = model.forward_hidden(x)
    fit = pos[None, :] < first[:, None]
    scored = ~fit
    gen = torch.Generator().manual_seed(1)
    y_changed = torch.where(scored, (y + torch.randint(1, 1024, y.shape, generator=gen)) % 1024, y)
    assert (y_changed != y).sum() == scored.sum()

    causal = tg.slot_delta(model, H, y, fit, s, shared=False)
    assert causal.shape == (5, 1, 64) and not causal[0].any() and bool((causal[1:].abs().amax(-1) > 0).all())
    assert torch.equal(causal, tg.slot_delta(model, H, y_changed, fit, s, shared=False))
    # not vacuous: a change at a fit (already scored) position of window 2 moves window 2's delta, no other
    y_fit = y.clone()
    y_fit[2, 3] = (y[2, 3] + 7) % 1024
    other = tg.slot_delta(model, H, y_fit, fit, s, shared=False)
    assert not torch.equal(other[2], causal[2])
    assert torch.equal(other[[0, 1, 3, 4]], causal[[0, 1, 3, 4]])
    # the seed's batch delta is fitted on the scored tokens themselves, so it moves with them
    every = torch.ones_like(fit)
    shared = tg.slot_delta(model, H, y, every, s, shared=True)
    shared_changed = tg.slot_delta(model, H, y_changed, every, s, shared=True)
    assert shared.shape == (1, 1, 64) and (shared - shared_changed).abs().max() > 1e-4


# ----------------------------------------------------------------------------- 2 processes vs 1

DRIVER = r"""
import json, os, sys
sys.path.insert(0, sys.argv[1])
import torch
import train_gpt as tg
torch.set_num_threads(1)
s = tg.parse_settings()
run = tg.Run(s)
run.log = lambda msg, console=True: None
torch.manual_seed(0)
model = tg.GPT(tg.ModelConfig.of(s), run.attn)
with torch.no_grad():
    for p in model.parameters():
        p.add_(torch.randn_like(p) * (0.5 / p.shape[-1] ** 0.5 if p.dim() >= 2 else 0.05))
luts = tg.build_sentencepiece_luts(tg.load_tokenizer(s), s.vocab_size, run.device)
val_files = os.path.join(s.data_path, "fineweb_val_*.bin")
val = tg.load_validation_tokens(val_files, s.eval_seq_len, s.val_max_tokens)
start = {k: v.clone() for k, v in model.state_dict().items()}
no_ttt, _ = tg.evaluate(model, run, val, luts, s.eval_stride, ttt=False, slot=True)
model.load_state_dict(start)
loss, bpb = tg.evaluate(model, run, val, luts, s.eval_stride, ttt=True, slot=True, tag="t")
if run.master:
    with open(sys.argv[2], "w") as f:
        json.dump(dict(loss=loss, bpb=bpb, no_ttt=no_ttt, world=run.world), f)
tg.leave(0)  # as train_gpt.py's own exit: together, past the C++ teardown that can abort a finished rank
"""


@needs_sample
@pytest.mark.slow
def test_ttt_with_slot_in_two_processes_matches_one(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    # 3 chunks of 4 sequences in batches of 3: the second batch leaves one rank without a sequence;
    # a high TTT_LR so that TTT moves the loss by ~0.5%, far above the tolerance
    env = subprocess_env(
        OUTPUT_DIR=tmp_path, VAL_MAX_TOKENS=1536, TTT_CHUNK_TOKENS=512, TTT_BATCH_SEQS=3, EVAL_BATCH_SEQS=5, TTT_LR=0.05
    )
    one = subprocess.Popen(
        [sys.executable, str(driver), str(ROOT), str(tmp_path / "one.json")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(driver),
            str(ROOT),
            str(tmp_path / "two.json"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out_one = one.communicate(timeout=300)[0]
    assert one.returncode == 0, out_one[-3000:]
    assert two.returncode == 0, (two.stdout + two.stderr)[-3000:]
    r1, r2 = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert (r1["world"], r2["world"]) == (1, 2)
    assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-6)
    assert r2["bpb"] == pytest.approx(r1["bpb"], rel=1e-6)
    assert r2["no_ttt"] == pytest.approx(r1["no_ttt"], rel=1e-6)
    assert abs(r1["loss"] - r1["no_ttt"]) > 1e-3 * r1["loss"]  # TTT mattered: a rank-dependent update would show


# ----------------------------------------------------------------------------- eval-only reproduces the run


@needs_sample
@pytest.mark.slow
def test_eval_only_reproduces_the_final_score(tmp_path):
    env = subprocess_env(OUTPUT_DIR=tmp_path, TTT_ENABLED=1, SLOT_ENABLED=1, SLOT_MODE="causal")
    train = subprocess.run(
        [sys.executable, str(ROOT / "train_gpt.py")],
        env={**env, "RUN_ID": "train"},
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert train.returncode == 0, (train.stdout + train.stderr)[-3000:]
    artifact = tmp_path / tg.ARTIFACT_NAME
    assert artifact.is_file()

    def final_line(text):
        lines = [ln for ln in text.splitlines() if ln.startswith("final_score_exact ")]
        assert len(lines) == 1, text[-3000:]
        return lines[0]

    want = final_line(train.stdout)
    assert want.startswith("final_score_exact eval:ttt+slot_causal val_loss:") and want.endswith(" causal:yes")
    again = subprocess.run(
        [sys.executable, str(ROOT / "train_gpt.py")],
        env={**env, "RUN_ID": "eval", "EVAL_ONLY": "1", "ARTIFACT_PATH": str(artifact)},
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert final_line(again.stdout) == want
    assert final_line((tmp_path / "logs" / "eval.txt").read_text()) == want

    wrong = subprocess.run(
        [sys.executable, str(ROOT / "train_gpt.py")],
        env={**env, "RUN_ID": "wrong", "EVAL_ONLY": "1", "ARTIFACT_PATH": str(artifact), "NUM_LAYERS": "5"},
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert wrong.returncode == 2, (wrong.stdout + wrong.stderr)[-3000:]
    err = [ln for ln in wrong.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in wrong.stderr
    assert "NUM_LAYERS=4 in the artifact but 5 here" in err[0]
    assert "final_score_exact" not in wrong.stdout


# ----------------------------------------------------------------------------- the audit tool

AUDIT_MODES = {
    "batch_slot": (dict(SLOT_MODE="batch"), 1, "ttt+slot_batch"),
    "sliding": (dict(TTT_ENABLED=0, SLOT_ENABLED=0), 0, "sliding"),
    "ttt": (dict(SLOT_ENABLED=0), 0, "ttt"),
    "ttt_causal_slot": (dict(SLOT_MODE="causal"), 0, "ttt+slot_causal"),
    # STACK=pr1855 (11 layers looped, lanes, gates, document masks; 32-token segments): its plain packed-row pass,
    # and the seed's TTT + causal SLOT on top (its phased TTT: tests/test_phased_ttt.py)
    "pr1855": (
        dict(
            STACK="pr1855",
            VOCAB_SIZE=1024,
            NUM_LAYERS=11,
            MLP_MULT=4,
            XSA_LAST_N=11,
            BIGRAM_VOCAB_SIZE=0,
            TRAIN_SEQ_LEN=32,
            EVAL_STRIDE=128,
            PHASED_TTT_ENABLED=0,
            EMBED_BF16=0,
        ),
        0,
        "roundtrip",
    ),
    "pr1855_ttt_slot": (
        dict(
            STACK="pr1855",
            VOCAB_SIZE=1024,
            NUM_LAYERS=11,
            MLP_MULT=4,
            XSA_LAST_N=11,
            BIGRAM_VOCAB_SIZE=0,
            TRAIN_SEQ_LEN=32,
            TTT_ENABLED=1,
            SLOT_ENABLED=1,
            PHASED_TTT_ENABLED=0,
            EMBED_BF16=0,
        ),
        0,
        "ttt+slot_causal",
    ),
}


def run_audit(*args, **over):
    env = subprocess_env(VAL_MAX_TOKENS=768, **over)
    return subprocess.run(
        [sys.executable, str(AUDIT), *args], env=env, capture_output=True, text=True, timeout=600, cwd=ROOT
    )


def audit_lines(out: str) -> dict[str, str]:
    lines = {}
    for ln in out.splitlines():
        key, _, rest = ln.partition(": ")
        if key in ("causality", "normalization", "coverage", "documents", "verdict"):
            lines[key] = rest
    return lines


@needs_sample
@pytest.mark.parametrize("mode", list(AUDIT_MODES))
def test_audit_verdicts(mode):
    over, code, name = AUDIT_MODES[mode]
    r = run_audit("--positions", "3", "--seed", "3", **over)
    assert r.returncode == code, r.stdout + r.stderr
    lines = audit_lines(r.stdout)
    documents = over.get("STACK") == "pr1855"  # document-masked attention: the isolation check runs too
    assert set(lines) == {"causality", "normalization", "coverage", "verdict"} | ({"documents"} if documents else set())
    if documents:
        assert lines["documents"].startswith("PASS 3 documents' last tokens perturbed on ")
        assert ", 0 rows of other documents moved" in lines["documents"]
        assert "the row after u moved in 3/3" in lines["documents"]
    assert lines["normalization"].startswith("PASS 768 rows of 1024")
    assert lines["coverage"].startswith("PASS 768/768 targets scored exactly once")
    assert "target u+1 moved in 3/3" in lines["causality"]
    assert "unperturbed rerun max |diff| 0.000e+00" in lines["causality"]
    if code:
        assert lines["causality"].startswith("FAIL") and "first leak" in lines["causality"]
        assert lines["verdict"].startswith(f"FAIL eval:{name} breaks causality")
    else:
        assert lines["causality"].startswith("PASS") and ", 0 changed," in lines["causality"]
        assert lines["verdict"].startswith(f"PASS eval:{name} ")


@needs_sample
def test_audit_reports_bad_settings_in_one_line():
    r = run_audit(EVAL_STRIDE=0)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == ["error: EVAL_STRIDE='0' must be > 0"]
    r = run_audit(SLOT_MODE="sideways")
    assert r.returncode == 2 and r.stderr.startswith("error: SLOT_MODE='sideways' must be one of causal, batch")


def load_audit_module():
    spec = importlib.util.spec_from_file_location("audit_causality", AUDIT)
    audit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(audit)
    return audit


@needs_sample
@pytest.mark.parametrize("leak", ["ttt_trains_before_scoring", "slot_fit_one_position_too_far"])
def test_audit_catches_a_planted_leak(base, monkeypatch, capsys, leak):
    """Leaks planted in the pipeline (the audit runs in this process) must fail the causality check:
    TTT training on the chunk about to be scored (condition 3), or a causal SLOT whose fit reaches the
    window's first scored position (it then sees one target it scores; only a perturbation exactly on a
    window edge can show it)."""
    audit = load_audit_module()
    for k, v in tiny_env(SLOT_ENABLED=int(leak.startswith("slot")), VAL_MAX_TOKENS=768, OUTPUT_DIR=base["out"]).items():
        monkeypatch.setenv(k, v)
    if leak == "ttt_trains_before_scoring":
        original_train = tg.ttt_train_chunk

        def peeking(model, run, val, c, n_chunks, opt, loss_fn, sgd):
            original_train(model, run, val, c + 1, n_chunks, opt, loss_fn, sgd)

        monkeypatch.setattr(tg, "ttt_train_chunk", peeking)
        name = "ttt"
    else:
        original_delta = tg.slot_delta

        def one_too_far(model, H, y, fit, s, shared):
            fit = fit | torch.cat((torch.zeros_like(fit[:, :1]), fit[:, :-1]), dim=1)
            return original_delta(model, H, y, fit, s, shared)

        monkeypatch.setattr(tg, "slot_delta", one_too_far)
        name = "ttt+slot_causal"
    assert audit.audit(["--positions", "3"]) == 1
    lines = audit_lines(capsys.readouterr().out)
    assert lines["causality"].startswith("FAIL") and lines["coverage"].startswith("PASS")
    assert lines["verdict"].startswith(f"FAIL eval:{name} breaks causality")


# ----------------------------------------------------------------------------- known problems of train_gpt.py


@needs_sample
def test_ttt_grad_clip_zero_means_no_clipping(base):
    changed = {}
    for clip in (1.0, 0.0):
        s, run, model = make_run(base, TTT_GRAD_CLIP=clip)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        opt = torch.optim.SGD(list(model.parameters()), lr=s.ttt_lr, momentum=s.ttt_momentum)
        tg.ttt_train_chunk(model, run, base["val"], 0, 2, opt, model, tg.seed_ttt_sgd(s))
        changed[clip] = max((v - before[k]).abs().max().item() for k, v in model.state_dict().items())
    assert changed[1.0] > 0
    assert changed[0.0] > 0, "TTT_GRAD_CLIP=0 froze the model"


@needs_sample
def test_slot_delta_leaves_the_model_gradients_alone(base):
    s, run, model = make_run(base)
    x = base["val"][: 2 * L].view(2, L)
    with torch.no_grad():
        H = model.forward_hidden(x)
    delta = tg.slot_delta(model, H, x, torch.ones_like(x, dtype=torch.bool), s, shared=False)
    assert delta.abs().max() > 0
    assert [n for n, p in model.named_parameters() if p.grad is not None] == []

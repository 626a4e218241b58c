"""Phased TTT (PR #1855's evaluation, train_gpt.evaluate_phased): score-first LoRA TTT per document with global SGD
phases. Each number is checked against an independent derivation: every scored distribution against a forward of
its own document window computed here, the batches and phases against the rules written out again, two gloo ranks
against one, and the causality audit (PASS on the real path, FAIL on a planted leak)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from test_eval import AUDIT, audit_lines, needs_sample, subprocess_env, tiny_env  # noqa: E402

import train_gpt as tg  # noqa: E402

# the record's model at a tiny width (11 layers looped to 17, lanes, gates, document masks), phased TTT in chunks of 8
# targets from windows of at most 32 tokens, batches of 2 documents, 2 phases over the first 4 documents
PHASED = dict(
    STACK="pr1855",
    VOCAB_SIZE=1024,
    NUM_LAYERS=11,
    MLP_MULT=4,
    XSA_LAST_N=11,
    BIGRAM_VOCAB_SIZE=0,
    TRAIN_SEQ_LEN=32,
    EVAL_SEQ_LEN=32,
    TTT_CHUNK_SIZE=8,
    TTT_EVAL_SEQ_LEN=32,
    TTT_BATCH_SIZE=2,
    TTT_LORA_RANK=4,
    TTT_LORA_LR=0.01,
    PHASED_TTT_PREFIX_DOCS=4,
    PHASED_TTT_NUM_PHASES=2,
    GLOBAL_TTT_CHUNK_TOKENS=64,
    GLOBAL_TTT_BATCH_SEQS=2,
    GLOBAL_TTT_LR=0.01,
    EMBED_BF16=0,  # fp32 on the CPU: the scores are compared with the model's own, recomputed
)
LENGTHS = [70, 9, 40, 3, 25, 57, 12]  # documents (BOS included): longer than a window, shorter than a chunk


def settings(tmp_path, **over):
    return tg.parse_settings(tiny_env(OUTPUT_DIR=tmp_path, **{**PHASED, **over}))


def synthetic_val(lengths=LENGTHS, seed=0):
    """Documents of these lengths, each a BOS then random non-BOS tokens, and one trailing token."""
    g = torch.Generator().manual_seed(seed)
    parts = [torch.cat((torch.tensor([tg.BOS_ID]), torch.randint(2, 1024, (n - 1,), generator=g))) for n in lengths]
    return torch.cat(parts + [torch.tensor([tg.BOS_ID])])


def setup(tmp_path, **over):
    s = settings(tmp_path, **over)
    run = tg.Run(s)
    run.log = lambda msg, console=True: None
    torch.manual_seed(0)
    model = tg.GPT(tg.ModelConfig.of(s), run.attn)
    with torch.no_grad():  # noise on every parameter: the zero-initialized projections and gates carry signal too
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.5 / p.shape[-1] ** 0.5 if p.dim() >= 2 else 0.05))
    model.looping = True
    luts = tg.build_sentencepiece_luts(tg.load_tokenizer(s), s.vocab_size, run.device)
    return s, run, model, luts


def captured(model, run, val, luts, monkeypatch, slot=False):
    rows = {}

    def hook(idx, logp):
        for i, r in zip(idx.tolist(), logp):
            assert i not in rows, f"target {i} scored twice"
            rows[i] = r.detach().clone()

    monkeypatch.setattr(tg, "SCORE_HOOK", hook)
    loss, bpb = tg.evaluate(model, run, val, luts, phased=True, slot=slot)
    monkeypatch.setattr(tg, "SCORE_HOOK", None)
    return rows, loss, bpb


def test_documents_and_batches_follow_the_record():
    val = synthetic_val()
    docs = tg.find_docs(val)
    starts = [sum(LENGTHS[:i]) for i in range(len(LENGTHS))]
    assert docs == [(a, n + 1) for a, n in zip(starts, LENGTHS)]  # each document's span ends at the next BOS
    targets = sorted(t for a, n in docs for t in range(a + 1, a + n))
    assert targets == list(range(1, val.numel()))  # every target once
    batches = tg.phased_batches(docs, 2)
    by_len = sorted(docs, key=lambda d: d[1])
    cut = [by_len[i : i + 2] for i in range(0, len(by_len), 2)]
    assert batches == sorted(cut, key=lambda b: -b[-1][1])
    assert [max(d[1] for d in b) for b in batches] == sorted((max(d[1] for d in b) for b in cut), reverse=True)


def test_untrained_scores_are_each_documents_own_windows(tmp_path, monkeypatch):
    """With both learning rates 0, every target's distribution is the model's on its own document's window:
    the last <= TTT_EVAL_SEQ_LEN tokens up to its chunk's end, computed here one window at a time."""
    s, run, model, luts = setup(tmp_path, TTT_LORA_LR=0, GLOBAL_TTT_LR=0)
    val = synthetic_val()
    rows, loss, _ = captured(model, run, val, luts, monkeypatch)
    assert sorted(rows) == list(range(1, val.numel()))
    C, Lt, nll = 8, 32, []
    with torch.no_grad():
        for a, n in tg.find_docs(val):
            for c in range(-(-(n - 1) // C)):
                end = min((c + 1) * C, n - 1)
                lo = max(end - Lt, 0)
                window = val[a + lo : a + end][None]
                logp = F.log_softmax(model.compute_logits(model.forward_hidden(window)), dim=-1)[0]
                for t in range(c * C, end):  # target a + 1 + t, predicted at window position t - lo
                    torch.testing.assert_close(rows[a + 1 + t], logp[t - lo], rtol=0, atol=2e-5)
                    nll.append(-logp[t - lo, val[a + 1 + t]].item())
    assert loss == pytest.approx(sum(nll) / len(nll), rel=1e-5)
    # another document's tokens move nothing: change every token of the longest one but its BOS
    far = val.clone()
    far[1:70] = (far[1:70] + 7) % 1022 + 2
    again, _, _ = captured(model, run, far, luts, monkeypatch)
    for t in range(71, val.numel()):
        torch.testing.assert_close(again[t], rows[t], rtol=0, atol=1e-6)


def test_causal_slot_fits_each_chunk_on_the_targets_scored_before_it(tmp_path, monkeypatch):
    """With the adapters and the global SGD frozen, SLOT inside phased TTT gives every chunk the distribution of its
    own window plus an offset that torch's AdamW fits here on the window's targets before the chunk (none for a
    document's first chunk: its scores are the plain ones)."""
    s, run, model, luts = setup(tmp_path, TTT_LORA_LR=0, GLOBAL_TTT_LR=0, SLOT_ENABLED=1, SLOT_LR=0.05, SLOT_STEPS=3)
    val = synthetic_val()
    rows, _, _ = captured(model, run, val, luts, monkeypatch, slot=True)
    plain, _, _ = captured(model, run, val, luts, monkeypatch)
    C, Lt, moved = 8, 32, 0.0
    for a, n in tg.find_docs(val):
        for c in range(-(-(n - 1) // C)):
            end = min((c + 1) * C, n - 1)
            lo = max(end - Lt, 0)
            window = val[a + lo : a + end]
            with torch.no_grad():
                H = model.forward_hidden(window[None])[0]
            delta = torch.zeros(1, H.size(1), requires_grad=True)
            fit = c * C - lo  # window positions 0 .. fit-1 predict targets scored before this chunk
            if fit:
                opt = torch.optim.AdamW([delta], lr=0.05, betas=(0.9, 0.999), eps=1e-5, weight_decay=1e-8)
                for _ in range(3):
                    opt.zero_grad()
                    F.cross_entropy(
                        model.compute_logits(H[:fit] + delta), val[a + lo + 1 : a + lo + 1 + fit]
                    ).backward()
                    opt.step()
            with torch.no_grad():
                logp = F.log_softmax(model.compute_logits(H + delta), dim=-1)
            for t in range(c * C, end):
                torch.testing.assert_close(rows[a + 1 + t], logp[t - lo], rtol=0, atol=5e-5)
                if c == 0:
                    torch.testing.assert_close(rows[a + 1 + t], plain[a + 1 + t], rtol=0, atol=0)
                moved = max(moved, (rows[a + 1 + t] - plain[a + 1 + t]).abs().max().item())
    assert moved > 1e-3  # the offsets changed the later chunks' scores


def test_adapters_start_at_b_zero_with_a_fresh_optimizer_and_learn_after_scoring(tmp_path):
    s, run, model, luts = setup(tmp_path)
    val = synthetic_val()
    batch = tg.phased_batches(tg.find_docs(val), 2)[0]  # the two longest documents: 9 and 8 chunks
    warm = tg.fresh_lane(model, run, 0, 0)
    start = {k: v.clone() for k, v in warm.items()}
    model.requires_grad_(False)  # as evaluate_phased runs it

    def scored(warm_a):
        seen = []
        tg.SCORE_HOOK = lambda idx, logp: seen.append((idx.clone(), logp.detach().clone()))
        try:
            stats = torch.zeros(3, dtype=torch.float64)
            tg.score_documents(model, run, val, luts, batch, warm_a, stats)
        finally:
            tg.SCORE_HOOK = None
        return seen, stats

    first, stats = scored(warm)
    assert any((warm[k] - start[k]).abs().max() > 0 for k in warm)  # A learned, kept warm for the lane's next batch
    # a second run from the same A: the same numbers (B zero and optimizer state fresh, nothing else carried)
    again, stats2 = scored({k: v.clone() for k, v in start.items()})
    assert torch.equal(stats, stats2)
    # from another A: chunk 0 is the same (B = 0: the adapters add nothing yet), later chunks are not
    other = {k: torch.rand_like(v) for k, v in start.items()}
    moved, _ = scored(other)
    torch.testing.assert_close(moved[0][1], first[0][1], rtol=0, atol=1e-6)
    assert max((m[1] - f[1]).abs().max().item() for m, f in zip(moved[1:], first[1:])) > 1e-4
    # without the adapters' learning, every chunk equals the untrained forward: the learning moved the scores
    s.ttt_lora_lr = 0.0
    frozen, _ = scored({k: v.clone() for k, v in start.items()})
    assert max((m[1] - f[1]).abs().max().item() for m, f in zip(frozen[1:], first[1:])) > 1e-4


def test_phases_train_on_documents_by_index_after_they_are_scored(tmp_path, monkeypatch):
    s, run, model, luts = setup(tmp_path)
    val = synthetic_val()
    events, original_sgd, original_score = [], tg.global_sgd, tg.score_documents

    def sgd(model_, run_, tokens, docs):
        events.append(("sgd", list(docs)))
        original_sgd(model_, run_, tokens, docs)

    def score(model_, run_, tokens, luts_, batch, warm, stats, slot=False, hints=None):
        events.append(("score", list(batch)))
        original_score(model_, run_, tokens, luts_, batch, warm, stats, slot, hints)

    monkeypatch.setattr(tg, "global_sgd", sgd)
    monkeypatch.setattr(tg, "score_documents", score)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tg.evaluate(model, run, val, luts, phased=True)
    # lengths with the next BOS 4 10 13 26 41 58 71: batches [71], [41, 58], [13, 26], [4, 10], longest first;
    # boundaries 4 * 1 / 2 = 2 and 4 documents: after the batch that scores document 2 (the second), then 4 (third)
    b = [[(0, 71)], [(79, 41), (147, 58)], [(204, 13), (122, 26)], [(119, 4), (70, 10)]]  # (start, length)
    order = [d for batch in b for d in batch]
    want = [("score", b[0]), ("score", b[1]), ("sgd", order[:2]), ("score", b[2]), ("sgd", order[:4]), ("score", b[3])]
    assert events == want
    assert any((v - before[k]).abs().max() > 0 for k, v in model.state_dict().items())  # the global SGD trained
    assert all(p.grad is None and p.requires_grad for p in model.parameters())  # and left the model as it found it


def test_a_prefix_longer_than_the_data_is_logged_and_takes_every_document(tmp_path, monkeypatch):
    s, run, model, luts = setup(tmp_path, PHASED_TTT_PREFIX_DOCS=10_000_000)
    logged, trained = [], []
    run.log = lambda msg, console=True: logged.append(msg)
    monkeypatch.setattr(tg, "global_sgd", lambda model_, run_, tokens, docs: trained.append(len(docs)))
    tg.evaluate(model, run, synthetic_val(), luts, phased=True)
    n = len(LENGTHS)
    want = f"PHASED_TTT_PREFIX_DOCS=10000000 is more than the {n} validation documents: every document is in the phases"
    assert any(want in line for line in logged), logged
    assert trained == [n // 2, n]  # two phases: the first half of the documents, then all of them


DRIVER = r"""
import json, sys
sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[1] + "/tests")
import torch
torch.set_num_threads(1)
import test_phased_ttt as t
import train_gpt as tg
from pathlib import Path
out = dict()
for global_lr in (0.0, 0.01):
    s, run, model, luts = t.setup(Path(sys.argv[2]).parent, GLOBAL_TTT_LR=global_lr)
    out[global_lr] = tg.evaluate(model, run, t.synthetic_val(t.LENGTHS * 2), luts, phased=True)
# the n-gram tilt, built on rank 0 and sent: a unigram context with no threshold hints every target after the first
s, run, model, luts = t.setup(
    Path(sys.argv[2]).parent, GLOBAL_TTT_LR=0.0, NGRAM_TILT_ENABLED=1, TOKEN_ORDER=1, TOKEN_THRESHOLD=0.0
)
tilt = tg.evaluate(model, run, t.synthetic_val(t.LENGTHS * 2), luts, phased=True)
if run.master:
    Path(sys.argv[2]).write_text(json.dumps(dict(adapters=out[0.0], both=out[0.01], tilt=tilt, world=run.world)))
tg.leave(0)  # as train_gpt.py's own exit: together, past the C++ teardown that can abort a finished rank
"""


@needs_sample
@pytest.mark.slow
def test_two_ranks_give_the_one_rank_score(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = subprocess_env(OUTPUT_DIR=tmp_path)
    results = {}
    for world, launcher in (
        (1, [sys.executable]),
        (2, [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]),
    ):
        r = subprocess.run(
            launcher + [str(driver), str(ROOT), str(tmp_path / f"w{world}.json")],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
        results[world] = json.loads((tmp_path / f"w{world}.json").read_text())
    one, two = results[1], results[2]
    assert (one["world"], two["world"]) == (1, 2)
    # the adapters alone: each document's rows are its own, whichever rank runs them (only the final sums differ)
    assert two["adapters"] == pytest.approx(one["adapters"], rel=1e-9)
    # with the global SGD: its gradients are summed over ranks in another order, and SGD steps carry that on
    assert two["both"] == pytest.approx(one["both"], rel=1e-5)
    assert abs(one["both"][0] - one["adapters"][0]) > 1e-3  # the global SGD mattered: a rank-dependent set would show
    assert two["tilt"] == pytest.approx(one["tilt"], rel=1e-9)  # every rank scores with rank 0's hints
    assert abs(one["tilt"][0] - one["adapters"][0]) > 1e-3


AUDIT_ENV = {
    **PHASED,
    "VAL_MAX_TOKENS": 512,
    "TTT_LORA_LR": 0.05,
    "PHASED_TTT_PREFIX_DOCS": 1,
    "PHASED_TTT_NUM_PHASES": 1,
    "TTT_BATCH_SIZE": 1,
    "GLOBAL_TTT_CHUNK_TOKENS": 128,
}


@needs_sample
@pytest.mark.parametrize("slot", [0, 1])
def test_audit_passes_phased_ttt(slot):
    r = subprocess.run(
        [sys.executable, str(AUDIT), "--positions", "3", "--seed", "3"],
        env=subprocess_env(**AUDIT_ENV, SLOT_ENABLED=slot, SLOT_LR=0.05),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    lines = audit_lines(r.stdout)
    assert lines["coverage"].startswith("PASS 512/512 targets scored exactly once")
    assert lines["causality"].startswith("PASS") and ", 0 changed," in lines["causality"]
    assert "unperturbed rerun max |diff| 0.000e+00" in lines["causality"]
    assert lines["verdict"].startswith("PASS eval:phased_ttt" + "+slot_causal " * slot + " " * (1 - slot))


@needs_sample
def test_audit_fails_an_adapter_step_before_scoring(monkeypatch, capsys, tmp_path):
    """The leak planted: each batch runs once unscored first, so its adapters' A has learned every chunk of its
    documents before they are scored."""
    spec = importlib.util.spec_from_file_location("audit_causality", AUDIT)
    audit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(audit)
    for k, v in tiny_env(OUTPUT_DIR=tmp_path, **AUDIT_ENV).items():
        monkeypatch.setenv(k, v)
    original = tg.score_documents

    def peeking(model, run, tokens, luts, batch, warm, stats, slot=False, hints=None):
        hook, tg.SCORE_HOOK = tg.SCORE_HOOK, None
        original(model, run, tokens, luts, batch, warm, torch.zeros_like(stats), slot, hints)
        tg.SCORE_HOOK = hook
        original(model, run, tokens, luts, batch, warm, stats, slot, hints)

    monkeypatch.setattr(tg, "score_documents", peeking)
    assert audit.audit(["--positions", "2", "--seed", "3"]) == 1
    lines = audit_lines(capsys.readouterr().out)
    assert lines["causality"].startswith("FAIL") and lines["coverage"].startswith("PASS")
    assert lines["verdict"].startswith("FAIL eval:phased_ttt breaks causality")


def test_a_batch_larger_than_the_data_is_logged_and_sized_to_it(tmp_path, monkeypatch):
    s, run, model, luts = setup(tmp_path, TTT_BATCH_SIZE=1000)
    logged, rows, real = [], [], tg.fresh_lane
    run.log = lambda msg, console=True: logged.append(msg)

    def lane(model_, run_, lane, phase, rows_=None):
        out = real(model_, run_, lane, phase, rows_)
        rows.append({a.size(0) for a in out.values()})
        return out

    monkeypatch.setattr(tg, "fresh_lane", lane)
    tg.evaluate(model, run, synthetic_val(), luts, phased=True)
    n = len(LENGTHS)
    want = f"TTT_BATCH_SIZE=1000 is more than the {n} validation documents: one batch of {n}"
    assert any(want in line for line in logged), logged
    assert rows and all(r == {n} for r in rows)  # the adapters hold the documents there are, not 1,000 rows

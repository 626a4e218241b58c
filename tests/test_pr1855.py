"""STACK=pr1855: PR #1855's model, optimizer, schedule and document-masked attention, each against an independent
computation, and STACK=seed unchanged (the digits of a stored run of the code before the stack existed)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT

import train_gpt as tg

# The record's logged run values (MODERN_STACK.md 0.3 and 10), typed from the document, not from train_gpt.py.
RECORD = dict(
    VOCAB_SIZE=8192,
    NUM_LAYERS=11,
    MODEL_DIM=512,
    NUM_HEADS=8,
    NUM_KV_HEADS=4,
    MLP_MULT=4.0,
    XSA_LAST_N=11,
    QK_GAIN_INIT=5.0,
    ROPE_DIMS=16,
    ROPE_BASE=10000.0,
    ROPE_TRAIN_SEQ_LEN=0,
    LN_SCALE=1,
    LOGIT_SOFTCAP=30.0,
    TIED_EMBED_INIT_STD=0.005,
    BIGRAM_VOCAB_SIZE=0,
    VE_ENABLED=0,
    NUM_LOOPS=2,
    LOOP_START=3,
    LOOP_END=5,
    ENABLE_LOOPING_AT=0.35,
    PARALLEL_START_LAYER=8,
    SMEAR_GATE_ENABLED=1,
    SMEAR_FIXED_ENABLED=0,
    GATE_WINDOW=12,
    SPARSE_ATTN_GATE_ENABLED=1,
    SPARSE_ATTN_GATE_SCALE=0.5,
    SKIP_GATES_ENABLED=1,
    DOC_MASKED_ATTN=1,
    TRAIN_BATCH_TOKENS=786432,
    TRAIN_SEQ_LEN=2048,
    EVAL_SEQ_LEN=2048,
    EVAL_STRIDE=2048,
    WARMUP_STEPS=20,
    ITERATIONS=20000,
    MAX_WALLCLOCK_SECONDS=600.0,
    VAL_LOSS_EVERY=0,
    WARMDOWN_FRAC=0.85,
    MIN_LR=0.1,
    MATRIX_LR=0.026,
    TIED_EMBED_LR=0.03,
    SCALAR_LR=0.02,
    MUON_MOMENTUM=0.97,
    MUON_MOMENTUM_WARMUP_START=0.92,
    MUON_MOMENTUM_WARMUP_STEPS=1500,
    MUON_BACKEND_STEPS=5,
    MUON_ROW_NORMALIZE=1,
    MUON_POLAR_EXPRESS=1,
    MUON_WD=0.095,
    EMBED_WD=0.085,
    ADAM_WD=0.02,
    BETA1=0.9,
    BETA2=0.99,
    ADAM_EPS=1e-8,
    GRAD_CLIP_NORM=0.3,
    EMA_ENABLED=1,
    EMA_DECAY=0.9965,
    SWA_ENABLED=0,
    LATE_QAT=0,
    EMBED_BITS=7,
    MATRIX_BITS=6,
    GPTQ_CALIB="train",
    GPTQ_RESERVE_SECONDS=0.5,
    GPTQ_CALIBRATION_BATCHES=16,  # of 48 x 2,048 tokens at its shape
    GPTQ_DAMP=0.01,
    # its phased TTT (MODERN_STACK.md 8 and the reproduce command)
    PHASED_TTT_ENABLED=1,
    PHASED_TTT_PREFIX_DOCS=2500,
    PHASED_TTT_NUM_PHASES=3,
    TTT_CHUNK_SIZE=48,
    TTT_EVAL_SEQ_LEN=2048,
    TTT_BATCH_SIZE=64,
    TTT_LORA_RANK=80,
    TTT_LORA_ALPHA=144.0,
    TTT_LORA_LR=1e-4,
    TTT_BETA1=0.0,
    TTT_BETA2=0.99,
    TTT_WEIGHT_DECAY=0.5,
    GLOBAL_TTT_LR=1e-3,
    GLOBAL_TTT_MOMENTUM=0.9,
    GLOBAL_TTT_EPOCHS=1,
    GLOBAL_TTT_CHUNK_TOKENS=32768,
    GLOBAL_TTT_GRAD_CLIP=1.0,
    TTT_ENABLED=0,
    SLOT_ENABLED=0,
)

# 11 layers as the record, at a width a CPU trains in a fraction of a second per step.
TINY_PR = dict(
    STACK="pr1855",
    NUM_LAYERS=11,
    VOCAB_SIZE=1024,
    MODEL_DIM=64,
    NUM_HEADS=4,
    NUM_KV_HEADS=2,
    XSA_LAST_N=11,
    MLP_MULT=4,
    BIGRAM_VOCAB_SIZE=0,
    TRAIN_SEQ_LEN=32,
    EVAL_SEQ_LEN=32,
    EMBED_BF16=0,  # the forward pass in fp32 on the CPU: these tests compare it with exact references
)


def pr_settings(tiny_settings, **over):
    return tiny_settings(**{**TINY_PR, **over})


def noised(model, seed=0):
    """Noise on every parameter (the zero-initialized projections and gates too), so every path carries signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.5 / p.shape[-1] ** 0.5 if p.dim() >= 2 else 0.3))
    return model


def test_stack_pr1855_resolves_to_the_record_values():
    s = tg.parse_settings({"STACK": "pr1855"}).by_env_name()
    assert {k: s[k] for k in RECORD} == RECORD
    # An explicit variable still wins; the stack's name-following values follow the explicit one.
    s = tg.parse_settings({"STACK": "pr1855", "EVAL_SEQ_LEN": "1024", "MATRIX_LR": "0.03"})
    assert (s.eval_stride, s.matrix_lr) == (1024, 0.03)


def test_stack_seed_keeps_every_default_and_the_seed_meaning_of_adam_wd():
    seed = tg.parse_settings({}).by_env_name()
    defaults = tg.Settings().by_env_name()
    assert {k: v for k, v in seed.items() if k not in ("RUN_ID", "EMBED_WD")} == {
        k: v for k, v in defaults.items() if k not in ("RUN_ID", "EMBED_WD")
    }
    assert seed["VE_LAYERS"] == [9, 10]
    # The seed's ADAM_WD decays every AdamW parameter, so the embeddings' decay follows it unless EMBED_WD is set.
    assert tg.parse_settings({"ADAM_WD": "0.1"}).embed_wd == 0.1
    assert tg.parse_settings({"ADAM_WD": "0.1", "EMBED_WD": "0.2"}).embed_wd == 0.2


@pytest.mark.parametrize(
    "env, words",
    [
        (dict(STACK="pr1856"), ["STACK", "seed, pr1855"]),
        (dict(STACK="pr1855", SMEAR_FIXED_ENABLED="1"), ["SMEAR_GATE_ENABLED=1", "SMEAR_FIXED_ENABLED=1"]),
        (dict(NUM_LOOPS="1", LOOP_START="4", LOOP_END="2"), ["LOOP_START=4", "LOOP_END=2"]),
        (dict(PARALLEL_START_LAYER="11"), ["PARALLEL_START_LAYER=11"]),
        (dict(MUON_POLAR_EXPRESS="1", MUON_BACKEND_STEPS="6"), ["MUON_BACKEND_STEPS", "5"]),
        (dict(STACK="pr1855", WARMDOWN_ITERS="100"), ["WARMDOWN_FRAC", "WARMDOWN_ITERS"]),
        (dict(TTT_CHUNK_SIZE="64", TTT_EVAL_SEQ_LEN="32"), ["TTT_CHUNK_SIZE=64", "TTT_EVAL_SEQ_LEN=32"]),
        (dict(PHASED_TTT_ENABLED="1", SLOT_MODE="batch"), ["SLOT_MODE=batch", "phased TTT", "causal"]),
    ],
)
def test_contradictory_stack_settings_are_one_error(env, words):
    with pytest.raises(tg.Fail) as e:
        tg.parse_settings(env)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_virtual_layers_are_the_logged_ones():
    s = tg.parse_settings({"STACK": "pr1855"})
    assert tg.layer_schedule(tg.ModelConfig.of(s), looped=True) == (
        [0, 1, 2, 3, 4, 5, 3, 4],
        [5, 3, 4, 5, 6, 7, 8, 9, 10],
    )
    assert tg.layer_schedule(tg.ModelConfig.of(s), looped=False) == ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10])
    assert (
        tg.GPT(
            tg.ModelConfig.of(
                tg.parse_settings(
                    {
                        "STACK": "pr1855",
                        "MODEL_DIM": "32",
                        "NUM_HEADS": "2",
                        "NUM_KV_HEADS": "1",
                        "VOCAB_SIZE": "32",
                        "TTT_LORA_RANK": "8",
                    }
                )
            )
        ).skip_weights.shape[0]
        == 8
    )  # 8 skip pairs looped, 5 not


def test_init_zero_projections_and_gate_values(tiny_settings):
    s = pr_settings(tiny_settings)
    torch.manual_seed(0)
    model = tg.GPT(tg.ModelConfig.of(s))
    L = s.num_layers
    assert model.qo_bank[L:].abs().max() == 0 and model.mlp_down_bank.abs().max() == 0
    assert model.skip_weights.shape == (8, 64) and (model.skip_gates == 0).all()
    # 1.1 as the record holds it after model.bfloat16() (INIT_DRAW_ORDER=pr1855 rounds the init to bf16)
    assert (model.parallel_resid_lambdas == 1.1015625).all() and (model.parallel_post_lambdas == 1).all()
    assert all((b.attn_gate_w == 0).all() and b.attn_gate_w.shape == (4, 12) for b in model.blocks)
    assert (model.blocks[0].q_gain == 5.0).all() and not hasattr(model, "bigram_emb") and not model.ve_layers
    # The smear gate is the identity at init: the embedding is plain RMSNorm of the token embedding.
    idx = torch.randint(0, 1024, (2, 16))
    assert torch.equal(model.embed(idx, torch.float32), F.rms_norm(model.tok_emb.weight[idx], (64,)))
    # The sparse gate is sigmoid(0) = 1/2 at init: attention output is half that of the same layer without it.
    x = torch.randn(2, 16, 64)
    with torch.no_grad():
        model.qo_bank[L + 3].normal_()
        ungated = tg.GPT(tg.ModelConfig.of(pr_settings(tiny_settings, SPARSE_ATTN_GATE_ENABLED=0)))
        ungated.load_state_dict({k: v for k, v in model.state_dict().items() if "attn_gate_w" not in k})
        torch.testing.assert_close(model.attn(3, x, None, torch.float32), 0.5 * ungated.attn(3, x, None, torch.float32))
    # Skip gates at init: an even blend of the stream and the weighted skip.
    a, b = torch.randn(2, 16, 64), torch.randn(2, 16, 64)
    torch.testing.assert_close(model.merge_skip(0, a, b, torch.float32), 0.5 * a + 0.5 * b)


def test_gates_compute_the_record_formulas(tiny_settings):
    s = pr_settings(tiny_settings)
    model = noised(tg.GPT(tg.ModelConfig.of(s)))
    w, lam = model.smear_w.detach(), model.smear_lambda.detach()
    idx = torch.randint(2, 1024, (1, 10))
    idx[0, 4] = tg.BOS_ID
    e = model.tok_emb.weight.detach()[idx[0]]
    want = e.clone()
    for t in range(1, 10):  # e_t + lambda * sigmoid(w . e_t[:12]) * e_{t-1}, not at a BOS
        if idx[0, t] != tg.BOS_ID:
            want[t] = e[t] + lam * torch.sigmoid(e[t, :12] @ w) * e[t - 1]
    torch.testing.assert_close(model.embed(idx, torch.float32)[0], F.rms_norm(want, (64,)))
    # Skip gate: sigmoid(g) * x + (1 - sigmoid(g)) * (w * skip)
    a, b = torch.randn(1, 3, 64), torch.randn(1, 3, 64)
    g, sw = torch.sigmoid(model.skip_gates[2].detach()), model.skip_weights[2].detach()
    torch.testing.assert_close(model.merge_skip(2, a, b, torch.float32), g * a + (1 - g) * sw * b)
    # Parallel block: lane_j <- r_j * lane_j + P[0, j] * A + P[1, j] * M
    # with A from lane 0 (mixed with x0), M from lane 1
    lanes, x0 = [torch.randn(1, 3, 64), torch.randn(1, 3, 64)], torch.randn(1, 3, 64)
    blk, ln = model.blocks[9], 1 / math.sqrt(10)
    with torch.no_grad():
        mix = blk.resid_mix
        A = blk.attn_scale * model.attn(9, F.rms_norm(mix[0] * lanes[0] + mix[1] * x0, (64,)) * ln, None, torch.float32)
        M = blk.mlp_scale * model.mlp(9, F.rms_norm(lanes[1], (64,)) * ln, torch.float32)
        r, P = model.parallel_resid_lambdas[9], model.parallel_post_lambdas[9]
        got = model.parallel_block(
            9,
            lanes,
            x0,
            torch.float32,
            lambda h: model.attn(9, h, None, torch.float32),
            lambda h: model.mlp(9, h, torch.float32),
        )
        for j in (0, 1):
            torch.testing.assert_close(got[j], r[j] * lanes[j] + P[0, j] * A + P[1, j] * M)


def test_doc_segments_match_a_loop():
    idx = torch.randint(2, 50, (3, 40))
    idx[0, [0, 7, 8, 30]] = tg.BOS_ID
    idx[1, 20] = tg.BOS_ID
    got = tg.doc_segments(idx, max_len=6)
    for b in range(3):
        seg, doc_start, want = 0, 0, []
        for t in range(40):
            if idx[b, t] == tg.BOS_ID:
                doc_start = t
            if t == 0 or idx[b, t] == tg.BOS_ID or (t - doc_start) % 6 == 0:
                seg += 1
            want.append(seg)
        assert got[b].tolist() == want


@pytest.mark.filterwarnings("ignore:.*flex_attention.*:UserWarning")  # eager flex on the CPU: unfused, still exact
def test_document_masked_attention_backends_agree():
    torch.manual_seed(0)
    B, T, H, Hkv, D = 2, 40, 4, 2, 8
    q, k, v = torch.randn(B, T, H, D), torch.randn(B, T, Hkv, D), torch.randn(B, T, Hkv, D)
    idx = torch.randint(2, 50, (B, T))
    idx[0, [5, 17]] = tg.BOS_ID
    seg = tg.doc_segments(idx, 16)
    want = torch.zeros(B, T, H, D)
    for b in range(B):  # each segment alone through plain causal attention
        for sid in seg[b].unique():
            pos = (seg[b] == sid).nonzero().flatten()
            want[b, pos] = tg.sdpa(q[b : b + 1, pos], k[b : b + 1, pos], v[b : b + 1, pos])[0]
    torch.testing.assert_close(tg.sdpa(q, k, v, seg), want)
    torch.testing.assert_close(tg.flex_attention_fn()(q, k, v, seg), want, atol=1e-5, rtol=1e-5)

    def fake_varlen(qf, kf, vf, cu_q, cu_k, max_q, max_k, causal):  # FlashAttention's contract, in plain torch
        assert causal and torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32 and cu_q.numel() == B * T + 1
        out = torch.zeros_like(qf)
        for a, e in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
            if e > a:
                out[a:e] = tg.sdpa(qf[None, a:e], kf[None, a:e], vf[None, a:e])[0]
        return out

    torch.testing.assert_close(tg.varlen_attention_fn(fake_varlen)(q, k, v, seg), want)


def test_a_token_moves_no_logit_of_another_document(tiny_settings):
    torch.manual_seed(0)
    model = noised(tg.GPT(tg.ModelConfig.of(pr_settings(tiny_settings))))
    model.looping = True
    idx = torch.randint(2, 1024, (2, 64))
    idx[:, [0, 20, 45]] = tg.BOS_ID  # documents [0, 20), [20, 45), [45, 64) in each row
    changed = idx.clone()
    changed[:, 19] = (idx[:, 19] + 1) % 1024  # the last token of the first document, right before a BOS
    changed[:, 30] = (idx[:, 30] + 1) % 1024  # a token inside the second
    for rows in ((2, 64), (1, 128)):  # evaluation windows, and one packed training row
        a = model.compute_logits(model.forward_hidden(idx.reshape(rows)))
        b = model.compute_logits(model.forward_hidden(changed.reshape(rows)))
        a, b = a.reshape(2, 64, -1), b.reshape(2, 64, -1)
        torch.testing.assert_close(a[:, :19], b[:, :19], atol=0, rtol=0)  # before the change: causal
        torch.testing.assert_close(a[:, 45:], b[:, 45:], atol=1e-6, rtol=0)  # the third document: untouched
        torch.testing.assert_close(a[:, 20:30], b[:, 20:30], atol=1e-6, rtol=0)  # the second, up to its change:
        # its BOS does not smear in the first document's last token
        assert (a[:, 30:45] - b[:, 30:45]).abs().max() > 1e-3  # the change does reach its own document


def test_smear_gate_ignores_the_previous_document_at_a_bos(tiny_settings):
    model = noised(tg.GPT(tg.ModelConfig.of(pr_settings(tiny_settings))))
    idx = torch.randint(2, 1024, (1, 8))
    idx[0, 4] = tg.BOS_ID
    other = idx.clone()
    other[0, 3] += 1
    a, b = model.embed(idx, torch.float32), model.embed(other, torch.float32)
    assert (a[0, 3] - b[0, 3]).abs().max() > 0 and torch.equal(a[0, 4:], b[0, 4:])
    other[0, 4] = 7  # the same change without the BOS reaches the next position
    c, d = model.embed(other, torch.float32), model.embed(torch.where(torch.arange(8) == 3, idx, other), torch.float32)
    assert (c[0, 4] - d[0, 4]).abs().max() > 1e-4


def polar_scalar(sigma, steps):
    """The singular values Polar-Express NS should produce: the scalar polynomials applied to each."""
    for a, b, c in tg.POLAR_EXPRESS[:steps]:
        sigma = a * sigma + b * sigma**3 + c * sigma**5
    return sigma


def test_polar_express_maps_singular_values_into_its_band():
    torch.manual_seed(0)
    G = torch.randn(3, 48, 96, dtype=torch.float64)
    X = tg.zeropower_via_newtonschulz5(G.float(), 5, polar_express=True).double()
    for g, x in zip(G, X):
        sigma = torch.linalg.svdvals(g / g.norm())
        want = polar_scalar(sigma, 5).sort(descending=True).values  # the polynomials are not monotone: compare sorted
        torch.testing.assert_close(torch.linalg.svdvals(x), want, atol=2e-4, rtol=2e-4)
    # the band its coefficients promise: every sigma in [1e-3, 1] of the normalized input ends within it
    grid = polar_scalar(torch.logspace(-3, 0, 2000, dtype=torch.float64), 5)
    lo, hi = grid.min().item(), grid.max().item()
    assert 0.5 < lo < 1 < hi < 1.5
    sv = torch.linalg.svdvals(X)
    assert sv.min() > lo - 1e-3 and sv.max() < hi + 1e-3
    # the seed's fixed quintic spreads them wider after 5 steps
    seed = torch.linalg.svdvals(tg.zeropower_via_newtonschulz5(G.float(), 5).double())
    assert (seed.max() - seed.min()) > (sv.max() - sv.min())


def test_muon_row_normalization_and_step_scale(monkeypatch):
    seen = []
    monkeypatch.setattr(tg, "zeropower_via_newtonschulz5", lambda u, steps, pe: seen.append(u.clone()) or u)
    p = torch.nn.Parameter(torch.zeros(2, 8, 4))
    g = torch.randn(2, 8, 4)
    p.grad = g.clone()
    opt = tg.ParallelMuon([p], lr=0.1, momentum=0.5, backend_steps=5, weight_decay=0.0, row_normalize=True)
    opt.launch_reduce_scatter()
    opt.step(opt.wait_shards())
    u = g + 0.5 * g  # Nesterov on a fresh buffer: g + mu * (mu * 0 + g)
    want = u / u.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(seen[0], want)
    torch.testing.assert_close(p.detach(), -0.1 * math.sqrt(8 / 4) * want)


def test_schedule_at_the_side_by_side_shape_is_the_records():
    """Issue #25's side-by-side of PR #1855's code: 150 steps on the step fraction, looping on at step 53 (its log),
    LR multiplier max(min((1 - f) / 0.85, 1), 0.1), momentum 0.92 -> 0.97 over 50 steps; and at the record's own
    shape its logged effective cap of 599,500 ms (0.5 s reserved for calibration) and loop switch at frac 0.350."""
    s = tg.parse_settings(
        dict(STACK="pr1855", ITERATIONS="150", MAX_WALLCLOCK_SECONDS="0", MUON_MOMENTUM_WARMUP_STEPS="50")
    )
    loop_on = next(step for step in range(150) if tg.training_fraction(s, step, 0.0) >= s.enable_looping_at)
    assert loop_on == 53
    typed = {0: 1.0, 22: 1.0, 23: 0.99608, 75: 0.58824, 127: 0.18039, 137: 0.10196, 140: 0.1, 149: 0.1}
    for step, want in typed.items():
        assert tg.lr_multiplier(s, step, 0.0) == pytest.approx(want, abs=5e-6), step
    for step, want in {0: 0.92, 10: 0.93, 25: 0.945, 50: 0.97, 149: 0.97}.items():
        assert tg.muon_momentum(s, step) == pytest.approx(want, abs=1e-12), step
    record = tg.parse_settings({"STACK": "pr1855"})
    assert tg.train_cap_ms(record) == 599_500
    assert tg.training_fraction(record, 2178, 0.350 * 599_500) == pytest.approx(0.350)


def test_muon_bf16_is_the_records_update_in_bf16():
    """MUON_BF16 (PR #1855's Muon): the gradient, momentum buffer, Nesterov update, row normalization (its norm in
    fp32) and Polar-Express Newton-Schulz all in bf16, the weights moved in fp32; written out here as the record's
    step does it. A 32 x 8 bank: its step scale sqrt(32 / 8) = 2 is exact in bf16."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(2, 32, 8) * 0.1)
    start, g = p.detach().clone(), torch.randn(2, 32, 8)
    p.grad = g.clone()
    opt = tg.ParallelMuon(
        [p], lr=0.1, momentum=0.5, backend_steps=5, weight_decay=0.1, row_normalize=True, polar_express=True, bf16=True
    )
    opt.launch_reduce_scatter()
    opt.step(opt.wait_shards())
    assert opt.state[p]["momentum_buffer"].dtype == torch.bfloat16 and p.dtype == torch.float32
    gb = g.bfloat16()
    buf = torch.zeros_like(gb).mul_(0.5).add_(gb)
    u = gb.add(buf, alpha=0.5)
    u = u / u.float().norm(dim=-1, keepdim=True).clamp_min(1e-7).to(u.dtype)
    X = u.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for a, b, c in tg.POLAR_EXPRESS:
        A = X @ X.mT
        X = a * X + (b * A + c * (A @ A)) @ X
    want = (start * (1 - 0.1 * 0.1)).add(X.mT, alpha=-0.1 * 2.0)
    torch.testing.assert_close(p.detach(), want, rtol=0, atol=1e-7)
    # and the fp32 update (MUON_BF16=0) is another one
    q = torch.nn.Parameter(start.clone())
    q.grad = g.clone()
    fp32 = tg.ParallelMuon(
        [q], lr=0.1, momentum=0.5, backend_steps=5, weight_decay=0.1, row_normalize=True, polar_express=True
    )
    fp32.launch_reduce_scatter()
    fp32.step(fp32.wait_shards())
    assert fp32.state[q]["momentum_buffer"].dtype == torch.float32 and not torch.equal(q.detach(), p.detach())


def test_embed_bf16_trains_the_tied_embedding_in_bf16(tiny_settings, tmp_path):
    """EMBED_BF16 (PR #1855's model.bfloat16() + restore_fp32_params): the tied embedding alone is bf16, so is its
    AdamW state, and on the CPU the forward pass runs in its dtype, as the record's code does there."""
    s = pr_settings(tiny_settings, EMBED_BF16=1, OUTPUT_DIR=str(tmp_path), DEVICE="cpu")
    run = tg.Run(s)
    model = tg.build_model(run)
    assert {n for n, p in model.named_parameters() if p.dtype != torch.float32} == {"tok_emb.weight"}
    assert model.tok_emb.weight.dtype == torch.bfloat16
    optimizers = tg.build_optimizers(model, s)
    idx = torch.randint(2, 1024, (1, 33), generator=torch.Generator().manual_seed(0))
    tg.train_step(run, model, optimizers, lambda n, row: (idx[:, :-1], idx[:, 1:]), 0, 1.0)
    adam = optimizers[1]
    assert {v.dtype for v in adam.state[model.tok_emb.weight].values() if v.dim()} == {torch.bfloat16}
    assert model.forward_hidden(idx).dtype == torch.bfloat16


def test_calibration_on_training_tokens_counts_batches_of_the_training_batch():
    """GPTQ_CALIB=train reads GPTQ_CALIBRATION_BATCHES micro-batches: the record's 16 x 48 x 2,048 tokens at its
    shape, and as many batches (not tokens) at a small one."""
    assert tg.calibration_shape(tg.parse_settings({"STACK": "pr1855"})) == (16 * 48, 2048)
    small = tg.parse_settings(dict(STACK="pr1855", TRAIN_BATCH_TOKENS="8192", TRAIN_SEQ_LEN="256"))
    assert tg.calibration_shape(small) == (16 * 1024 // 256, 256)
    assert tg.calibration_shape(tg.parse_settings({})) == (64, 2048)  # the seed's self-generated text


def test_weight_decay_per_group(tiny_settings):
    def decays(**over):
        s = tiny_settings(**over)
        model = tg.GPT(tg.ModelConfig.of(s))
        muon, adam, _ = tg.build_optimizers(model, s)
        emb, sc = adam.param_groups
        assert emb["params"][0] is model.tok_emb.weight
        return emb["weight_decay"], sc["weight_decay"], muon.param_groups[0]["weight_decay"]

    assert decays() == (0.04, 0.04, 0.04)
    assert decays(ADAM_WD=0.1) == (0.1, 0.1, 0.04)
    assert decays(**TINY_PR) == (0.085, 0.02, 0.095)


@pytest.mark.parametrize("frac", [0.0, 0.1, 0.15, 0.5, 0.9, 0.915, 0.95, 1.0, 1.2])
def test_warmdown_frac_and_min_lr(tiny_settings, frac):
    s = tiny_settings(WARMDOWN_FRAC=0.85, MIN_LR=0.1, ITERATIONS=1000, WARMDOWN_ITERS=0)
    want = 1.0 if frac < 0.15 else max((1 - frac) / 0.85, 0.1)  # MODERN_STACK 5.2
    assert tg.lr_multiplier(s, round(frac * 1000), 0.0) == pytest.approx(want)
    s = tiny_settings(WARMDOWN_FRAC=0.85, MIN_LR=0.1, MAX_WALLCLOCK_SECONDS=100, WARMDOWN_ITERS=0)
    assert tg.lr_multiplier(s, 7, frac * 100_000) == pytest.approx(want)  # of the wallclock, not the step


def test_seed_stack_digits_are_unchanged(tmp_path, script_env, run_script):
    ref = json.loads((ROOT / "tests" / "reference" / "seed_tiny.json").read_text())
    env = {
        k: v
        for k, v in script_env(tmp_path).items()
        if k not in tg.SETTING_NAMES or k in ("DATA_PATH", "TOKENIZER_PATH", "OUTPUT_DIR", "RUN_ID")
    }
    proc = run_script({**env, **ref["settings"]}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    keep = re.compile(
        r"(step:\d+/\d+ train_loss:|final_float_exact|final_int6_roundtrip_exact|legal_ttt_exact|"
        r"final_score_exact)"
    )
    got = [re.sub(r" train_time:.*", "", ln) for ln in proc.stdout.splitlines() if keep.match(ln)]
    # the same lines and numbers; the numbers up to 1e-6 relative: CPUs with other vector units (AVX2, AVX-512, AMX)
    # take other kernels and move the 8th digit (seen: 6.91655270 vs 6.91655271), a numerics change moves far more
    number = re.compile(r"-?\d+\.\d+")
    assert [number.sub("#", ln) for ln in got] == [number.sub("#", ln) for ln in ref["lines"]]
    for mine, theirs in zip(got, ref["lines"]):
        assert [float(v) for v in number.findall(mine)] == pytest.approx(
            [float(v) for v in number.findall(theirs)], rel=1e-6
        ), (mine, theirs)


@pytest.mark.slow
def test_pr1855_two_gloo_ranks_equal_one(tmp_path, script_env):
    from test_training import DRIVER

    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    # GRAD_CLIP_LOCAL=0: the record clips each rank's gradient before averaging (its value under STACK=pr1855), which
    # by design depends on the number of ranks; the global clip does not. MUON_BF16=0: rounding the two ranks' summed
    # gradient shard to bf16 can land one bf16 step away from rounding the one rank's, then Newton-Schulz amplifies it.
    kw = dict(
        TINY_PR,
        ITERATIONS=4,
        TRAIN_BATCH_TOKENS=1024,
        EMA_DECAY=0.9,
        ENABLE_LOOPING_AT=0.5,
        VAL_MAX_TOKENS=512,
        GRAD_CLIP_LOCAL=0,
        MUON_BF16=0,
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
    assert all(torch.equal(two["state"][k], results[2][1]["state"][k]) for k in two["state"])
    moved = max((one["state"][k] - one["initial"][k]).abs().max().item() for k in one["state"])
    assert moved > 1e-2
    for k in one["state"]:
        a, b = one["state"][k], two["state"][k]
        assert (a - b).abs().max().item() <= 1e-5 * max(1.0, a.abs().max().item()), k


def test_init_draw_order_pr1855_draws_as_the_records_constructor(tiny_settings):
    """INIT_DRAW_ORDER=pr1855, written out from PR #1855's GPT.__init__ and _init_weights: the Embedding's constructor
    draw, its smear gate's Linear(GATE_WINDOW, 1) constructor draw (then zeroed), the tied embedding's normal, every
    layer's Q, K, V orthogonal, then every layer's MLP-up, and every parameter rounded to bf16."""
    s = pr_settings(tiny_settings)
    assert s.init_draw_order == "pr1855"
    torch.manual_seed(7)
    model = tg.GPT(tg.ModelConfig.of(s))
    torch.manual_seed(7)
    L, V, d = s.num_layers, s.vocab_size, s.model_dim
    torch.empty(V, d).normal_()
    torch.nn.init.kaiming_uniform_(torch.empty(1, s.gate_window), a=math.sqrt(5))
    emb = torch.nn.init.normal_(torch.empty(V, d), std=s.tied_embed_init_std)
    kv_dim, hidden = s.num_kv_heads * d // s.num_heads, int(s.mlp_mult * d)
    q, k, v = [], [], []
    for _ in range(L):
        q.append(torch.nn.init.orthogonal_(torch.empty(d, d)))
        k.append(torch.nn.init.orthogonal_(torch.empty(kv_dim, d)))
        v.append(torch.nn.init.orthogonal_(torch.empty(kv_dim, d)))
    up = [torch.nn.init.orthogonal_(torch.empty(hidden, d)) for _ in range(L)]
    bf16 = lambda t: t.bfloat16().float()  # noqa: E731
    assert torch.equal(model.tok_emb.weight, bf16(emb))
    assert torch.equal(model.qo_bank[:L], bf16(torch.stack(q))) and torch.equal(
        model.mlp_up_bank, bf16(torch.stack(up))
    )
    assert torch.equal(model.kv_bank, bf16(torch.stack(k + v)))
    assert model.parallel_resid_lambdas[0, 0].item() == 1.1015625  # 1.1 in bf16, as the record's init holds it
    seed_order = tg.GPT(tg.ModelConfig.of(pr_settings(tiny_settings, INIT_DRAW_ORDER="seed")))
    assert seed_order.parallel_resid_lambdas[0, 0].item() == pytest.approx(1.1, abs=1e-7)
    assert tg.parse_settings({}).init_draw_order == "seed" and "INIT_DRAW_ORDER" not in tg.MODEL_KEYS


def test_rope_freq_bf16_rotates_at_the_records_rounded_frequencies():
    x = torch.randn(1, 5, 2, 16)
    base, dims = 10000.0, 16
    inv = (1.0 / base ** (torch.arange(0, dims, 2, dtype=torch.float32) / dims)).bfloat16().float()
    assert inv[1].item() == 0.31640625  # the record's second frequency: 0.3162 rounded
    angles = torch.outer(torch.arange(5, dtype=torch.float32), inv)
    cos, sin = angles.cos()[None, :, None], angles.sin()[None, :, None]
    x1, x2 = x[..., :8], x[..., 8:]
    want = torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)
    torch.testing.assert_close(tg.apply_partial_rope(x, dims, base, freq_bf16=True), want, atol=1e-6, rtol=0)
    assert (tg.apply_partial_rope(x, dims, base) - want).abs().max() > 1e-4
    assert "ROPE_FREQ_BF16" in tg.MODEL_KEYS  # a different function: the artifact records it


def test_adam_fused_is_the_records_adamw(tiny_settings):
    """ADAM_FUSED (PR #1855's fused=True): on bf16 weights (the tied embedding under EMBED_BF16) its steps stay close
    to the same AdamW in fp32 rounded once a step; the default path rounds every op and drifts away."""
    s = pr_settings(tiny_settings)
    model = tg.GPT(tg.ModelConfig.of(s))
    assert tg.build_optimizers(model, s)[1].defaults["fused"] is True
    assert not tg.build_optimizers(model, pr_settings(tiny_settings, ADAM_FUSED=0))[1].defaults["fused"]
    g = torch.Generator().manual_seed(0)
    w0, grad = (
        (torch.randn(64, 32, generator=g) * 0.005).bfloat16(),
        (torch.randn(64, 32, generator=g) * 0.01).bfloat16(),
    )
    lr, wd, b2 = 0.03, 0.085, 0.99
    p, m, v = w0.float(), torch.zeros(64, 32), torch.zeros(64, 32)
    for t in range(1, 6):  # the fp32 step, rounded to bf16 once
        p, m, v = p * (1 - lr * wd), 0.9 * m + 0.1 * grad.float(), b2 * v + (1 - b2) * grad.float() ** 2
        p = (p - lr / (1 - 0.9**t) * m / ((v / (1 - b2**t)).sqrt() + 1e-8)).bfloat16().float()
    error = {}
    for fused in (True, None):
        w = torch.nn.Parameter(w0.clone())
        opt = torch.optim.AdamW([w], lr=lr, weight_decay=wd, betas=(0.9, b2), fused=fused)
        for _ in range(5):
            w.grad = grad.clone()
            opt.step()
        error[fused] = (w.detach().float() - p).abs().mean().item()
    assert error[True] < 0.5 * error[None], error


def test_segment_attention_equals_the_dense_document_mask():
    """The CPU's document-masked attention (one SDPA call per segment, as the record's per-document calls) gives the
    dense mask's numbers, forward and backward, and is what the CPU picks."""
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(2, 1024, (2, 40), generator=g)
    idx[0, [0, 7, 8, 30]] = tg.BOS_ID
    idx[1, 20] = tg.BOS_ID
    seg = tg.doc_segments(idx, 16)
    q, k, v = (torch.randn(2, 40, h, 8, generator=g, requires_grad=True) for h in (4, 2, 2))
    dense, pieces = tg.sdpa(q, k, v, seg), tg.segment_sdpa(q, k, v, seg)
    torch.testing.assert_close(pieces, dense, atol=1e-6, rtol=0)
    w = torch.randn(dense.shape, generator=g)
    grads = [torch.autograd.grad((y * w).sum(), (q, k, v)) for y in (dense, pieces)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert tg.pick_attention(tg.parse_settings({}), torch.device("cpu")).documents is tg.segment_sdpa


def test_warmup_restores_everything_but_muons_momentum_when_told(tiny_settings, tmp_path, monkeypatch, one_thread):
    """WARMUP_STEPS steps, then as many looped (the record's log: warmup_step, loop_warmup_step); the state is then
    restored exactly (the run equals one without warm-up), except, with WARMUP_KEEPS_MUON_MOMENTUM=1 (on in the
    stack, as PR #1855's 8-GPU runs), Muon's momentum: the first step then moves the banks, and only them, otherwise."""
    from test_training import train_in_process

    kw = dict(TINY_PR, ITERATIONS=1, VAL_MAX_TOKENS=256, OUTPUT_DIR=tmp_path)
    assert tiny_settings(**kw).warmup_keeps_muon_momentum == 1
    plain = train_in_process(tiny_settings(**kw, WARMUP_STEPS=0, RUN_ID="plain"), monkeypatch)[0]
    reset = train_in_process(tiny_settings(**kw, WARMUP_STEPS=2, WARMUP_KEEPS_MUON_MOMENTUM=0, RUN_ID="r"), monkeypatch)
    kept = train_in_process(tiny_settings(**kw, WARMUP_STEPS=2, RUN_ID="kept"), monkeypatch)[0]
    assert all(torch.equal(plain[k], reset[0][k]) for k in plain)
    banks = set(tg.BANK_ROWS)
    assert all(torch.equal(plain[k], kept[k]) for k in plain if k not in banks)
    assert all(not torch.equal(plain[k], kept[k]) for k in banks)
    log = (tmp_path / "logs" / "r.txt").read_text().splitlines()
    warm = [ln for ln in log if "warmup_step:" in ln]
    assert warm == ["warmup_step:1/2", "warmup_step:2/2", "loop_warmup_step:1/2", "loop_warmup_step:2/2"]

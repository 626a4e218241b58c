"""Model, optimizer and export pieces of train_gpt.py, each checked against an independent computation.

The expected values are derived here from SPEC §5-§7 (formulas written out in float64 where it matters), never
copied from the code under test's output.
"""

from __future__ import annotations

import io
import lzma
import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg

pytestmark = pytest.mark.usefixtures("one_thread")

F32_EPS = torch.finfo(torch.float32).eps


# ----------------------------------------------------------------------------- independent reference pieces


def rms(x: torch.Tensor) -> torch.Tensor:
    """RMSNorm without weight, written out."""
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + F32_EPS)


def ns5_reference(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """SPEC §6 in float64: unit Frobenius norm, transpose when tall, X <- aX + (bA + cA^2)X with A = XX^T."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.double()
    tall = X.shape[-2] > X.shape[-1]
    if tall:
        X = X.transpose(-2, -1)
    X = X / X.norm(dim=(-2, -1), keepdim=True)
    for _ in range(steps):
        A = X @ X.transpose(-2, -1)
        X = a * X + (b * A + c * A @ A) @ X
    return X.transpose(-2, -1) if tall else X


def rope_reference(x: torch.Tensor, rope_dims: int, base: float, sign: int) -> torch.Tensor:
    """Pairs (i, i + rope_dims/2) as complex numbers z = x_i + i*x_{i+half},
    rotated by sign * t * base^(-2i/rope_dims)."""
    half = rope_dims // 2
    xd = x.double()
    t = torch.arange(x.size(1), dtype=torch.float64)
    theta = t[:, None] * base ** (-2.0 * torch.arange(half, dtype=torch.float64) / rope_dims)  # [T, half]
    z = torch.complex(xd[..., :half], xd[..., half:rope_dims])
    z = z * torch.polar(torch.ones_like(theta), sign * theta)[None, :, None, :]
    return torch.cat((z.real, z.imag, xd[..., rope_dims:]), dim=-1)


def causal_gqa_attention(q, k, v):
    """Plain softmax attention, causal, query head h reading KV head h // (H / Hkv); q [B,T,H,D], k/v [B,T,Hkv,D]."""
    B, T, H, D = q.shape
    rep = H // k.size(2)
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(D)
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v)


def randomize_(model: tg.GPT, seed: int) -> tg.GPT:
    """Give every parameter (zero-initialized ones included) a generic non-trivial value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
            else:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    return model


def write_blob(path, raw: bytes):
    path.write_bytes(lzma.compress(raw))
    return path


# ----------------------------------------------------------------------------- the record configuration


@pytest.mark.slow
def test_record_configuration_size_and_one_training_step():
    s = tg.parse_settings({})
    # SPEC §5: the record run's architecture, restated.
    V, d, L, H, Hkv, hd, hidden = 1024, 512, 11, 8, 4, 64, 1536
    bigram_rows, bigram_dim, ve_dim, ve_layers = 1536, 128, 128, [9, 10]
    assert (s.vocab_size, s.model_dim, s.num_layers, s.num_heads, s.num_kv_heads) == (V, d, L, H, Hkv)
    assert (s.bigram_vocab_size, s.bigram_dim, s.ve_dim, s.ve_layers) == (
        bigram_rows,
        bigram_dim,
        ve_dim,
        ve_layers,
    )
    n_skips = min(L // 2, L - L // 2)
    expected = (
        V * d  # tied token embedding
        + bigram_rows * bigram_dim
        + d * bigram_dim
        + 1  # bigram table, projection, scale
        + d  # smear gate
        + 2 * L * d * d
        + 2 * L * (Hkv * hd) * d  # Q/Out bank, K/V bank
        + 2 * L * hidden * d  # MLP up and down banks
        + L * (d + d + 2 * d + H)  # attn_scale, mlp_scale, resid_mix (a, b), q_gain
        + n_skips * d  # U-Net skip weights
        + V * ve_dim
        + ve_dim * Hkv * hd
        + 1
        + len(ve_layers)
    )  # VE table, projection, scale, layer scales
    assert abs(expected - 26.9e6) < 0.05e6

    torch.manual_seed(0)
    model = tg.GPT(tg.ModelConfig.of(s))
    assert sum(p.numel() for p in model.parameters()) == expected
    assert model.qo_bank.shape == (2 * L, d, d) and model.kv_bank.shape == (2 * L, Hkv * hd, d)
    assert model.mlp_up_bank.shape == (L, hidden, d) and model.mlp_down_bank.shape == (L, d, hidden)

    tokens = torch.randint(0, V, (1, 2049), generator=torch.Generator().manual_seed(1))
    loss = model(tokens[:, :-1], tokens[:, 1:])
    # Tied embedding of std 0.005: the logits are tiny, so the first prediction is close to uniform.
    assert math.isfinite(loss.item()) and abs(loss.item() - math.log(V)) < 0.1
    loss.backward()
    named = dict(model.named_parameters())
    grads = {n: p.grad.detach().clone() for n, p in named.items()}
    before = {n: p.detach().clone() for n, p in named.items()}

    muon, adam, others = tg.build_optimizers(model, s)
    tg.optimizer_step(muon, adam, others, s)
    check_first_step(named, before, grads, L, embed_lr=0.035, scalar_lr=0.025, matrix_lr=0.025, wd=0.04, clip=0.3)
    # At initialization the Out and MLP-down matrices are zero (SPEC §5), so only they (not Q, K, V, up) have a
    # gradient; after the step they hold exactly the first orthogonalized update.
    assert not before["mlp_down_bank"].any() and not before["qo_bank"][L:].any()
    assert not grads["qo_bank"][:L].any() and not grads["mlp_up_bank"].any()
    assert named["mlp_down_bank"].abs().max() > 0 and named["qo_bank"][L:].abs().max() > 0


def check_first_step(named, before, grads, L, embed_lr, scalar_lr, matrix_lr, wd, clip):
    """The first optimizer step against SPEC §6 written out: global clip, AdamW, Muon (NS5 of the Nesterov momentum)."""
    # Global clip over every gradient; the same factor for all parameters.
    total = math.sqrt(sum(g.double().square().sum().item() for g in grads.values()))
    coef = min(1.0, clip / (total + 1e-6))
    for n, p in named.items():  # the clip scales the gradients in place
        torch.testing.assert_close(p.grad.double(), grads[n].double() * coef, rtol=1e-6, atol=1e-12, msg=n)
    changed = {n for n in named if not torch.equal(named[n].detach(), before[n])}
    assert changed >= {n for n, g in grads.items() if g.abs().max() > 0}
    # AdamW, first step: p <- p(1 - lr*wd) - lr * g/(|g| + eps) (bias-corrected moments are g and g^2);
    # embeddings at TIED_EMBED_LR, every scalar and control vector at SCALAR_LR.
    for n in named:
        if "bank" in n:
            continue
        lr = embed_lr if n in ("tok_emb.weight", "bigram_emb", "ve_emb") else scalar_lr
        g = grads[n].double() * coef
        want = before[n].double() * (1 - lr * wd) - lr * g / (g.abs() + 1e-8)
        torch.testing.assert_close(named[n].detach().double(), want, rtol=0, atol=1e-6, msg=n)
    # Muon, first step: the buffer is g and the Nesterov direction g + mu*g, so after NS5's normalization
    # p <- p(1 - lr*wd) - lr * NS5(g) * sqrt(max(1, rows/cols)); a zero gradient leaves only the decay.
    for n in ("qo_bank", "kv_bank", "mlp_up_bank", "mlp_down_bank"):
        for r in sorted({0, L - 1, named[n].shape[0] - 1}):
            g = grads[n][r]
            scale = math.sqrt(max(1.0, g.shape[0] / g.shape[1]))
            update = ns5_reference(g) * scale if g.any() else torch.zeros(g.shape, dtype=torch.float64)
            want = before[n][r].double() * (1 - matrix_lr * wd) - matrix_lr * update
            torch.testing.assert_close(named[n][r].detach().double(), want, rtol=0, atol=1e-6, msg=f"{n}[{r}]")


def test_optimizer_first_step_on_every_bank(tiny_settings):
    """All four banks with a gradient (random weights, so nothing is zero), the tall MLP-up matrices scaled by
    sqrt(rows/cols), non-default learning rates and clip, so that each setting is seen to act."""
    s = tiny_settings(MATRIX_LR=0.05, SCALAR_LR=0.01, TIED_EMBED_LR=0.02, MUON_WD=0.1, ADAM_WD=0.1, GRAD_CLIP_NORM=0.05)
    torch.manual_seed(0)
    model = randomize_(tg.GPT(tg.ModelConfig.of(s)), 18)
    idx = torch.randint(0, 1024, (2, 65), generator=torch.Generator().manual_seed(19))
    model(idx[:, :-1], idx[:, 1:]).backward()
    named = dict(model.named_parameters())
    grads = {n: p.grad.detach().clone() for n, p in named.items()}
    before = {n: p.detach().clone() for n, p in named.items()}
    assert all(
        grads[b].flatten(1).abs().amax(1).min() > 0 for b in ("qo_bank", "kv_bank", "mlp_up_bank", "mlp_down_bank")
    )
    assert math.sqrt(sum(g.square().sum().item() for g in grads.values())) > 0.05  # the clip is active
    muon, adam, others = tg.build_optimizers(model, s)
    assert {id(p) for p in muon.param_groups[0]["params"]} == {
        id(named[b]) for b in ("qo_bank", "kv_bank", "mlp_up_bank", "mlp_down_bank")
    }
    assert {id(p) for p in others} == {id(p) for n, p in named.items() if "bank" not in n}
    tg.optimizer_step(muon, adam, others, s)
    wd = 0.1
    check_first_step(named, before, grads, 4, embed_lr=0.02, scalar_lr=0.01, matrix_lr=0.05, wd=wd, clip=0.05)


def test_clip_coefficient_is_global():
    grads = [torch.full((3,), 2.0), torch.full((4,), -1.0)]
    shards = [torch.ones(2, 2)]
    norm = math.sqrt(3 * 4 + 4 * 1 + 4 * 1)
    assert tg.clip_coefficient(grads, shards, 1.0).item() == pytest.approx(1.0 / norm, rel=1e-6)
    assert tg.clip_coefficient(grads, shards, 100.0).item() == 1.0  # never scales up


# ----------------------------------------------------------------------------- components


def test_mlp_is_leaky_relu_squared(tiny_settings):
    torch.manual_seed(0)
    model = randomize_(tg.GPT(tg.ModelConfig.of(tiny_settings())), 1)
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(2))
    for i in range(4):
        up, down = model.mlp_up_bank[i].detach().double(), model.mlp_down_bank[i].detach().double()
        h = x.double() @ up.T
        h = torch.where(h > 0, h, 0.5 * h)
        want = h.square() @ down.T
        got = model.mlp(i, x, torch.float32)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        assert (h < 0).any() and (h > 0).any()  # both branches of the leaky ReLU are exercised


def test_attention_and_xsa_remove_the_value_direction(tiny_settings):
    """Attention (RMSNorm on q, k per head, partial RoPE, q gain, causal GQA) against plain softmax attention; on the
    XSA layers the head outputs lose their component along the unit value vector of their own KV group."""
    s = tiny_settings()
    torch.manual_seed(0)
    model = randomize_(tg.GPT(tg.ModelConfig.of(s)), 3)
    B, T, d, H, Hkv, D, L = 2, 9, 64, 4, 2, 16, 4
    with torch.no_grad():
        for i in range(L):
            model.qo_bank[L + i].copy_(torch.eye(d))  # identity output projection: attn() returns the head outputs
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(B, T, d, generator=gen)
    ve = torch.randn(B, T, Hkv * D, generator=gen)
    xsa_layers = {i for i in range(L) if i >= L - s.xsa_last_n}
    assert xsa_layers == {2, 3}
    for i in range(L):
        ve_i = ve if i in s.ve_layers else None
        xd = x.double()
        q = (xd @ model.qo_bank[i].detach().double().T).view(B, T, H, D)
        k = (xd @ model.kv_bank[i].detach().double().T).view(B, T, Hkv, D)
        v = xd @ model.kv_bank[L + i].detach().double().T
        if ve_i is not None:
            v = v + ve_i.double() * model.ve_layer_scales[s.ve_layers.index(i)].item()
        v = v.view(B, T, Hkv, D)
        q = rope_reference(rms(q), 16, 10000.0, -1) * model.blocks[i].q_gain.detach().double()[None, None, :, None]
        k = rope_reference(rms(k), 16, 10000.0, -1)
        y_plain = causal_gqa_attention(q, k, v)  # [B, T, H, D]

        got = model.attn(i, x, ve_i, torch.float32).double().view(B, T, H, D)
        vhat = F.normalize(v, dim=-1).repeat_interleave(H // Hkv, dim=2)  # head h -> KV group h // (H / Hkv)
        dots = (got * vhat).sum(-1)
        if i in xsa_layers:
            want = y_plain - (y_plain * vhat).sum(-1, keepdim=True) * vhat
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            assert dots.abs().max() < 1e-5
        else:
            torch.testing.assert_close(got, y_plain, rtol=1e-5, atol=1e-5)
            assert dots.abs().mean() > 0.05 * got.norm(dim=-1).mean()


def test_partial_rope_rotates_only_the_first_16_dims():
    base = 10000.0
    x = torch.randn(2, 33, 3, 64, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    got = tg.apply_partial_rope(x, 16, base)
    assert torch.equal(got[..., 16:], x[..., 16:])
    assert torch.equal(got[:, 0], x[:, 0])  # t = 0: angle 0
    # Pair (i, i+8) turned by t * base^(-2i/16); the reference turns clockwise, either direction is a valid RoPE
    # as long as it is the same for every pair and position. (The angles are float32 in the code: 1e-5 slack.)
    errors = [(got - rope_reference(x, 16, base, sign)).abs().max().item() for sign in (-1, +1)]
    assert min(errors) < 1e-5 and max(errors) > 1e-2
    # Relative positions: <R_t q, R_s k> depends only on t - s.
    q, k = x[:1, :1].expand(1, 33, 3, 64), x[1:, :1].expand(1, 33, 3, 64)
    rq, rk = tg.apply_partial_rope(q.contiguous(), 16, base), tg.apply_partial_rope(k.contiguous(), 16, base)
    dot = torch.einsum("bthd,bshd->ths", rq, rk)
    for shift in (0, 3, 11):
        diag = torch.diagonal(dot, offset=-shift, dim1=0, dim2=2)  # t = s + shift
        torch.testing.assert_close(diag, diag[:, :1].expand_as(diag), rtol=0, atol=1e-5)


def test_rope_base_is_raised_beyond_the_1024_table_only_as_the_reference():
    s = tg.parse_settings({})  # default: the base is ROPE_BASE at every length
    assert (
        tg.rope_base(tg.ModelConfig.of(s), 128)
        == tg.rope_base(tg.ModelConfig.of(s), 2048)
        == tg.rope_base(tg.ModelConfig.of(s), 8192)
        == 10000.0
    )
    s = tg.parse_settings({"ROPE_TRAIN_SEQ_LEN": "1024"})  # the reference's tables
    assert tg.rope_base(tg.ModelConfig.of(s), 1024) == 10000.0 and tg.rope_base(tg.ModelConfig.of(s), 128) == 10000.0
    assert tg.rope_base(tg.ModelConfig.of(s), 2048) == pytest.approx(10000.0 * 2.0 ** (16 / 14), rel=1e-12)


@pytest.mark.parametrize("rows", [256, 1536])
def test_bigram_hash_matches_the_integer_formula(tiny_settings, rows):
    model = tg.GPT(tg.ModelConfig.of(tiny_settings(BIGRAM_VOCAB_SIZE=rows)))
    idx = torch.randint(0, 1024, (3, 50), generator=torch.Generator().manual_seed(rows))
    idx[0, :4] = torch.tensor([1023, 1023, 0, 1023])
    got = model.bigram_hash(idx)
    mod = rows - 1
    for b in range(3):
        toks = [int(t) for t in idx[b]]
        want = [mod] + [((36313 * cur) ^ (27191 * prev)) % mod for prev, cur in zip(toks, toks[1:])]
        assert got[b].tolist() == want
    assert got.min() >= 0 and got.max() == mod


def test_embedding_bigram_and_smear_gate(tiny_settings):
    torch.manual_seed(0)
    model = randomize_(tg.GPT(tg.ModelConfig.of(tiny_settings())), 6)
    with torch.no_grad():
        model.smear_gate.copy_(torch.linspace(-3, 3, 64))  # per-channel gates from ~0.05 to ~0.95
    idx = torch.randint(0, 1024, (2, 17), generator=torch.Generator().manual_seed(7))
    E, T, P = (
        model.tok_emb.weight.detach().double(),
        model.bigram_emb.detach().double(),
        model.bigram_proj.detach().double(),
    )
    rows = torch.tensor([[255] + [((36313 * int(c)) ^ (27191 * int(p))) % 255 for p, c in zip(r, r[1:])] for r in idx])
    x = rms(E[idx] + (T[rows] @ P.T) * model.bigram_scale.item())
    g = torch.sigmoid(model.smear_gate.detach().double())
    want = torch.empty_like(x)
    want[:, 0] = (1 - g) * x[:, 0]  # x_{-1} = 0
    for t in range(1, x.size(1)):
        want[:, t] = (1 - g) * x[:, t] + g * x[:, t - 1]
    got = model.embed(idx, torch.float32).double()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_forward_is_the_unet_of_blocks(tiny_settings):
    """forward_hidden / compute_logits / forward against SPEC §5 written out for 5 layers: blocks 0, 1 push their
    outputs; block 2 adds skip_weight_0 x (block 1's output), block 3 skip_weight_1 x (block 0's), block 4 none."""
    s = tiny_settings(NUM_LAYERS=5, VE_LAYERS="3,4", XSA_LAST_N=2)
    torch.manual_seed(0)
    model = randomize_(tg.GPT(tg.ModelConfig.of(s)), 8)
    assert model.skip_weights.shape == (2, 64)
    idx = torch.randint(0, 1024, (2, 24), generator=torch.Generator().manual_seed(9))
    f32 = torch.float32
    with torch.no_grad():
        x0 = model.embed(idx, f32)
        ve = (model.ve_emb[idx] @ model.ve_proj.T) * model.ve_scale

        def block(i, x):
            blk = model.blocks[i]
            x_in = blk.resid_mix[0] * x + blk.resid_mix[1] * x0
            si = 1 / math.sqrt(i + 1)
            x = x_in + blk.attn_scale * model.attn(i, rms(x_in) * si, ve if i in (3, 4) else None, f32)
            return x + blk.mlp_scale * model.mlp(i, rms(x) * si, f32)

        def unet(order):
            out0 = block(0, x0)
            out1 = block(1, out0)
            first, second = (out1, out0) if order == "lifo" else (out0, out1)
            x = block(2, out1 + model.skip_weights[0] * first)
            x = block(3, x + model.skip_weights[1] * second)
            return block(4, x)

        want, fifo = unet("lifo"), unet("fifo")
        got = model.forward_hidden(idx)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert (fifo - want).abs().max() > 1e-2  # the order matters, so the comparison above can tell them apart

        z = rms(want.double()) @ model.tok_emb.weight.double().T
        logits = 30 * torch.tanh(z / 30)
        torch.testing.assert_close(model.compute_logits(got).double(), logits, rtol=1e-5, atol=1e-5)
        targets = torch.randint(0, 1024, idx.shape, generator=torch.Generator().manual_seed(10))
        nll = -logits.log_softmax(-1).gather(-1, targets[..., None]).mean()
        assert model(idx, targets).item() == pytest.approx(nll.item(), rel=1e-5)


@pytest.mark.parametrize("shape", [(3, 64, 256), (3, 256, 64), (2, 96, 512)], ids=["wide", "tall", "wider"])
def test_newton_schulz_is_close_to_orthogonal(shape):
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(11)) * 7.0
    X = tg.zeropower_via_newtonschulz5(G, 5)
    assert X.shape == G.shape and X.dtype == G.dtype
    sv = torch.linalg.svdvals(X.double())
    assert sv.min() > 0.6 and sv.max() < 1.3
    torch.testing.assert_close(X.double(), ns5_reference(G), rtol=0, atol=1e-4)
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    polar = U @ Vh  # the exact orthogonal factor NS5 approximates
    assert ((X.double() - polar).norm() / polar.norm()).item() < 0.3


@pytest.mark.parametrize("bits, max_q", [(5, 15), (6, 31), (8, 127)])
def test_fake_quantize_grid_and_straight_through_gradient(bits, max_q):
    w = torch.randn(6, 40, generator=torch.Generator().manual_seed(12), requires_grad=True)
    out = tg.fake_quantize(w, bits)
    scale = w.detach().abs().amax(dim=1, keepdim=True) / max_q
    k = out.detach() / scale
    torch.testing.assert_close(k, k.round(), rtol=0, atol=1e-4)
    assert k.round().min() >= -max_q - 1 and k.round().max() <= max_q
    assert k.round().abs().max() == max_q  # each row's largest |w| sits on the grid's end
    assert ((out.detach() - w.detach()).abs() <= scale / 2 + 1e-6).all()
    (out * torch.arange(40.0)).sum().backward()
    torch.testing.assert_close(w.grad, torch.arange(40.0).expand(6, 40))


def test_late_qat_mode_quantizes_at_its_bits_and_spares_the_banks_when_told(tiny_settings):
    """Under late QAT (qat_bits) a matrix enters the forward pass on the grid of its rows at those bits; with
    qat_banks off (LATE_QAT_BANKS=0, the reference's) only the plain linears do."""
    model = tg.GPT(tg.ModelConfig.of(tiny_settings()))
    bank, plain = model.qo_bank[0], model.bigram_proj
    assert torch.equal(model.weight(bank, torch.float32, bank=True), bank)  # off by default
    for bits in (5, 7):
        model.qat_bits, model.qat_banks = bits, True
        got = model.weight(bank, torch.float32, bank=True).detach()
        k = got / (bank.detach().abs().amax(1, keepdim=True) / (2 ** (bits - 1) - 1))
        torch.testing.assert_close(k, k.round(), rtol=0, atol=1e-4)
        assert k.round().abs().max() == 2 ** (bits - 1) - 1
        model.qat_banks = False
        assert torch.equal(model.weight(bank, torch.float32, bank=True), bank)
        assert not torch.equal(model.weight(plain, torch.float32), plain)


def test_bigram_hash_table_learns(tiny_settings):
    torch.manual_seed(0)
    model = tg.GPT(tg.ModelConfig.of(tiny_settings()))
    idx = torch.randint(0, 1024, (2, 64), generator=torch.Generator().manual_seed(13))
    model(idx[:, :-1], idx[:, 1:]).backward()
    assert model.bigram_emb.grad.abs().max() > 0 or model.bigram_proj.grad.abs().max() > 0


# ----------------------------------------------------------------------------- quantization and export


def test_quantize_rows_int6_error_bound_and_best_clip():
    gen = torch.Generator().manual_seed(14)
    w = torch.randn(48, 600, generator=gen) * 0.05
    w[::5, 7] = 0.9  # one outlier in some rows, so that clipping below the max can pay off
    percentiles = (99.9, 99.95, 99.99, 99.999, 100)
    q, scale = tg.quantize_rows(w, 31, percentiles)
    assert q.dtype == torch.int8 and scale.dtype == torch.float16 and q.shape == w.shape and scale.shape == (48,)
    assert q.min() >= -31 and q.max() <= 31
    wn, qn, sn = w.double().numpy(), q.numpy().astype(np.float64), scale.double().numpy()
    recon = qn * sn[:, None]
    unclipped = np.abs(wn) <= 31 * sn[:, None]
    assert unclipped.mean() > 0.99
    assert (np.abs(recon - wn)[unclipped] <= sn[:, None].repeat(600, 1)[unclipped] / 2 * (1 + 1e-6)).all()
    assert (np.abs(qn[~unclipped]) == 31).all()  # clipped entries sit on the edge of the grid
    # Each row keeps the candidate clip (numpy percentile of |w|) with the least squared error.
    for r in range(48):
        errs = []
        for pct in percentiles:
            clip = np.percentile(np.abs(wn[r]), pct)
            sc = float(np.float16(np.float32(clip / 31)))
            errs.append(np.mean((np.clip(np.round(wn[r] / sc), -31, 31) * sc - wn[r]) ** 2))
        assert np.mean((recon[r] - wn[r]) ** 2) <= min(errs) * (1 + 1e-4) + 1e-12
    assert (sn[::5] < 0.9 / 31).any()  # an outlier row chose to clip


def export_settings(tiny_settings, **kw):
    # d = 256: Q/Out matrices have exactly 65,536 elements (the seed's size rule would keep them fp16), MLP matrices
    # 131,072, the token embedding 262,144.
    return tiny_settings(
        NUM_LAYERS=2, MODEL_DIM=256, NUM_HEADS=4, NUM_KV_HEADS=2, MLP_MULT=2, VE_LAYERS="1", XSA_LAST_N=1, **kw
    )


def save(state, s, path):
    """What the exporter writes for these weights with GPTQ-lite (no calibration): returns its bytes."""
    blob = tg.pack(*tg.quantize_state(state, s), s)
    path.write_bytes(blob)
    return len(blob)


def test_quantize_state_int6_int8_fp16_paths(tiny_settings):
    s = export_settings(tiny_settings, QUANT="gptq_lite")  # without a Hessian: the seed's round-to-nearest
    torch.manual_seed(0)
    model = randomize_(tg.GPT(tg.ModelConfig.of(s)), 15)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tensors, scheme = tg.quantize_state(state, s)
    flat = tg.unbank(state, 2)
    assert set(scheme) == set(flat)
    for name, t in flat.items():
        if ".attn." in name or ".mlp." in name:
            assert scheme[name] == "int6", name
        elif name in ("tok_emb.weight", "bigram_emb", "ve_emb"):
            assert scheme[name] == "int8", name
        else:
            assert scheme[name] == "fp16", name
            assert tensors[name].dtype == torch.float16 and torch.equal(tensors[name], t.half())
    assert scheme["blocks.0.attn.c_q.weight"] == "int6" and state["qo_bank"][0].numel() == 65536
    # int8 per row: clip at the 99.99984th percentile of |w|, scale = clip/127, values in [-127, 127].
    w = flat["tok_emb.weight"].double().numpy()
    q, sc = tensors["tok_emb.weight.q"].numpy().astype(np.float64), tensors["tok_emb.weight.scale"].double().numpy()
    assert q.min() >= -127 and q.max() <= 127
    clip = np.percentile(np.abs(w), 99.99984, axis=1)
    np.testing.assert_allclose(sc, clip / 127, rtol=1e-3)
    inside = np.abs(w) <= 127 * sc[:, None]
    err = np.abs(q * sc[:, None] - w)
    assert (err[inside] <= np.broadcast_to(sc[:, None], w.shape)[inside] / 2 * (1 + 1e-6)).all()
    # int6 matrices: values within [-31, 31]; other bit widths follow MATRIX_BITS / EMBED_BITS.
    q6 = tensors["blocks.1.mlp.fc.weight.q"]
    assert q6.dtype == torch.int8 and q6.min() >= -31 and q6.max() <= 31
    t5, s5 = tg.quantize_state(state, export_settings(tiny_settings, MATRIX_BITS=5, EMBED_BITS=7))
    assert s5["blocks.1.mlp.fc.weight"] == "int5" and s5["tok_emb.weight"] == "int7"
    assert t5["blocks.1.mlp.fc.weight.q"].abs().max() == 15 and t5["tok_emb.weight.q"].abs().max() <= 63
    # unbank/rebank: per-layer roles come from the bank rows the forward pass uses
    assert torch.equal(flat["blocks.1.attn.c_q.weight"], state["qo_bank"][1])
    assert torch.equal(flat["blocks.1.attn.proj.weight"], state["qo_bank"][3])
    assert torch.equal(flat["blocks.0.attn.c_v.weight"], state["kv_bank"][2])
    back = tg.rebank(flat, 2)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)


def test_artifact_round_trip_is_exact(tiny_settings, tmp_path):
    torch.manual_seed(0)
    s = export_settings(tiny_settings)
    state = {k: v.detach().clone() for k, v in randomize_(tg.GPT(tg.ModelConfig.of(s)), 16).state_dict().items()}
    want = tg.dequantize_state(*tg.quantize_state(state, s), 2)
    path = tmp_path / "a.ptz"
    n_bytes = save(state, s, path)
    assert n_bytes == path.stat().st_size and path.read_bytes().startswith(tg.RANS_MAGIC)
    loaded = tg.load_artifact(path, s)
    assert set(loaded) == set(state) == set(want)
    for k in state:
        assert loaded[k].shape == state[k].shape, k
        assert loaded[k].dtype == want[k].dtype and torch.equal(loaded[k], want[k]), k
    # The dequantized weights are close to the originals, and a fresh model accepts them as they are.
    for k in ("mlp_up_bank", "tok_emb.weight", "qo_bank"):
        assert (loaded[k] - state[k]).norm() < 0.1 * state[k].norm(), k
    tg.GPT(tg.ModelConfig.of(s)).load_state_dict(loaded, strict=True)


def test_artifact_bytes_are_reproducible(tiny_settings, tmp_path):
    s = tiny_settings(NUM_LAYERS=1, MODEL_DIM=16, NUM_HEADS=2, NUM_KV_HEADS=1, VE_LAYERS="0", XSA_LAST_N=1, ROPE_DIMS=4)
    torch.manual_seed(0)
    state = tg.GPT(tg.ModelConfig.of(s)).state_dict()
    blobs = set()
    for i in range(10):  # 3 metadata keys: ten saves all in one order by chance has probability 6^-9
        save(state, s, tmp_path / f"{i}.ptz")
        blobs.add((tmp_path / f"{i}.ptz").read_bytes())
    assert len(blobs) == 1


class _Payload:
    """Unpickling this creates (opens for writing) the file named by `marker`."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_artifact_that_would_run_code_is_refused(tiny_settings, tmp_path):
    s = tiny_settings()
    # The payload really does run code when unpickled (shown on a separate marker) ...
    probe = tmp_path / "probe"
    obj = pickle.loads(pickle.dumps({"w": _Payload(str(probe))}))
    obj["w"].close()
    assert probe.exists()
    # ... and load_artifact refuses it, as a bare pickle and in torch.save's zip format, without running it.
    marker = tmp_path / "marker"
    raw_pickle = pickle.dumps({"qo_bank": _Payload(str(marker))})
    buf = io.BytesIO()
    torch.save({"qo_bank": _Payload(str(marker))}, buf)
    for name, raw in (("pickle.ptz", raw_pickle), ("torchsave.ptz", buf.getvalue())):
        path = write_blob(tmp_path / name, raw)
        with pytest.raises(tg.Fail) as err:
            tg.load_artifact(path, s)
        assert str(path) in str(err.value)
        assert not marker.exists()


def test_artifact_with_other_model_settings_is_refused(tiny_settings, tmp_path):
    s = tiny_settings()
    torch.manual_seed(0)
    save(tg.GPT(tg.ModelConfig.of(s)).state_dict(), s, tmp_path / "a.ptz")
    with pytest.raises(tg.Fail) as err:
        tg.load_artifact(tmp_path / "a.ptz", tiny_settings(XSA_LAST_N=1))
    assert "XSA_LAST_N" in str(err.value) and "MODEL_DIM" not in str(err.value)
    with pytest.raises(tg.Fail) as err:
        tg.load_artifact(tmp_path / "a.ptz", tiny_settings(MODEL_DIM=128))
    assert "MODEL_DIM" in str(err.value)
    # Settings outside the model (training, evaluation) do not matter for loading.
    assert set(tg.load_artifact(tmp_path / "a.ptz", tiny_settings(MATRIX_LR=0.5, EVAL_STRIDE=32))) == set(
        tg.GPT(tg.ModelConfig.of(s)).state_dict()
    )

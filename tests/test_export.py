"""Export: precision by role, full GPTQ, calibration data, rANS packing, corrupt artifacts, fitting the byte limit."""

from __future__ import annotations

import json
import lzma
import subprocess
import sys
import types
from dataclasses import replace

import numpy as np
import pytest
import torch
from test_model import export_settings, randomize_, save

import train_gpt as tg

SAMPLE_TRAIN_GLOB = "fineweb_train_"


def cpu_run(s):
    """The part of train_gpt.Run that calibration uses."""
    return types.SimpleNamespace(s=s, device=torch.device("cpu"), autocast=lambda: torch.autocast("cpu", enabled=False))


# ----------------------------------------------------------------------------- precision by role


def test_precision_by_role_matches_the_seed_at_record_shapes_and_quantizes_small_matrices():
    s = tg.parse_settings({})
    with torch.device("meta"):
        flat = tg.unbank(tg.GPT(tg.ModelConfig.of(s)).state_dict(), s.num_layers)
    for name, t in flat.items():  # the seed's rule: by size, then attention/MLP int6, other large tensors int8
        seed = "fp16" if t.numel() <= 65536 else "int6" if (".attn." in name or ".mlp." in name) else "int8"
        assert tg.precision_of(name, t, s) == seed, name
    kinds = [tg.precision_of(n, t, s) for n, t in flat.items()]
    assert kinds.count("int6") == 11 * 6 and kinds.count("int8") == 3
    # At the CPU demo's width the seed kept every matrix fp16; by role they are int6 like at the record shape.
    demo = tg.parse_settings(
        dict(
            NUM_LAYERS="4",
            MODEL_DIM="128",
            NUM_HEADS="4",
            NUM_KV_HEADS="2",
            VE_LAYERS="2,3",
            XSA_LAST_N="2",
            BIGRAM_DIM="32",
            VE_DIM="32",
        )
    )
    small = tg.unbank(tg.GPT(tg.ModelConfig.of(demo)).state_dict(), 4)
    matrices = [n for n in small if ".attn." in n or ".mlp." in n]
    assert len(matrices) == 24 and all(small[n].numel() <= 65536 for n in matrices)
    assert all(tg.precision_of(n, small[n], demo) == "int6" for n in matrices)


# ----------------------------------------------------------------------------- GPTQ


def obs_reference(W, H, scale, max_q, damp):
    """GPTQ written the slow way (optimal brain surgeon): after each column, update the rest by the explicit inverse
    Hessian, then eliminate that column from the inverse. No Cholesky, no blocks, float64."""
    W, H = W.double().clone(), H.double().clone()
    H += damp * H.diagonal().mean() * torch.eye(len(H), dtype=torch.float64)
    Hinv, scale = torch.linalg.inv(H), scale.double()
    Q = torch.zeros_like(W)
    for j in range(W.size(1)):
        Q[:, j] = torch.clamp(torch.round(W[:, j] / scale), -max_q, max_q)
        err = (W[:, j] - Q[:, j] * scale) / Hinv[j, j]
        W[:, j + 1 :] -= err[:, None] * Hinv[j, j + 1 :][None]
        Hinv = Hinv - Hinv[:, j : j + 1] @ Hinv[j : j + 1, :] / Hinv[j, j]
    return Q


def correlated_layer(rows=96, cols=128, n=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + 0.3 * torch.eye(cols)
    X = torch.randn(n, cols, generator=g) @ mix  # strongly correlated inputs
    return torch.randn(rows, cols, generator=g) * 0.05, X


def test_gptq_scales_minimize_output_error_over_the_clip_grid():
    W, X = correlated_layer()
    H = X.T @ X
    scale = tg.best_scales(W, [W.abs().amax(dim=1) * f for f in tg.GPTQ_CLIPS], 31, H)
    for r in range(0, 96, 7):
        errs = []
        for frac in tg.GPTQ_CLIPS:
            sc = float(np.float16(W[r].abs().max().item() * frac / 31))
            d = W[r] - torch.clamp(torch.round(W[r] / sc), -31, 31) * sc
            errs.append(((X @ d) ** 2).sum().item())
        d = W[r] - torch.clamp(torch.round(W[r] / scale[r]), -31, 31) * scale[r]
        assert ((X @ d) ** 2).sum().item() <= min(errs) * (1 + 1e-3)


def test_gptq_matches_the_obs_reference_and_beats_round_to_nearest():
    W, X = correlated_layer()
    H = X.T @ X
    s = replace(tg.Settings(), gptq_damp=0.01, gptq_block=32, gptq_actorder=0)
    q, scale = tg.gptq_rows(W, H, 31, s)
    ref = obs_reference(W, H, scale.float(), 31, 0.01)
    assert (q.double() == ref).float().mean() > 0.99  # float32 vs float64: a few ties may round differently

    def output_error(q, scale):  # measured on the inputs themselves, not through H
        return ((X @ (W - q.float() * scale.float()[:, None]).T) ** 2).sum().item()

    lite = output_error(*tg.quantize_rows(W, 31, tg.MATRIX_PERCENTILES))
    rtn_same_scales = output_error(torch.clamp(torch.round(W / scale.float()[:, None]), -31, 31), scale)
    for actorder in (0, 1):
        err = output_error(*tg.gptq_rows(W, H, 31, replace(s, gptq_actorder=actorder)))
        assert err < 0.75 * lite and err < 0.75 * rtn_same_scales, (err, lite, rtn_same_scales)
    assert q.abs().max() <= 31 and q.dtype == torch.int8 and scale.dtype == torch.float16


# ----------------------------------------------------------------------------- calibration


def test_kv_cache_generation_matches_the_full_forward(tiny_settings):
    s = tiny_settings()
    torch.manual_seed(0)
    model = randomize_(tg.GPT(tg.ModelConfig.of(s)), 3).eval()
    idx = torch.randint(0, 1024, (2, 24))
    with torch.no_grad():
        full = model.compute_logits(model.forward_hidden(idx))
        cache = dict(len=0)
        steps = [model.compute_logits(model.forward_hidden(idx[:, :5], cache))]  # a prefill of 5, then one at a time
        for t in range(6, 25):
            steps.append(model.compute_logits(model.forward_hidden(idx[:, :t], cache)))
    got = torch.cat(steps, dim=1)
    assert got.shape == full.shape and cache["len"] == 24
    torch.testing.assert_close(got, full, atol=2e-4, rtol=1e-4)


def test_calibration_reads_no_validation_tokens(tiny_settings, monkeypatch):
    read = []
    real = tg.load_data_shard
    monkeypatch.setattr(tg, "load_data_shard", lambda path: read.append(str(path)) or real(path))
    s = tiny_settings(GPTQ_CALIB_SEQS=3, GPTQ_CALIB_LEN=40)
    torch.manual_seed(0)
    model = randomize_(tg.GPT(tg.ModelConfig.of(s)), 4)
    tokens = tg.calibration_tokens(model, cpu_run(s))
    assert read == [] and tokens.shape == (3, 40) and (tokens[:, 0] == tg.BOS_ID).all()
    assert tokens.unique().numel() > 20  # sampled text, not a constant
    assert torch.equal(tokens, tg.calibration_tokens(model, cpu_run(s)))  # seeded
    hessians, _ = tg.collect_hessians(model, cpu_run(s))
    assert read == []
    assert set(hessians) == {n for n in tg.unbank(model.state_dict(), 4) if ".attn." in n or ".mlp." in n}
    # H of the MLP down projection is the sum of x^T x of its inputs, (leaky_relu(up x))^2: symmetric, PSD.
    h = hessians["blocks.1.mlp.proj.weight"]
    assert (
        h.shape == (128, 128)
        and torch.allclose(h, h.T)
        and torch.linalg.eigvalsh(h.double()).min() > -1e-6 * h.diagonal().max()
    )
    # GPTQ_CALIB=train reads the training stream only (the time for it is reserved inside the training cap).
    t = tiny_settings(GPTQ_CALIB="train", GPTQ_CALIBRATION_BATCHES=2, GPTQ_RESERVE_SECONDS=5)  # 2 x 128 tokens
    train_tokens = tg.calibration_tokens(model, cpu_run(t))
    assert read and all(SAMPLE_TRAIN_GLOB in p for p in read)
    first = real(read[0])[:256].astype(np.int64)
    assert train_tokens.shape == (2, 128) and np.array_equal(train_tokens.numpy().ravel(), first)
    assert tg.train_cap_ms(replace(t, max_wallclock_seconds=600.0)) == 595_000


def test_train_calibration_without_a_reserve_is_refused(tiny_settings):
    with pytest.raises(tg.Fail, match="GPTQ_RESERVE_SECONDS"):
        tiny_settings(GPTQ_CALIB="train", MAX_WALLCLOCK_SECONDS=600)


# ----------------------------------------------------------------------------- rANS


@pytest.mark.parametrize("lanes", [1, 5, 64])
def test_rans_round_trip_is_exact(lanes):
    rng = np.random.default_rng(lanes)
    parts = [
        np.clip(np.round(rng.normal(0, sd, n)), -mq, mq).astype(np.int64) + mq
        for sd, n, mq in ((4, 3000, 31), (0.2, 333, 15), (30, 2000, 127), (1, 1, 63), (2, 700, 31))
    ]
    alphabet = 255
    freq = tg.rans_tables(np.stack([np.bincount(p, minlength=alphabet) for p in parts]))
    assert (freq.sum(axis=1) == 1 << tg.RANS_PREC).all()
    keys = np.concatenate([i * alphabet + p for i, p in enumerate(parts)])
    states, counts, words = tg.rans_encode(keys, freq, lanes)
    tables = np.repeat(np.arange(len(parts)), [len(p) for p in parts])
    assert np.array_equal(tg.rans_decode(tables, freq, states, counts, words), np.concatenate(parts))
    # Within a fraction of a percent of the order-0 entropy of each part (plus the final states).
    bound = sum(tg.entropy_bytes(np.bincount(p)) for p in parts)
    assert 2 * len(words) + 4 * lanes < bound * 1.01 + 4 * lanes + 16


def test_predict_is_the_integer_floor_of_its_formula():
    rng = np.random.default_rng(0)
    above, total, i = (
        rng.integers(-127, 128, 5000),
        rng.integers(-127 * 8191, 127 * 8191, 5000),
        rng.integers(0, 8192, 5000),
    )
    wa, wm = rng.integers(0, 9, 5000), rng.integers(0, 9, 5000)
    total[i == 0] = 0  # nothing is above row 0
    got = tg.predict(above, total, i, wa, wm, 31)
    want = [
        0 if n == 0 else max(-31, min(31, (int(a) * int(x) * int(n) + int(b) * int(t) + 2 * int(n)) // (4 * int(n))))
        for a, x, b, t, n in zip(wa, above, wm, total, i)
    ]  # Python's exact integer floor division
    assert got.tolist() == want


def test_chain_order_is_the_greedy_euclidean_nearest_neighbour_chain():
    rng = np.random.default_rng(0)
    q = rng.integers(-63, 64, size=(60, 512))  # int7's range and the record's width: float32 distances stay exact
    q[17] = q[30] = q[3]  # ties at distance 0: the first row not yet taken wins
    q[40] = q[5] + (np.arange(512) == 9)  # ties at distance 1 between rows 5 and 40 and their copies
    q[50] = q[40]
    order, taken = [0], {0}
    while len(order) < len(q):  # brute force in integers, row by row
        d = [((q[j] - q[order[-1]]) ** 2).sum() if j not in taken else np.inf for j in range(len(q))]
        order.append(int(np.argmin(d)))
        taken.add(order[-1])
    assert tg.chain_order(q).tolist() == order


def test_lehmer_code_counts_the_later_smaller_rows_and_decodes_to_the_order():
    rng = np.random.default_rng(3)
    for n in (1, 2, 7, 300):
        order = rng.permutation(n)
        digits = tg.lehmer_code(order)
        # Independently: a row's digit is how many rows after it in the order have a smaller index.
        assert digits.tolist() == [sum(int(order[j]) < int(order[i]) for j in range(i + 1, n)) for i in range(n)]
        assert all(0 <= d < n - i for i, d in enumerate(digits))
        assert tg.from_lehmer(digits.tolist()) == order.tolist()
    with pytest.raises(IndexError):
        tg.from_lehmer([3, 0, 0])  # the first digit of 3 rows is at most 2


def structured_group(rng, layers=3, rows=96, cols=48, max_q=31):
    """Matrices of one role with the structure the coder models: half the rows near-copies of a few prototypes (a
    chain puts them together, the row above predicts them), column offsets (the mean of the rows above predicts
    them), and two row scales (two modes)."""
    out = []
    for _ in range(layers):
        protos, offset = rng.normal(0, 6, (4, cols)), rng.normal(0, 4, cols)
        scale = np.where(rng.random(rows) < 0.5, 1.0, 5.0)[:, None]
        q = offset + scale * rng.normal(0, 1, (rows, cols))
        copies = rng.random(rows) < 0.5
        q[copies] = protos[rng.integers(0, 4, copies.sum())] + (rng.random((copies.sum(), cols)) < 0.1)
        out.append(np.clip(np.round(q), -max_q, max_q).astype(np.int64))
    return out


def test_context_coder_finds_the_structure_and_round_trips_exactly(tiny_settings):
    """On matrices with near-duplicate rows, column offsets and two row scales, code_group chains the rows, fits
    several modes and predicts from above and from the mean; the packed artifact of such a model decodes to the same
    symbols, and its symbols cost well under their order-0 entropy (computed here from the counts)."""
    rng = np.random.default_rng(1)
    qs = structured_group(rng)
    order, modes, w, E = tg.code_group(qs, 31)
    assert order is not None and [sorted(o) for o in order.tolist()] == [list(range(96))] * 3
    assert len(w) > 1 and w[:, 0].max() > 0 and w[:, 1].max() > 0  # modes; predictions from above and the mean
    assert modes.shape == (96, 3) and E.shape == (96, 3 * 48)
    # A wide group (48 x 96) is coded by its longer side: the same units, the same residuals as its transpose.
    wide = tg.code_group([q.T for q in qs], 31)
    assert np.array_equal(wide[0], order) and np.array_equal(wide[3], E)
    # The residuals are those of the prediction: rebuild each matrix row by row from them.
    G = np.concatenate([q[o] for q, o in zip(qs, order)], axis=1)
    wa, wm = np.repeat(w[modes], 48, axis=1).transpose(2, 0, 1)
    above, total = np.zeros(3 * 48, np.int64), np.zeros(3 * 48, np.int64)
    for i in range(96):
        pred = [
            0 if i == 0 else max(-31, min(31, (a * x * i + b * t + 2 * i) // (4 * i)))
            for a, x, b, t in zip(wa[i].tolist(), above.tolist(), wm[i].tolist(), total.tolist())
        ]
        assert (G[i] - np.array(pred) == E[i]).all()
        above, total = G[i], total + G[i]
    # A whole artifact: its coded tensors replaced by such groups, packed and unpacked.
    torch.manual_seed(0)
    s = export_settings(tiny_settings)
    tensors, scheme = tg.quantize_state(randomize_(tg.GPT(tg.ModelConfig.of(s)), 4).state_dict(), s)
    for names in tg.coder_groups(scheme, {k: tuple(tensors[k + ".q"].shape) for k in tg.coded_names(scheme)}):
        rows, cols = tensors[names[0] + ".q"].shape
        max_q = tg.max_q_of(scheme[names[0]])
        for k, q in zip(names, structured_group(rng, len(names), rows, cols, max_q)):
            tensors[k + ".q"] = torch.from_numpy(q.astype(np.int8))
    blob = tg.pack(tensors, scheme, s)
    assert blob[:8] == tg.RANS_MAGIC and blob == tg.pack(tensors, scheme, s)  # reproducible
    back, _ = tg.unpack(blob)
    assert set(back) == set(tensors) and all(torch.equal(back[k], tensors[k]) for k in tensors)
    words = len(blob) - 12 - int.from_bytes(blob[8:12], "little")
    order0 = sum(
        tg.entropy_bytes(np.bincount(tensors[k + ".q"].numpy().astype(np.int64).ravel() + 127))
        for k in tg.coded_names(scheme)
    )
    assert words < 0.85 * order0


def test_fit_modes_splits_units_by_their_scale():
    """Two kinds of rows (spread 1 and 8, no other structure): with two modes each row lands in its kind's mode, and
    the estimate is below one table's."""
    rng = np.random.default_rng(2)
    wide = rng.random(200) < 0.5
    G = np.round(rng.normal(0, 1, (200, 64)) * np.where(wide, 8, 1)[:, None]).astype(np.int64)
    modes, w, E, bits = tg.fit_modes(G, 1, 31, 2)
    assert len(w) == 2 and len(set(modes[wide, 0])) == 1 and len(set(modes[~wide, 0])) == 1
    assert modes[wide, 0][0] != modes[~wide, 0][0]
    assert bits < tg.fit_modes(G, 1, 31, 1)[3]


def test_artifact_is_smaller_than_lzma_and_near_the_entropy_bound(tiny_settings, tmp_path):
    torch.manual_seed(0)
    s = export_settings(tiny_settings)
    state = randomize_(tg.GPT(tg.ModelConfig.of(s)), 5).state_dict()
    tensors, scheme = tg.quantize_state(state, s)
    rans = len(tg.pack(tensors, scheme, s))
    xz = len(lzma.compress(tg.st.save(tensors), preset=9))
    symbols = sum(
        tg.entropy_bytes(np.bincount(t.numpy().astype(np.int64).ravel() + 127))
        for k, t in tensors.items()
        if k.endswith(".q")
    )
    assert rans < 0.99 * xz and rans < symbols + sum(
        t.numel() * t.element_size() for k, t in tensors.items() if not k.endswith(".q")
    )


def rewrite_rans_head(blob: bytes, edit) -> bytes:
    """A structurally valid rANS artifact whose safetensors head was changed by edit(tensors)."""
    from safetensors.torch import save

    n = int.from_bytes(blob[8:12], "little")
    raw = lzma.decompress(blob[12 : 12 + n])
    tensors, header = tg.read_safetensors(raw)
    edit(tensors)
    head = lzma.compress(save(tensors, metadata={"pgolf": __import__("json").dumps(header)}))
    return blob[:8] + len(head).to_bytes(4, "little") + head + blob[12 + n :]


def test_corrupt_artifacts_are_refused_in_one_line(tiny_settings, tmp_path):
    torch.manual_seed(0)
    s = tiny_settings()
    state = randomize_(tg.GPT(tg.ModelConfig.of(s)), 6).state_dict()
    save(state, s, tmp_path / "good.ptz")
    r = (tmp_path / "good.ptz").read_bytes()
    tg.load_artifact(tmp_path / "good.ptz", s)  # intact: loads

    def flip(blob, at):
        b = bytearray(blob)
        b[at] ^= 0x5A
        return bytes(b)

    def bad_freq(t):
        t["rans.freq"][0, :2] += 1

    def bad_state(t):
        t["rans.states"][0] = 3

    def bad_modes(t):  # a shape its size would be allocated from
        t["ctx.0.modes"] = torch.zeros(10**4, 3, dtype=torch.uint8)

    def bad_order(t):  # a row order of another length than its matrices' rows
        t["ctx.0.order"] = torch.arange(5, dtype=torch.int16)[None]

    def missing_w(t):
        del t["ctx.1.w"]

    def order_digit_out_of_range(t):  # the right shape, but a first digit past the rows left to choose from
        rows = t["ctx.0.modes"].shape[0]
        t["ctx.0.order"] = torch.full(t["ctx.0.modes"].T.shape, rows, dtype=torch.int16)

    n = int.from_bytes(r[8:12], "little")
    cases = dict(
        rans_truncated=r[: len(r) // 2],
        rans_stream_flipped=flip(r, len(r) - 40),
        rans_head_flipped=flip(r, 12 + n // 2),
        rans_bad_magic=b"PGRANS9\n" + r[8:],
        rans_bad_length=r[:8] + (10**9).to_bytes(4, "little") + r[12:],
        rans_bad_freq=rewrite_rans_head(r, bad_freq),
        rans_bad_state=rewrite_rans_head(r, bad_state),
        rans_extra_word=r + b"\x00\x00",
        bad_modes=rewrite_rans_head(r, bad_modes),
        bad_order=rewrite_rans_head(r, bad_order),
        missing_w=rewrite_rans_head(r, missing_w),
        order_digit_out_of_range=rewrite_rans_head(r, order_digit_out_of_range),
        empty=b"",
    )
    for name, blob in cases.items():
        path = tmp_path / f"{name}.ptz"
        path.write_bytes(blob)
        with pytest.raises(tg.Fail) as err:
            tg.load_artifact(path, s)
        msg = str(err.value)
        assert str(path) in msg and "\n" not in msg, (name, msg)


# ----------------------------------------------------------------------------- fitting the byte limit


def test_fit_to_limit_prunes_the_cheapest_values_until_it_fits(tiny_settings):
    torch.manual_seed(0)
    s = export_settings(tiny_settings)
    state = randomize_(tg.GPT(tg.ModelConfig.of(s)), 7).state_dict()
    tensors, scheme = tg.quantize_state(state, s)
    original = {k: v.clone() for k, v in tensors.items()}
    full = tg.pack(tensors, scheme, s)
    logs = []
    run = types.SimpleNamespace(s=s, log=logs.append)
    # Already under: the very bytes pack() makes, nothing changed, nothing logged.
    blob = tg.fit_to_limit(run, tensors, scheme, None, len(full) + 10)
    assert blob == full and logs == []
    assert all(torch.equal(tensors[k], original[k]) for k in tensors)
    # Over by 0.5%: the result fits, and only +-1 values became 0, the cheapest (scale^2) ones first.
    budget = int(len(full) * 0.995)
    blob = tg.fit_to_limit(run, tensors, scheme, None, budget)
    assert len(blob) <= budget and len(logs) == 1 and "fit_to_limit: zeroed" in logs[0]
    pruned_cost, kept_cost = [], []
    for k, kind in scheme.items():
        if not kind.startswith("int"):
            assert torch.equal(tensors[k], original[k])
            continue
        before, after = original[k + ".q"], tensors[k + ".q"]
        changed = before != after
        assert (after[changed] == 0).all() and (before[changed].abs() == 1).all()
        cost = tensors[k + ".scale"].float()[:, None].square().expand_as(before)
        pruned_cost.append(cost[changed])
        kept_cost.append(cost[(after.abs() == 1)])
    pruned, kept = torch.cat(pruned_cost), torch.cat(kept_cost)
    assert pruned.numel() > 0 and kept.numel() > 0 and pruned.max() <= kept.min()
    loaded = tg.unpack(blob)[0]
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors if k.endswith(".q"))


# ----------------------------------------------------------------------------- crafted files: bounded memory


def claim_shape(blob: bytes, name: str, shape) -> bytes:
    """A genuine rANS artifact whose header claims another shape for one coded tensor (the stream unchanged)."""
    from safetensors.torch import save as st_save

    n = int.from_bytes(blob[8:12], "little")
    tensors, header = tg.read_safetensors(lzma.decompress(blob[12 : 12 + n]))
    header["shapes"][name] = list(shape)
    head = lzma.compress(st_save(tensors, metadata={"pgolf": json.dumps(header)}))
    return blob[:8] + len(head).to_bytes(4, "little") + head + blob[12 + n :]


def xz_bomb(n_bytes: int) -> bytes:
    """An artifact whose LZMA head is n_bytes of zeros (~1/7000 of that on disk)."""
    c, zeros = lzma.LZMACompressor(preset=0), bytes(2**24)
    head = b"".join([c.compress(zeros) for _ in range(n_bytes // len(zeros))] + [c.flush()])
    return tg.RANS_MAGIC + len(head).to_bytes(4, "little") + head


RSS_WRAPPER = """import json, resource, subprocess, sys
p = subprocess.run(sys.argv[2:], capture_output=True, text=True)
json.dump(dict(rc=p.returncode, stdout=p.stdout, stderr=p.stderr,
               maxrss_mib=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024), open(sys.argv[1], "w"))
"""


@pytest.mark.parametrize("craft", ["rans_shape_claim", "xz_bomb"])
def test_crafted_artifacts_are_refused_before_using_memory(craft, tmp_path, tiny_settings, script_env):
    """EVAL_ONLY on a crafted artifact: one error line, exit 2, and the process's peak memory far below what the file
    claims (40M symbols of int64 work arrays: >1 GB; a 1 GiB inflation), measured by a parent of its own."""
    s = tiny_settings()
    torch.manual_seed(0)
    blob = tg.pack(*tg.quantize_state(tg.GPT(tg.ModelConfig.of(s)).state_dict(), s), s)
    path = tmp_path / "crafted.ptz"
    path.write_bytes(
        claim_shape(blob, "blocks.0.mlp.fc.weight", (4000, 10000)) if craft == "rans_shape_claim" else xz_bomb(2**30)
    )
    assert path.stat().st_size < 1_000_000
    wrapper, report = tmp_path / "wrap.py", tmp_path / "report.json"
    wrapper.write_text(RSS_WRAPPER)
    env = script_env(tmp_path / "out", EVAL_ONLY=1, ARTIFACT_PATH=path)
    subprocess.run(
        [sys.executable, str(wrapper), str(report), sys.executable, str(tg.__file__)],
        env=env,
        cwd=tmp_path,
        timeout=300,
        check=True,
    )
    r = json.loads(report.read_text())
    lines = r["stderr"].strip("\n").split("\n")
    assert r["rc"] == 2 and "Traceback" not in r["stderr"] and len(lines) == 1, r["stderr"][-3000:]
    assert lines[0].startswith("error: ") and str(path) in lines[0] and "nothing in it was run" in lines[0]
    assert r["maxrss_mib"] < 700, r["maxrss_mib"]


def test_declared_shapes_and_inflated_sizes_are_checked_first(tiny_settings, tmp_path):
    s = tiny_settings()
    torch.manual_seed(0)
    blob = tg.pack(*tg.quantize_state(tg.GPT(tg.ModelConfig.of(s)).state_dict(), s), s)
    for name, crafted, why in (
        ("shape", claim_shape(blob, "blocks.0.mlp.fc.weight", (4000, 10000)), "not those of this model"),
        ("small_shape", claim_shape(blob, "blocks.0.mlp.fc.weight", (2, 3)), "not those of this model"),
        ("bomb", xz_bomb(2**26), "inflates past"),
    ):
        path = tmp_path / f"{name}.ptz"
        path.write_bytes(crafted)
        with pytest.raises(tg.Fail, match=why):
            tg.load_artifact(path, s)
    # The float-weights file: a tensor of another shape (or one more tensor) is refused before any is read.
    from safetensors.torch import save_file

    state = tg.GPT(tg.ModelConfig.of(s)).state_dict()
    tg.save_float_weights(state, s, tmp_path / "good.safetensors")
    assert set(tg.load_float_weights(tmp_path / "good.safetensors", s)) == set(state)
    meta = {"pgolf": json.dumps(dict(format="pgolf-float-v1", config=tg.artifact_config(s)))}
    for name, edit in (
        ("bigger", dict(state, **{"tok_emb.weight": torch.zeros(2048, 64)})),
        ("extra", dict(state, extra=torch.zeros(3))),
    ):
        save_file({k: v.float().contiguous() for k, v in edit.items()}, tmp_path / f"{name}.safetensors", metadata=meta)
        with pytest.raises(tg.Fail, match="not those of a model of these settings"):
            tg.load_float_weights(tmp_path / f"{name}.safetensors", s)

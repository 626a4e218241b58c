"""AWQ-lite (PR #1908, used by #1945 -> #2014) as an export setting: the calibration inputs' RMS, the group choice
against a brute-force scoring, the chosen columns on their own grid inside the GPTQ solve, the packed round trip, and
the settings around it."""

from __future__ import annotations

import collections
from dataclasses import replace

import numpy as np
import pytest
import torch
from test_export import cpu_run
from test_pr1855 import noised, pr_settings

import train_gpt as tg

AWQ = dict(AWQ_LITE_ENABLED=1, AWQ_LITE_GROUP_SIZE=16)


def calibrated(tiny_settings, **over):
    s = pr_settings(tiny_settings, GPTQ_CALIB="self", GPTQ_CALIB_SEQS=2, GPTQ_CALIB_LEN=16, **{**AWQ, **over})
    torch.manual_seed(0)
    model = noised(tg.GPT(tg.ModelConfig.of(s))).eval()
    model.looping = True  # as export_artifact calibrates a looped stack
    return s, model, *tg.collect_hessians(model, cpu_run(s))


def test_settings_take_the_record_names_and_stay_off_in_every_stack():
    for stack in ("seed", "pr1855", "pr2135"):
        assert tg.parse_settings({"STACK": stack}).awq_lite_enabled == 0
    s = tg.parse_settings({"STACK": "pr1855", "AWQ_LITE_ENABLED": "1"}).by_env_name()
    # PR #1945's logged values are the defaults
    assert {k: s[k] for k in ("AWQ_LITE_BITS", "AWQ_LITE_GROUP_SIZE", "AWQ_LITE_GROUP_TOP_K")} == dict(
        AWQ_LITE_BITS=8, AWQ_LITE_GROUP_SIZE=64, AWQ_LITE_GROUP_TOP_K=1
    )
    with pytest.raises(tg.Fail, match="AWQ_LITE_ENABLED=1 .* set QUANT=gptq"):
        tg.parse_settings({"AWQ_LITE_ENABLED": "1", "QUANT": "gptq_lite"})


def test_input_rms_is_that_of_the_rows_the_hessian_sums(tiny_settings):
    s, model, hessians, rms = calibrated(tiny_settings)
    assert set(rms) == set(hessians)
    # the embedding's inputs are the final-norm outputs of the calibration text, one row a token
    tokens = tg.calibration_tokens(model, cpu_run(s))
    with torch.no_grad():
        h = model.forward_hidden(tokens).double()
    x = (h / torch.sqrt(h.square().mean(-1, keepdim=True) + torch.finfo(torch.float32).eps)).flatten(0, 1)
    assert torch.allclose(rms["tok_emb.weight"].double(), x.square().mean(0).sqrt(), rtol=1e-5)
    # each matrix averages over every row it saw: the calibration tokens once per virtual use of its layer (layer 3,
    # looped, three times), so RMS^2 x tokens x uses is the Hessian's diagonal
    uses = collections.Counter(sum(tg.layer_schedule(tg.ModelConfig.of(s), looped=True), []))
    assert uses[3] == 3 and uses[0] == 1
    for j in (0, 3):
        name = f"blocks.{j}.attn.c_q.weight"
        H = hessians[name].diagonal().double()
        assert torch.allclose(rms[name].double().square() * tokens.numel() * uses[j], H, rtol=1e-5)


def brute_force_groups(flat, rms, s):
    """Every (score, name, first column) by plain loops in float64, the top k kept."""
    scored = []
    for name, r in rms.items():
        if int(tg.precision_of(name, flat[name], s)[3:]) >= s.awq_lite_bits:
            continue
        w = flat[name].double().numpy()
        size = s.awq_lite_group_size
        for start in range(0, w.shape[1] - size + 1, size):
            score = sum(float(r[c]) * np.abs(w[:, c]).mean() for c in range(start, start + size))
            scored.append((score, name, start))
    return sorted(scored, reverse=True)[: s.awq_lite_group_top_k]


@pytest.mark.parametrize("bits,top_k", [(8, 1), (8, 5), (7, 4)])
def test_groups_are_the_most_salient_of_the_whole_model(tiny_settings, bits, top_k):
    s, model, hessians, rms = calibrated(tiny_settings, AWQ_LITE_BITS=bits, AWQ_LITE_GROUP_TOP_K=top_k)
    flat = tg.unbank({k: v.float() for k, v in model.state_dict().items()}, s.num_layers)
    g = torch.Generator().manual_seed(bits + top_k)
    rms = {k: torch.rand(len(v), generator=g) for k, v in rms.items()}  # a spread of saliencies
    want = brute_force_groups(flat, rms, s)
    got = tg.awq_groups(flat, rms, s)
    assert sum(len(v) for v in got.values()) == top_k * 16
    expect = {}
    for _, name, start in want:
        expect.setdefault(name, []).extend(range(start, start + 16))
    assert {k: sorted(v.tolist()) for k, v in got.items()} == {k: sorted(v) for k, v in expect.items()}
    if bits == 7:  # the int7 embedding is no candidate for 7-bit groups
        assert "tok_emb.weight" not in got


def test_chosen_columns_round_on_their_own_grid_inside_the_solve():
    s = replace(tg.parse_settings({"STACK": "pr1855"}), awq_lite_enabled=1)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(24, 48, generator=g) * 0.02
    cols = torch.arange(16, 32, dtype=torch.int16)
    hi_scale = tg.awq_scales(w, 11.5, 127)
    assert np.array_equal(hi_scale.half().numpy(), (11.5 * w.double().numpy().std(1, ddof=1) / 127).astype(np.float16))
    # a diagonal H spreads no error: GPTQ is then round-to-nearest, column by column, on each column's own grid
    q, scale = tg.gptq_rows(w, torch.diag(torch.rand(48, generator=g) + 0.5), 31, s, 11.5, (cols, hi_scale, 127))
    inside = torch.zeros(48, dtype=torch.bool)
    inside[cols.long()] = True
    want_lo = torch.clamp(torch.round(w / scale.float()[:, None]), -31, 31)
    want_hi = torch.clamp(torch.round(w / hi_scale[:, None]), -127, 127)
    assert torch.equal(q[:, ~inside].float(), want_lo[:, ~inside])
    assert torch.equal(q[:, inside].float(), want_hi[:, inside])
    assert q[:, inside].abs().max() > 31  # the finer grid is used
    # with a full H, the error of the output on the calibration inputs falls when the salient inputs get the fine grid
    x = torch.randn(512, 48, generator=g)
    x[:, 16:32] *= 8
    H = x.T @ x
    plain = tg.gptq_rows(w, H, 31, s, 11.5)
    awq = tg.gptq_rows(w, H, 31, s, 11.5, (cols, hi_scale, 127))
    assert torch.equal(plain[1], awq[1])  # the rows' own scale is unchanged

    def out_err(q, scale, hi=None):
        back = q.float() * scale.float()[:, None]
        if hi is not None:
            back[:, cols.long()] = q[:, cols.long()].float() * hi[:, None]
        return (x @ (back - w).T).square().sum()

    assert out_err(*awq, hi_scale) < 0.7 * out_err(*plain)
    # no columns: the solve of no AWQ, bit for bit
    none = tg.gptq_rows(w, H, 31, s, 11.5, (cols[:0], hi_scale, 127))
    assert torch.equal(none[0], plain[0]) and torch.equal(none[1], plain[1])


def test_quantized_state_packs_and_loads_exactly_with_lqer_on_top(tiny_settings, tmp_path):
    s, model, hessians, rms = calibrated(tiny_settings, AWQ_LITE_GROUP_TOP_K=2)
    tensors, scheme = tg.quantize_state(model.state_dict(), s, hessians, rms)
    awq = [k[:-4] for k in tensors if k.endswith(".awq")]
    assert awq and all(tensors[k + ".awq_s"].dtype == torch.float16 for k in awq)
    assert sum(len(tensors[k + ".awq"]) for k in awq) == 32
    flat = tg.unbank({k: v.float() for k, v in model.state_dict().items()}, s.num_layers)
    k = awq[0]
    cols = tensors[k + ".awq"].long()
    plain = tensors[k + ".q"].float() * tensors[k + ".scale"].float()[:, None]
    fine = tg.dequantize({n: v for n, v in tensors.items() if ".lq" not in n}, k)
    assert torch.equal(fine[:, cols], tensors[k + ".q"][:, cols].float() * tensors[k + ".awq_s"].float()[:, None])
    assert (flat[k] - fine)[:, cols].norm() < (flat[k] - plain)[:, cols].norm()
    # LQER is fitted to what is left with the groups in place: its top tensors by that error
    errs = {
        n: (flat[n] - tg.dequantize({m: v for m, v in tensors.items() if ".lq" not in m}, n)).norm() for n in hessians
    }
    assert sorted(n[:-4] for n in tensors if n.endswith(".lqa")) == sorted(sorted(errs, key=errs.get)[-3:])
    blob = tg.pack(tensors, scheme, s)
    got, header = tg.unpack(blob, s)
    assert header["awq"] == {n: len(tensors[n + ".awq"]) for n in awq}
    assert all(torch.equal(got[n], tensors[n]) for n in tensors)
    (tmp_path / "a.ptz").write_bytes(blob)
    loaded = tg.load_artifact(tmp_path / "a.ptz", s)
    assert torch.equal(tg.unbank(loaded, s.num_layers)[k], tg.dequantize(tensors, k))
    # a column outside the matrix is refused (negative indices would otherwise wrap)
    for bad in (-1, tensors[k + ".q"].size(1)):
        t = dict(tensors)
        t[k + ".awq"] = t[k + ".awq"].clone()
        t[k + ".awq"][0] = bad
        with pytest.raises(ValueError, match="AWQ-lite columns are outside"):
            tg.dequantize(t, k)

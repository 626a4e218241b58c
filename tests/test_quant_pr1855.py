"""PR #1855's export as settings (STACK=pr1855): SDClip row scales, GPTQ on the tied embedding with the Hessian of the
final-norm outputs, int8 per-row attention gates and LQER asymmetric factors, each against an independent
computation; a tiny STACK=pr1855 train+export+eval run whose artifact loads; STACK=seed's export unchanged."""

from __future__ import annotations

import json
import lzma
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from test_export import cpu_run
from test_pr1855 import TINY_PR, noised, pr_settings

import train_gpt as tg


def test_pr1855_stack_turns_the_scheme_on_and_seed_keeps_it_off():
    pr, seed = tg.parse_settings({"STACK": "pr1855"}), tg.parse_settings({})
    assert (pr.quant_scales, pr.gptq_embed, pr.gate_int8, pr.lqer_enabled) == ("sdclip", 1, 1, 1)
    assert (seed.quant_scales, seed.gptq_embed, seed.gate_int8, seed.lqer_enabled) == ("search", 0, 0, 0)
    # the record's logged values (MODERN_STACK.md 6.1, 6.2), typed from the document
    assert {
        k: pr.by_env_name()[k]
        for k in (
            "ATTN_CLIP_SIGMAS",
            "MLP_CLIP_SIGMAS",
            "EMBED_CLIP_SIGMAS",
            "LQER_RANK",
            "LQER_TOP_K",
            "LQER_ASYM_GROUP",
        )
    } == dict(
        ATTN_CLIP_SIGMAS=13.0,
        MLP_CLIP_SIGMAS=11.5,
        EMBED_CLIP_SIGMAS=14.0,
        LQER_RANK=4,
        LQER_TOP_K=3,
        LQER_ASYM_GROUP=64,
    )
    with pytest.raises(tg.Fail, match="QUANT_SCALES"):
        tg.parse_settings({"QUANT_SCALES": "minmax"})


def test_sdclip_scales_are_k_row_std_over_qmax_in_fp16():
    s = tg.parse_settings({"STACK": "pr1855"})
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(48, 96, generator=g) * 0.02, torch.randn(256, 96, generator=g)
    H = x.T @ x
    for name, k, max_q in (
        ("blocks.0.attn.c_q.weight", 13.0, 31),
        ("blocks.0.mlp.fc.weight", 11.5, 31),
        ("tok_emb.weight", 14.0, 63),
    ):
        assert tg.clip_sigmas(name, s) == k
        q, scale = tg.gptq_rows(w, H, max_q, s, tg.clip_sigmas(name, s))
        wn = w.numpy().astype(np.float64)
        want = (k * wn.std(axis=1, ddof=1) / max_q).astype(np.float16)
        assert scale.dtype == torch.float16 and np.array_equal(scale.numpy(), want), name
        assert q.abs().max() <= max_q
    assert tg.clip_sigmas("blocks.0.attn.c_q.weight", tg.parse_settings({})) == 0  # seed: the scale search


def test_embedding_hessian_is_that_of_the_final_norm_outputs(tiny_settings):
    s = pr_settings(tiny_settings, GPTQ_CALIB="self", GPTQ_CALIB_SEQS=3, GPTQ_CALIB_LEN=24)
    torch.manual_seed(0)
    model = noised(tg.GPT(tg.ModelConfig.of(s))).eval()
    hessians, _ = tg.collect_hessians(model, cpu_run(s))
    tokens = tg.calibration_tokens(model, cpu_run(s))  # seeded: the same text
    with torch.no_grad():
        h = model.forward_hidden(tokens).double()
    x = (h / torch.sqrt(h.square().mean(-1, keepdim=True) + torch.finfo(torch.float32).eps)).flatten(0, 1)
    want = x.T @ x
    got = hessians["tok_emb.weight"].double()
    assert got.shape == (64, 64)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    # not the embedding's own inputs (one-hot rows) nor the first block's: the head's
    assert not torch.allclose(got, hessians["blocks.0.attn.c_q.weight"].double(), rtol=1e-2)
    assert "tok_emb.weight" not in tg.collect_hessians(model, cpu_run(replace(s, gptq_embed=0)))[0]
    # and it is what GPTQ quantizes the embedding with: int7 under STACK=pr1855, SDClip k = 14
    tensors, scheme = tg.quantize_state(model.state_dict(), s, hessians)
    assert scheme["tok_emb.weight"] == "int7"
    q, scale = tg.gptq_rows(model.tok_emb.weight.detach(), hessians["tok_emb.weight"], 63, s, 14.0)
    assert torch.equal(tensors["tok_emb.weight.q"], q) and torch.equal(tensors["tok_emb.weight.scale"], scale)


def test_int8_gate_rows_round_trip_within_half_a_step(tiny_settings):
    s = pr_settings(tiny_settings)
    torch.manual_seed(0)
    model = noised(tg.GPT(tg.ModelConfig.of(s)))
    tensors, scheme = tg.quantize_state(model.state_dict(), s)
    gates = [k for k in scheme if k.endswith("attn_gate_w")]
    assert len(gates) == 11 and all(scheme[k] == "int8" for k in gates)
    back = tg.unbank(tg.dequantize_state(tensors, scheme, 11), 11)
    for k in gates:
        w = model.state_dict()[k].float()
        scale = tensors[k + ".scale"]
        assert scale.dtype == torch.float16 and scale.shape == (w.size(0),)
        want = (w.abs().amax(dim=1).numpy() / 127).astype(np.float16)
        assert np.array_equal(scale.numpy(), want)
        assert ((back[k] - w).abs() <= scale.float()[:, None] / 2 + 1e-7).all()
    assert tg.precision_of(gates[0], model.state_dict()[gates[0]], replace(s, gate_int8=0)) == "fp16"


def test_lqer_reduces_the_error_as_its_svd_promises_and_packs_exactly():
    g = torch.Generator().manual_seed(1)
    # an error with a strong rank-4 part, as a quantization error with structure has
    E = (
        torch.randn(96, 4, generator=g) @ torch.randn(4, 80, generator=g) * 0.01
        + torch.randn(96, 80, generator=g) * 1e-3
    )
    f = tg.lqer_factors("w", E, 4, 64)
    assert f["w.lqa"].shape == (96, 4) and f["w.lqb"].shape == (5, 64) and f["w.lqb_s"].shape == (5,)
    assert f["w.lqa"].min() >= -2 and f["w.lqa"].max() <= 1 and f["w.lqb"].min() >= -8 and f["w.lqb"].max() <= 7
    # independent: the rank-4 SVD in float64 and its promise ||E - E_4||_F = sqrt(sum of the other sigma^2)
    U, S, Vh = np.linalg.svd(E.numpy().astype(np.float64), full_matrices=False)
    A, B = U[:, :4] * S[:4], Vh[:4]
    assert np.isclose(np.linalg.norm(E.numpy() - A @ B), np.sqrt((S[4:] ** 2).sum()), rtol=1e-3)
    # the packing's error, elementwise at most half a step (+ the fp16 rounding of the scales; signs of the singular
    # vectors aligned with numpy's)
    sa, sb = f["w.lqa_s"].double().item(), f["w.lqb_s"].double().numpy()
    assert np.isclose(sa, np.abs(A).max() / 1.5, rtol=1e-3)
    Ap = f["w.lqa"].numpy() * sa
    Bp = (f["w.lqb"].numpy() * sb[:, None]).ravel()[:320].reshape(4, 80)
    sign = np.sign((Ap * A).sum(0))
    assert (np.abs(Ap * sign - A) <= 0.51 * sa).all()
    assert (np.abs(Bp * sign[:, None] - B).ravel() <= 0.51 * np.repeat(sb, 64)[:320]).all()
    delta = tg.lqer_delta(f, "w", 80).double().numpy()
    assert np.allclose(delta, Ap @ Bp, atol=1e-6)
    # ||E - A'B'|| <= ||E - AB|| + ||AB - A'B'||, and the correction shrinks the error
    left = np.linalg.norm(E.numpy() - delta)
    assert left <= np.sqrt((S[4:] ** 2).sum()) + np.linalg.norm(A @ B - Ap @ Bp) + 1e-6
    assert left < 0.7 * np.linalg.norm(E.numpy())


def test_lqer_factors_and_gates_round_trip_through_the_packer(tiny_settings, tmp_path):
    s = pr_settings(tiny_settings)
    torch.manual_seed(0)
    model = noised(tg.GPT(tg.ModelConfig.of(s)))
    state = model.state_dict()
    calib = replace(s, gptq_calib="self", gptq_calib_seqs=2, gptq_calib_len=16)
    hessians, _ = tg.collect_hessians(model, cpu_run(calib))
    tensors, scheme = tg.quantize_state(state, s, hessians)
    flat = tg.unbank({k: v.float() for k, v in state.items()}, 11)
    errs = {
        k: (flat[k] - tensors[k + ".q"].float() * tensors[k + ".scale"].float()[:, None]).norm().item()
        for k in hessians
    }
    top = sorted(errs, key=errs.get, reverse=True)[:3]
    assert sorted(k[:-4] for k in tensors if k.endswith(".lqa")) == sorted(top)
    blob = tg.pack(tensors, scheme, s)
    path = tmp_path / "a.ptz"
    path.write_bytes(blob)
    got, header = tg.unpack(blob, s)
    assert header["lqer"] == {k: [4, 64] for k in top}
    assert set(got) == set(tensors) and all(torch.equal(got[k], tensors[k]) for k in tensors)
    loaded = tg.unbank(tg.load_artifact(path, s), 11)
    for k in top:  # A B added to the dequantized weight once, at load
        plain = tensors[k + ".q"].float() * tensors[k + ".scale"].float()[:, None]
        assert torch.allclose(loaded[k], plain + tg.lqer_delta(tensors, k, plain.size(1)))
        assert (flat[k] - loaded[k]).norm() < (flat[k] - plain).norm()
    # a declared rank past the matrix is refused before decoding
    n = int.from_bytes(blob[8:12], "little")
    from safetensors.torch import save as st_save

    head, meta = tg.read_safetensors(lzma.decompress(blob[12 : 12 + n]))
    for bad in ([65, 64], [4, 10**9], [0, 64], [4, 0], [4, 32]):
        meta["lqer"][top[0]] = bad
        crafted = st_save(head, metadata={"pgolf": json.dumps(meta)})
        raw = lzma.compress(crafted)
        path.write_bytes(blob[:8] + len(raw).to_bytes(4, "little") + raw + blob[12 + n :])
        with pytest.raises(tg.Fail, match="not those of this model"):
            tg.load_artifact(path, s)


def test_seed_export_has_none_of_it(tiny_settings):
    s = tiny_settings()
    torch.manual_seed(0)
    model = tg.GPT(tg.ModelConfig.of(s))
    hessians, _ = tg.collect_hessians(model, cpu_run(replace(s, gptq_calib_seqs=2, gptq_calib_len=16)))
    assert "tok_emb.weight" not in hessians
    tensors, scheme = tg.quantize_state(model.state_dict(), s, hessians)
    assert not any(".lq" in k for k in tensors) and scheme["tok_emb.weight"] == "int8"
    assert "lqer" not in tg.unpack(tg.pack(tensors, scheme, s))[1]


def test_tiny_pr1855_run_exports_an_artifact_that_loads(tmp_path, tiny_settings, script_env, run_script):
    # a cap far away and a long reserve: the calibration on training tokens ends inside it, and the log says nothing;
    # AWQ-lite on (PR #1945's export), its 2 groups of 16 columns logged and in the artifact
    env = script_env(
        tmp_path,
        **TINY_PR,
        AWQ_LITE_ENABLED=1,
        AWQ_LITE_GROUP_SIZE=16,
        AWQ_LITE_GROUP_TOP_K=2,
        ITERATIONS=2,
        VAL_MAX_TOKENS=512,
        GPTQ_CALIB_SEQS=2,
        GPTQ_CALIB_LEN=32,
        MAX_WALLCLOCK_SECONDS=600,
        GPTQ_RESERVE_SECONDS=300,
    )
    proc = run_script(env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    header = tg.unpack((tmp_path / tg.ARTIFACT_NAME).read_bytes())[1]
    scheme = header["scheme"]
    awq = re.findall(r"^awq_lite bits:8 tensor:(\S+) group_starts:(\S+)$", out, re.M)
    assert sum(len(starts.split(",")) for _, starts in awq) == 2
    assert header["awq"] == {name: 16 * len(starts.split(",")) for name, starts in awq}
    assert {"int8", "int7", "int6"} <= set(scheme.values())  # gates, the embedding, the matrices
    lqer = [ln for ln in out.splitlines() if ln.startswith("lqer rank:4 group:64 tensors:")]
    assert len(lqer) == 1 and len(lqer[0].split("tensors:")[1].split(",")) == 3
    assert "final_int6_roundtrip_exact" in out
    check_eval_clock(out, tmp_path)
    end, cap, loud = calib_line(out, tmp_path)
    assert cap == 600 and 0 < end < 300 and not loud
    s = pr_settings(tiny_settings)
    state = tg.load_artifact(tmp_path / tg.ARTIFACT_NAME, s)
    assert set(state) == set(tg.model_shapes(s))


def check_eval_clock(out, out_dir):
    """The final eval_clock block: the artifact's load and every pass the log scored, counted, summing to the counted
    total (the summary's eval_time_s); the start-up validation load and the float diagnostic listed, not counted."""
    parts = re.findall(r"^eval_clock part:(\S+) seconds:([\d.]+) (counted|not_counted) \(", out, re.M)
    counted = {p: float(x) for p, x, kind in parts if kind == "counted"}
    passes = re.findall(r"^(\w+)_exact val_loss:", out, re.M)
    assert list(counted) == ["artifact_load", *[p for p in passes if p != "final_float"]]
    assert [p for p, _, kind in parts if kind == "not_counted"] == ["val_load", "final_float_exact"]
    total = float(re.search(r"^eval_clock counted_total:([\d.]+)s budget:600s$", out, re.M).group(1))
    assert json.loads((out_dir / "logs" / "test.json").read_text())["eval_time_s"] == pytest.approx(total, abs=0.051)
    assert sum(counted.values()) == pytest.approx(total, abs=0.05 * len(counted) + 0.001)


def calib_line(out, out_dir):
    """The gptq_calibration line's numbers, checked against the run's own: its end on the training clock is the
    summary's training time plus the logged calibration time; the loud line appears exactly when that is past the
    cap. Returns (end, cap, loud)."""
    line = next(ln for ln in out.splitlines() if ln.startswith("gptq_calibration source:train "))
    fields = dict(f.split(":", 1) for f in line.split()[1:])
    end, cap, calib = (float(fields[k].rstrip("s")) for k in ("train_plus_calibration", "cap", "time"))
    train_s = json.loads((out_dir / "logs" / "test.json").read_text())["train_time_ms"] / 1000
    assert end == pytest.approx(train_s + calib, abs=0.11)
    loud = "training tokens read after the cap" in out
    if abs(end - cap) > 0.05:  # the line prints one decimal: within rounding of the cap either verdict can be right
        assert loud == (0 < cap < end)
    return end, cap, loud


def test_calibration_past_the_cap_is_said(tmp_path, script_env, run_script):
    """GPTQ_CALIB=train reads training tokens: with a reserve shorter than the calibration (and than a step), the
    training clock stops at cap - reserve and the calibration ends past the cap, which the log says loudly."""
    env = script_env(
        tmp_path,
        **TINY_PR,
        ITERATIONS=100000,
        MAX_WALLCLOCK_SECONDS=1.5,
        GPTQ_RESERVE_SECONDS=0.001,
        VAL_MAX_TOKENS=512,
        GPTQ_CALIB_SEQS=2,
        GPTQ_CALIB_LEN=32,
        VAL_LOSS_EVERY=0,
    )
    proc = run_script(env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    end, cap, loud = calib_line(proc.stdout, tmp_path)
    assert cap == 1.5 and loud and end >= 1.5  # past the cap, printed to one decimal
    # the training time it starts from is the loop's own clock where it stopped, not an earlier reading
    stopped = float(re.search(r"^stopping_early: wallclock_cap train_time:(\d+)ms", proc.stdout, re.M).group(1))
    assert json.loads((tmp_path / "logs" / "test.json").read_text())["train_time_ms"] == pytest.approx(stopped, abs=1)

"""tools/quant_report.py: the record's scheme beside our default on one float file, and --many over several."""

from __future__ import annotations

import re
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, SAMPLE_DATA, SAMPLE_TOKENIZER, TINY
from test_pr1855 import TINY_PR

import train_gpt as tg

sys.path.insert(0, str(ROOT / "tools"))
import quant_report as qr  # noqa: E402

RECORD = dict(QUANT_SCALES="sdclip", GPTQ_EMBED=1, GATE_INT8=1, LQER_ENABLED=1)
SMALL = dict(ITERATIONS=2, VAL_MAX_TOKENS=512, EVAL_STRIDE=128, GPTQ_CALIB_SEQS=2, GPTQ_CALIB_LEN=32)


@pytest.fixture(scope="module")
def floats(tmp_path_factory, script_env, run_script):
    """Two tiny 2-step float files; the first trained (and so exported) with the record's scheme, its log kept."""
    out = {}
    for name, extra in (("a", RECORD), ("b", dict(SEED=2, QUANT="gptq_lite"))):
        d = tmp_path_factory.mktemp(f"float_{name}")
        proc = run_script(script_env(d, **SMALL, **extra), timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[name] = (d / tg.FLOAT_NAME, proc.stdout)
    return out


def report(monkeypatch, capsys, tmp_path, *args, **settings):
    """quant_report.main in this process (one thread, as the runs' OMP_NUM_THREADS=1) with the tiny settings of the
    runs above; its stdout."""
    for k in tg.SETTING_NAMES:
        monkeypatch.delenv(k, raising=False)
    env = dict(TINY, **SMALL, DATA_PATH=SAMPLE_DATA, TOKENIZER_PATH=SAMPLE_TOKENIZER, OUTPUT_DIR=tmp_path)
    for k, v in dict(env, **settings).items():
        monkeypatch.setenv(k, str(v))
    monkeypatch.setattr(sys, "argv", ["quant_report.py", *map(str, args), "--val-tokens", "512"])
    assert qr.main() == 0
    return capsys.readouterr().out


def fields(line: str) -> dict:
    return dict(f.split(":", 1) for f in line.split()[1:])


def table(out: str, first: str) -> dict:
    """Rows of the markdown table whose header starts with `| first |`: {first cell: {column: cell}}."""
    lines = out.splitlines()
    i = next(i for i, ln in enumerate(lines) if ln.startswith(f"| {first} |"))
    head = [c.strip() for c in lines[i].strip("|").split("|")]
    rows = {}
    for ln in lines[i + 2 :]:
        if not ln.startswith("|"):
            break
        cells = [c.strip() for c in ln.strip("|").split("|")]
        rows[cells[0]] = dict(zip(head, cells))
    return rows


def num(cell: str) -> float:
    return float(cell.replace(",", ""))


def test_last_line_adds_default_and_record_gaps_and_brotli_bytes(floats, one_thread, monkeypatch, capsys, tmp_path):
    out = report(monkeypatch, capsys, tmp_path, floats["a"][0])
    last = out.strip().splitlines()[-1]
    assert last.startswith("quant_report ")
    f = fields(last)
    old = "float_bpb gptq_lite_gap gptq_gap lzma_bytes best_bytes entropy_bytes best_compressor".split()
    lrzip = ["lrzip_pergroup_bytes"] if qr.shutil.which("lrzip") else []  # only where the binary is installed
    assert list(f) == old + ["default_gap", "record_scheme_gap", "brotli_bytes"] + lrzip
    rows = table(out, "candidate")
    assert list(rows) == ["gptq_lite", "gptq (default)", "record_scheme"]  # the seed stack's QUANT is gptq
    # Each gap on the last line is its row's (printed to 6 decimals there), and is its bpb minus the float's.
    float_bpb = float(re.search(r"^float val bpb: ([0-9.]+) on 512 val tokens$", out, re.M).group(1))
    assert abs(float(f["float_bpb"]) - float_bpb) < 1e-9
    for key, row in (
        ("gptq_lite_gap", "gptq_lite"),
        ("gptq_gap", "gptq (default)"),
        ("default_gap", "gptq (default)"),
        ("record_scheme_gap", "record_scheme"),
    ):
        r = rows[row]
        assert abs(float(f[key]) - num(r["gap"])) <= 5.1e-7, key
        assert abs(num(r["val bpb"]) - float_bpb - num(r["gap"])) <= 1.1e-6, key
    default = rows["gptq (default)"]
    assert int(f["brotli_bytes"]) == num(default["brotli_shuffle"])
    assert int(f["lzma_bytes"]) == num(default["lzma"])
    packers = ["rans", "lzma", "brotli_shuffle", "zstd", "bitpack_lzma"] + ["lrzip_pergroup"] * bool(lrzip)
    assert int(f["best_bytes"]) == min(num(default[p]) for p in packers)
    if lrzip:
        assert int(f["lrzip_pergroup_bytes"]) == num(default["lrzip_pergroup"])
    assert int(f["best_bytes"]) == num(default[f["best_compressor"]])
    # The record's scheme is another export, not ours relabelled: LQER's factors and SDClip scales change the bytes.
    assert num(rows["record_scheme"]["rans"]) != num(default["rans"])
    assert re.search(r"^record_scheme: .*; lqer (\S+,){2}\S+$", out, re.M)


def test_record_scheme_gap_is_that_of_a_direct_export_with_those_settings(
    floats, one_thread, monkeypatch, capsys, tmp_path
):
    path, log = floats["a"]  # the run exported with the record's settings at the end of its training
    direct_gap = float(re.search(r"^quant_gap_bpb:(-?[0-9.]+)$", log, re.M).group(1))
    direct_float = float(re.search(r"^final_float_exact val_loss:\S+ val_bpb:([0-9.]+)$", log, re.M).group(1))
    direct_bytes = int(re.search(r"^Serialized model int6\+rans: (\d+) bytes$", log, re.M).group(1))
    out = report(monkeypatch, capsys, tmp_path, path)
    f = fields(out.strip().splitlines()[-1])
    assert abs(float(f["record_scheme_gap"]) - direct_gap) <= 1.01e-8, (f["record_scheme_gap"], direct_gap)
    assert abs(float(f["float_bpb"]) - direct_float) <= 5.1e-7
    assert num(table(out, "candidate")["record_scheme"]["rans"]) == direct_bytes  # the same artifact, byte for byte


def test_many_prints_every_file_and_the_mean_of_the_gaps(floats, one_thread, monkeypatch, capsys, tmp_path):
    a, b = floats["a"][0], floats["b"][0]
    out = report(monkeypatch, capsys, tmp_path, "--many", a, b)
    rows = table(out, "file")
    assert list(rows) == [str(a), str(b), "mean", "sd", "min", "max"]
    last = fields(out.strip().splitlines()[-1])
    assert out.strip().splitlines()[-1].startswith("quant_report_many files:2 ")
    for c in qr.MANY:
        gaps = [num(rows[str(p)][f"{c} gap"]) for p in (a, b)]
        assert all(num(rows[str(p)][f"{c} bytes"]) > 0 for p in (a, b))
        mean = sum(gaps) / 2
        assert abs(num(rows["mean"][f"{c} gap"]) - mean) <= 2e-8, c  # inputs and output rounded to 8 decimals
        assert abs(float(last[f"{c}_mean_gap"]) - mean) <= 2e-8, c
        assert abs(float(last[f"{c}_sd_gap"]) - abs(gaps[0] - gaps[1]) / 2**0.5) <= 2e-8, c
        assert num(rows["min"][f"{c} gap"]) == min(gaps) and num(rows["max"][f"{c} gap"]) == max(gaps)
    # The same numbers as the one-file report: file a's record_scheme gap is its direct export's.
    direct_gap = float(re.search(r"^quant_gap_bpb:(-?[0-9.]+)$", floats["a"][1], re.M).group(1))
    assert abs(num(rows[str(a)]["record_scheme gap"]) - direct_gap) <= 1.01e-8


def test_the_stack_comes_from_the_run_log_beside_the_file(
    tmp_path, one_thread, script_env, run_script, monkeypatch, capsys
):
    """STACK unset: a STACK=pr1855 file is measured at that stack's defaults (its log says so), which are the
    record's scheme; the seed files above at the seed's (asserted by the first test's default row)."""
    proc = run_script(script_env(tmp_path, **TINY_PR, **dict(SMALL, EVAL_STRIDE=32)), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    direct_gap = float(re.search(r"^quant_gap_bpb:(-?[0-9.]+)$", proc.stdout, re.M).group(1))
    # the run's settings that are not in the file: its sequence lengths, and TINY_PR's fp32 embedding
    seq = dict(TRAIN_SEQ_LEN=32, EVAL_SEQ_LEN=32, EVAL_STRIDE=32, EMBED_BF16=0)
    out = report(monkeypatch, capsys, tmp_path / "report", tmp_path / tg.FLOAT_NAME, **seq)
    assert re.search(r"^stack:pr1855 from the run log .*test\.json ", out, re.M), out[:2000]
    f = fields(out.strip().splitlines()[-1])
    assert f["default_gap"] == f["record_scheme_gap"] and abs(float(f["default_gap"]) - direct_gap) <= 1.01e-8
    # The environment's STACK wins over the log; without a log, seed.
    assert qr.file_stack(tmp_path / tg.FLOAT_NAME, dict(STACK="seed")) == ("seed", "environment")
    (tmp_path / "alone").mkdir()
    (tmp_path / "alone" / tg.FLOAT_NAME).write_bytes((tmp_path / tg.FLOAT_NAME).read_bytes())
    assert qr.file_stack(tmp_path / "alone" / tg.FLOAT_NAME, {})[0] == "seed"


def test_at_bytes_reads_the_gap_off_the_curve_between_its_neighbours():
    pts = [(700, 0.1), (500, 0.5), (600, 0.3)]  # unsorted: by bytes 500 -> 0.5, 600 -> 0.3, 700 -> 0.1
    assert qr.at_bytes(pts, 550) == pytest.approx(0.4)
    assert qr.at_bytes(pts, 675) == pytest.approx(0.15)
    assert qr.at_bytes(pts, 600) == pytest.approx(0.3)
    assert qr.at_bytes(pts, 499) != qr.at_bytes(pts, 499)  # outside the measured range: nan, never extrapolated


def test_equal_bytes_mode_measures_each_candidate_at_each_width(floats, one_thread, monkeypatch, capsys, tmp_path):
    b = floats["b"][0]
    out = report(monkeypatch, capsys, tmp_path, "--many", b, "--bits", "5,7")
    # first the --many table at the stack's MATRIX_BITS: the same numbers as a plain --many run
    plain = table(report(monkeypatch, capsys, tmp_path, "--many", b), "file")[str(b)]
    assert table(out, "file | stack")[str(b)] == plain
    row = table(out, "file | default")[str(b)]
    assert row["default"].startswith("gptq@6 (")  # the stack's MATRIX_BITS joins the widths asked for
    curve = lambda c: [
        tuple(num(v) for v in p.split(" / ")) for p in row[f"{c}: bytes / gap at MATRIX_BITS 5, 6, 7"].split("; ")
    ]
    default, n = curve("gptq"), 0
    assert num(re.search(r"\(([\d,]+) bytes", row["default"]).group(1)) == default[1][0]  # its own point
    for c in ("gptq", "record_scheme", "gptq_lite"):
        pts = curve(c)
        assert len(pts) == 3 and pts[0][0] < pts[1][0] < pts[2][0]  # more bits, more bytes
        # the ratio at each point of c inside the default curve's bytes, recomputed here from the printed points
        want = [qr.at_bytes(default, b) / g for b, g in pts if default[0][0] <= b <= default[2][0] and g > 0]
        cell = row[f"default gap / {c} gap, at equal bytes"]
        got = [] if cell == "no common bytes" else [float(r) for r in cell.split(", ")]
        assert got == pytest.approx(want, abs=0.006, rel=1e-3), c
        n += len(got)
    assert n > 0
    last = fields(out.strip().splitlines()[-1])
    assert out.strip().splitlines()[-1].startswith("quant_report_equal_bytes files:1 ")
    assert int(last["gptq_points"]) == len(curve("gptq")) - sum(g <= 0 for _, g in default)


def test_lrzip_pergroup_groups_chains_and_transposes_as_the_record(tiny_settings):
    """The byte streams handed to the compressor: the record's seven roles in its order, layers concatenated, rows of
    tok_emb, c_q and fc chained, each matrix transposed; and the total counts them plus brotli of the rest and
    orders."""
    brotli = pytest.importorskip("brotli")
    from safetensors.torch import save

    torch.manual_seed(0)
    s = tiny_settings()
    tensors, scheme = tg.quantize_state(tg.GPT(tg.ModelConfig.of(s)).state_dict(), s)
    seen = []
    total = len(qr.lrzip_pergroup(tensors, scheme, compress=lambda b: seen.append(b) or 1000 + len(seen)))
    L, want, orders, rest = s.num_layers, [], [], dict(tensors)
    for role, chained in (
        ("tok_emb.weight", 1),
        ("attn.c_k", 0),
        ("attn.c_q", 1),
        ("attn.c_v", 0),
        ("attn.proj", 0),
        ("mlp.fc", 1),
        ("mlp.proj", 0),
    ):
        names = ["tok_emb.weight"] if role == "tok_emb.weight" else [f"blocks.{i}.{role}.weight" for i in range(L)]
        parts = []
        for k in names:
            q = rest.pop(k + ".q").numpy()
            if chained:  # the L1 chain, brute force: from row 0, the nearest row not yet taken, first on ties
                o, left = [0], np.ones(len(q), bool)
                while len(o) < len(q):
                    left[o[-1]] = False
                    d = np.abs(q.astype(np.int64) - q[o[-1]]).sum(1)
                    o.append(int(np.flatnonzero(left)[d[left].argmin()]))
                o = np.array(o)
                q, _ = q[o], orders.append(o.astype(np.uint16).tobytes())
            parts.append(np.ascontiguousarray(q.T).tobytes())
        want.append(b"".join(parts))
    assert seen == want
    assert total == sum(1001 + i for i in range(len(want))) + len(
        brotli.compress(save(rest), quality=11, lgwin=24)
    ) + len(brotli.compress(b"".join(orders), quality=11))


@pytest.mark.skipif(not qr.shutil.which("lrzip"), reason="the lrzip binary (Debian package lrzip) is not installed")
def test_lrzip_codes_a_small_group_instead_of_storing_it_raw():
    data = np.random.default_rng(1).integers(-3, 4, 50_000).astype(np.int8).tobytes()
    n = qr.lrzip(data)
    assert 0 < n < len(data) * 0.5  # ~2.8 bits of entropy per byte: ZPAQ codes it, not a raw store

"""Tests of tools/record.py (seed statistics, record folders, plots) and tools/sweep.sh."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / "tools"

spec = importlib.util.spec_from_file_location("record", TOOLS / "record.py")
record = importlib.util.module_from_spec(spec)
sys.modules["record"] = record
spec.loader.exec_module(record)


# ----------------------------------------------------------------------------- made-up logs

FAKE_CODE = '''import os
TEMPLATE = """
final_int6_roundtrip_exact val_loss:{q_val_loss:.8f} val_bpb:{q_val_bpb:.8f}
Total submission size int6+lzma: {total} bytes
step:{step}/{iters} train_loss:{loss:.4f} train_time:{t:.0f}ms step_avg:{avg:.2f}ms
seed:{args.seed}
Code size: 12 bytes
"""
    log0(f"legal_ttt_exact val_loss:{loss:.8f} val_bpb:{bpb:.8f}")
    log0(f"step:{step}/{args.iterations} val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f} train_time:{t:.0f}ms")
final_int6_sliding_window_exact val_loss:1.5 val_bpb:0.9 # not a log line: trailing text
stopping_early: wallclock_cap train_time:{elapsed}ms step:{step}/{iters}
'''

NVIDIA_SMI = """Mon Mar 23 16:05:50 2026
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 550.54.15              Driver Version: 550.54.15      CUDA Version: 12.4     |
|   0  NVIDIA H100 80GB HBM3          On  |   00000000:18:00.0 Off |                    0 |
+-----------------------------------------------------------------------------------------+
"""


def make_run(seed: int, rng: random.Random) -> dict:
    """Parameters of a made-up run; the tests derive every expected value from these."""
    steps = rng.randint(7000, 7200)
    step_avg = rng.uniform(82.0, 85.0)
    return dict(
        seed=seed,
        steps=steps,
        iterations=9000,
        step_avg=step_avg,
        train_ms=round(steps * step_avg),
        model_bytes=rng.randint(15_800_000, 15_950_000),
        code_bytes=rng.randint(60_000, 90_000),
        ttt_loss=rng.uniform(1.885, 1.892),
        ttt_bpb=rng.uniform(1.116, 1.121),
        ttt_ms=rng.randint(400_000, 420_000),
        rt_loss=rng.uniform(1.93, 1.94),
        rt_bpb=rng.uniform(1.14, 1.15),
        sw_loss=rng.uniform(1.89, 1.90),
        sw_bpb=rng.uniform(1.12, 1.125),
    )


def reference_log(r: dict) -> str:
    """The reference's format: the code printed first, a nvidia-smi block, then the log lines."""
    lines = [
        FAKE_CODE,
        NVIDIA_SMI,
        "logs/af2d01c8.txt",
        "model_params:26928220",
        f"seed:{r['seed']}",
        "warmup_step:1/20",
        f"step:0/{r['iterations']} val_loss:6.9304 val_bpb:4.1046 train_time:0ms step_avg:0.01ms",
    ]
    for step in (1, 2, 500, 1000):
        lines.append(
            f"step:{step}/{r['iterations']} train_loss:{7.0 - step / 500:.4f} "
            f"train_time:{step * r['step_avg']:.0f}ms step_avg:{r['step_avg']:.2f}ms"
        )
    lines += [
        f"step:4000/{r['iterations']} val_loss:2.0577 val_bpb:1.2187 train_time:{4000 * r['step_avg']:.0f}ms "
        f"step_avg:{r['step_avg']:.2f}ms",
        "swa:start step:6500",
        f"step:{r['steps']}/{r['iterations']} val_loss:1.9214 val_bpb:1.1379 train_time:{r['train_ms']}ms "
        f"step_avg:{r['step_avg']:.2f}ms",
        f"stopping_early: wallclock_cap train_time:{r['train_ms']}ms step:{r['steps']}/{r['iterations']}",
        "peak memory allocated: 21471 MiB reserved: 22002 MiB",
        "DIAGNOSTIC post_ema val_loss:1.9196 val_bpb:1.1369 eval_time:1971ms",
        "Serialized model: 106027446 bytes",
        f"Code size: {r['code_bytes']} bytes",
        "Total submission size: 106116904 bytes",
        f"Serialized model int6+lzma: {r['model_bytes']} bytes",
        f"Total submission size int6+lzma: {r['model_bytes'] + r['code_bytes']} bytes",
        f"final_int6_roundtrip val_loss:{r['rt_loss']:.4f} val_bpb:{r['rt_bpb']:.4f} eval_time:6562ms",
        f"final_int6_roundtrip_exact val_loss:{r['rt_loss']:.8f} val_bpb:{r['rt_bpb']:.8f}",
        f"final_int6_sliding_window val_loss:{r['sw_loss']:.4f} val_bpb:{r['sw_bpb']:.4f} stride:64 eval_time:74066ms",
        f"final_int6_sliding_window_exact val_loss:{r['sw_loss']:.8f} val_bpb:{r['sw_bpb']:.8f}",
        "ttt_sliding:start chunks=1893 chunk_tokens=32768",
        "  ttt_chunk [1/1893] bpb=1.159980 time=0.5s",
        f"ttt_sliding:done val_loss={r['ttt_loss']:.6f} val_bpb={r['ttt_bpb']:.6f} elapsed=409.8s",
        f"legal_ttt val_loss:{r['ttt_loss']:.4f} val_bpb:{r['ttt_bpb']:.4f} eval_time:{r['ttt_ms']}ms",
        f"legal_ttt_exact val_loss:{r['ttt_loss']:.8f} val_bpb:{r['ttt_bpb']:.8f}",
    ]
    return "\n".join(lines) + "\n"


def run_command(seed: int) -> str:
    return f"SEED={seed} MATRIX_LR=0.025 SLOT_MODE=causal torchrun --standalone --nproc_per_node=8 train_gpt.py"


def our_text_log(r: dict) -> str:
    lines = [f"seed:{r['seed']}", f"run_command: {run_command(r['seed'])}"]
    for step in (1, 10, 20):
        lines.append(
            f"step:{step}/{r['iterations']} train_loss:{6.0 - step / 10:.4f} "
            f"train_time:{step * r['step_avg']:.0f}ms step_avg:{r['step_avg']:.2f}ms"
        )
    lines += [
        f"step:{r['steps']}/{r['iterations']} val_loss:2.1000 val_bpb:1.2400 train_time:{r['train_ms']}ms "
        f"step_avg:{r['step_avg']:.2f}ms",
        f"Serialized model int6+zstd: {r['model_bytes']} bytes",
        f"Code size: {r['code_bytes']} bytes",
        f"Total submission size int6+zstd: {r['model_bytes'] + r['code_bytes']} bytes",
        f"final_int6_roundtrip_exact val_loss:{r['rt_loss']:.8f} val_bpb:{r['rt_bpb']:.8f}",
        f"legal_ttt_exact val_loss:{r['sw_loss']:.8f} val_bpb:{r['sw_bpb']:.8f}",
        f"final_score_exact eval:ttt+slot_causal val_loss:{r['ttt_loss']:.8f} val_bpb:{r['ttt_bpb']:.8f} causal:yes",
    ]
    return "\n".join(lines) + "\n"


def our_json_log(r: dict) -> dict:
    return {
        "run_id": f"run{r['seed']}",
        "seed": r["seed"],
        "settings": {"SEED": r["seed"], "ITERATIONS": r["iterations"], "COMPRESSOR": "lzma"},
        "run_command": run_command(r["seed"]),
        "steps": r["steps"],
        "train_time_ms": float(r["train_ms"]),
        "step_avg_ms": r["train_ms"] / r["steps"],
        "eval_time_s": r["ttt_ms"] / 1000.0,
        "bytes": {
            "model": r["model_bytes"],
            "code": r["code_bytes"],
            "total": r["model_bytes"] + r["code_bytes"],
            "limit": 16_000_000,
        },
        "over_limit": r["model_bytes"] + r["code_bytes"] > 16_000_000,
        "metrics": {
            "final_int6_roundtrip_exact": {"val_loss": r["rt_loss"], "val_bpb": r["rt_bpb"]},
            "final_int6_sliding_window_exact": {"val_loss": r["sw_loss"], "val_bpb": r["sw_bpb"]},
            "legal_ttt_exact": {"val_loss": r["sw_loss"], "val_bpb": r["sw_bpb"]},
        },
        "final": {"eval": "ttt+slot_causal", "val_loss": r["ttt_loss"], "val_bpb": r["ttt_bpb"], "causal": True},
        "train_curve": [{"step": s, "train_loss": 6.0 - s / 10, "time_ms": s * r["step_avg"]} for s in range(1, 21)],
        "val_curve": [
            {"step": s, "val_loss": 3.0 - s / 20, "val_bpb": 1.8 - s / 40, "time_ms": s * r["step_avg"]}
            for s in (0, 10, 20)
        ],
    }


@pytest.fixture
def runs():
    rng = random.Random(20240520)
    return [make_run(seed, rng) for seed in (1337, 42, 2025)]


def write_reference_logs(tmp_path: Path, runs: list[dict]) -> list[Path]:
    paths = []
    for r in runs:
        p = tmp_path / f"train_seed{r['seed']}.log"
        p.write_text(reference_log(r))
        paths.append(p)
    return paths


def rounded(x: float, digits: int = 8) -> float:
    """The value a log line printed with :.{digits}f reads back as."""
    return float(f"{x:.{digits}f}")


def last_line(text: str) -> dict:
    return dict(tok.split(":", 1) for tok in text.strip().splitlines()[-1].split())


# ----------------------------------------------------------------------------- statistics


def test_p_value_closed_form_df2():
    # n=3, df=2: the t CDF is 1/2 + t / (2 sqrt(2 + t^2)); t from the sample by hand
    for values, threshold in (
        ([1.8842, 1.8861, 1.8853], 1.8926),
        ([1.8950, 1.8930, 1.8945], 1.8926),
        ([1.0, 2.0, 4.0], 2.5),
    ):
        mean = sum(values) / 3
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / 2)
        t_hand = (mean - threshold) / (sd / math.sqrt(3))
        t, p = record.one_sided_t_test(values, threshold)
        assert t == pytest.approx(t_hand, rel=1e-12)
        assert p == pytest.approx(0.5 + t_hand / (2 * math.sqrt(2 + t_hand * t_hand)), rel=1e-10)
    assert record.one_sided_t_test([1.8842, 1.8861, 1.8853], 1.8926)[1] < 0.01  # a clear gain is significant
    assert record.one_sided_t_test([1.8950, 1.8930, 1.8945], 1.8926)[1] > 0.5  # a mean above it is not


def test_p_value_hand_checked_n2():
    # n=2: s = |a-b|/sqrt(2), so t = (mean - L') / (|a-b|/2), and df=1 is Cauchy
    a, b, threshold = 1.100, 1.104, 1.110
    mean = (a + b) / 2
    t_hand = (mean - threshold) / (abs(a - b) / 2)  # = -4
    p_hand = 0.5 + math.atan(t_hand) / math.pi
    t, p = record.one_sided_t_test([a, b], threshold)
    assert t == pytest.approx(-4.0) and t == pytest.approx(t_hand)
    assert p == pytest.approx(p_hand, rel=1e-12)
    assert p == pytest.approx(0.0779791303773694, rel=1e-9)  # 1/2 - atan(4)/pi, worked by hand


def test_zero_spread_is_degenerate_not_a_crash():
    assert record.one_sided_t_test([1.0, 1.0], 1.5)[1] == 0.0
    assert record.one_sided_t_test([2.0, 2.0], 1.5)[1] == 1.0


# ----------------------------------------------------------------------------- parsing


def test_parse_reference_log_ignores_code_and_smi(tmp_path, runs):
    r = runs[0]
    (path,) = write_reference_logs(tmp_path, [r])
    log = record.parse_log(path)
    assert log.fmt == "text"
    assert log.seed == r["seed"]
    assert log.run_command is None
    assert log.score_name == "legal_ttt_exact"
    assert log.val_loss == rounded(r["ttt_loss"]) and log.val_bpb == rounded(r["ttt_bpb"])
    assert log.eval_time_s == pytest.approx((6562 + 74066 + r["ttt_ms"]) / 1000)  # all timed passes
    assert log.bytes_total == r["model_bytes"] + r["code_bytes"]  # the compressed total, not the raw one
    assert log.bytes_model == r["model_bytes"] and log.bytes_code == r["code_bytes"]
    assert log.compressor == "int6+lzma"
    assert log.steps == r["steps"] and log.iterations == r["iterations"]
    assert log.stopped_early and log.train_time_ms == r["train_ms"]
    assert [p[0] for p in log.train_curve] == [1, 2, 500, 1000]
    assert [p[0] for p in log.val_curve] == [0, 4000, r["steps"]]
    assert log.metrics["final_int6_roundtrip_exact"] == {
        "val_loss": rounded(r["rt_loss"]),
        "val_bpb": rounded(r["rt_bpb"]),
    }
    assert log.metrics["final_int6_sliding_window"]["eval_time_ms"] == 74066
    assert "DIAGNOSTIC post_ema" not in log.metrics


def test_parse_code_only_gives_no_score(tmp_path):
    path = tmp_path / "code_only.log"
    # FAKE_CODE has one well-formed look-alike (the log's real line comes later and wins, see above); drop it
    path.write_text(FAKE_CODE.replace("Code size: 12 bytes\n", "") + NVIDIA_SMI)
    log = record.parse_log(path)
    assert not log.has_score and log.seed is None and log.bytes_total is None and log.bytes_code is None
    assert not log.train_curve and not log.val_curve and not log.stopped_early


def test_diverged_run_counts_steps_but_has_no_score(tmp_path):
    path = tmp_path / "diverged.txt"
    path.write_text(
        "seed:7\nstep:1/10 train_loss:6.9000 train_time:10ms step_avg:10.00ms\n"
        "step:2/10 train_loss:nan train_time:20ms step_avg:10.00ms\n"
        "final_int6_roundtrip_exact val_loss:nan val_bpb:nan\n"
    )
    log = record.parse_log(path)
    assert log.steps == 2 and log.train_curve == [(1, 6.9, 10.0)] and not log.has_score
    assert record.main(["stats", str(path), str(path)]) == 1


def test_parse_our_text_log(tmp_path, runs):
    r = runs[1]
    path = tmp_path / "ours.txt"
    path.write_text(our_text_log(r))
    log = record.parse_log(path)
    assert log.seed == r["seed"] and log.run_command == run_command(r["seed"])
    assert log.score_name == "final_score_exact" and log.causal is True
    assert log.val_loss == rounded(r["ttt_loss"]) and log.val_bpb == rounded(r["ttt_bpb"])
    assert log.metrics["final_score_exact"]["eval"] == "ttt+slot_causal"
    assert log.bytes_total == r["model_bytes"] + r["code_bytes"] and log.compressor == "int6+zstd"
    assert log.steps == r["steps"] and not log.stopped_early and log.train_time_ms == r["train_ms"]
    assert log.eval_time_s is None


def test_parse_our_json_log(tmp_path, runs):
    r = runs[2]
    path = tmp_path / "ours.json"
    path.write_text(json.dumps(our_json_log(r)))
    log = record.parse_log(path)
    assert log.fmt == "json" and log.seed == r["seed"] and log.run_command == run_command(r["seed"])
    assert log.val_loss == r["ttt_loss"] and log.val_bpb == r["ttt_bpb"] and log.causal is True
    assert log.bytes_total == r["model_bytes"] + r["code_bytes"] and log.over_limit is False
    assert log.steps == r["steps"] and log.eval_time_s == pytest.approx(r["ttt_ms"] / 1000)
    assert len(log.train_curve) == 20 and len(log.val_curve) == 3
    assert set(log.metrics) == {"final_int6_roundtrip_exact", "final_int6_sliding_window_exact", "legal_ttt_exact"}


def test_json_without_final_has_no_score(tmp_path, runs):
    data = our_json_log(runs[0])
    del data["final"]
    path = tmp_path / "unfinished.json"
    path.write_text(json.dumps(data))
    assert not record.parse_log(path).has_score


# ----------------------------------------------------------------------------- stats CLI


def test_stats_mixed_formats(tmp_path, runs, capsys):
    stats = pytest.importorskip("scipy.stats")
    ref = write_reference_logs(tmp_path, runs[:1])[0]
    ours_txt = tmp_path / "ours.txt"
    ours_txt.write_text(our_text_log(runs[1]))
    ours_json = tmp_path / "ours.json"
    ours_json.write_text(json.dumps(our_json_log(runs[2])))
    sota, margin = 1.8976, 0.004
    assert (
        record.main(
            ["stats", str(ref), str(ours_txt), str(ours_json), "--sota-val-loss", str(sota), "--margin", str(margin)]
        )
        == 0
    )
    out = capsys.readouterr().out
    losses = [rounded(runs[0]["ttt_loss"]), rounded(runs[1]["ttt_loss"]), runs[2]["ttt_loss"]]
    bpbs = [rounded(runs[0]["ttt_bpb"]), rounded(runs[1]["ttt_bpb"]), runs[2]["ttt_bpb"]]
    fields = last_line(out)
    assert set(fields) == {"mean_val_loss", "std_val_loss", "mean_val_bpb", "p_value", "n"}
    assert int(fields["n"]) == 3
    assert float(fields["mean_val_loss"]) == pytest.approx(statistics.mean(losses), abs=1e-8)
    assert float(fields["std_val_loss"]) == pytest.approx(statistics.stdev(losses), abs=1e-8)
    assert float(fields["mean_val_bpb"]) == pytest.approx(statistics.mean(bpbs), abs=1e-8)
    expected_p = stats.ttest_1samp(losses, sota - margin, alternative="less").pvalue
    assert float(fields["p_value"]) == pytest.approx(expected_p, rel=1e-5)
    for r in runs:  # one table row per seed
        assert any(line.split()[1:2] == [str(r["seed"])] for line in out.splitlines())


def test_stats_without_sota_has_no_p_value(tmp_path, runs, capsys):
    paths = write_reference_logs(tmp_path, runs)
    assert record.main(["stats", *map(str, paths)]) == 0
    fields = last_line(capsys.readouterr().out)
    assert "p_value" not in fields and int(fields["n"]) == 3
    assert float(fields["mean_val_bpb"]) == pytest.approx(statistics.mean(rounded(r["ttt_bpb"]) for r in runs))


def run_cli(*args):
    return subprocess.run(
        [sys.executable, str(TOOLS / "record.py"), *map(str, args)], capture_output=True, text=True, timeout=60
    )


def test_stats_errors(tmp_path, runs):
    paths = write_reference_logs(tmp_path, runs[:2])
    one = run_cli("stats", paths[0], "--sota-val-loss", "1.9")
    assert one.returncode != 0 and "at least 2" in one.stderr and len(one.stderr.strip().splitlines()) == 1
    unscored = tmp_path / "crashed.txt"
    unscored.write_text(reference_log(runs[2]).split("final_int6_roundtrip val_loss")[0])
    bad = run_cli("stats", paths[0], unscored)
    assert bad.returncode != 0 and "crashed.txt" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    missing = run_cli("stats", paths[0], tmp_path / "nope.txt")
    assert missing.returncode != 0 and "nope.txt" in missing.stderr and "Traceback" not in missing.stderr
    broken = tmp_path / "broken.json"
    broken.write_text('{"run_id": "x", "final": ')
    bad_json = run_cli("stats", paths[0], broken)
    assert bad_json.returncode != 0 and "broken.json" in bad_json.stderr and "Traceback" not in bad_json.stderr
    ok = run_cli("stats", *paths)
    assert ok.returncode == 0 and ok.stdout.strip().splitlines()[-1].startswith("mean_val_loss:")


def test_stats_refuses_the_same_run_twice(tmp_path, runs):
    paths = write_reference_logs(tmp_path, runs[:2])
    again = tmp_path / "again.json"  # the JSON summary of the run whose text log is paths[0]
    again.write_text(json.dumps(our_json_log(runs[0])))
    r = run_cli("stats", *paths, again, "--sota-val-loss", "1.9")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and r.stdout == "" and len(lines) == 1
    assert lines[0].startswith("error: ") and f"seed {runs[0]['seed']}" in lines[0] and "again.json" in lines[0]


def test_stats_without_scipy_says_how_to_install_it(tmp_path, runs):
    paths = write_reference_logs(tmp_path, runs[:2])
    fake = tmp_path / "no_scipy" / "scipy"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named scipy')\n")
    r = subprocess.run(
        [sys.executable, str(TOOLS / "record.py"), "stats", *map(str, paths), "--sota-val-loss", "1.9"],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=str(fake.parent)),
    )
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "pip install scipy" in lines[0], r.stderr
    assert r.stdout == ""
    r = subprocess.run(
        [sys.executable, str(TOOLS / "record.py"), "stats", *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=str(fake.parent)),
    )
    assert r.returncode == 0, r.stderr  # no t-test asked for: no scipy needed


# ----------------------------------------------------------------------------- new


def test_new_creates_record_folder(tmp_path, runs, capsys):
    logs_dir = tmp_path / "logs"
    logs_dir.mkdir()
    ref_paths = write_reference_logs(logs_dir, runs[:2])
    ours = logs_dir / "run2025.json"
    ours.write_text(json.dumps(our_json_log(runs[2])))
    code = tmp_path / "train_gpt.py"
    code.write_text("print('frozen code of the record')\n")
    root = tmp_path / "records"
    rc = record.main(
        [
            "new",
            "TestRecord",
            "--logs",
            *map(str, ref_paths),
            str(ours),
            "--records-dir",
            str(root),
            "--date",
            "2026-04-01",
            "--code",
            str(code),
            "--author",
            "Ada",
            "--github-id",
            "ada-gh",
            "--sota-val-loss",
            "1.8976",
        ]
    )
    assert rc == 0
    folder = root / "2026-04-01_TestRecord"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [
            "README.md",
            "submission.json",
            "train_gpt.py",
            "train_gpt.source.py",
            "train_seed1337.log",
            "train_seed42.log",
            "run2025.json",
        ]
    )
    # The counted file is the packed one and runs the frozen source's program; the readable source sits beside it.
    assert (folder / "train_gpt.source.py").read_bytes() == code.read_bytes()
    packed = (folder / "train_gpt.py").read_text()
    assert packed.startswith("import base64,lzma\n") and packed.count("\n") == 2
    ran = subprocess.run([sys.executable, str(folder / "train_gpt.py")], capture_output=True, text=True, timeout=60)
    assert ran.stdout == "frozen code of the record\n"
    assert record.main(["verify", str(folder)]) == 0
    for p in [*ref_paths, ours]:
        assert (folder / p.name).read_bytes() == p.read_bytes()
    sub = json.loads((folder / "submission.json").read_text())
    assert set(sub) == {"name", "author", "github_id", "val_bpb", "bytes_total", "blurb", "date"}
    bpbs = [rounded(runs[0]["ttt_bpb"]), rounded(runs[1]["ttt_bpb"]), runs[2]["ttt_bpb"]]
    assert sub["val_bpb"] == pytest.approx(statistics.mean(bpbs), abs=1e-8)
    assert sub["bytes_total"] == max(r["model_bytes"] + r["code_bytes"] for r in runs)
    assert (sub["name"], sub["author"], sub["github_id"], sub["date"]) == ("TestRecord", "Ada", "ada-gh", "2026-04-01")
    assert sub["blurb"]
    readme = (folder / "README.md").read_text()
    for r in runs:
        assert f"| {r['seed']} |" in readme
    assert f"{rounded(runs[0]['ttt_bpb']):.8f}" in readme
    assert "SEED=<seed> MATRIX_LR=0.025" in readme  # the command recovered from the JSON log
    assert "not recorded in `train_seed1337.log`, `train_seed42.log`" in readme
    assert "p = " in readme


def test_new_author_from_git_config_and_command_from_text_logs(tmp_path, runs, monkeypatch):
    paths = []
    for r in runs:
        p = tmp_path / f"seed{r['seed']}.txt"
        p.write_text(our_text_log(r))
        paths.append(p)
    code = tmp_path / "code.py"
    code.write_text("x = 1\n")
    monkeypatch.setattr(record, "git_config", {"user.name": "Grace", "github.user": "grace-h"}.get)
    assert (
        record.main(
            [
                "new",
                "FromGit",
                "--logs",
                *map(str, paths),
                "--records-dir",
                str(tmp_path / "rec"),
                "--code",
                str(code),
                "--blurb",
                "A test blurb.",
            ]
        )
        == 0
    )
    (folder,) = (tmp_path / "rec").iterdir()
    assert folder.name.endswith("_FromGit") and len(folder.name.split("_")[0]) == 10
    sub = json.loads((folder / "submission.json").read_text())
    assert (sub["author"], sub["github_id"], sub["blurb"]) == ("Grace", "grace-h", "A test blurb.")
    assert sub["date"] == folder.name.split("_")[0]
    readme = (folder / "README.md").read_text()
    assert "identical up to the seed" in readme and "not recorded" not in readme
    assert "TODO: against the current record" in readme  # no --sota-val-loss: says how to compute p


def test_new_refuses_bad_input(tmp_path, runs, capsys):
    paths = write_reference_logs(tmp_path, runs[:2])
    code = tmp_path / "code.py"
    code.write_text("x = 1\n")
    common = [
        "--records-dir",
        str(tmp_path / "rec"),
        "--code",
        str(code),
        "--author",
        "a",
        "--github-id",
        "b",
        "--date",
        "2026-01-02",
    ]
    assert record.main(["new", "Once", "--logs", *map(str, paths), *common]) == 0
    assert record.main(["new", "Once", "--logs", *map(str, paths), *common]) == 1  # folder exists
    assert "already exists" in capsys.readouterr().err
    assert record.main(["new", "bad/name", "--logs", *map(str, paths), *common]) == 1
    assert record.main(["new", "Other", "--logs", *map(str, paths), *common[:-1], "2026-13-40"]) == 1
    noscore = tmp_path / "noscore.txt"
    noscore.write_text(FAKE_CODE + NVIDIA_SMI)
    assert record.main(["new", "Other", "--logs", str(paths[0]), str(noscore), *common]) == 1
    assert not (tmp_path / "rec" / "2026-01-02_Other").exists()


def test_verify_refuses_a_packed_file_that_is_not_its_source(tmp_path, capsys):
    folder = tmp_path / "rec"
    folder.mkdir()
    tg = record.train_gpt()
    source = 'def f():\n    """doc"""\n    return 1  # comment\nprint(f())\n'
    (folder / "train_gpt.source.py").write_text(source)
    (folder / "train_gpt.py").write_text(tg.pack_code(source.replace("# comment", "# other")))  # same program
    assert record.main(["verify", str(folder)]) == 0
    (folder / "train_gpt.py").write_text(tg.pack_code(source.replace("return 1", "return 2")))
    assert record.main(["verify", str(folder)]) == 1
    assert "does not run the program of train_gpt.source.py" in capsys.readouterr().err
    (folder / "train_gpt.py").write_text(source)  # the readable file where the packed one belongs
    assert record.main(["verify", str(folder)]) == 1
    assert "is not a packed train_gpt.py" in capsys.readouterr().err
    (folder / "train_gpt.py").unlink()
    assert record.main(["verify", str(folder)]) == 1 and "missing" in capsys.readouterr().err


def test_parse_packed_code_size_lines(tmp_path):
    path = tmp_path / "ours.txt"
    path.write_text(
        "seed:1\nSerialized model int6+rans: 15000000 bytes\nCode size: 31000 bytes (packed; source 90000 bytes)\n"
        "Total submission size int6+rans: 15031000 bytes (packed code 31000 + model 15000000)\n"
        "final_int6_roundtrip_exact val_loss:2.00000000 val_bpb:1.20000000\n"
    )
    log = record.parse_log(path)
    assert (log.bytes_code, log.bytes_total, log.compressor) == (31000, 15031000, "int6+rans")


# ----------------------------------------------------------------------------- plot


def test_plot_writes_png(tmp_path, runs):
    mpimg = pytest.importorskip("matplotlib.image")
    ref = write_reference_logs(tmp_path, runs[:1])[0]
    ours = tmp_path / "ours.json"
    ours.write_text(json.dumps(our_json_log(runs[1])))
    out = tmp_path / "plots" / "curves.png"
    assert record.main(["plot", str(ref), str(ours), "-o", str(out)]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 20_000
    img = mpimg.imread(out)
    assert img.ndim == 3 and img.shape[0] >= 400 and img.shape[1] >= 600
    assert img[..., :3].std() > 0.05  # not a blank canvas


def test_plot_without_curves_fails(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("nothing here\n")
    assert record.main(["plot", str(empty), "-o", str(tmp_path / "x.png")]) == 1
    assert not (tmp_path / "x.png").exists()


# ----------------------------------------------------------------------------- sweep.sh

FAKE_RUN_SH = r"""
# stands in for the CPU demo: writes the JSON summary from the grid's environment
python - <<'PY'
import json, os, pathlib
out = pathlib.Path(os.environ["OUTPUT_DIR"]) / "logs"
out.mkdir(parents=True, exist_ok=True)
lr, seed = float(os.environ["MATRIX_LR"]), int(os.environ["SEED"])
assert "SWEEP_VALUES" not in os.environ
bpb = 2.0 + lr + seed / 1e4
(out / (os.environ["RUN_ID"] + ".json")).write_text(json.dumps(
    {"seed": seed, "steps": 30, "bytes": {"total": 1234}, "final": {"val_loss": bpb * 1.7, "val_bpb": bpb}}))
PY
"""


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_sweep_table(tmp_path):
    (tmp_path / "tools").mkdir()
    shutil.copy(TOOLS / "sweep.sh", tmp_path / "tools" / "sweep.sh")
    shutil.copy(TOOLS / "record.py", tmp_path / "tools" / "record.py")
    (tmp_path / "run.sh").write_text(FAKE_RUN_SH.replace("python -", f"{sys.executable} -"))
    env = dict(
        os.environ, SWEEP_VALUES="0.01 0.03", SWEEP_SEEDS="1 2", SWEEP_DIR=str(tmp_path / "sw"), PYTHON=sys.executable
    )
    res = subprocess.run(
        ["bash", str(tmp_path / "tools" / "sweep.sh")], capture_output=True, text=True, env=env, timeout=120
    )
    assert res.returncode == 0, res.stderr
    rows = [line.split() for line in res.stdout.splitlines() if line[:1].isdigit()]
    assert len(rows) == 4
    for value, seed, bpb, *_ in rows:
        assert float(bpb) == pytest.approx(2.0 + float(value) + int(seed) / 1e4, abs=1e-4)
    for value in ("0.01", "0.03"):
        mean = statistics.mean(2.0 + float(value) + s / 1e4 for s in (1, 2))
        assert f"MATRIX_LR={value}: mean val_bpb {mean:.4f} over 2 seed(s)" in res.stdout

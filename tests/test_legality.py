"""The legality catalogue (docs/legality.md): each evaluation pattern the challenge ruled out, planted here (a
monkeypatch in this process, never a user-facing option) or set by the record's own setting, fails
tools/audit_causality.py on the condition it breaks, with a non-zero figure and the first offending target; the legal
neighbours pass (here and in tests/test_eval.py, test_phased_ttt.py, test_pr2135.py); and an artifact is audited from
its run's log alone, as in-process with the run's settings."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest
import torch
from test_eval import AUDIT, AUDIT_MODES, audit_lines, needs_sample, subprocess_env, tiny_env
from test_pr2135 import TILT_AUDIT, load_audit

import train_gpt as tg

PR1855_AUDIT = AUDIT_MODES["pr1855"][0]
SLIDING = dict(TTT_ENABLED=0, SLOT_ENABLED=0)


def audited(monkeypatch, capsys, tmp_path, args=("--positions", "3", "--seed", "3"), **env):
    """The audit in this process (so that a monkeypatch plants the pattern): exit status and its lines."""
    audit = load_audit()
    for k, v in tiny_env(OUTPUT_DIR=tmp_path, **{"VAL_MAX_TOKENS": 768, **env}).items():
        monkeypatch.setenv(k, v)
    code = audit.audit(list(args))
    return code, audit_lines(capsys.readouterr().out)


def leak_of(line: str) -> float:
    """The figure of a failed line's first leak."""
    return float(re.search(r"first leak: token \d+ .*?moved target \d+ by ([\d.e+-]+)", line).group(1))


@needs_sample
def test_pre_quantization_ttt_fails_causality(monkeypatch, capsys, tmp_path):
    """The model adapted on the validation tokens before any is scored (issue #677's closed PRs): every score then
    depends on every token, later ones included."""
    real = tg.evaluate

    def adapted_first(model, run, val, luts, **kw):
        L = run.s.eval_seq_len
        m = (val.numel() - 1) // L * L
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        model(val[:m].view(-1, L), val[1 : m + 1].view(-1, L)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return real(model, run, val, luts, **kw)

    monkeypatch.setattr(tg, "evaluate", adapted_first)
    code, lines = audited(monkeypatch, capsys, tmp_path, **SLIDING)
    assert code == 1 and lines["causality"].startswith("FAIL") and leak_of(lines["causality"]) > 1e-5
    assert lines["coverage"].startswith("PASS") and lines["normalization"].startswith("PASS")
    assert lines["verdict"].startswith("FAIL eval:sliding breaks causality") and "first leak" in lines["verdict"]


@needs_sample
def test_a_second_pass_that_rescores_fails_coverage(monkeypatch, capsys, tmp_path):
    """Scoring the stream twice (a second pass over tokens already scored, e.g. to keep the better) breaks the single
    pass: every target is scored twice, and the audit names the first."""
    real = tg.evaluate

    def twice(model, run, val, luts, **kw):
        real(model, run, val, luts, **kw)
        return real(model, run, val, luts, **kw)

    monkeypatch.setattr(tg, "evaluate", twice)
    code, lines = audited(monkeypatch, capsys, tmp_path, **SLIDING)
    assert code == 1 and lines["coverage"].startswith("FAIL 0/768 targets scored exactly once")
    assert "more than once 768" in lines["coverage"] and "first scored more than once: target 1" in lines["coverage"]
    assert lines["verdict"].startswith("FAIL eval:sliding breaks coverage")


@needs_sample
def test_a_tilt_that_is_not_renormalized_fails_normalization(monkeypatch, capsys, tmp_path):
    """The n-gram tilt's boost added to the hinted token's log-probability without dividing by 1 + p(h)(e^b - 1):
    the scored rows no longer sum to 1 (what the legal tilt of tests/test_pr2135.py keeps, and the audit passes)."""

    def unnormalized(logp, hints, boost):
        h = hints.clamp_min(0)[..., None].long()
        boosted = logp.scatter_add(-1, h, torch.full_like(h, boost, dtype=logp.dtype))
        return torch.where((hints >= 0)[..., None], boosted, logp)

    monkeypatch.setattr(tg, "tilt", unnormalized)
    code, lines = audited(monkeypatch, capsys, tmp_path, args=("--positions", "1", "--seed", "3"), **TILT_AUDIT)
    assert code == 1 and lines["normalization"].startswith("FAIL")
    first = re.search(r"first off: target (\d+) sums to exp\(([\d.e+-]+)\)", lines["normalization"])
    assert first and float(first.group(2)) > 1e-4
    assert lines["verdict"].startswith("FAIL eval:phased_ttt breaks normalization")


@needs_sample
@pytest.mark.parametrize("bos_fix", [1, 0])
def test_the_smear_gate_without_its_bos_mask_fails_documents(monkeypatch, capsys, tmp_path, bos_fix):
    """PR #1797 (and PR #2135's launch command): without the mask, the last token of a document reaches the next
    document through the smear gate's previous-token term; with it, documents are isolated."""
    code, lines = audited(monkeypatch, capsys, tmp_path, SMEAR_GATE_BOS_FIX=bos_fix, **PR1855_AUDIT)
    assert lines["causality"].startswith("PASS")  # the leak runs forward in the stream: causality cannot see it
    assert code == 1 - bos_fix and lines["documents"].startswith("PASS" if bos_fix else "FAIL"), lines["documents"]
    if not bos_fix:
        assert leak_of(lines["documents"]) > 1e-5
        token, target = map(int, re.search(r"first leak: token (\d+) .* target (\d+)", lines["documents"]).groups())
        assert target == token + 2  # the row after the next document's BOS: its context is that BOS
        assert lines["verdict"].startswith("FAIL eval:roundtrip breaks documents")


@needs_sample
def test_an_artifact_is_audited_from_its_log_alone(tmp_path, script_env, run_script):
    """A reviewer passes the artifact and the run's log: the audit takes the run's settings from the log (JSON or
    text), gives the verdict the in-process audit gives with the run's own environment, writes it to JSON; a setting
    in the environment still wins (SLOT_MODE=batch on the same artifact fails)."""
    run_env = dict(TTT_ENABLED=1, TTT_CHUNK_TOKENS=256, TTT_BATCH_SEQS=4, TTT_EPOCHS=1, EVAL_STRIDE=64)
    proc = run_script(script_env(tmp_path, **run_env), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    artifact, log_json, log_txt = (
        tmp_path / tg.ARTIFACT_NAME,
        tmp_path / "logs" / "test.json",
        tmp_path / "logs" / "test.txt",
    )
    audit = load_audit()
    logged = audit.logged_settings(log_json)
    assert logged == audit.logged_settings(log_txt)
    assert logged["TTT_ENABLED"] == "1" and logged["EVAL_STRIDE"] == "64"

    def conditions(out):
        return {k: re.sub(r" \([\d.]+s\)", "", v) for k, v in audit_lines(out).items()}

    clean = subprocess_env()  # no train_gpt setting at all: only the log's
    clean = {k: v for k, v in clean.items() if k not in tg.SETTING_NAMES}
    report = tmp_path / "audit.json"
    cmd = [sys.executable, str(AUDIT), str(artifact), "--log", str(log_json), "--positions", "2", "--seed", "3"]
    alone = subprocess.run([*cmd, "--json", str(report)], env=clean, capture_output=True, text=True, timeout=600)
    assert alone.returncode == 0, alone.stdout + alone.stderr
    assert f"settings: {log_json} (environment settings on top)" in alone.stdout
    # the same verdict as the audit run with the run's own environment
    in_env = script_env(tmp_path, **run_env, ARTIFACT_PATH=artifact, VAL_MAX_TOKENS=0)
    direct = subprocess.run(cmd[:2] + cmd[5:], env=in_env, capture_output=True, text=True, timeout=600)
    assert direct.returncode == 0, direct.stdout + direct.stderr
    assert conditions(alone.stdout) == conditions(direct.stdout)
    assert conditions(alone.stdout)["verdict"].startswith("PASS eval:ttt ")
    got = json.loads(report.read_text())
    assert got["verdict"] == "PASS" and got["eval"] == "ttt" and got["settings"]["TTT_CHUNK_TOKENS"] == 256
    assert got["conditions"]["causality"]["rows_changed"] == 0 and got["conditions"]["coverage"]["missing"] == 0
    assert math.isfinite(got["conditions"]["normalization"]["max_abs_logsumexp"])
    # another evaluation of the same artifact: the environment's setting wins over the log's
    batch = subprocess.run(
        cmd, env=dict(clean, SLOT_ENABLED="1", SLOT_MODE="batch"), capture_output=True, text=True, timeout=600
    )
    assert batch.returncode == 1, batch.stdout + batch.stderr
    assert audit_lines(batch.stdout)["verdict"].startswith("FAIL eval:ttt+slot_batch breaks causality")
    # a log that is not one says so in one line
    bad = subprocess.run([*cmd[:3], "--log", str(artifact)], env=clean, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--log" in bad.stderr

#!/usr/bin/env python3
"""Tools around a record attempt: seed statistics, the records/ folder, plots.

    python tools/record.py stats LOG... [--sota-val-loss L] [--margin 0.005]
    python tools/record.py new NAME --logs LOG... [--date YYYY-MM-DD] [--records-dir DIR] [--code PATH]
                                   [--author A] [--github-id G] [--blurb TEXT] [--sota-val-loss L]
    python tools/record.py verify FOLDER
    python tools/record.py plot LOG... -o out.png

A record folder holds the code twice: `train_gpt.py`, the packed self-extracting file that the byte count counts
and the challenge runs, and `train_gpt.source.py`, the readable source a reviewer diffs; `verify` checks that the
first runs exactly the second's program.

A LOG is either a text log (ours, logs/<RUN_ID>.txt, or the reference's train_seed*.log) or our
JSON summary (logs/<RUN_ID>.json). Only the standard library is needed, plus scipy for the t-test
(`--sota-val-loss`) and matplotlib for `plot`.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import re
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
ARTIFACT_LIMIT = 16_000_000
DEFAULT_MARGIN = 0.005


class RecordError(Exception):
    """A problem with the user's input: reported as one line on stderr, exit status 1."""


class UsageError(RecordError):
    """Input that can never work as given (the same run twice, a missing library): one line, exit status 2."""


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


# ----------------------------------------------------------------------------- t-test


def one_sided_t_test(values: list[float], threshold: float) -> tuple[float, float]:
    """t statistic and p-value for H0: mean >= threshold against H1: mean < threshold (scipy.stats.ttest_1samp)."""
    if len(values) < 2:
        raise RecordError("a t-test needs at least 2 values")
    try:
        from scipy import stats
    except ImportError:
        raise UsageError("the t-test needs scipy: pip install scipy (or pip install -r requirements-dev.txt)") from None
    diff = sum(values) / len(values) - threshold
    if sample_std(values) == 0.0:  # all values identical: scipy gives nan; the answer is certain either way
        return (math.copysign(math.inf, diff) if diff else 0.0), (0.0 if diff < 0 else 1.0 if diff > 0 else 0.5)
    result = stats.ttest_1samp(values, popmean=threshold, alternative="less")
    return float(result.statistic), float(result.pvalue)


def sample_std(values: list[float]) -> float:
    """The sample standard deviation (n - 1); 0 for a single value."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


# ----------------------------------------------------------------------------- log parsing

NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
LOSS = rf"(?:{NUM}|[-+]?(?:nan|inf))"  # a diverged run prints nan: the line still counts, the value does not
TRAIN_RE = re.compile(rf"step:(\d+)/(\d+) train_loss:({LOSS}) train_time:({NUM})ms step_avg:({NUM})ms")
VAL_RE = re.compile(rf"step:(\d+)/(\d+) val_loss:({LOSS}) val_bpb:({LOSS}) train_time:({NUM})ms step_avg:({NUM})ms")
STOP_RE = re.compile(rf"stopping_early: wallclock_cap train_time:({NUM})ms step:(\d+)/(\d+)")
MODEL_BYTES_RE = re.compile(r"Serialized model ([\w+.\-]+): (\d+) bytes")
CODE_BYTES_RE = re.compile(r"Code size: (\d+) bytes(?: \(packed; source \d+ bytes\))?")
TOTAL_BYTES_RE = re.compile(
    r"Total submission size(?: ([\w+.\-]+))?: (\d+) bytes(?: \(packed code \d+ \+ model \d+\))?"
)
EVAL_RE = re.compile(
    rf"(?P<name>(?:final|legal)_[a-z0-9_]+)(?: eval:(?P<eval>[\w+.\-]+))?"
    rf" val_loss:(?P<loss>{LOSS}) val_bpb:(?P<bpb>{LOSS})(?P<extra>(?: [a-z_]+:[\w+.\-]+)*)"
)
EVAL_TIME_RE = re.compile(rf"({NUM})ms")
SEED_RE = re.compile(r"seed:(\d+)")
COMMAND_RE = re.compile(r"run_command: (\S.*)")


def _finite(text: str) -> float | None:
    value = float(text)
    return value if math.isfinite(value) else None


@dataclass
class RunLog:
    path: Path
    fmt: str  # "text" or "json"
    seed: int | None = None
    run_command: str | None = None
    steps: int | None = None
    iterations: int | None = None
    train_time_ms: float | None = None
    step_avg_ms: float | None = None
    eval_time_s: float | None = None
    stopped_early: bool = False
    bytes_model: int | None = None
    bytes_code: int | None = None
    bytes_total: int | None = None
    compressor: str | None = None
    over_limit: bool | None = None
    score_name: str | None = None
    val_loss: float | None = None
    val_bpb: float | None = None
    causal: bool | None = None
    metrics: dict = field(default_factory=dict)  # name -> {"val_loss", "val_bpb"[, "eval_time_ms"]}
    train_curve: list = field(default_factory=list)  # (step, train_loss, time_ms)
    val_curve: list = field(default_factory=list)  # (step, val_loss, val_bpb, time_ms)

    @property
    def has_score(self) -> bool:
        return self.val_loss is not None and self.val_bpb is not None

    @property
    def label(self) -> str:
        return f"{self.path.stem} (seed {self.seed})" if self.seed is not None else self.path.stem


def parse_text_log(path: Path, text: str) -> RunLog:
    """Every line that does not match one of the known formats exactly, from column 0, is ignored."""
    log = RunLog(path=path, fmt="text")
    eval_times: dict[str, float] = {}
    totals: list[tuple[str | None, int]] = []
    last_step_time = None
    for raw in text.splitlines():
        line = raw.rstrip()
        if m := TRAIN_RE.fullmatch(line):
            step, iters = int(m[1]), int(m[2])
            loss, t_ms, avg = _finite(m[3]), float(m[4]), float(m[5])
            if loss is not None:
                log.train_curve.append((step, loss, t_ms))
            log.steps = max(log.steps or 0, step)
            log.iterations, last_step_time, log.step_avg_ms = iters, t_ms, avg
        elif m := VAL_RE.fullmatch(line):
            step, iters = int(m[1]), int(m[2])
            loss, bpb, t_ms, avg = _finite(m[3]), _finite(m[4]), float(m[5]), float(m[6])
            if loss is not None and bpb is not None:
                log.val_curve.append((step, loss, bpb, t_ms))
            log.steps = max(log.steps or 0, step)
            log.iterations, last_step_time = iters, t_ms
            if step > 0:
                log.step_avg_ms = avg
        elif m := STOP_RE.fullmatch(line):
            log.stopped_early = True
            log.train_time_ms, log.steps, log.iterations = float(m[1]), int(m[2]), int(m[3])
        elif m := MODEL_BYTES_RE.fullmatch(line):
            log.compressor, log.bytes_model = m[1], int(m[2])
        elif m := CODE_BYTES_RE.fullmatch(line):
            log.bytes_code = int(m[1])
        elif m := TOTAL_BYTES_RE.fullmatch(line):
            totals.append((m[1], int(m[2])))
        elif m := EVAL_RE.fullmatch(line):
            loss, bpb = _finite(m["loss"]), _finite(m["bpb"])
            if loss is None or bpb is None:
                continue
            name, entry = m["name"], {"val_loss": loss, "val_bpb": bpb}
            causal = None
            for token in m["extra"].split():
                key, _, value = token.partition(":")
                if key == "eval_time" and (t := EVAL_TIME_RE.fullmatch(value)):
                    entry["eval_time_ms"] = eval_times[name] = float(t[1])
                elif key == "causal" and value in ("yes", "no"):
                    causal = value == "yes"
            if m["eval"]:
                entry["eval"] = m["eval"]
            log.metrics[name] = entry
            if name.endswith("_exact"):
                log.score_name, log.val_loss, log.val_bpb, log.causal = name, loss, bpb, causal
        elif m := SEED_RE.fullmatch(line):
            log.seed = int(m[1])
        elif m := COMMAND_RE.fullmatch(line):
            log.run_command = m[1].strip()
    if log.train_time_ms is None:
        log.train_time_ms = last_step_time
    if totals:
        # prefer the compressed artifact ("Total submission size int6+lzma: N") over a raw total
        labelled = [t for t in totals if t[0]]
        log.bytes_total = (labelled or totals)[-1][1]
    if eval_times:
        # total over the timed evaluation passes (round trip, sliding window, TTT...), as eval_time_s of our JSON;
        # a pass reporting its time on both its plain and its _exact line counts once
        per_pass = {name.removesuffix("_exact"): ms for name, ms in eval_times.items()}
        log.eval_time_s = sum(per_pass.values()) / 1000.0
    if log.bytes_total is not None:
        log.over_limit = log.bytes_total > ARTIFACT_LIMIT
    return log


def _num(value, kind=float):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if kind is int:
        return int(value) if float(value).is_integer() else None
    return float(value) if math.isfinite(value) else None


def parse_json_log(path: Path, data) -> RunLog:
    if not isinstance(data, dict):
        raise RecordError(f"{path}: not a JSON run summary (expected an object)")
    log = RunLog(path=path, fmt="json")
    log.seed = _num(data.get("seed"), int)
    cmd = data.get("run_command")
    log.run_command = cmd.strip() if isinstance(cmd, str) and cmd.strip() else None
    log.steps = _num(data.get("steps"), int)
    log.train_time_ms = _num(data.get("train_time_ms"))
    log.step_avg_ms = _num(data.get("step_avg_ms"))
    log.eval_time_s = _num(data.get("eval_time_s"))
    settings = data.get("settings") if isinstance(data.get("settings"), dict) else {}
    log.iterations = _num(settings.get("ITERATIONS"), int)
    b = data.get("bytes") if isinstance(data.get("bytes"), dict) else {}
    log.bytes_model, log.bytes_code, log.bytes_total = (_num(b.get(k), int) for k in ("model", "code", "total"))
    if isinstance(settings.get("COMPRESSOR"), str):
        log.compressor = settings["COMPRESSOR"]
    if isinstance(data.get("over_limit"), bool):
        log.over_limit = data["over_limit"]
    elif log.bytes_total is not None:
        log.over_limit = log.bytes_total > (_num(b.get("limit"), int) or ARTIFACT_LIMIT)
    metrics = data.get("metrics") if isinstance(data.get("metrics"), dict) else {}
    for name, entry in metrics.items():
        if isinstance(entry, dict):
            loss, bpb = _num(entry.get("val_loss")), _num(entry.get("val_bpb"))
            if loss is not None and bpb is not None:
                log.metrics[name] = {"val_loss": loss, "val_bpb": bpb}
                if (t := _num(entry.get("eval_time_s"))) is not None:
                    log.metrics[name]["eval_time_ms"] = 1000.0 * t
    final = data.get("final")
    if isinstance(final, dict):
        loss, bpb = _num(final.get("val_loss")), _num(final.get("val_bpb"))
        if loss is not None and bpb is not None:
            log.val_loss, log.val_bpb = loss, bpb
            log.score_name = f"final({final['eval']})" if isinstance(final.get("eval"), str) else "final"
            log.causal = final["causal"] if isinstance(final.get("causal"), bool) else None
    for point in data.get("train_curve") or []:
        if isinstance(point, dict):
            step, loss, t = _num(point.get("step"), int), _num(point.get("train_loss")), _num(point.get("time_ms"))
            if step is not None and loss is not None:
                log.train_curve.append((step, loss, t))
    for point in data.get("val_curve") or []:
        if isinstance(point, dict):
            step, t = _num(point.get("step"), int), _num(point.get("time_ms"))
            loss, bpb = _num(point.get("val_loss")), _num(point.get("val_bpb"))
            if step is not None and loss is not None and bpb is not None:
                log.val_curve.append((step, loss, bpb, t))
    return log


def parse_log(path) -> RunLog:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise RecordError(f"{path}: cannot read ({e.strerror or e})") from None
    if path.suffix.lower() == ".json" or text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if path.suffix.lower() == ".json":
                raise RecordError(
                    f"{path}: invalid JSON ({e.msg} at line {e.lineno}); is the run still writing it?"
                ) from None
        else:
            return parse_json_log(path, data)
    return parse_text_log(path, text)


def parse_scored_logs(paths, minimum: int) -> list[RunLog]:
    if len(paths) < minimum:
        raise RecordError(f"need at least {minimum} logs (one per seed), got {len(paths)}")
    logs = [parse_log(p) for p in paths]
    for log in logs:
        if not log.has_score:
            what = "no `final` val_loss/val_bpb" if log.fmt == "json" else "no `..._exact val_loss:X val_bpb:Y` line"
            raise RecordError(
                f"{log.path}: {what} with finite numbers; the run did not finish its evaluation (or diverged)"
            )
    seen: dict[int, Path] = {}
    for log in logs:
        if log.seed is not None and log.seed in seen:
            raise UsageError(
                f"seed {log.seed} appears in both {seen[log.seed]} and {log.path}: the same run given "
                f"twice (its .txt and .json?) would fake the statistics; give each run once"
            )
        if log.seed is not None:
            seen[log.seed] = log.path
    return logs


# ----------------------------------------------------------------------------- stats


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def results_rows(logs: list[RunLog]) -> list[list[str]]:
    rows = []
    for log in logs:
        size = _fmt(log.bytes_total, ",d")
        if log.over_limit:
            size += " OVER"
        rows.append(
            [
                log.path.name,
                _fmt(log.seed, "d"),
                _fmt(log.val_loss, ".8f"),
                _fmt(log.val_bpb, ".8f"),
                size,
                _fmt(log.steps, "d"),
                _fmt(None if log.train_time_ms is None else log.train_time_ms / 1000, ".1f"),
                _fmt(log.eval_time_s, ".1f"),
                log.score_name or "-",
            ]
        )
    return rows


RESULT_HEADER = ["log", "seed", "val_loss", "val_bpb", "bytes_total", "steps", "train_s", "eval_s", "score"]


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    fmt_row = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
    return "\n".join([fmt_row(header), fmt_row(["-" * w for w in widths])] + [fmt_row(r) for r in rows])


def summarize(logs: list[RunLog], sota_val_loss: float | None, margin: float) -> dict:
    losses = [log.val_loss for log in logs]
    bpbs = [log.val_bpb for log in logs]
    out = dict(
        n=len(logs),
        mean_val_loss=sum(losses) / len(losses),
        std_val_loss=sample_std(losses),
        mean_val_bpb=sum(bpbs) / len(bpbs),
        std_val_bpb=sample_std(bpbs),
    )
    if sota_val_loss is not None:
        out["threshold"] = sota_val_loss - margin
        out["t"], out["p_value"] = one_sided_t_test(losses, out["threshold"])
    return out


def summary_line(s: dict) -> str:
    line = (
        f"mean_val_loss:{s['mean_val_loss']:.8f} std_val_loss:{s['std_val_loss']:.8f} "
        f"mean_val_bpb:{s['mean_val_bpb']:.8f}"
    )
    if "p_value" in s:
        line += f" p_value:{s['p_value']:.6g}"
    return line + f" n:{s['n']}"


def cmd_stats(args) -> int:
    if args.sota_val_loss is not None:
        one_sided_t_test([0.0, 1.0], 0.0)  # scipy missing: say so before reading any log
    logs = parse_scored_logs(args.logs, minimum=2)
    print(text_table(RESULT_HEADER, results_rows(logs)))
    for log in logs:
        if log.over_limit:
            warn(f"{log.path}: artifact is {log.bytes_total:,} bytes, over the {ARTIFACT_LIMIT:,}-byte cap")
    s = summarize(logs, args.sota_val_loss, args.margin)
    print(f"std_val_bpb:{s['std_val_bpb']:.8f}")
    if "p_value" in s:
        print(
            f"t_test: H0 mean_val_loss >= {args.sota_val_loss} - {args.margin} = {s['threshold']:.8f}; "
            f"t={s['t']:.4f} df={s['n'] - 1}; significant at p<0.01: {'yes' if s['p_value'] < 0.01 else 'no'}"
        )
    print(summary_line(s))
    return 0


# ----------------------------------------------------------------------------- new

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+\-]*")
SEED_ASSIGN_RE = re.compile(r"(?<!\S)SEED=\S+")


def git_config(key: str) -> str | None:
    try:
        r = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "config", "--get", key], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    value = r.stdout.strip()
    return value if r.returncode == 0 and value else None


def run_command_section(logs: list[RunLog]) -> list[str]:
    known = [log for log in logs if log.run_command]
    missing = [log for log in logs if not log.run_command]
    lines = []
    if known:
        generic = {SEED_ASSIGN_RE.sub("SEED=<seed>", log.run_command) for log in known}
        if len(generic) == 1:
            lines += [
                "Recovered from the logs (identical up to the seed):",
                "",
                "```bash",
                generic.pop(),
                "```",
                "",
                "with seeds " + ", ".join(str(log.seed) if log.seed is not None else "?" for log in known) + ".",
            ]
        else:
            lines += ["The logs record different commands:", ""]
            for log in known:
                lines += [f"- `{log.path.name}`:", "", "  ```bash", f"  {log.run_command}", "  ```", ""]
    if missing:
        if lines:
            lines.append("")
        names = ", ".join(f"`{log.path.name}`" for log in missing)
        lines += [
            f"The run command is not recorded in {names} (reference-format logs do not print it). "
            "TODO: fill in the exact command, e.g.",
            "",
            "```bash",
            "SEED=<seed> <settings...> torchrun --standalone --nproc_per_node=8 train_gpt.py",
            "```",
        ]
    return lines


def readme_text(
    name: str, date: str, author: str, logs: list[RunLog], s: dict, blurb: str, sota: float | None, margin: float
) -> str:
    rows = results_rows(logs)
    header = ["seed", "val_loss", "val_bpb", "bytes_total", "steps", "train_s", "eval_s", "score", "log"]
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for log, r in zip(logs, rows):
        table.append("| " + " | ".join(r[1:] + [f"`{log.path.name}`"]) + " |")
    max_bytes = max((log.bytes_total for log in logs if log.bytes_total is not None), default=None)
    lines = [
        f"# {name}",
        "",
        f"Date: {date}. Author: {author or 'TODO'}.",
        "",
        blurb,
        "",
        "## Results",
        "",
        *table,
        "",
        "train_s: training wallclock (cap 600 s); eval_s: total of the timed evaluation passes "
        "(cap 600 s); score: the line or field the val_loss/val_bpb come from.",
        "",
        f"Mean over {s['n']} run(s): val_loss {s['mean_val_loss']:.8f} (std {s['std_val_loss']:.8f}), "
        f"val_bpb **{s['mean_val_bpb']:.8f}** (std {s['std_val_bpb']:.8f}). "
        f"Largest artifact: {_fmt(max_bytes, ',d')} bytes (cap {ARTIFACT_LIMIT:,}).",
        "",
        "## Significance",
        "",
    ]
    if "p_value" in s:
        lines += [
            f"One-sided one-sample t-test of H0: mean val_loss >= {sota} - {margin} = "
            f"{s['threshold']:.8f}: t = {s['t']:.4f}, df = {s['n'] - 1}, p = {s['p_value']:.6g} "
            f"({'significant' if s['p_value'] < 0.01 else 'NOT significant'} at p < 0.01)."
        ]
    else:
        lines += [
            "TODO: against the current record's val_loss L, run",
            "",
            "```bash",
            "python tools/record.py stats " + " ".join(log.path.name for log in logs) + " --sota-val-loss L",
            "```",
            "",
            "in this folder; a record needs p < 0.01 for a gain of at least 0.005 nats.",
        ]
    lines += [
        "",
        "## Run command",
        "",
        *run_command_section(logs),
        "",
        "## What changed",
        "",
        "TODO: what this submission changes against the previous record, and why.",
        "",
        "## Files",
        "",
        "- `train_gpt.py`: the exact code of these runs, packed (self-extracting; its bytes are the counted "
        "code size).",
        "- `train_gpt.source.py`: the same program as readable source (`python tools/record.py verify` "
        "checks that they agree).",
        "- `submission.json`: name, author, github_id, val_bpb (mean), bytes_total (largest), blurb, date.",
        *[
            f"- `{log.path.name}`: run log" + (f" (seed {log.seed})" if log.seed is not None else "") + "."
            for log in logs
        ],
        "",
    ]
    return "\n".join(lines)


def cmd_new(args) -> int:
    if not NAME_RE.fullmatch(args.name):
        raise RecordError(f"record name {args.name!r}: use letters, digits and ._+- only (no spaces or slashes)")
    date = args.date or _dt.date.today().isoformat()
    try:
        _dt.date.fromisoformat(date)
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", date):
            raise ValueError
    except ValueError:
        raise RecordError(f"--date {date!r} is not a YYYY-MM-DD date") from None
    logs = parse_scored_logs(args.logs, minimum=1)
    names = [log.path.name for log in logs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise RecordError(f"two logs share the file name {dup[0]}; rename one so both fit in the record folder")
    if any(n in ("train_gpt.py", "submission.json", "README.md") for n in names):
        raise RecordError("a log may not be named train_gpt.py, submission.json or README.md")
    code = Path(args.code) if args.code else REPO_ROOT / "train_gpt.py"
    if not code.is_file():
        raise RecordError(f"{code}: no such file (pass the code of these runs with --code PATH)")
    source = code.read_text(encoding="utf-8")
    packed = train_gpt().pack_code(source)
    code_bytes = len(packed.encode())
    for log in logs:
        if log.bytes_code is not None and log.bytes_code != code_bytes:
            warn(
                f"{code} packs to {code_bytes} bytes but {log.path.name} reports Code size: {log.bytes_code} bytes; "
                f"is it the code these runs used? (pass it with --code)"
            )
    sized = [log.bytes_total for log in logs if log.bytes_total is not None]
    if not sized:
        raise RecordError("no log reports its total submission size (`Total submission size ...: N bytes`)")
    if len(sized) < len(logs):
        warn("some logs do not report their submission size; bytes_total is the largest of the others")
    for log in logs:
        if log.over_limit:
            warn(f"{log.path.name}: artifact is {log.bytes_total:,} bytes, over the {ARTIFACT_LIMIT:,}-byte cap")
    author = args.author or git_config("user.name") or ""
    github_id = args.github_id or git_config("github.user") or ""
    if not author:
        warn("author unknown: pass --author or set `git config user.name`")
    if not github_id:
        warn("github_id unknown: pass --github-id or set `git config github.user`")
    s = summarize(logs, args.sota_val_loss, args.margin) if len(logs) > 1 or args.sota_val_loss is None else None
    if s is None:
        warn("one log only: no t-test possible")
        s = summarize(logs, None, args.margin)
    blurb = args.blurb or (
        f"TODO: one paragraph on what this submission does. Mean val_bpb "
        f"{s['mean_val_bpb']:.4f} (std {s['std_val_bpb']:.4f}) over {s['n']} seed(s)."
    )

    root = Path(args.records_dir) if args.records_dir else REPO_ROOT / "records"
    folder = root / f"{date}_{args.name}"
    if folder.exists():
        raise RecordError(f"{folder} already exists; pick another NAME or --date, or remove it")
    folder.mkdir(parents=True)
    (folder / "train_gpt.py").write_text(packed, encoding="utf-8")
    (folder / "train_gpt.source.py").write_text(source, encoding="utf-8")
    verify_code(folder)
    for log in logs:
        shutil.copyfile(log.path, folder / log.path.name)
    submission = dict(
        name=args.name,
        author=author,
        github_id=github_id,
        val_bpb=round(s["mean_val_bpb"], 8),
        bytes_total=max(sized),
        blurb=blurb,
        date=date,
    )
    (folder / "submission.json").write_text(
        json.dumps(submission, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    readme = readme_text(args.name, date, author, logs, s, blurb, args.sota_val_loss, args.margin)
    (folder / "README.md").write_text(readme, encoding="utf-8")
    print(f"created {folder}")
    for p in sorted(folder.iterdir()):
        print(f"  {p.name}")
    print(summary_line(s))
    return 0


def train_gpt():
    """The repo's train_gpt.py as a module: its pack_code/unpack_code/strip_source are the one packing."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    import train_gpt as module

    return module


def verify_code(folder: Path) -> None:
    """The packed train_gpt.py of a record folder must run exactly the program of its train_gpt.source.py."""
    packed_path, source_path = folder / "train_gpt.py", folder / "train_gpt.source.py"
    for p in (packed_path, source_path):
        if not p.is_file():
            raise RecordError(f"{p}: missing (a record folder holds the packed train_gpt.py and train_gpt.source.py)")
    tg = train_gpt()
    try:
        program = tg.unpack_code(packed_path.read_text(encoding="utf-8"))
    except (ValueError, LookupError) as e:
        raise RecordError(
            f"{packed_path} is not a packed train_gpt.py ({e}); make it with tools/record.py new"
        ) from None
    if program != tg.strip_source(source_path.read_text(encoding="utf-8")):
        raise RecordError(
            f"{packed_path} does not run the program of {source_path.name}: pack the source again "
            "(tools/record.py new) rather than editing either by hand"
        )


def cmd_verify(args) -> int:
    verify_code(Path(args.folder))
    print(f"{args.folder}: train_gpt.py runs exactly the program of train_gpt.source.py")
    return 0


# ----------------------------------------------------------------------------- plot


def cmd_plot(args) -> int:
    logs = [parse_log(p) for p in args.logs]
    if not logs:
        raise RecordError("plot needs at least one log")
    if not any(log.train_curve or log.val_curve for log in logs):
        raise RecordError("none of the logs has a train or val curve (no `step:N/M ...` lines)")
    for log in logs:
        if not (log.train_curve or log.val_curve):
            warn(f"{log.path}: no train or val points; left out of the plot")
    try:
        import matplotlib
    except ImportError:
        raise RecordError("plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    panels = [
        (axes[0][0], "train", "step"),
        (axes[0][1], "train", "time"),
        (axes[1][0], "val", "step"),
        (axes[1][1], "val", "time"),
    ]
    for ax, curve, xkind in panels:
        for i, log in enumerate(logs):
            if curve == "train":
                pts = [(s, y, t) for s, y, t in log.train_curve]
            else:
                pts = [(s, bpb, t) for s, _, bpb, t in log.val_curve]
            if xkind == "time":
                pts = [(t / 1000.0, y) for _, y, t in pts if t is not None]
            else:
                pts = [(s, y) for s, y, _ in pts]
            if pts:
                ax.plot(
                    [p[0] for p in pts],
                    [p[1] for p in pts],
                    marker="o" if len(pts) < 30 else None,
                    markersize=3,
                    label=log.label,
                    color=f"C{i % 10}",
                )
        ax.set_xlabel("step" if xkind == "step" else "train wallclock (s)")
        ax.set_ylabel("train loss (nats)" if curve == "train" else "val bpb")
        ax.set_title(
            f"{'train loss' if curve == 'train' else 'val bpb'} vs {'step' if xkind == 'step' else 'wallclock'}"
        )
        ax.grid(True, alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=args.dpi)
    plt.close(fig)
    print(f"wrote {out}")
    return 0


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="record.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    st = sub.add_parser("stats", help="per-seed table, mean, std and the one-sided t-test against the record")
    st.add_argument("logs", nargs="+", help="text logs or JSON summaries, one per seed")
    st.add_argument(
        "--sota-val-loss",
        type=float,
        default=None,
        metavar="L",
        help="val_loss of the current record; tests H0: mean >= L - margin",
    )
    st.add_argument("--margin", type=float, default=DEFAULT_MARGIN, help="required gain in nats (default 0.005)")
    st.set_defaults(func=cmd_stats)

    nw = sub.add_parser("new", help="create records/<date>_<NAME>/ from the logs of a record attempt")
    nw.add_argument("name")
    nw.add_argument("--logs", nargs="+", required=True)
    nw.add_argument("--records-dir", default=None, help="root folder (default: the repo's records/)")
    nw.add_argument("--date", default=None, help="YYYY-MM-DD (default: today)")
    nw.add_argument("--code", default=None, help="train_gpt.py to freeze (default: the repo's train_gpt.py)")
    nw.add_argument("--author", default=None, help="default: git config user.name")
    nw.add_argument("--github-id", default=None, help="default: git config github.user")
    nw.add_argument("--blurb", default=None)
    nw.add_argument("--sota-val-loss", type=float, default=None, metavar="L")
    nw.add_argument("--margin", type=float, default=DEFAULT_MARGIN)
    nw.set_defaults(func=cmd_new)

    vf = sub.add_parser("verify", help="check that a record's packed train_gpt.py runs its train_gpt.source.py")
    vf.add_argument("folder")
    vf.set_defaults(func=cmd_verify)

    pl = sub.add_parser("plot", help="train loss and val bpb against step and wallclock")
    pl.add_argument("logs", nargs="+")
    pl.add_argument("-o", "--output", required=True)
    pl.add_argument("--dpi", type=int, default=100)
    pl.set_defaults(func=cmd_plot)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except RecordError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1


if __name__ == "__main__":
    sys.exit(main())

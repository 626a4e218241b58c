"""Export report for a final_model.float.safetensors: what each quantizer and packer makes of the same weights.

    python3 tools/quant_report.py OUTPUT_DIR/final_model.float.safetensors [--val-tokens N] [--no-eval] [--json F]
    python3 tools/quant_report.py --many F1 F2 ... [--val-tokens N] [--bits 5,6,7,8]

Model settings come from the file itself; export settings (MATRIX_BITS, EMBED_BITS, GPTQ_*) and DATA_PATH /
TOKENIZER_PATH from the environment, as for train_gpt.py. STACK: the environment's if set, else the one the run log
beside the file (OUTPUT_DIR/logs/RUN_ID.json of the run with the file's model settings) names, else seed.
Candidates, each quantized and packed from the same weights: gptq_lite and gptq (the stack's settings with that
QUANT) and record_scheme (PR #1855's: QUANT=gptq QUANT_SCALES=sdclip GPTQ_EMBED=1 GATE_INT8=1 LQER_ENABLED=1 on top of
the stack's settings); the default is the one of the stack's QUANT. Prints, per tensor
(--per-tensor): shape, precision, order-0 entropy of its symbols, bytes under each packer and weight MSE; then the
bytes of every candidate x packer, the order-0 bound, and (with the data) the val bpb of the float model and of each
candidate's round trip on a val slice. The last line is
for scripts:
    quant_report float_bpb:F gptq_lite_gap:A gptq_gap:B lzma_bytes:L best_bytes:K entropy_bytes:E best_compressor:NAME
        default_gap:D record_scheme_gap:R brotli_bytes:Z [lrzip_pergroup_bytes:P]
(gaps in val bpb, round trip minus float; bytes of the whole packed model; L, K, E, Z, P of the default candidate;
E = order-0 bound of the symbols + the unquantized tensors' bytes; Z = brotli_shuffle, -1 without the package;
P = PR #1855's per-group lrzip packing of the same tensors, only where the lrzip binary is installed).
--many: every candidate on each file, a table of gap and bytes (train_gpt.py's artifact) per file, then mean, sample
standard deviation and range of each candidate's gap over the files; last line
    quant_report_many files:N default_mean_gap:D default_sd_gap:d record_scheme_mean_gap:R ... gptq_lite_sd_gap:g
--bits B1,B2,...: every candidate at each MATRIX_BITS (and the stack's own), so that gaps compare at equal bytes: the
--many table at the stack's MATRIX_BITS, then per file each candidate's (bytes, gap) curve and, at each of its
points inside the default curve's byte range, the default's gap there over the candidate's; last line
    quant_report_equal_bytes files:N default_over_gptq_mean:X gptq_points:n default_over_record_scheme_mean:Y ...
Packers that only this report tries (brotli with byte shuffling, zstd, 6-bit packing + LZMA) need their packages.
"""

from __future__ import annotations

import argparse
import json
import lzma
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as save_tensors

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_gpt as tg  # noqa: E402


def file_stack(path: Path, env=os.environ) -> tuple:
    """(STACK, where it came from): the environment's if set; else that of the newest training run's summary
    (OUTPUT_DIR/logs/*.json beside the file) whose model settings are the file's; else seed."""
    if "STACK" in env:
        return env["STACK"], "environment"
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        config = json.loads(f.metadata()["pgolf"])["config"]
    runs = []
    for log in (path.parent / "logs").glob("*.json"):
        try:
            settings = json.loads(log.read_text()).get("settings") or {}
        except (OSError, ValueError, AttributeError):
            continue
        if not settings.get("EVAL_ONLY") and all(settings.get(k) == v for k, v in config.items()):
            runs.append((log.stat().st_mtime, settings.get("STACK", "seed"), log))
    if not runs:
        return "seed", "default (no run log beside the file; set STACK if it was trained with another)"
    _, stack, log = max(runs)
    return stack, f"the run log {log}"


def settings_for(path: Path, env=os.environ) -> dict:
    """parse_settings of the environment, with the model settings the float file was trained with."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        config = json.loads(f.metadata()["pgolf"])["config"]
    env = dict(env)
    env.update({k: ",".join(map(str, v)) if isinstance(v, list) else str(v) for k, v in config.items()})
    env.setdefault("OUTPUT_DIR", tempfile.mkdtemp(prefix="quant_report_"))
    env.setdefault("COMPILE", "0")
    env.setdefault("RUN_ID", "quant_report")
    env.setdefault("PHASED_TTT_ENABLED", "0")  # the report scores round trips only: no phased TTT to size
    return tg.parse_settings({k: v for k, v in env.items() if k in tg.SETTING_NAMES or k.startswith(("TORCH", "NCCL"))})


def shuffled(raw: np.ndarray, width: int) -> bytes:
    """Byte shuffling: all first bytes of each element, then all second bytes, ..."""
    raw = raw.reshape(-1).view(np.uint8)
    return raw.reshape(-1, width).T.tobytes() if width > 1 else raw.tobytes()


def bitpacked(q: np.ndarray, bits: int) -> bytes:
    """The symbols (q + max_q) in exactly `bits` bits each."""
    sym = (q.astype(np.int64).ravel() + 2 ** (bits - 1) - 1).astype(np.uint8)
    return np.packbits(np.unpackbits(sym[:, None], axis=1)[:, 8 - bits :].ravel()).tobytes()


def extra_packers() -> dict:
    """Whole-model packers beyond train_gpt.py's, each over the same quantized tensors; absent packages skipped."""
    out = {}
    try:
        import brotli

        out["brotli_shuffle"] = lambda tensors, scheme: brotli.compress(
            b"".join(shuffled(t.numpy(), t.element_size()) for _, t in sorted(tensors.items())), quality=11
        )
        if shutil.which("lrzip"):  # a report column only: no artifact needs it
            out["lrzip_pergroup"] = lrzip_pergroup
    except ImportError:
        pass
    try:
        import zstandard

        out["zstd"] = lambda tensors, scheme: zstandard.ZstdCompressor(level=22).compress(save_tensors(tensors))
    except ImportError:
        pass
    out["bitpack_lzma"] = lambda tensors, scheme: lzma.compress(
        b"".join(
            bitpacked(t.numpy(), int(scheme[k[:-2]][3:])) if k.endswith(".q") else t.numpy().tobytes()
            for k, t in sorted(tensors.items())
        ),
        preset=9,
    )
    return out


RECORD_GROUPS = ("tok_emb.", ".c_k.", ".c_q.", ".c_v.", ".attn.proj.", ".fc.", ".mlp.proj.")  # its order
RECORD_CHAINED = ("tok_emb.", ".c_q.", ".fc.")


def lrzip(data: bytes) -> int:
    """Bytes of `lrzip -z -L 9` (ZPAQ) of data, or of `lrzip -z -L 9 -T` if smaller (-T: code the data even where
    lrzip's lz4 pre-test would store it raw, as it does for most of a small model's groups)."""
    with tempfile.TemporaryDirectory() as d:
        Path(d, "x").write_bytes(data)
        sizes = []
        for extra in ([], ["-T"]):
            subprocess.run(
                ["lrzip", "-q", "-f", "-z", "-L", "9", *extra, "-o", f"{d}/y", f"{d}/x"],
                check=True,
                capture_output=True,
            )
            sizes.append(Path(d, "y").stat().st_size)
    return min(sizes)


def record_chain_order(q: np.ndarray) -> np.ndarray:
    """The record's row order for its hot groups: from row 0, the nearest row by L1 distance of those not yet taken
    (train_gpt.py's coder chains by Euclidean distance instead)."""
    dist, order = torch.cdist(*[torch.from_numpy(q).float()] * 2, p=1.0), [0]
    taken = torch.zeros(len(q), dtype=torch.bool)
    while len(order) < len(q):
        taken[order[-1]] = True
        order.append(int(dist[order[-1]].masked_fill(taken, math.inf).argmin()))
    return np.array(order)


def lrzip_pergroup(tensors: dict, scheme: dict, compress=None) -> bytes:
    """PR #1855's COMPRESSOR=pergroup on the same quantized tensors, as a size: the .q tensors of its seven roles
    grouped in its order, layers concatenated; rows of tok_emb, c_q and fc in the greedy L1 chain (record_chain_order),
    every matrix transposed, each group through compress (default: lrzip); the rest (scales, fp16, other int
    tensors, LQER factors) through brotli q11 of safetensors, and the row orders as uint16 through brotli.
    Returns a placeholder of that many bytes (only its length is reported)."""
    import brotli

    groups, rest, orders = {g: [] for g in RECORD_GROUPS}, dict(tensors), []
    for k in tg.coded_names(scheme):
        role = next((g for g in RECORD_GROUPS if g in "." + k), None)
        if role is None:
            continue
        q = rest.pop(k + ".q").numpy()
        if role in RECORD_CHAINED:
            order = record_chain_order(q)
            q = q[order]
            orders.append(order.astype(np.uint16).tobytes())
        groups[role].append(q.T.tobytes())
    total = sum((compress or lrzip)(b"".join(parts)) for parts in groups.values() if parts)
    total += len(brotli.compress(save_tensors(rest), quality=11, lgwin=24))
    total += len(brotli.compress(b"".join(orders), quality=11))
    return bytes(total)


def tensor_rows(tensors: dict, scheme: dict, flat: dict) -> list[dict]:
    """Per tensor: shape, precision, order-0 entropy (bits/symbol), bytes by packer, weight MSE."""
    rows = []
    for name, kind in scheme.items():
        row = dict(name=name, shape=list(flat[name].shape), precision=kind)
        if kind.startswith("int"):
            q, scale = tensors[name + ".q"], tensors[name + ".scale"]
            counts = np.bincount(q.numpy().astype(np.int64).ravel() + 127)
            row["entropy_bits"] = 8 * tg.entropy_bytes(counts) / q.numel()
            # rANS: this tensor's words and lane states alone (the shared head is not split per tensor).
            sym = q.numpy().astype(np.int64).ravel() + 127
            states, _, words = tg.rans_encode(sym, tg.rans_tables(np.bincount(sym, minlength=255)[None]), 64)
            row["bytes"] = dict(
                rans=2 * len(words) + 4 * len(states) + 2 * scale.numel(),
                lzma=len(lzma.compress(q.numpy().tobytes() + scale.numpy().tobytes(), preset=9)),
            )
            back = tg.dequantize(tensors, name)  # with LQER's A B where the tensor has factors
        else:
            t = tensors[name]
            row["bytes"] = dict(raw=t.numel() * t.element_size())
            back = t.float()
        row["mse"] = (back - flat[name].float()).square().mean().item()
        rows.append(row)
    return rows


def entropy_bound(tensors: dict, scheme: dict) -> float:
    """Order-0 bytes of every tensor's symbols plus the raw bytes of everything not entropy-coded."""
    total = 0.0
    for name, t in tensors.items():
        if name.endswith(".q"):
            total += tg.entropy_bytes(np.bincount(t.numpy().astype(np.int64).ravel() + 127))
        else:
            total += t.numel() * t.element_size()
    return total


RECORD_SCHEME = dict(quant="gptq", quant_scales="sdclip", gptq_embed=1, gate_int8=1, lqer_enabled=1)
MANY = ("default", "record_scheme", "gptq_lite")  # the columns of --many


def candidates(s, quant: str, bits: list | None = None) -> dict:
    """label -> export settings; --quant gptq_lite leaves out the two that need calibration; with bits, each
    candidate once per MATRIX_BITS, labelled candidate@bits."""
    out = dict(gptq_lite=replace(s, quant="gptq_lite"))
    if quant == "both":
        out.update(gptq=replace(s, quant="gptq"), record_scheme=replace(s, **RECORD_SCHEME))
    if bits:
        out = {f"{label}@{b}": replace(c, matrix_bits=b) for label, c in out.items() for b in bits}
    return out


def at_bytes(points: list, target: float) -> float:
    """The gap at target bytes, linear between the two (bytes, gap) points around it; nan outside their range."""
    points = sorted(points)
    for (b0, g0), (b1, g1) in zip(points, points[1:]):
        if b0 <= target <= b1:
            return g0 + (g1 - g0) * (target - b0) / max(b1 - b0, 1)
    return float("nan")


def eval_model(run, weights):
    """The model train_gpt.py evaluates: its attention backends, looped when the stack loops."""
    model = tg.build_model(run, weights)
    model.looping = bool(run.s.num_loops)
    return model


def measure(
    path: Path, val_tokens: int, no_eval: bool, quant: str, extras: bool, per_tensor: bool, bits: list | None = None
) -> dict:
    """Every candidate on one float file: bytes by packer, order-0 bound, times, and (with the data) val bpb."""
    stack, stack_source = file_stack(path)
    s = settings_for(path, dict(os.environ, STACK=stack))
    state = tg.load_float_weights(path, s)
    with torch.device("meta"):  # the model's own order (the file's is sorted), as train_gpt.py packs after training
        state = {k: state[k] for k in tg.GPT(tg.ModelConfig.of(s)).state_dict()}
    if bits:  # the stack's own MATRIX_BITS always: the default's point
        bits = sorted(set(bits) | {s.matrix_bits})
    cands = candidates(s, quant, bits)
    run = tg.Run(s)
    hessians, input_rms, calib_s = None, None, 0.0
    if quant == "both":  # one calibration for all: GPTQ_EMBED only adds the embedding's sum to the same pass
        run.s = replace(s, gptq_embed=1)
        t0 = time.perf_counter()
        hessians, input_rms = tg.collect_hessians(eval_model(run, state), run)
        calib_s = time.perf_counter() - t0
        run.s = s
    flat = tg.unbank(state, s.num_layers)
    val = luts = None
    bpb = {}
    if not no_eval:
        val = tg.load_validation_tokens(os.path.join(s.data_path, tg.VAL_SHARDS), s.eval_seq_len, val_tokens)
        luts = tg.byte_counter(s, tg.load_tokenizer(s), val.numel(), run.device)[0]
        bpb["float"] = tg.evaluate(
            eval_model(run, state), run, val, luts, stride=s.eval_seq_len, ttt=False, slot=False
        )[1]
    results = {}
    for label, c in cands.items():
        h = None
        if c.quant == "gptq":
            h = {k: v for k, v in hessians.items() if c.gptq_embed or k != "tok_emb.weight"}
        t0 = time.perf_counter()
        tensors, scheme = tg.quantize_state(state, c, h, input_rms)
        quant_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        blob = tg.pack(tensors, scheme, c)
        t1 = time.perf_counter()
        tg.unpack(blob)
        sizes = dict(
            rans=dict(bytes=len(blob), pack_s=t1 - t0, unpack_s=time.perf_counter() - t1),
            lzma=dict(bytes=len(lzma.compress(save_tensors(tensors), preset=9))),
        )  # a baseline: safetensors + xz
        if extras:
            for comp, fn in extra_packers().items():
                sizes[comp] = dict(bytes=len(fn(tensors, scheme)))
        results[label] = dict(
            quantize_s=quant_s,
            packers=sizes,
            bytes=len(blob),
            entropy_bytes=entropy_bound(tensors, scheme),
            lqer=[k for k in scheme if k + ".lqa" in tensors],
            awq_lite=[k for k in scheme if k + ".awq" in tensors],
        )
        if per_tensor:
            results[label]["tensors"] = tensor_rows(tensors, scheme, flat)
        if not no_eval:
            weights = tg.dequantize_state(tensors, scheme, s.num_layers)
            bpb[label] = tg.evaluate(
                eval_model(run, weights), run, val, luts, stride=s.eval_seq_len, ttt=False, slot=False
            )[1]
        results[label]["gap"] = bpb[label] - bpb["float"] if bpb else float("nan")
    default = s.quant if any(k.split("@")[0] == s.quant for k in results) else "gptq_lite"
    return dict(
        settings=s,
        stack_source=stack_source,
        results=results,
        val_bpb=bpb,
        calibration_s=calib_s,
        default=default + (f"@{s.matrix_bits}" if bits else ""),
    )


def print_one(m: dict, args) -> None:
    s, results, bpb = m["settings"], m["results"], m["val_bpb"]
    if args.per_tensor:
        last = m["default"]
        print(f"per tensor, {last}:")
        print(f"{'tensor':34s} {'shape':>12s} {'prec':>5s} {'H bits':>6s} {'rans':>9s} {'lzma':>9s} {'mse':>10s}")
        for r in results[last]["tensors"]:
            b = r["bytes"]
            print(
                f"{r['name']:34s} {'x'.join(map(str, r['shape'])):>12s} {r['precision']:>5s} "
                f"{r.get('entropy_bits', float('nan')):6.3f} {b.get('rans', b.get('raw')):9d} "
                f"{b.get('lzma', b.get('raw')):9d} {r['mse']:10.3e}"
            )
    print(f"stack:{s.stack} from {m['stack_source']} (its settings are the candidates' base)")
    if m["calibration_s"]:
        print(
            f"calibration: {m['calibration_s']:.1f}s ({' x '.join(map(str, tg.calibration_shape(s)))} tokens, "
            f"source {s.gptq_calib})"
        )
    packers = list(results["gptq_lite"]["packers"])
    print("| candidate | " + " | ".join(packers) + " | order-0 bound | val bpb | gap |")
    print("|---|" + "---:|" * (len(packers) + 3))
    for label, r in results.items():
        cells = [f"{r['packers'][p]['bytes']:,}" for p in packers]
        gap = f"{r['gap']:+.6f}" if bpb else "-"
        name = label + (" (default)" if label == m["default"] else "")
        print(
            f"| {name} | " + " | ".join(cells) + f" | {r['entropy_bytes']:,.0f} | "
            f"{bpb.get(label, float('nan')):.6f} | {gap} |"
        )
    if bpb:
        print(f"float val bpb: {bpb['float']:.6f} on {args.val_tokens} val tokens")
    for label, r in results.items():
        print(
            f"{label}: quantize {r['quantize_s']:.1f}s; "
            + "; ".join(
                f"{p} pack {v['pack_s']:.1f}s unpack {v['unpack_s']:.1f}s"
                for p, v in r["packers"].items()
                if "pack_s" in v
            )
            + (f"; lqer {','.join(r['lqer'])}" if r["lqer"] else "")
        )
    default = results[m["default"]]
    best = min(default["packers"], key=lambda p: default["packers"][p]["bytes"])
    gap = lambda k: results[k]["gap"] if k in results else float("nan")
    brotli = default["packers"].get("brotli_shuffle", dict(bytes=-1))["bytes"]
    lrzip_bytes = default["packers"].get("lrzip_pergroup", dict(bytes=None))["bytes"]
    print(
        f"quant_report float_bpb:{bpb.get('float', float('nan')):.6f} gptq_lite_gap:{gap('gptq_lite'):.6f} "
        f"gptq_gap:{gap('gptq'):.6f} lzma_bytes:{default['packers']['lzma']['bytes']} "
        f"best_bytes:{default['packers'][best]['bytes']} entropy_bytes:{default['entropy_bytes']:.0f} "
        f"best_compressor:{best} default_gap:{default['gap']:.8f} record_scheme_gap:{gap('record_scheme'):.8f} "
        f"brotli_bytes:{brotli}" + (f" lrzip_pergroup_bytes:{lrzip_bytes}" if lrzip_bytes else "")
    )


def spread(values: list) -> tuple:
    """mean, sample standard deviation (nan for one value), min, max."""
    v = np.array(values, dtype=np.float64)
    return v.mean(), v.std(ddof=1) if len(v) > 1 else float("nan"), v.min(), v.max()


def print_many(ms: dict, args) -> None:
    """One row per file: gap and bytes of each candidate of MANY; then mean, sd and range of each gap."""

    def cell(m, c):
        return m["results"][m["default"] if c == "default" else c] if (c == "default" or c in m["results"]) else None

    print("| file | stack | " + " | ".join(f"{c} gap | {c} bytes" for c in MANY) + " |")
    print("|---|---|" + "---:|" * (2 * len(MANY)))
    for path, m in ms.items():
        cells = []
        for c in MANY:
            r = cell(m, c)
            cells += [f"{r['gap']:+.8f}", f"{r['bytes']:,}"] if r else ["-", "-"]
        print(f"| {path} | {m['settings'].stack} | " + " | ".join(cells) + " |")
    stats = {}
    for c in MANY:
        gaps = [cell(m, c)["gap"] for m in ms.values() if cell(m, c)]
        stats[c] = spread(gaps) if gaps else (float("nan"),) * 4
    for i, row in enumerate(("mean", "sd", "min", "max")):
        print(f"| {row} | | " + " | ".join(f"{stats[c][i]:{'.8f' if row == 'sd' else '+.8f'}} | " for c in MANY) + "|")
    print(
        "quant_report_many files:%d " % len(ms)
        + " ".join(f"{c}_mean_gap:{stats[c][0]:.8f} {c}_sd_gap:{stats[c][1]:.8f}" for c in MANY)
    )


def at_own_bits(m: dict) -> dict:
    """A --bits measurement seen as a plain one: the candidates at the stack's MATRIX_BITS, labelled without @bits."""
    own = f"@{m['settings'].matrix_bits}"
    return dict(
        m,
        results={k[: -len(own)]: r for k, r in m["results"].items() if k.endswith(own)},
        default=m["default"][: -len(own)],
    )


def print_equal_bytes(ms: dict, bits: list) -> None:
    """--bits: per file, each candidate's (bytes, gap) at every MATRIX_BITS; then, at each of its points that lies
    inside the byte range of the default's curve, the default's gap there (read off its curve) over the candidate's:
    the gap ratio at equal bytes (< 1: the default loses less). Last line: the mean ratio per candidate."""
    bits = sorted(set(bits) | {m["settings"].matrix_bits for m in ms.values()})
    labels = ("gptq", "record_scheme", "gptq_lite")
    print(
        "| file | default | "
        + " | ".join(
            f"{c}: bytes / gap at MATRIX_BITS {', '.join(map(str, bits))} | default gap / {c} gap, at equal bytes"
            for c in labels
        )
        + " |"
    )
    print("|---|---|" + "---|---|" * len(labels))
    ratios = {c: [] for c in labels}
    for path, m in ms.items():
        curve = lambda c: [
            (m["results"][f"{c}@{b}"]["bytes"], m["results"][f"{c}@{b}"]["gap"])
            for b in bits
            if f"{c}@{b}" in m["results"]
        ]
        default = curve(m["default"].split("@")[0])
        cells = []
        for c in labels:
            pts, here = curve(c), []
            for b, gap in pts:
                d = at_bytes(default, b)
                if d == d and gap > 0:
                    here.append(d / gap)
                    ratios[c].append(d / gap)
            cells += [
                "; ".join(f"{b:,} / {gap:+.8f}" for b, gap in pts),
                ", ".join(f"{r:.2f}" for r in here) or "no common bytes",
            ]
        ref = m["results"][m["default"]]
        print(
            f"| {path} | {m['default']} ({ref['bytes']:,} bytes, gap {ref['gap']:+.8f}) | " + " | ".join(cells) + " |"
        )
    print(
        "quant_report_equal_bytes files:%d " % len(ms)
        + " ".join(
            f"default_over_{c}_mean:{np.mean(r) if r else float('nan'):.3f} {c}_points:{len(r)}"
            for c, r in ratios.items()
        )
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("float_path", type=Path, nargs="?")
    ap.add_argument(
        "--many",
        type=Path,
        nargs="+",
        metavar="FLOAT_FILE",
        help="every candidate on each file: table of gap and bytes, then mean and spread of each gap",
    )
    ap.add_argument("--val-tokens", type=int, default=65536, help="val slice for the bpb columns")
    ap.add_argument("--no-eval", action="store_true", help="bytes only (no data needed)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--per-tensor", action="store_true", help="print the per-tensor table")
    ap.add_argument(
        "--bits",
        type=lambda v: sorted({int(b) for b in v.split(",")}),
        metavar="B1,B2,...",
        help="with --many: every candidate at each MATRIX_BITS, their gaps compared at equal bytes",
    )
    ap.add_argument(
        "--quant",
        choices=("both", "gptq_lite"),
        default="both",
        help="gptq_lite: skip GPTQ and its calibration (e.g. bytes of a large model on a CPU)",
    )
    args = ap.parse_args()
    paths = args.many or ([args.float_path] if args.float_path else [])
    if not paths or (args.many and args.float_path):
        ap.error("give one float file, or --many and a list of them")
    for p in paths:
        if not p.is_file():
            print(f"error: {p} not found; train_gpt.py writes it to OUTPUT_DIR/{tg.FLOAT_NAME}", file=sys.stderr)
            return 2
    try:
        ms = {
            str(p): measure(
                p,
                args.val_tokens,
                args.no_eval,
                args.quant,
                extras=not args.many,
                per_tensor=args.per_tensor and not args.many,
                bits=args.bits,
            )
            for p in paths
        }
    except tg.Fail as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:  # one file: its report (as before); --many: the reports by path
        data = {
            p: dict(m, settings=dict(tg.artifact_config(m["settings"]), STACK=m["settings"].stack))
            for p, m in ms.items()
        }
        args.json.write_text(json.dumps(data if args.many else data[str(paths[0])], indent=1))
    if args.bits:  # the --many table from the points at each stack's own MATRIX_BITS, then the curves
        print_many({p: at_own_bits(m) for p, m in ms.items()}, args)
        print_equal_bytes(ms, args.bits)
    elif args.many:
        print_many(ms, args)
    else:
        print_one(ms[str(paths[0])], args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Export report for a final_model.float.safetensors: what each quantizer and packer makes of the same weights.

    python3 tools/quant_report.py OUTPUT_DIR/final_model.float.safetensors [--val-tokens N] [--no-eval] [--json F]

Model settings come from the file itself; export settings (MATRIX_BITS, EMBED_BITS, GPTQ_*) and DATA_PATH /
TOKENIZER_PATH from the environment, as for train_gpt.py. Prints, per tensor: shape, precision, order-0 entropy
of its symbols, bytes under each packer and weight MSE; then the bytes of every QUANT x COMPRESSOR, the order-0
bound, and (with the data) the val bpb of the float model and of each quantizer on a val slice. The last line is
for scripts:
    quant_report float_bpb:F gptq_lite_gap:A gptq_gap:B lzma_bytes:L best_bytes:K entropy_bytes:E best_compressor:NAME
(gaps in val bpb; bytes of the whole packed model; E = order-0 bound of the symbols + the unquantized tensors' bytes).
Packers that only this report tries (brotli with byte shuffling, zstd, 6-bit packing + LZMA) need their packages.
"""
from __future__ import annotations

import argparse, json, lzma, os, sys, tempfile, time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_gpt as tg  # noqa: E402


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
    return tg.parse_settings({k: v for k, v in env.items() if k in tg.DEFAULTS or k.startswith(("TORCH", "NCCL"))})


def shuffled(raw: np.ndarray, width: int) -> bytes:
    """Byte shuffling: all first bytes of each element, then all second bytes, ..."""
    raw = raw.reshape(-1).view(np.uint8)
    return raw.reshape(-1, width).T.tobytes() if width > 1 else raw.tobytes()


def bitpacked(q: np.ndarray, bits: int) -> bytes:
    """The symbols (q + max_q) in exactly `bits` bits each."""
    sym = (q.astype(np.int64).ravel() + 2 ** (bits - 1) - 1).astype(np.uint8)
    return np.packbits(np.unpackbits(sym[:, None], axis=1)[:, 8 - bits:].ravel()).tobytes()


def extra_packers() -> dict:
    """Whole-model packers beyond train_gpt.py's, each over the same quantized tensors; absent packages skipped."""
    out = {}
    try:
        import brotli
        out["brotli_shuffle"] = lambda tensors, scheme: brotli.compress(b"".join(
            shuffled(t.numpy(), t.element_size()) for _, t in sorted(tensors.items())), quality=11)
    except ImportError:
        pass
    try:
        import zstandard
        from safetensors.torch import save
        out["zstd"] = lambda tensors, scheme: zstandard.ZstdCompressor(level=22).compress(save(tensors))
    except ImportError:
        pass
    out["bitpack_lzma"] = lambda tensors, scheme: lzma.compress(b"".join(
        bitpacked(t.numpy(), int(scheme[k[:-2]][3:])) if k.endswith(".q") else t.numpy().tobytes()
        for k, t in sorted(tensors.items())), preset=9)
    return out


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
            states, _, words = tg.rans_encode(sym, tg.rans_tables([sym], 255), tg.rans_lanes(len(sym)))
            row["bytes"] = dict(rans=2 * len(words) + 4 * len(states) + 2 * scale.numel(),
                                lzma=len(lzma.compress(q.numpy().tobytes() + scale.numpy().tobytes(), preset=9)))
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("float_path", type=Path)
    ap.add_argument("--val-tokens", type=int, default=65536, help="val slice for the bpb columns")
    ap.add_argument("--no-eval", action="store_true", help="bytes only (no data needed)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--per-tensor", action="store_true", help="print the per-tensor table")
    ap.add_argument("--quant", choices=("both", "gptq_lite"), default="both",
                    help="gptq_lite: skip GPTQ and its calibration (e.g. bytes of a large model on a CPU)")
    args = ap.parse_args()
    if not args.float_path.is_file():
        print(f"error: {args.float_path} not found; train_gpt.py writes it to OUTPUT_DIR/{tg.FLOAT_NAME}", file=sys.stderr)
        return 2
    try:
        s = settings_for(args.float_path)
        state = tg.load_float_weights(args.float_path, s)
        run = tg.Run(s)
        hessians, calib_s = None, 0.0
        if args.quant == "both":
            hessian_model = tg.GPT(s).to(run.device)
            hessian_model.load_state_dict(state)
            t0 = time.perf_counter()
            hessians = tg.collect_hessians(hessian_model, run)
            calib_s = time.perf_counter() - t0
        flat = tg.unbank(state, s["NUM_LAYERS"])
        results, report = {}, dict(settings={k: s[k] for k in tg.MODEL_KEYS}, calibration_s=calib_s)
        for quant in ("gptq_lite", "gptq") if hessians else ("gptq_lite",):
            t0 = time.perf_counter()
            tensors, scheme = tg.quantize_state(state, dict(s, QUANT=quant), hessians if quant == "gptq" else None)
            quant_s = time.perf_counter() - t0
            sizes = {}
            for comp in ("rans", "lzma"):
                t0 = time.perf_counter()
                blob, _ = tg.pack(tensors, scheme, dict(s, COMPRESSOR=comp))
                t1 = time.perf_counter()
                tg.unpack(blob)
                sizes[comp] = dict(bytes=len(blob), pack_s=t1 - t0, unpack_s=time.perf_counter() - t1)
            for comp, fn in extra_packers().items():
                sizes[comp] = dict(bytes=len(fn(tensors, scheme)))
            results[quant] = dict(quantize_s=quant_s, packers=sizes, entropy_bytes=entropy_bound(tensors, scheme),
                                  tensors=tensor_rows(tensors, scheme, flat), state=tg.dequantize_state(tensors, scheme, s["NUM_LAYERS"]))
        bpb = {}
        if not args.no_eval:
            val = tg.load_validation_tokens(os.path.join(s["DATA_PATH"], tg.VAL_SHARDS), s["EVAL_SEQ_LEN"],
                                            args.val_tokens)
            luts = tg.build_sentencepiece_luts(tg.load_tokenizer(s), s["VOCAB_SIZE"], run.device)
            for label, weights in [("float", state)] + [(q, results[q]["state"]) for q in results]:
                model = tg.GPT(s).to(run.device)
                model.load_state_dict(weights)
                bpb[label] = tg.evaluate(model, run, val, luts, stride=s["EVAL_SEQ_LEN"], ttt=False, slot=False)[1]
    except tg.Fail as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    if args.per_tensor:
        print(f"per tensor, {list(results)[-1]}:")
        print(f"{'tensor':34s} {'shape':>12s} {'prec':>5s} {'H bits':>6s} {'rans':>9s} {'lzma':>9s} {'mse':>10s}")
        for r in results[list(results)[-1]]["tensors"]:
            b = r["bytes"]
            print(f"{r['name']:34s} {'x'.join(map(str, r['shape'])):>12s} {r['precision']:>5s} "
                  f"{r.get('entropy_bits', float('nan')):6.3f} {b.get('rans', b.get('raw')):9d} "
                  f"{b.get('lzma', b.get('raw')):9d} {r['mse']:10.3e}")
    if hessians:
        print(f"calibration: {calib_s:.1f}s ({s['GPTQ_CALIB_SEQS']} x {s['GPTQ_CALIB_LEN']} tokens, source {s['GPTQ_CALIB']})")
    packers = list(results["gptq_lite"]["packers"])
    print("| QUANT | " + " | ".join(packers) + " | order-0 bound | val bpb | gap |")
    print("|---|" + "---:|" * (len(packers) + 3))
    for quant, r in results.items():
        cells = [f"{r['packers'][p]['bytes']:,}" for p in packers]
        gap = f"{bpb[quant] - bpb['float']:+.4f}" if bpb else "-"
        print(f"| {quant} | " + " | ".join(cells) + f" | {r['entropy_bytes']:,.0f} | "
              f"{bpb.get(quant, float('nan')):.4f} | {gap} |")
    if bpb:
        print(f"float val bpb: {bpb['float']:.4f} on {args.val_tokens} val tokens")
    for quant, r in results.items():
        print(f"{quant}: quantize {r['quantize_s']:.1f}s; " + "; ".join(
            f"{p} pack {v['pack_s']:.1f}s unpack {v['unpack_s']:.1f}s" for p, v in r["packers"].items() if "pack_s" in v))
    default = results.get(s["QUANT"], results["gptq_lite"])
    best = min(default["packers"], key=lambda p: default["packers"][p]["bytes"])
    gaps = {q: (bpb[q] - bpb["float"]) if q in bpb else float("nan") for q in ("gptq_lite", "gptq")}
    if args.json:
        for r in results.values():
            r.pop("state")
        args.json.write_text(json.dumps(dict(report, results=results, val_bpb=bpb), indent=1))
    print(f"quant_report float_bpb:{bpb.get('float', float('nan')):.6f} gptq_lite_gap:{gaps['gptq_lite']:.6f} "
          f"gptq_gap:{gaps['gptq']:.6f} lzma_bytes:{default['packers']['lzma']['bytes']} "
          f"best_bytes:{default['packers'][best]['bytes']} entropy_bytes:{default['entropy_bytes']:.0f} "
          f"best_compressor:{best}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Pack and unpack time of train_gpt.py's context coder at the record's shapes (issue #16: pack <= 60 s, decode
<= 10 s on 2 CPU cores), on synthetic symbols: a Student-t(5) per matrix at the spread of the record's int6/int7
export (SDClip), so the coder's work (chains, modes, rANS) is that of a real artifact, not its bytes.

    python3 tools/pack_bench.py [--layers 11] [--seed 0]

Checks the round trip, then prints `pack_bench symbols:N bytes:B pack_s:P unpack_s:U threads:T`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_gpt as tg  # noqa: E402

ROLES = (
    ("attn.c_q", (512, 512)),
    ("attn.c_k", (256, 512)),
    ("attn.c_v", (256, 512)),
    ("attn.proj", (512, 512)),
    ("mlp.fc", (2048, 512)),
    ("mlp.proj", (512, 2048)),
)


def record_shaped(layers: int, seed: int) -> tuple:
    """Quantized tensors and scheme of the record's shapes: an int7 8192 x 512 embedding, int6 matrices."""
    rng, tensors, scheme = np.random.default_rng(seed), {}, {}
    mats = [("tok_emb.weight", (8192, 512), 7, 4.5)] + [
        (f"blocks.{i}.{role}.weight", shape, 6, 2.4) for i in range(layers) for role, shape in ROLES
    ]
    for name, shape, bits, sd in mats:
        q = np.clip(np.round(rng.standard_t(5, shape) * sd), -tg.max_q_of(f"int{bits}"), tg.max_q_of(f"int{bits}"))
        tensors[name + ".q"] = torch.from_numpy(q.astype(np.int8))
        tensors[name + ".scale"] = torch.full((shape[0],), 0.01, dtype=torch.float16)
        scheme[name] = f"int{bits}"
    return tensors, scheme


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=11)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    tensors, scheme = record_shaped(args.layers, args.seed)
    s = tg.parse_settings({})
    t0 = time.perf_counter()
    blob = tg.pack(tensors, scheme, s)
    t1 = time.perf_counter()
    back, _ = tg.unpack(blob)
    t2 = time.perf_counter()
    assert all(torch.equal(back[k], tensors[k]) for k in tensors if k.endswith(".q"))
    n = sum(t.numel() for k, t in tensors.items() if k.endswith(".q"))
    print(
        f"pack_bench symbols:{n} bytes:{len(blob)} pack_s:{t1 - t0:.1f} unpack_s:{t2 - t1:.1f} "
        f"threads:{torch.get_num_threads()}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

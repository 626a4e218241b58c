"""Rebuild the embedded SP8192 and CaseOps samples from the embedded sample's own documents.

    python data/build_sample_sp8192.py                 # runs `apt-get download python3.11-doc` itself
    python data/build_sample_sp8192.py --deb python3.11-doc_3.11.2-6+deb12u8_all.deb [--out /tmp/sample]

Writes data/datasets/sample_sp8192/ + data/tokenizers/sample_8192_bpe.model and
data/datasets/sample_sp8192_caseops/ (with fineweb_val_bytes_000000.bin)
+ data/tokenizers/sample_8192_bpe_caseops.model,
and data/sample_build_sp8192.json (counts and SHA-256 of every file).

The documents and the train/val split are those of data/build_sample.py. Each document is first put in the form
the tokenizer reproduces (its nmt_nfkc normalization: NFKC, whitespace runs and newlines to one space; the text
SentencePiece decodes back), so that both samples are lossless: the decoded validation text is the document, and
the CaseOps sidecar adds up to its UTF-8 length exactly. Deterministic: one trainer thread, every sentence in order,
fixed seed.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import tempfile
from pathlib import Path

import sentencepiece as spm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build_sample  # noqa: E402
import caseops  # noqa: E402
from fineweb import DATA_DIR  # noqa: E402
from shards import write_shard  # noqa: E402

VOCAB_SIZE = 8192
MAX_TRAIN_TOKENS = 1_600_000  # keeps each sample (shards + tokenizer) under 5 MB
PLAIN = dict(dataset="sample_sp8192", tokenizer="sample_8192_bpe.model")
CASEOPS = dict(dataset="sample_sp8192_caseops", tokenizer="sample_8192_bpe_caseops.model")


def train(sentences: list[str], **extra) -> bytes:
    spm.set_random_generator_seed(build_sample.TRAINER_SEED)
    settings = dict(build_sample.TRAINER_SETTINGS, vocab_size=VOCAB_SIZE, **extra)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model, **settings)
    return model.getvalue()


def paragraphs(docs: list[str]) -> list[str]:
    return [p for doc in docs for p in doc.split("\n")]


def build(sources: dict[str, str], out: Path, provenance: dict) -> dict:
    train_raw, val_raw, info = build_sample.split_documents(sources)
    plain_bytes = train(paragraphs(train_raw))
    sp = spm.SentencePieceProcessor(model_proto=plain_bytes)
    assert sp.vocab_size() == VOCAB_SIZE, sp.vocab_size()
    # the text the tokenizer reproduces; a document that is not stable under it (none, in this source) is dropped
    normalize = lambda d: sp.decode(sp.encode(d))  # noqa: E731
    train_docs, val_docs, dropped = [], [], 0
    for raw, dest in [(d, train_docs) for d in train_raw] + [(d, val_docs) for d in val_raw]:
        doc = normalize(raw)
        if doc and normalize(doc) == doc:
            dest.append(doc)
        else:
            dropped += 1

    tok_plain = out / "tokenizers" / PLAIN["tokenizer"]
    tok_plain.parent.mkdir(parents=True, exist_ok=True)
    tok_plain.write_bytes(plain_bytes)
    ds = out / "datasets" / PLAIN["dataset"]
    train_tokens, train_used = build_sample.encode_documents(sp, train_docs, MAX_TRAIN_TOKENS)
    val_tokens, val_used = build_sample.encode_documents(sp, val_docs)
    plain_files = [
        tok_plain,
        write_shard(ds / "fineweb_train_000000.bin", train_tokens),
        write_shard(ds / "fineweb_val_000000.bin", val_tokens),
    ]

    caseops_bytes = train(
        [caseops.encode(p) for p in paragraphs(train_raw)], user_defined_symbols=list(caseops.OPERATORS)
    )
    spc = spm.SentencePieceProcessor(model_proto=caseops_bytes)
    assert spc.vocab_size() == VOCAB_SIZE, spc.vocab_size()
    caseops.check_caseops_tokenizer(spc)
    # CaseOps documents must come back exactly through the tokenizer and the inverse transform
    lossless = lambda d: spc.decode(spc.encode(caseops.encode(d))) == caseops.encode(d)  # noqa: E731
    c_val = [d for d in val_docs if lossless(d)]
    c_train = [d for d in train_docs if lossless(d)]
    tok_caseops = out / "tokenizers" / CASEOPS["tokenizer"]
    tok_caseops.write_bytes(caseops_bytes)
    cds = out / "datasets" / CASEOPS["dataset"]
    summary_c = caseops.prep(
        c_val + c_train, spc, cds, val_docs=len(c_val), max_train_tokens=MAX_TRAIN_TOKENS, log=lambda m: None
    )
    expected_val_bytes = sum(len(d.encode("utf-8")) for d in c_val)
    if summary_c["val_original_bytes"] != expected_val_bytes:
        raise SystemExit(
            f"error: CaseOps sidecar adds up to {summary_c['val_original_bytes']} bytes, the "
            f"validation text has {expected_val_bytes}"
        )
    caseops_files = [tok_caseops] + [cds / n for n in summary_c["files"]] + [cds / "caseops_split.json"]

    sha = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    summary = dict(
        provenance,
        sentencepiece=spm.__version__,
        source_files=info["files_total"],
        documents_dropped_unstable=dropped,
        sp8192=dict(
            train_documents=train_used,
            train_tokens=int(train_tokens.size),
            val_documents=val_used,
            val_tokens=int(val_tokens.size),
            val_bytes=sum(len(d.encode("utf-8")) for d in val_docs),
            bytes_with_tokenizer=sum(p.stat().st_size for p in plain_files),
        ),
        caseops=dict(
            train_documents=summary_c["train_documents"],
            train_tokens=summary_c["train_tokens"],
            val_documents=summary_c["val_documents"],
            val_tokens=summary_c["val_tokens"],
            val_bytes=summary_c["val_original_bytes"],
            documents_dropped_not_lossless=len(val_docs) + len(train_docs) - len(c_val) - len(c_train),
            bytes_with_tokenizer=sum(p.stat().st_size for p in caseops_files),
        ),
        sha256={p.relative_to(out).as_posix(): sha(p) for p in plain_files + caseops_files},
    )
    (out / "sample_build_sp8192.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--deb", type=Path, help=f"a downloaded {build_sample.PACKAGE}_*.deb")
    src.add_argument("--source", type=Path, help="an unpacked package tree (dpkg -x) or its html/_sources folder")
    ap.add_argument("--out", type=Path, default=DATA_DIR, help="layout root to write into (default: data/)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.source is not None:
            sources = build_sample.sources_from_dir(args.source)
            provenance = dict(source=f"{build_sample.PACKAGE} (unpacked tree)")
        else:
            deb = args.deb if args.deb is not None else build_sample.fetch_deb(Path(tmp))
            if not deb.is_file():
                raise SystemExit(f"error: --deb {deb} not found")
            sources = build_sample.sources_from_deb(deb)
            provenance = dict(source=deb.name, source_sha256=hashlib.sha256(deb.read_bytes()).hexdigest())
    if not sources:
        raise SystemExit("error: no .rst.txt documentation sources found in the given source")
    s = build(sources, args.out, provenance)
    for name in ("sp8192", "caseops"):
        print(
            f"{name}: train {s[name]['train_documents']} docs / {s[name]['train_tokens']} tokens; val "
            f"{s[name]['val_documents']} docs / {s[name]['val_tokens']} tokens; {s[name]['bytes_with_tokenizer']:,} "
            f"bytes with the tokenizer"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

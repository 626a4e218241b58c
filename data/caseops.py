"""CaseOps: a lossless case transform applied before tokenizing, and the per-token byte sidecar that scores it.

    python data/caseops.py encode < text.txt > transformed.txt
    python data/caseops.py decode < transformed.txt > text.txt
    python data/caseops.py prep --docs docs.jsonl --tokenizer tok.model --out data/datasets/my_caseops

The transform (the field's "caseops_v1", PR #1736 onwards) works on maximal runs of ASCII letters [A-Za-z]:
a lowercase run is left alone; an all-capitals run of two or more letters becomes ALLCAPS + the run in lowercase;
a Titlecase run (one capital, then lowercase; a lone capital included) becomes TITLE + lowercase; any other mixed
run gets TITLE when its first letter is a capital, then CAPNEXT before each later capital, all letters lowercased.
A literal operator character in the text becomes ESC + that character. Everything else (digits, punctuation,
non-ASCII letters) is untouched. `decode` is the exact inverse and refuses malformed operator sequences.

The operators are four private-use characters, reserved in the tokenizer as user-defined pieces (ids 4..7):
TITLE U+E001, ALLCAPS U+E002, CAPNEXT U+E003, ESC U+E004.

Validation bytes: a model trained on transformed text must still be scored in bits per byte of the *original*
text, so prep writes, beside each validation shard, a sidecar with one uint16 per token (same header format):
BOS counts 0; every other token counts the original UTF-8 bytes of the input it covers (SentencePiece's surface
span): operators and ESC 0, an escaped character its UTF-8 length, each ASCII letter 1, anything else its UTF-8
length. See data/README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
from shards import BOS_ID, shard_name, write_shard

TITLE, ALLCAPS, CAPNEXT, ESC = "\ue001", "\ue002", "\ue003", "\ue004"
OPERATORS = (TITLE, ALLCAPS, CAPNEXT, ESC)
OPERATOR_SET = frozenset(OPERATORS)
CANONICAL_VAL_DOCS = 50_000  # the challenge's split: the first 50,000 documents are validation
SHARD_TOKENS = 100_000_000  # tokens per shard, as the challenge's export
BATCH_DOCS = 1024  # documents per SentencePiece batch encode

_RUN = re.compile(r"[A-Za-z]+|[\ue001-\ue004]")


def _is_upper(c: str) -> bool:
    return "A" <= c <= "Z"


def _is_lower(c: str) -> bool:
    return "a" <= c <= "z"


# ----------------------------------------------------------------------------- transform


def _encode_run(run: str) -> str:
    if run.islower():
        return run
    low = run.lower()
    if len(run) >= 2 and run.isupper():
        return ALLCAPS + low
    if _is_upper(run[0]) and (len(run) == 1 or run[1:].islower()):
        return TITLE + low
    out = [TITLE + low[0] if _is_upper(run[0]) else low[0]]
    for c, lc in zip(run[1:], low[1:]):
        out.append(CAPNEXT + lc if _is_upper(c) else lc)
    return "".join(out)


def encode(text: str) -> str:
    """The CaseOps form of text (see the module docstring)."""
    return _RUN.sub(lambda m: ESC + m.group() if m.group() in OPERATOR_SET else _encode_run(m.group()), text)


def _malformed(text: str, i: int, why: str) -> ValueError:
    around = text[max(0, i - 12) : i + 12].encode("unicode_escape").decode("ascii")
    return ValueError(f"malformed CaseOps text at character {i}: {why} (near '{around}')")


def decode(text: str) -> str:
    """The exact inverse of encode. Raises ValueError on a malformed operator sequence: ESC not followed by an
    operator character; TITLE or ALLCAPS not at the start of a run of lowercase letters; CAPNEXT not before a
    lowercase letter inside a run, or inside an ALLCAPS run; an ALLCAPS run of one letter (encode writes TITLE).
    Capital ASCII letters, which encode never writes, are passed through unchanged."""
    out: list[str] = []
    i, n = 0, len(text)
    mode = None  # None outside a run; "lower", "title" (after its first letter) or "allcaps" inside one
    while i < n:
        c = text[i]
        if c == ESC:
            if i + 1 >= n or text[i + 1] not in OPERATOR_SET:
                raise _malformed(text, i, "ESC must be followed by an operator character")
            out.append(text[i + 1])
            mode = None
            i += 2
            continue
        if c in (TITLE, ALLCAPS):
            name = "TITLE" if c == TITLE else "ALLCAPS"
            if mode is not None:
                raise _malformed(text, i, f"{name} inside a run of letters")
            if i + 1 >= n or not _is_lower(text[i + 1]):
                raise _malformed(text, i, f"{name} must be followed by a lowercase letter")
            if c == ALLCAPS:
                j = i + 1
                while j < n and _is_lower(text[j]):
                    j += 1
                if j - (i + 1) < 2:
                    raise _malformed(text, i, "ALLCAPS before a single letter")
                if j < n and (text[j] == CAPNEXT or "A" <= text[j] <= "Z"):
                    raise _malformed(text, j, "a case operator inside an ALLCAPS run")
                out.append(text[i + 1 : j].upper())
                mode = None
                i = j
                continue
            out.append(text[i + 1].upper())
            mode = "title"
            i += 2
            continue
        if c == CAPNEXT:
            if mode is None:
                raise _malformed(text, i, "CAPNEXT at the start of a run (encode writes TITLE there)")
            if i + 1 >= n or not _is_lower(text[i + 1]):
                raise _malformed(text, i, "CAPNEXT must be followed by a lowercase letter")
            out.append(text[i + 1].upper())
            i += 2
            continue
        out.append(c)
        mode = "lower" if ("a" <= c <= "z" or "A" <= c <= "Z") else None
        i += 1
    return "".join(out)


# ----------------------------------------------------------------------------- original-byte counts


def original_byte_counts(surfaces, escaped: bool = False) -> tuple[list[int], bool]:
    """Original UTF-8 bytes covered by each token, given each token's surface: the span of the CaseOps text it
    was cut from. Operators count 0, ESC 0 and the character it escapes its UTF-8 length (even when that
    character is in the next token), an ASCII letter 1, anything else its UTF-8 length. Returns the counts and
    whether the last surface ended in an unfinished ESC (pass it back in for the next piece of the same text)."""
    counts = []
    for surface in surfaces:
        total = 0
        for ch in surface:
            if escaped:
                total += len(ch.encode("utf-8"))
                escaped = False
            elif ch == ESC:
                escaped = True
            elif ch in OPERATOR_SET:
                pass
            elif ch < "\x80":
                total += 1
            else:
                total += len(ch.encode("utf-8"))
        counts.append(total)
    return counts, escaped


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return value, pos


def _messages(buf: bytes):
    """(field number, value) of one protobuf message: varints as int, 32-bit fields as float, length-delimited and
    64-bit fields as bytes (enough for SentencePiece's messages without the protobuf package)."""
    pos, n = 0, len(buf)
    while pos < n:
        key, pos = _varint(buf, pos)
        wire = key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + size], pos + size
        elif wire == 5:
            value, pos = float(np.frombuffer(buf[pos : pos + 4], dtype="<f4")[0]), pos + 4
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield key >> 3, value


def encode_with_surfaces(sp, text: str) -> tuple[list[int], list[str]]:
    """Token ids of text and the surface (input span) of each."""
    return ids_and_surfaces(sp.encode(text, out_type="serialized_proto"))


def ids_and_surfaces(proto: bytes) -> tuple[list[int], list[str]]:
    """Token ids and surfaces from SentencePiece's SentencePieceText message (read here without the protobuf
    package: pieces are field 2, each with id 2 and surface 3)."""
    ids, surfaces = [], []
    for field, value in _messages(proto):
        if field != 2:
            continue
        pid, surface = 0, b""
        for f, v in _messages(value):
            if f == 2:
                pid = v
            elif f == 3:
                surface = v
        ids.append(pid)
        surfaces.append(surface.decode("utf-8"))
    return ids, surfaces


def encode_document(sp, transformed: str) -> tuple[np.ndarray, np.ndarray]:
    """[BOS] + the tokens of one CaseOps document, and its sidecar (BOS 0, then each token's original bytes)."""
    return document_arrays(sp.encode(transformed, out_type="serialized_proto"))


def document_arrays(proto: bytes) -> tuple[np.ndarray, np.ndarray]:
    ids, surfaces = ids_and_surfaces(proto)
    counts, _ = original_byte_counts(surfaces)
    return np.array([BOS_ID] + ids, dtype=np.uint16), np.array([0] + counts, dtype=np.uint16)


def encode_batch(sp, texts: list[str], validation: bool, threads: int) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """(tokens, sidecar or None) of each document: the CaseOps transform, then SentencePiece's batch encode on
    `threads` threads (its C++ threads; the output does not depend on their number)."""
    transformed = [encode(text) for text in texts]
    if validation:
        protos = sp.encode(transformed, out_type="serialized_proto", num_threads=threads)
        return [document_arrays(proto) for proto in protos]
    return [(np.array([BOS_ID] + ids, dtype=np.uint16), None) for ids in sp.encode(transformed, num_threads=threads)]


def check_caseops_tokenizer(sp) -> None:
    """The reserved layout: ids 4..7 are the user-defined operators TITLE, ALLCAPS, CAPNEXT, ESC."""
    for i, op in enumerate(OPERATORS, start=4):
        if i >= sp.vocab_size() or sp.id_to_piece(i) != op or sp.is_control(i) or sp.is_unknown(i):
            raise ValueError(
                f"tokenizer: id {i} must be the operator piece U+{ord(op):04X} (a CaseOps tokenizer "
                f"reserves ids 4..7 as user-defined symbols)"
            )


# ----------------------------------------------------------------------------- prep


def read_documents(path: Path, field: str = "text"):
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except ValueError as e:
                raise SystemExit(f"error: {path}:{lineno}: not a JSON line ({e})") from None
            if not isinstance(doc, dict) or not isinstance(doc.get(field), str):
                raise SystemExit(f"error: {path}:{lineno}: no string field {field!r}")
            yield doc[field]


def _doc_hash(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


class ShardWriter:
    """Collects documents and writes fineweb_<split>_NNNNNN.bin (and the parallel _bytes_ sidecar) shards."""

    def __init__(self, out: Path, split: str, shard_tokens: int, sidecar: bool):
        self.out, self.split, self.shard_tokens, self.sidecar = out, split, shard_tokens, sidecar
        self.tokens: list[np.ndarray] = []
        self.bytes: list[np.ndarray] = []
        self.pending = self.index = self.total = 0
        self.written: list[Path] = []

    def add(self, tokens: np.ndarray, counts: np.ndarray | None) -> None:
        self.tokens.append(tokens)
        if self.sidecar:
            self.bytes.append(counts)
        self.pending += tokens.size
        self.total += tokens.size
        if self.pending >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self.tokens:
            return
        self.written.append(write_shard(self.out / shard_name(self.split, self.index), np.concatenate(self.tokens)))
        if self.sidecar:
            self.written.append(
                write_shard(self.out / shard_name(self.split, self.index, sidecar=True), np.concatenate(self.bytes))
            )
        self.tokens, self.bytes, self.pending = [], [], 0
        self.index += 1


def check_splits_disjoint(val_tokens: list[np.ndarray], train_docs_tokens) -> None:
    """Refuse when a training document's tokens equal a validation document's (BOS included)."""
    seen = {hashlib.sha256(t.tobytes()).digest(): i for i, t in enumerate(val_tokens)}
    for j, t in enumerate(train_docs_tokens):
        k = seen.get(hashlib.sha256(t.tobytes()).digest())
        if k is not None:
            raise SystemExit(
                f"error: overlapping splits: training document {j} is validation document {k}; "
                f"refusing to write a training set that contains validation text"
            )


def batches(docs, val_docs: int, size: int):
    """Lists of (index, text) of at most size documents, in order; a list is all validation or all training."""
    batch = []
    for i, text in enumerate(docs):
        if batch and (len(batch) == size or i == val_docs):
            yield batch
            batch = []
        batch.append((i, text))
    if batch:
        yield batch


def prep(
    docs,
    sp,
    out: Path,
    val_docs: int = CANONICAL_VAL_DOCS,
    shard_tokens: int = SHARD_TOKENS,
    max_train_tokens: int | None = None,
    log=print,
    threads: int = 1,
    batch_docs: int = BATCH_DOCS,
    progress: bool = False,
) -> dict:
    """Turn documents (an iterable of str, in the canonical order) into CaseOps shards under out: the first
    val_docs documents are validation (tokens + byte sidecar), the rest training. Refuses overlapping splits:
    a training document whose text, or whose tokens, equal those of a validation document. Documents are encoded
    batch_docs at a time on `threads` threads (the shards are the same bytes for any number); progress: a bar
    with documents/s on stderr."""
    check_caseops_tokenizer(sp)
    if val_docs < 1:
        raise SystemExit("error: --val-docs must be at least 1")
    out.mkdir(parents=True, exist_ok=True)
    previous = out / "caseops_split.json"
    if previous.is_file():
        old = json.loads(previous.read_text())
        if old.get("val_docs") != val_docs:
            raise SystemExit(
                f"error: {out} holds a split with {old.get('val_docs')} validation documents, this run "
                f"asks for {val_docs}: the two would overlap; use an empty --out"
            )
    for stale in out.glob("fineweb_*.bin"):
        stale.unlink()
    val = ShardWriter(out, "val", shard_tokens, sidecar=True)
    train = ShardWriter(out, "train", shard_tokens, sidecar=False)
    val_text_hashes: dict[bytes, int] = {}
    val_token_hashes: dict[bytes, int] = {}
    val_bytes = val_count = train_docs = 0
    truncated = False
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc="caseops prep", unit="docs", mininterval=1.0, smoothing=0.1)
    started = time.perf_counter()
    for batch in batches(docs, val_docs, batch_docs):
        validation = batch[0][0] < val_docs
        if not validation:
            val.flush()
        encoded = encode_batch(sp, [text for _, text in batch], validation, threads)
        done = 0
        for (i, text), (tokens, counts) in zip(batch, encoded):
            if validation:
                val_text_hashes.setdefault(_doc_hash(text), i)
                val_token_hashes.setdefault(hashlib.sha256(tokens.tobytes()).digest(), i)
                val_bytes += int(counts.sum())
                val_count += 1
                val.add(tokens, counts)
                done += 1
                continue
            # A training document, in this order (as one document at a time): its text against the validation
            # texts, then the cut-off, then its tokens against the validation tokens.
            k = val_text_hashes.get(_doc_hash(text))
            if k is not None:
                raise SystemExit(
                    f"error: overlapping splits: document {i} (training) has the text of validation "
                    f"document {k}; refusing to put validation text into training"
                )
            if max_train_tokens is not None and train.total >= max_train_tokens:
                truncated = True
                break
            k = val_token_hashes.get(hashlib.sha256(tokens.tobytes()).digest())
            if k is not None:
                raise SystemExit(
                    f"error: overlapping splits: document {i} (training) tokenizes to validation "
                    f"document {k}; refusing to put validation text into training"
                )
            train.add(tokens, None)
            train_docs += 1
            done += 1
        if bar is not None:
            bar.update(done)
        if truncated:
            break
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - started
    val.flush()
    train.flush()
    summary = dict(
        val_docs=val_docs,
        val_documents=val_count,
        val_tokens=val.total,
        val_original_bytes=val_bytes,
        train_documents=train_docs,
        train_tokens=train.total,
        train_truncated=truncated,
        files=[p.name for p in val.written + train.written],
        seconds=round(seconds, 3),
        documents_per_s=round((val_count + train_docs) / max(seconds, 1e-9), 1),
        threads=threads,
    )
    previous.write_text(json.dumps(dict(val_docs=val_docs), indent=1) + "\n")
    if val_count < val_docs:
        log(f"note: only {val_count} documents, all validation; no training split")
    if val_docs != CANONICAL_VAL_DOCS:
        log(f"note: {val_docs} validation documents; the challenge's split is the first {CANONICAL_VAL_DOCS:,}")
    return summary


# ----------------------------------------------------------------------------- command line


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="caseops.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("encode", help="stdin -> CaseOps form on stdout")
    sub.add_parser("decode", help="CaseOps form on stdin -> original text on stdout")
    p = sub.add_parser("prep", help="documents (jsonl) -> CaseOps shards + validation byte sidecar")
    p.add_argument("--docs", required=True, type=Path, help="jsonl, one document per line, in the canonical order")
    p.add_argument("--field", default="text", help="the JSON field holding the text (default text)")
    p.add_argument("--tokenizer", required=True, type=Path, help="a CaseOps SentencePiece model (ids 4..7 reserved)")
    p.add_argument("--out", required=True, type=Path, help="output folder (its shards are replaced)")
    p.add_argument(
        "--val-docs",
        type=int,
        default=CANONICAL_VAL_DOCS,
        help=f"the first N documents are validation (default {CANONICAL_VAL_DOCS}, the challenge's split)",
    )
    p.add_argument(
        "--shard-tokens", type=int, default=SHARD_TOKENS, help=f"tokens per shard (default {SHARD_TOKENS:,})"
    )
    p.add_argument("--max-train-tokens", type=int, default=None, help="stop the training split after about N tokens")
    p.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="SentencePiece encode threads (default: every core; the shards do not depend on it)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar (there is none off a terminal)")
    args = ap.parse_args(argv)
    if args.command == "prep" and args.threads < 1:
        ap.error(f"--threads {args.threads}: must be 1 or more")
    if args.command in ("encode", "decode"):
        data = sys.stdin.read()
        try:
            sys.stdout.write(encode(data) if args.command == "encode" else decode(data))
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_file=str(args.tokenizer))
    except Exception:
        print(f"error: {args.tokenizer}: not a loadable SentencePiece model", file=sys.stderr)
        return 1
    try:
        summary = prep(
            read_documents(args.docs, args.field),
            sp,
            args.out,
            args.val_docs,
            args.shard_tokens,
            args.max_train_tokens,
            log=lambda m: print(m, file=sys.stderr),
            threads=args.threads,
            progress=not args.no_progress and sys.stderr.isatty(),
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"{summary['val_documents'] + summary['train_documents']:,} documents in {summary['seconds']:.1f} s "
        f"({summary['documents_per_s']:,.0f} documents/s, {args.threads} threads)",
        file=sys.stderr,
    )
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Rebuild the embedded sample dataset (data/datasets/sample_sp1024, data/tokenizers/sample_1024_bpe.model).

Source: the reStructuredText sources of the Python 3.11 documentation as shipped in Debian's python3.11-doc
package (PSF licence, see data/README.md). The text is lightly cleaned of rst markup (code, tables and index
directives dropped), cut into documents at section headings, split into train/val by source file, a
SentencePiece BPE tokenizer with the challenge's settings is trained on the train documents, and both splits are
written as challenge shards (each document BOS-prefixed, no EOS).

    python data/build_sample.py                          # runs `apt-get download python3.11-doc` itself
    python data/build_sample.py --deb python3.11-doc_3.11.2-6+deb12u8_all.deb
    python data/build_sample.py --source DIR             # a `dpkg -x` tree, or its html/_sources folder
    python data/build_sample.py --out /tmp/sample        # write somewhere other than data/

Deterministic: the same source gives the same bytes (single-threaded trainer, no input shuffling, fixed seed).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import sentencepiece as spm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fineweb import DATA_DIR  # noqa: E402
from shards import BOS_ID, write_shard  # noqa: E402

PACKAGE = "python3.11-doc"
SOURCES_MARKER = "/html/_sources/"
# Prose-heavy parts of the documentation; the C API, the legacy distutils/install guides and the licence
# pages are left out.
INCLUDE_DIRS = (
    "tutorial",
    "howto",
    "library",
    "reference",
    "faq",
    "using",
    "extending",
    "installing",
    "distributing",
    "whatsnew",
)
INCLUDE_FILES = ("glossary.rst.txt",)
EXCLUDE_FILES = ("whatsnew/changelog.rst.txt", "whatsnew/index.rst.txt")

VOCAB_SIZE = 1024
MIN_DOC_CHARS = 2500  # sections are merged until a document has at least this many characters
MIN_KEEP_CHARS = 300  # shorter documents (stubs, index pages) are dropped
VAL_FRACTION = 0.10  # share of the text (by characters) whose source files go to the val split
MAX_TRAIN_TOKENS = 2_600_000  # keeps the committed sample small; documents past it are left out
TRAINER_SEED = 1337

TRAINER_SETTINGS = dict(
    model_type="bpe",
    vocab_size=VOCAB_SIZE,
    character_coverage=0.999,
    byte_fallback=True,
    split_digits=True,
    normalization_rule_name="nmt_nfkc",
    add_dummy_prefix=False,
    pad_id=0,
    bos_id=1,
    eos_id=2,
    unk_id=3,
    hard_vocab_limit=False,
    # determinism: one thread, every sentence, in order
    num_threads=1,
    input_sentence_size=0,
    shuffle_input_sentence=False,
    max_sentence_length=1 << 16,
    minloglevel=2,
)


# ----------------------------------------------------------------------------- source


def read_ar_members(data: bytes) -> dict[str, bytes]:
    """Members of a Debian package (an `ar` archive)."""
    if not data.startswith(b"!<arch>\n"):
        raise SystemExit("error: not a Debian package (missing ar magic)")
    members, pos = {}, 8
    while pos + 60 <= len(data):
        header = data[pos : pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        members[name] = data[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size & 1)
    return members


def sources_from_deb(deb: Path) -> dict[str, str]:
    members = read_ar_members(deb.read_bytes())
    data_name = next((n for n in members if n.startswith("data.tar")), None)
    if data_name is None:
        raise SystemExit(f"error: {deb} has no data.tar member")
    files = {}
    with tarfile.open(fileobj=io.BytesIO(members[data_name]), mode="r:*") as tar:
        for info in tar:
            if info.isfile() and SOURCES_MARKER in info.name and info.name.endswith(".rst.txt"):
                rel = info.name.split(SOURCES_MARKER, 1)[1]
                files[rel] = tar.extractfile(info).read().decode("utf-8")
    return files


def sources_from_dir(root: Path) -> dict[str, str]:
    found = [p for p in root.rglob("*.rst.txt") if SOURCES_MARKER in p.as_posix()] or list(root.rglob("*.rst.txt"))
    files = {}
    for p in found:
        posix = p.as_posix()
        rel = posix.split(SOURCES_MARKER, 1)[1] if SOURCES_MARKER in posix else p.relative_to(root).as_posix()
        files[rel] = p.read_text(encoding="utf-8")
    return files


def fetch_deb(workdir: Path) -> Path:
    """`apt-get download python3.11-doc` into workdir (after `apt-get update` if the package lists lack it)."""

    def download():
        return subprocess.run(
            ["apt-get", "download", PACKAGE],
            cwd=workdir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=600,
        )

    print(f"fetching {PACKAGE} with apt-get download ...", file=sys.stderr)
    try:
        result = download()
        if result.returncode != 0 and hasattr(os, "geteuid") and os.geteuid() == 0:
            print("apt-get download failed; running apt-get update and trying again ...", file=sys.stderr)
            subprocess.run(["apt-get", "update"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
            result = download()
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SystemExit(f"error: `apt-get download {PACKAGE}` could not run ({e}); pass --deb or --source instead")
    if result.returncode != 0:
        detail = " ".join(result.stderr.decode(errors="replace").split())
        raise SystemExit(f"error: `apt-get download {PACKAGE}` failed ({detail}); pass --deb or --source instead")
    debs = sorted(workdir.glob(f"{PACKAGE}_*.deb"))
    if not debs:
        raise SystemExit(f"error: apt-get download left no {PACKAGE}_*.deb in {workdir}")
    return debs[-1]


def selected(rel: str) -> bool:
    if rel in EXCLUDE_FILES:
        return False
    return rel in INCLUDE_FILES or rel.split("/", 1)[0] in INCLUDE_DIRS


# ----------------------------------------------------------------------------- rst -> text

ADORNMENT = re.compile(r"""^([=\-~^"*+#`:'.<>_])\1{2,}\s*$""")
DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:-]+)::\s*(.*)$")
EXPLICIT = re.compile(r"^(\s*)\.\.(\s|$)")
OPTION_LINE = re.compile(r"^\s*:[\w-]+:(\s.*)?$")
SIMPLE_TABLE_BORDER = re.compile(r"^\s*=+(\s+=+)+\s*$")
LIST_ITEM = re.compile(r"^(\s*)([*+-]|#\.|\d+\.|\(\d+\))\s+(.*)$")

ADMONITIONS = {
    "note",
    "warning",
    "important",
    "tip",
    "hint",
    "caution",
    "attention",
    "danger",
    "seealso",
    "impl-detail",
    "topic",
    "sidebar",
    "admonition",
    "centered",
}
VERSION_NOTES = {
    "versionadded": "New in version {}.",
    "versionchanged": "Changed in version {}:",
    "deprecated": "Deprecated since version {}:",
    "deprecated-removed": "Deprecated since version {}:",
}
OBJECTS = {
    "function",
    "method",
    "class",
    "attribute",
    "data",
    "exception",
    "decorator",
    "decoratormethod",
    "classmethod",
    "staticmethod",
    "abstractmethod",
    "coroutinefunction",
    "coroutinemethod",
    "awaitablefunction",
    "awaitablemethod",
    "describe",
    "opcode",
    "cmdoption",
    "option",
    "envvar",
    "pdbcommand",
    "property",
}

ROLE = re.compile(r":((?:[\w.+-]+:)+)`([^`]*)`")
NUMBERED_ROLES = {"pep": "PEP {}", "rfc": "RFC {}", "issue": "bpo-{}", "gh": "gh-{}"}  # as Sphinx renders them
LITERAL = re.compile(r"``(.+?)``")
LINK = re.compile(r"`([^`<]*?)\s*(?:<[^`>]*>)?`__?")
INTERPRETED = re.compile(r"`([^`]+)`")
STRONG = re.compile(r"\*\*([^*\s](?:[^*]*?[^*\s])?)\*\*")
EMPHASIS = re.compile(r"(?<![\w*\\])\*([^*\s](?:[^*]*?[^*\s])?)\*(?![\w*])")
FIELD = re.compile(r"^(\s*):([\w -]+):(\s+(.*))?$")  # ":Author: Name" (not a role: no backquote follows)
DROPPED_FIELDS = {"tocdepth", "orphan", "nosearch", "noindex", "platform", "synopsis"}
FOOTNOTE_REF = re.compile(r"\s*\[(?:#\w*|\d+|\*)\]_")
SUBSTITUTION = re.compile(r"\|(\w[\w ]*)\|")


def role_text(m: re.Match) -> str:
    role, text = m.group(1).rstrip(":").rsplit(":", 1)[-1], m.group(2)
    if role in NUMBERED_ROLES and text.isdigit():
        return NUMBERED_ROLES[role].format(text)
    target = re.match(r"(.*?)\s*<[^<>]*>$", text, re.S)
    if target and target.group(1):
        text = target.group(1)
    text = text.lstrip("!*")
    if text.startswith("~"):
        text = text[1:].rsplit(".", 1)[-1]
    return text


def clean_inline(text: str) -> str:
    text = ROLE.sub(role_text, text)
    text = LITERAL.sub(r"\1", text)
    text = LINK.sub(r"\1", text)
    text = INTERPRETED.sub(r"\1", text)
    text = STRONG.sub(r"\1", text)
    text = EMPHASIS.sub(r"\1", text)
    text = FOOTNOTE_REF.sub("", text)
    text = SUBSTITUTION.sub(r"\1", text)
    text = text.replace("\\ ", "").replace("\\", "")
    return re.sub(r"\s+", " ", text).strip()


def indent_of(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def rst_blocks(source: str) -> list[tuple[str, str]]:
    """The readable blocks of one rst file, in order: ("title", text) or ("para", text)."""
    blocks: list[tuple[str, str]] = []
    para: list[str] = []
    para_indent = 0
    skip_base = None  # skip lines indented deeper than this (literal blocks, dropped directives)
    skip_to_blank = False  # skip until the next blank line (doctest blocks, grid tables)
    skip_table = False  # inside a simple table, until its closing border
    pending_literal = None  # a paragraph ended with "::": the next deeper-indented block is code
    after_directive = False  # directive options may follow directly

    def flush():
        nonlocal para, pending_literal
        if not para:
            return
        text = " ".join(para)
        if text.endswith("::"):
            pending_literal = para_indent
            text = "" if text == "::" else text[:-3] if text.endswith(" ::") else text[:-1]  # "x::" -> "x:"
        text = clean_inline(text)
        if text:
            blocks.append(("para", text))
        para = []

    lines = source.replace("\t", "        ").splitlines()
    for n, raw in enumerate(lines):
        line = raw.rstrip()
        stripped = line.strip()
        ind = indent_of(line)
        if skip_table:
            if SIMPLE_TABLE_BORDER.match(line) and (n + 1 == len(lines) or not lines[n + 1].strip()):
                skip_table = False
            continue
        if skip_to_blank:
            if not stripped:
                skip_to_blank = False
            continue
        if skip_base is not None:
            if not stripped or ind > skip_base:
                continue
            skip_base = None
        if not stripped:
            flush()
            after_directive = False
            continue
        if pending_literal is not None:
            base, pending_literal = pending_literal, None
            if ind > base:
                skip_base = base
                continue
        if after_directive and OPTION_LINE.match(line):
            continue
        after_directive = False
        if ADORNMENT.match(line):
            if len(para) == 1:  # underline of a section title
                blocks.append(("title", clean_inline(para[0])))
                para = []
            else:
                flush()
            continue
        if SIMPLE_TABLE_BORDER.match(line):
            flush()
            skip_table = True
            continue
        if stripped.startswith(("+-", "+=")) or (
            stripped.startswith("|")
            and stripped.endswith("|")
            and len(stripped) > 2
            and not SUBSTITUTION.fullmatch(stripped)
        ):
            flush()
            skip_to_blank = True
            continue
        if stripped.startswith(">>>"):
            flush()
            skip_to_blank = True
            continue
        m = DIRECTIVE.match(line)
        if m:
            flush()
            name, arg = m.group(2), m.group(3).strip()
            if name in ADMONITIONS:
                if arg and name not in ("seealso", "impl-detail"):
                    para, para_indent = [arg], ind + 3
                elif name == "seealso":
                    para, para_indent = (["See also:", arg] if arg else ["See also:"]), ind + 3
                after_directive = True
            elif name in VERSION_NOTES:
                version, _, rest = arg.partition(" ")
                para, para_indent = [VERSION_NOTES[name].format(version)] + ([rest] if rest else []), ind + 3
                after_directive = True
            elif name in OBJECTS:
                if arg:
                    blocks.append(("para", clean_inline(arg)))
                after_directive = True
            else:
                skip_base = ind
            continue
        if EXPLICIT.match(line):  # comments, link targets, footnotes, substitution definitions
            flush()
            skip_base = ind
            continue
        field = FIELD.match(line)
        if field:
            flush()
            if field.group(2).lower() not in DROPPED_FIELDS:
                para = [f"{field.group(2)}: {field.group(4) or ''}".rstrip()]
                para_indent = field.start(4) if field.group(4) else ind + 3
            continue
        item = LIST_ITEM.match(line)
        if item:
            flush()
            para, para_indent = [item.group(3)], item.start(3)
            continue
        if para and ind != para_indent and len(para) == 1 and ind > para_indent:
            flush()  # definition list: the term, then its indented definition
        if not para:
            para_indent = ind
        para.append(stripped)
    flush()
    return blocks


def file_documents(blocks: list[tuple[str, str]]) -> list[str]:
    """Cut a file's blocks at section titles, merging sections until each document is long enough."""
    sections: list[list[str]] = [[]]
    for kind, text in blocks:
        if kind == "title" and any(len(p) > 40 for p in sections[-1]):
            sections.append([])
        sections[-1].append(text)
    docs: list[list[str]] = []
    for sec in sections:
        if docs and sum(map(len, docs[-1])) < MIN_DOC_CHARS:
            docs[-1].extend(sec)
        else:
            docs.append(list(sec))
    if len(docs) > 1 and sum(map(len, docs[-1])) < MIN_DOC_CHARS:
        docs[-2].extend(docs.pop())
    out = []
    for paras in docs:
        text = "\n".join(p for p in paras if p)
        if len(text) >= MIN_KEEP_CHARS:
            out.append(text)
    return out


def sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def split_documents(sources: dict[str, str]) -> tuple[list[str], list[str], dict]:
    per_file = {rel: file_documents(rst_blocks(sources[rel])) for rel in sorted(sources) if selected(rel)}
    seen: set[str] = set()
    for rel in sorted(per_file):  # drop exact duplicates, keeping the first copy
        kept = []
        for doc in per_file[rel]:
            if sha(doc) not in seen:
                seen.add(sha(doc))
                kept.append(doc)
        per_file[rel] = kept
    total = sum(len(d) for docs in per_file.values() for d in docs)
    val_files, val_chars = [], 0
    for rel in sorted(per_file, key=lambda r: sha("val-split:" + r)):
        if val_chars >= VAL_FRACTION * total:
            break
        if per_file[rel]:
            val_files.append(rel)
            val_chars += sum(map(len, per_file[rel]))
    val_set = set(val_files)
    val = [d for rel in sorted(val_set) for d in per_file[rel]]
    train = [d for rel in sorted(per_file) if rel not in val_set for d in per_file[rel]]
    # a fixed, content-derived order mixes the documentation's parts the way the challenge's export is shuffled
    train.sort(key=sha)
    val.sort(key=sha)
    info = dict(files_total=len(per_file), files_val=sorted(val_set))
    return train, val, info


# ----------------------------------------------------------------------------- tokenizer and shards


def train_tokenizer(train_docs: list[str]) -> bytes:
    spm.set_random_generator_seed(TRAINER_SEED)
    sentences = [p for doc in train_docs for p in doc.split("\n")]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model, **TRAINER_SETTINGS)
    return model.getvalue()


def encode_documents(sp: spm.SentencePieceProcessor, docs: list[str], max_tokens: int | None = None):
    pieces, total, used = [], 0, 0
    for ids in sp.encode(docs, out_type=int):
        if max_tokens is not None and total >= max_tokens:
            break
        pieces.append(np.array([BOS_ID] + ids, dtype=np.uint16))
        total += len(ids) + 1
        used += 1
    return np.concatenate(pieces), used


def build(sources: dict[str, str], out: Path, provenance: dict) -> dict:
    train_docs, val_docs, info = split_documents(sources)
    model_bytes = train_tokenizer(train_docs)
    sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    train_tokens, train_used = encode_documents(sp, train_docs, MAX_TRAIN_TOKENS)
    val_tokens, val_used = encode_documents(sp, val_docs)

    tok_path = out / "tokenizers" / f"sample_{VOCAB_SIZE}_bpe.model"
    tok_path.parent.mkdir(parents=True, exist_ok=True)
    tok_path.write_bytes(model_bytes)
    ds = out / "datasets" / f"sample_sp{VOCAB_SIZE}"
    outputs = {
        "train": write_shard(ds / "fineweb_train_000000.bin", train_tokens),
        "val": write_shard(ds / "fineweb_val_000000.bin", val_tokens),
    }
    summary = dict(
        provenance,
        sentencepiece=spm.__version__,
        source_files=info["files_total"],
        val_source_files=info["files_val"],
        train_documents=train_used,
        train_tokens=int(train_tokens.size),
        val_documents=val_used,
        val_tokens=int(val_tokens.size),
        sha256={
            p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in (tok_path, outputs["train"], outputs["val"])
        },
    )
    (out / "sample_build.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--deb", type=Path, help=f"a downloaded {PACKAGE}_*.deb")
    src.add_argument("--source", type=Path, help="an unpacked package tree (dpkg -x) or its html/_sources folder")
    ap.add_argument("--out", type=Path, default=DATA_DIR, help="layout root to write into (default: data/)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.source is not None:
            if not args.source.is_dir():
                raise SystemExit(f"error: --source {args.source} is not a directory")
            sources, provenance = sources_from_dir(args.source), dict(source=f"{PACKAGE} (unpacked tree)")
        else:
            deb = args.deb if args.deb is not None else fetch_deb(Path(tmp))
            if not deb.is_file():
                raise SystemExit(f"error: --deb {deb} not found")
            sources = sources_from_deb(deb)
            provenance = dict(source=deb.name, source_sha256=hashlib.sha256(deb.read_bytes()).hexdigest())
    if not sources:
        raise SystemExit("error: no .rst.txt documentation sources found in the given source")
    summary = build(sources, args.out, provenance)
    print(
        f"train: {summary['train_documents']} documents, {summary['train_tokens']} tokens; "
        f"val: {summary['val_documents']} documents, {summary['val_tokens']} tokens -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

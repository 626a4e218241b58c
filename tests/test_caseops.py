"""SP8192 and CaseOps data: the embedded samples, the CaseOps transform and sidecar, prep's split, the bpb audit
(each accounting bug the field shipped, planted and caught), and the variant downloads on the stand-in Hub."""

from __future__ import annotations

import io
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "data"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import caseops  # noqa: E402
import fineweb  # noqa: E402
from fineweb import AuditFailure, audit_tokens, lut_arrays  # noqa: E402
from shards import write_shard  # noqa: E402
from test_data import COMMIT, FakeHub, proto_fields  # noqa: E402

from train_gpt import load_data_shard  # noqa: E402

DATA = REPO / "data"
PLAIN_DS = DATA / "datasets" / "sample_sp8192"
CASE_DS = DATA / "datasets" / "sample_sp8192_caseops"
PLAIN_TOK = DATA / "tokenizers" / "sample_8192_bpe.model"
CASE_TOK = DATA / "tokenizers" / "sample_8192_bpe_caseops.model"
BUILD = json.loads((DATA / "sample_build_sp8192.json").read_text())
BOS = 1
OPS = ["\ue001", "\ue002", "\ue003", "\ue004"]


def documents(tokens):
    starts = np.flatnonzero(tokens == BOS)
    return [tokens[s:e] for s, e in zip(starts, list(starts[1:]) + [tokens.size])]


@pytest.fixture(scope="module")
def plain_sp():
    return spm.SentencePieceProcessor(model_file=str(PLAIN_TOK))


@pytest.fixture(scope="module")
def case_sp():
    return spm.SentencePieceProcessor(model_file=str(CASE_TOK))


# ----------------------------------------------------------------------------- the samples


@pytest.mark.parametrize("tok", [PLAIN_TOK, CASE_TOK])
def test_sample_tokenizers_have_the_records_settings(tok):
    sp = spm.SentencePieceProcessor(model_file=str(tok))
    model = proto_fields(tok.read_bytes())
    trainer, normalizer = proto_fields(model[2][0]), proto_fields(model[3][0])
    assert trainer[3] == [2] and trainer[4] == [8192]  # BPE, vocab 8192
    assert abs(trainer[10][0] - 0.999) < 1e-6  # character_coverage
    assert trainer[35] == [1] and trainer[25] == [1]  # byte_fallback, split_digits
    assert (trainer[43], trainer[41], trainer[42], trainer[40]) == ([0], [1], [2], [3])
    assert trainer[16] == [1]  # num_threads: one (determinism)
    assert normalizer[1] == [b"nmt_nfkc"] and normalizer[3] == [0]  # nmt_nfkc, no dummy prefix
    assert sp.vocab_size() == 8192
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert sum(sp.is_byte(i) for i in range(8192)) == 256
    assert sp.piece_to_id("\u2581") != sp.unk_id()  # a standalone space piece
    first_byte = 8 if tok == CASE_TOK else 4
    assert sp.id_to_piece(first_byte) == "<0x00>" and sp.id_to_piece(first_byte + 255) == "<0xFF>"


def test_caseops_tokenizer_reserves_the_operators_at_4_to_7(case_sp, plain_sp):
    assert [case_sp.id_to_piece(i) for i in range(4, 8)] == OPS
    assert not any(case_sp.is_control(i) or case_sp.is_byte(i) or case_sp.is_unknown(i) for i in range(4, 8))
    assert case_sp.encode("\ue001\ue002\ue003\ue004") == [4, 5, 6, 7]  # each operator is one piece
    assert all(plain_sp.piece_to_id(op) == plain_sp.unk_id() for op in OPS)
    caseops.check_caseops_tokenizer(case_sp)
    with pytest.raises(ValueError, match="id 4"):
        caseops.check_caseops_tokenizer(plain_sp)


def test_samples_fit_and_match_the_build_record():
    import hashlib

    for ds, tok, key in ((PLAIN_DS, PLAIN_TOK, "sp8192"), (CASE_DS, CASE_TOK, "caseops")):
        files = sorted(ds.iterdir()) + [tok]
        assert sum(p.stat().st_size for p in files) <= 5_000_000
        for p in files:
            assert BUILD["sha256"][p.relative_to(DATA).as_posix()] == hashlib.sha256(p.read_bytes()).hexdigest()
        val, train = load_data_shard(ds / "fineweb_val_000000.bin"), load_data_shard(ds / "fineweb_train_000000.bin")
        assert val[0] == BOS and train[0] == BOS and not np.any(val == 2) and not np.any(train == 2)  # BOS, no EOS
        assert len(documents(val)) == BUILD[key]["val_documents"] >= 100
        assert train.size == BUILD[key]["train_tokens"] > 1_000_000
    assert sorted(p.name for p in PLAIN_DS.iterdir()) == ["fineweb_train_000000.bin", "fineweb_val_000000.bin"]
    assert (CASE_DS / "fineweb_val_bytes_000000.bin").is_file()


def test_caseops_sample_inverts_to_the_plain_sample_and_its_sidecar_adds_up(plain_sp, case_sp):
    """The two samples hold the same validation documents in the same order: the inverse transform of each
    decoded CaseOps document is the plain sample's decoded document, and the sidecar adds up to its UTF-8 bytes."""
    plain = documents(load_data_shard(PLAIN_DS / "fineweb_val_000000.bin"))
    val = load_data_shard(CASE_DS / "fineweb_val_000000.bin")
    side = load_data_shard(CASE_DS / "fineweb_val_bytes_000000.bin")
    assert side.size == val.size and np.all(side[val == BOS] == 0)
    starts = np.flatnonzero(val == BOS)
    assert len(starts) == len(plain)
    total = 0
    for s, e, p in zip(starts, list(starts[1:]) + [val.size], plain):
        text = plain_sp.decode(p[1:].tolist())
        assert caseops.decode(case_sp.decode(val[s + 1 : e].tolist())) == text
        assert int(side[s:e].sum()) == len(text.encode("utf-8"))
        total += int(side[s:e].sum())
    assert total == BUILD["caseops"]["val_bytes"] == BUILD["sp8192"]["val_bytes"]
    assert np.any(val == 4) and np.any(val == 5) and np.all(side[np.isin(val, [4, 5, 6])] == 0)


def test_the_audit_passes_the_real_samples(plain_sp, case_sp):
    r = audit_tokens(load_data_shard(PLAIN_DS / "fineweb_val_000000.bin"), plain_sp)
    assert r["bytes"] == BUILD["sp8192"]["val_bytes"]
    r = audit_tokens(
        load_data_shard(CASE_DS / "fineweb_val_000000.bin"),
        case_sp,
        sidecar=load_data_shard(CASE_DS / "fineweb_val_bytes_000000.bin"),
    )
    assert r["bytes"] == BUILD["caseops"]["val_bytes"]


def test_audit_command_line_names_each_check(capsys):
    assert fineweb.main(["inspect", "--audit", str(PLAIN_DS), str(CASE_DS)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and "LUT of sample_8192_bpe.model" in out[0]
    assert "sidecar fineweb_val_bytes_000000.bin" in out[1] and "inverse transform" in out[1]


# ----------------------------------------------------------------------------- the transform


def test_caseops_encodes_the_documented_cases():
    T, A, C, E = OPS
    assert caseops.encode("plain words") == "plain words"
    assert caseops.encode("NASA and NATO") == f"{A}nasa and {A}nato"
    assert caseops.encode("Hello World") == f"{T}hello {T}world"
    assert caseops.encode("I A") == f"{T}i {T}a"  # one capital: TITLE, not ALLCAPS
    assert caseops.encode("McDonald iPhone") == f"{T}mc{C}donald i{C}phone"
    assert caseops.encode("ABc") == f"{T}a{C}bc"
    assert caseops.encode(f"x{T}y{E}") == f"x{E}{T}y{E}{E}"
    assert caseops.encode("Ünïcode ÉCOLE 42") == f"Ünïcode É{A}cole 42"  # non-ASCII untouched


def test_caseops_round_trip_on_adversarial_text():
    rng = random.Random(15)
    alphabet = list("aAbBzZ") + OPS + list(" 1-é É日\u2581\n") + ["\U0001f600"]
    cases = ["ALL CAPS SHOUTING", "mIxEd CaSe", "X", "xY", "XYz", "\ue004\ue004\ue001A", "ÀB ßS ǅ", ""]
    cases += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(3000)]
    for text in cases:
        enc = caseops.encode(text)
        assert caseops.decode(enc) == text
        assert not any("A" <= c <= "Z" for c in enc)
        counts, open_esc = caseops.original_byte_counts([enc])
        assert counts == [len(text.encode("utf-8"))] and not open_esc


@pytest.mark.parametrize(
    "bad",
    [
        "\ue004",
        "\ue004x",
        "\ue001",
        "\ue001A",
        "\ue001\ue001ab",
        "a\ue001b",
        "\ue002a",
        "\ue002ab\ue003c",
        "\ue003ab",
        "x \ue003a",
        "\ue001 a",
    ],
)
def test_caseops_decode_refuses_malformed_operators(bad):
    with pytest.raises(ValueError, match="malformed CaseOps text at character"):
        caseops.decode(bad)


def test_byte_counts_follow_the_escape_across_tokens():
    T, A, C, E = OPS
    # "Ab" -> TITLE a b ; a literal TITLE -> ESC TITLE, split over two tokens
    assert caseops.original_byte_counts([T, "ab", E, T, "é", "\u2581"])[0] == [0, 2, 0, 3, 2, 3]
    counts, open_esc = caseops.original_byte_counts(["x" + E])
    assert counts == [1] and open_esc
    assert caseops.original_byte_counts([T], escaped=True)[0] == [3]


# ----------------------------------------------------------------------------- tiny tokenizers and planted bugs

TINY_TEXT = None


def tiny_text() -> list[str]:
    global TINY_TEXT
    if TINY_TEXT is None:
        sp = spm.SentencePieceProcessor(model_file=str(PLAIN_TOK))
        docs = documents(load_data_shard(PLAIN_DS / "fineweb_val_000000.bin"))[:12]
        TINY_TEXT = [sp.decode(d[1:].tolist()) for d in docs]
    return TINY_TEXT


def tiny_tokenizer(sentences, vocab=400, **extra) -> spm.SentencePieceProcessor:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab,
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
        num_threads=1,
        minloglevel=2,
        **extra,
    )
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


@pytest.fixture(scope="module")
def tiny():
    return tiny_tokenizer(tiny_text())


@pytest.fixture(scope="module")
def tiny_caseops():
    return tiny_tokenizer([caseops.encode(t) for t in tiny_text()], user_defined_symbols=OPS)


def shard_of(sp, texts):
    return np.concatenate([np.array([BOS] + sp.encode(t), dtype=np.uint16) for t in texts])


AUDIT_TEXTS = [
    "First document, with 12 digits 345678901234 and words.",
    "Second one: naïve café — « quotes » and an emoji \U0001f600 here.",
    "Third: Mixed CASE text, McDonald and iPhone, plus a literal \ue001 operator.",
]


def test_the_audit_passes_correct_tiny_accounting(tiny, tiny_caseops):
    r = audit_tokens(shard_of(tiny, AUDIT_TEXTS), tiny)
    assert r["documents"] == 3 and r["bytes"] == sum(len(t.encode()) for t in AUDIT_TEXTS)
    tokens, side = zip(*(caseops.encode_document(tiny_caseops, caseops.encode(t)) for t in AUDIT_TEXTS))
    r = audit_tokens(np.concatenate(tokens), tiny_caseops, sidecar=np.concatenate(side))
    assert r["bytes"] == sum(len(t.encode()) for t in AUDIT_TEXTS)
    r = audit_tokens(np.concatenate(tokens), tiny_caseops, sidecar=np.concatenate(side), originals=AUDIT_TEXTS)
    assert r["documents"] == 3


def test_audit_catches_a_tokenizer_without_a_standalone_space_piece():
    """Challenge issue #897: without a '▁' piece a space falls back to the 3 bytes of U+2581, counted 3."""
    sp = tiny_tokenizer([t.replace(" ", "") for t in tiny_text()])
    assert sp.piece_to_id("\u2581") == sp.unk_id()
    tokens = shard_of(sp, AUDIT_TEXTS)
    with pytest.raises(AuditFailure) as err:
        audit_tokens(tokens, sp)
    msg = str(err.value)
    spaces = AUDIT_TEXTS[0].count(" ")
    assert f"{len(AUDIT_TEXTS[0]) + 2 * spaces} bytes counted, its decoded text has {len(AUDIT_TEXTS[0])}" in msg
    assert "document 0" in msg and "first disagreement at piece '<0x81>'" in msg  # the third byte of U+2581


def test_audit_catches_byte_fallback_pieces_counted_as_three(tiny):
    """PR #1271/#1289: byte pieces counted as len('\\ufffd') = 3 bytes."""
    base, space, boundary = (a.copy() for a in lut_arrays(tiny))
    byte_ids = [i for i in range(tiny.vocab_size()) if tiny.is_byte(i)]
    base[byte_ids] = 3
    tokens = shard_of(tiny, AUDIT_TEXTS)
    assert any(tiny.is_byte(int(t)) for t in documents(tokens)[1])
    audit_tokens(tokens[: documents(tokens)[0].size], tiny, luts=(base, space, boundary))  # no bytes: passes
    with pytest.raises(AuditFailure, match=r"document 1 .*piece '<0x[0-9A-F]{2}>'"):
        audit_tokens(tokens, tiny, luts=(base, space, boundary))


def test_audit_catches_a_doubled_space_byte(tiny):
    """#1632/#1672: the space counted in the base bytes and again through the leading-space flag."""
    base, space, boundary = (a.copy() for a in lut_arrays(tiny))
    base[space] += 1
    with pytest.raises(AuditFailure, match=r"document 0 .*first disagreement at piece '\u2581"):
        audit_tokens(shard_of(tiny, AUDIT_TEXTS), tiny, luts=(base, space, boundary))


def test_audit_catches_a_sidecar_off_by_one(tiny_caseops):
    tokens, side = zip(*(caseops.encode_document(tiny_caseops, caseops.encode(t)) for t in AUDIT_TEXTS))
    tokens, side = np.concatenate(tokens), np.concatenate(side)
    starts = np.flatnonzero(tokens == BOS)
    k = int(starts[2]) + 7
    bumped = side.copy()
    bumped[k] += 1
    with pytest.raises(AuditFailure) as err:
        audit_tokens(tokens, tiny_caseops, sidecar=bumped)
    assert "document 2" in str(err.value) and f"token {k})" in str(err.value)
    with pytest.raises(AuditFailure, match="not parallel"):  # one entry short
        audit_tokens(tokens, tiny_caseops, sidecar=side[:-1])
    with pytest.raises(AuditFailure, match="not parallel.*BOS"):  # shifted by one position
        audit_tokens(tokens, tiny_caseops, sidecar=np.roll(side, 1))
    wrong = list(AUDIT_TEXTS)
    wrong[1] += "!"
    with pytest.raises(AuditFailure, match="document 1 .*the original document has"):
        audit_tokens(tokens, tiny_caseops, sidecar=side, originals=wrong)


# ----------------------------------------------------------------------------- prep


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def test_prep_writes_shards_and_a_parallel_sidecar(tmp_path, tiny_caseops, capsys):
    tok = tmp_path / "tok.model"
    tok.write_bytes(tiny_caseops.serialized_model_proto())
    texts = AUDIT_TEXTS + [f"Train Doc {i}: SOME Text" for i in range(5)]
    out = tmp_path / "out"
    code = caseops.main(
        [
            "prep",
            "--docs",
            str(write_jsonl(tmp_path / "d.jsonl", texts)),
            "--tokenizer",
            str(tok),
            "--out",
            str(out),
            "--val-docs",
            "3",
        ]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["val_documents"] == 3 and summary["train_documents"] == 5
    assert sorted(p.name for p in out.glob("*.bin")) == [
        "fineweb_train_000000.bin",
        "fineweb_val_000000.bin",
        "fineweb_val_bytes_000000.bin",
    ]
    val, side = load_data_shard(out / "fineweb_val_000000.bin"), load_data_shard(out / "fineweb_val_bytes_000000.bin")
    assert len(documents(val)) == 3 and len(documents(load_data_shard(out / "fineweb_train_000000.bin"))) == 5
    assert int(side.sum()) == summary["val_original_bytes"] == sum(len(t.encode()) for t in AUDIT_TEXTS)
    assert audit_tokens(val, tiny_caseops, sidecar=side, originals=AUDIT_TEXTS)["documents"] == 3
    # the canonical split is the default
    import inspect

    assert inspect.signature(caseops.prep).parameters["val_docs"].default == 50_000 == caseops.CANONICAL_VAL_DOCS


def test_prep_gives_the_same_shards_on_one_thread_or_several_and_shows_progress(tmp_path, tiny_caseops, capsys):
    """Batched, threaded encoding writes the bytes that encoding one document at a time does, whatever the thread
    count and the batch size (batches that straddle the validation/training boundary and the shard boundaries
    included), and the progress bar counts the documents with their rate."""
    rng = np.random.default_rng(0)
    words = ["Alpha", "beta", "GAMMA", "McDelta", "eps", "ZETA-9", "naïve", "café", "iPhone", "x\ue002y", "42"]
    texts = AUDIT_TEXTS + [" ".join(rng.choice(words, size=int(rng.integers(3, 40)))) for _ in range(200)]
    shards = {}
    for threads, batch in ((1, 1), (4, 7), (2, 1024)):
        out = tmp_path / f"threads{threads}_batch{batch}"
        summary = caseops.prep(
            texts, tiny_caseops, out, val_docs=40, shard_tokens=1500, log=lambda m: None,
            threads=threads, batch_docs=batch, progress=threads == 4,
        )  # fmt: skip
        assert summary["threads"] == threads and summary["documents_per_s"] > 0
        shards[threads] = {p.name: p.read_bytes() for p in sorted(out.glob("*.bin"))}
    assert shards[1] == shards[4] == shards[2]
    assert sum(name.startswith("fineweb_train_") for name in shards[1]) >= 3  # several training shards
    # The validation shards are each document's encode_document, one at a time, in order.
    val = np.concatenate([load_data_shard(tmp_path / "threads1_batch1" / n) for n in shards[1] if "val_0" in n])
    want = np.concatenate([caseops.encode_document(tiny_caseops, caseops.encode(t))[0] for t in texts[:40]])
    assert np.array_equal(val, want)
    progress = capsys.readouterr().err
    assert "caseops prep" in progress and f"{len(texts)}docs" in progress and "docs/s" in progress
    # A truncated training split stops at the same document whatever the batch.
    kept = [
        caseops.prep(texts, tiny_caseops, tmp_path / f"cut{b}", val_docs=40, max_train_tokens=900, batch_docs=b)
        for b in (1, 16)
    ]
    assert kept[0]["train_documents"] == kept[1]["train_documents"] < 160 and kept[0]["train_truncated"]
    # What is refused does not depend on the batch either: a validation text as the first document past the
    # cut-off is still checked (and refused), one document later it is never read.
    first_past = 40 + kept[0]["train_documents"]
    for at, refused in ((first_past, True), (first_past + 1, False)):
        planted = texts[:at] + [texts[0]] + texts[at + 1 :]
        for b in (1, 16):
            out = tmp_path / f"planted{at}_{b}"
            if refused:
                with pytest.raises(SystemExit, match=f"document {at} .*validation document 0"):
                    caseops.prep(planted, tiny_caseops, out, val_docs=40, max_train_tokens=900, batch_docs=b)
            else:
                caseops.prep(planted, tiny_caseops, out, val_docs=40, max_train_tokens=900, batch_docs=b)


def test_prep_refuses_overlapping_splits(tmp_path, tiny_caseops):
    texts = AUDIT_TEXTS + ["a training document", AUDIT_TEXTS[1]]  # a validation document again in training
    with pytest.raises(SystemExit, match="overlapping splits: document 4 .*validation document 1"):
        caseops.prep(texts, tiny_caseops, tmp_path / "a", val_docs=3)
    assert not list((tmp_path / "a").glob("fineweb_train_*.bin"))
    # a folder prepared with one split is not rewritten with another (the #2127 mix-up of 10,000 and 50,000)
    caseops.prep(AUDIT_TEXTS + ["x", "y"], tiny_caseops, tmp_path / "b", val_docs=1, log=lambda m: None)
    with pytest.raises(SystemExit, match="1 validation documents, this run asks for 3"):
        caseops.prep(AUDIT_TEXTS + ["x", "y"], tiny_caseops, tmp_path / "b", val_docs=3)
    with pytest.raises(ValueError, match="id 4"):
        caseops.prep(AUDIT_TEXTS, spm.SentencePieceProcessor(model_file=str(PLAIN_TOK)), tmp_path / "c")


def test_check_splits_disjoint_on_tokens():
    a, b = np.array([1, 5, 6], np.uint16), np.array([1, 7], np.uint16)
    caseops.check_splits_disjoint([a], [b])
    with pytest.raises(SystemExit, match="training document 1 is validation document 0"):
        caseops.check_splits_disjoint([a], [b, a.copy()])


# ----------------------------------------------------------------------------- downloads of the variants

VARIANT_CASES = {
    "sp8192": ("kevclark/parameter-golf", "fineweb_8192_bpe", PLAIN_DS, PLAIN_TOK, False),
    "sp4096": ("kevclark/parameter-golf", "fineweb_4096_bpe", PLAIN_DS, PLAIN_TOK, False),
    "sp8192_lossless_caps_caseops_v1_reserved": (
        "romeerp/parameter-golf-caseops-v1",
        "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved",
        CASE_DS,
        CASE_TOK,
        True,
    ),
}


def variant_hub(tmp_path, variant):
    repo, tok_name, ds, tok, sidecar = VARIANT_CASES[variant]
    hub = FakeHub(repo).start()
    name = f"fineweb10B_{variant}"
    val = load_data_shard(ds / "fineweb_val_000000.bin")
    cut = int(np.flatnonzero(val == BOS)[6])
    parts = {"fineweb_val_000000.bin": val[:cut]}
    if sidecar:
        parts["fineweb_val_bytes_000000.bin"] = load_data_shard(ds / "fineweb_val_bytes_000000.bin")[:cut]
    train = load_data_shard(ds / "fineweb_train_000000.bin")
    for i in range(2):
        parts[f"fineweb_train_{i:06d}.bin"] = train[i * 5000 : (i + 1) * 5000]
    hub.shards = {}
    for n, toks in parts.items():
        hub.shards[n] = write_shard(tmp_path / "src" / n, toks).read_bytes()
        hub.add(f"datasets/datasets/{name}/{n}", hub.shards[n])
    # (the sp4096 stand-in serves the 8192 model; its manifest entry says so, so that the vocab check holds)
    hub.add(f"datasets/tokenizers/{tok_name}.model", tok.read_bytes())
    manifest = {
        "datasets": [{"name": name, "tokenizer_name": tok_name, "stats": {"files_train": 2, "files_val": 1}}],
        "tokenizers": [{"name": tok_name, "model_path": f"tokenizers/{tok_name}.model", "vocab_size": 8192}],
    }
    hub.add("datasets/manifest.json", json.dumps(manifest).encode())
    return hub, name, tok_name


@pytest.fixture
def dl(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    for v in (
        "HF_TOKEN",
        "FINEWEB_REPO_ID",
        "FINEWEB_REMOTE_DIR",
        "MATCHED_FINEWEB_REPO_ID",
        "MATCHED_FINEWEB_REMOTE_ROOT_PREFIX",
    ):
        monkeypatch.delenv(v, raising=False)

    def run(hub, root, *extra):
        capsys.readouterr()
        code = fineweb.main(["download", "--root", str(root), "--endpoint", hub.endpoint, *map(str, extra)])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_variants_name_their_default_repos():
    assert fineweb.VARIANTS["sp8192"]["repo_id"] == fineweb.VARIANTS["sp4096"]["repo_id"] == "kevclark/parameter-golf"
    case = fineweb.VARIANTS["sp8192_lossless_caps_caseops_v1_reserved"]
    assert case["repo_id"] == "romeerp/parameter-golf-caseops-v1" and case["remote_dir"] == "datasets"
    assert fineweb.VARIANTS["sp1024"]["repo_id"] == "willdepueoai/parameter-golf"


@pytest.mark.parametrize("variant", ["sp8192", "sp4096", "sp8192_lossless_caps_caseops_v1_reserved"])
def test_download_each_variant_from_its_repo(tmp_path, dl, variant):
    hub, name, tok_name = variant_hub(tmp_path, variant)
    try:
        root = tmp_path / "data"
        root.mkdir()  # a stale manifest from the sp1024 repo, without this variant, must not hide it
        (root / "manifest.json").write_text(json.dumps({"datasets": [{"name": "fineweb10B_sp1024"}]}))
        code, out, err = dl(hub, root, "--variant", variant, "--train-shards", "2")
        assert code == 0, out + err
        ds = root / "datasets" / name
        assert sorted(p.name for p in ds.iterdir()) == sorted(hub.shards)
        for n, data in hub.shards.items():
            assert (ds / n).read_bytes() == data
        assert (root / "tokenizers" / f"{tok_name}.model").is_file()
        assert json.loads((root / "manifest.json").read_text())["datasets"][0]["name"] == name
        assert all(
            f"/datasets/{hub.repo_id}/resolve/{COMMIT}/" in p
            for _, p, _ in hub.log
            if "/resolve/" in p and "manifest" not in p
        )
    finally:
        hub.stop()


def test_repo_id_still_overrides_a_variants_default(tmp_path, dl):
    hub, name, _ = variant_hub(tmp_path, "sp8192")
    hub.repo_id = "someone/mirror"
    try:
        code, out, err = dl(hub, tmp_path / "a", "--variant", "sp8192", "--train-shards", "0")
        assert code == 1 and "cannot read the dataset repo kevclark/parameter-golf" in err
        code, out, err = dl(
            hub, tmp_path / "b", "--variant", "sp8192", "--train-shards", "0", "--repo-id", "someone/mirror"
        )
        assert code == 0, out + err
    finally:
        hub.stop()


def test_caseops_download_resumes_and_refuses_a_bad_sidecar(tmp_path, dl):
    variant = "sp8192_lossless_caps_caseops_v1_reserved"
    hub, name, _ = variant_hub(tmp_path, variant)
    try:
        root = tmp_path / "data"
        ds = root / "datasets" / name
        side = f"datasets/datasets/{name}/fineweb_val_bytes_000000.bin"
        hub.cut[side] = 2000
        hub.outage_after_cut = True
        code, out, err = dl(hub, root, "--variant", variant, "--train-shards", "2")
        assert code == 1 and "run the same command again" in err and not (ds / "fineweb_val_bytes_000000.bin").exists()
        hub.broken.clear()
        hub.log.clear()
        code, out, err = dl(hub, root, "--variant", variant, "--train-shards", "2")  # the next run: the rest
        assert code == 0, out + err
        fetched = {p.rsplit("/", 1)[-1] for _, p, _ in hub.log if "/resolve/" in p} - {"manifest.json"}
        assert fetched == {"fineweb_val_bytes_000000.bin"}
        assert (ds / "fineweb_val_bytes_000000.bin").read_bytes() == hub.shards["fineweb_val_bytes_000000.bin"]

        (ds / "fineweb_val_bytes_000000.bin").unlink()  # a sidecar one entry short
        short = load_data_shard(CASE_DS / "fineweb_val_bytes_000000.bin")[
            : load_data_shard(ds / "fineweb_val_000000.bin").size - 1
        ]
        hub.add(side, write_shard(tmp_path / "short.bin", short).read_bytes())
        code, out, err = dl(hub, root, "--variant", variant, "--train-shards", "2")
        assert code == 1 and "refusing the download" in err and "byte counts for" in err
        assert not (ds / "fineweb_val_bytes_000000.bin").exists()
    finally:
        hub.stop()


def test_variant_download_refuses_a_corrupt_shard(tmp_path, dl):
    hub, name, _ = variant_hub(tmp_path, "sp8192")
    try:
        bad = bytearray(hub.shards["fineweb_train_000001.bin"])
        bad[:4] = b"\0\0\0\0"
        hub.add(f"datasets/datasets/{name}/fineweb_train_000001.bin", bytes(bad))
        code, out, err = dl(hub, tmp_path / "data", "--variant", "sp8192", "--train-shards", "2")
        assert code == 1 and "fineweb_train_000001.bin" in err and "not a token shard" in err
        assert not (tmp_path / "data" / "datasets" / name / "fineweb_train_000001.bin").exists()
    finally:
        hub.stop()

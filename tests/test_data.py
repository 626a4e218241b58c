"""Data: shard format, the embedded sample, bpb byte accounting, the downloader and inspector, the sample rebuild.

The downloader runs against a stand-in for the Hugging Face Hub on loopback addresses (see FakeHub): no network.
"""

from __future__ import annotations

import ast
import hashlib
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "data"))

import caseops  # noqa: E402
from shards import shard_header, write_shard  # noqa: E402

from train_gpt import (  # noqa: E402
    SHARD_HEADER_WORDS,
    SHARD_MAGIC,
    SHARD_VERSION,
    Fail,
    build_sentencepiece_luts,
    load_data_shard,
    target_bytes,
)

SAMPLE = REPO / "data" / "datasets" / "sample_sp1024"
SAMPLE_TRAIN = SAMPLE / "fineweb_train_000000.bin"
SAMPLE_VAL = SAMPLE / "fineweb_val_000000.bin"
SAMPLE_TOKENIZER = REPO / "data" / "tokenizers" / "sample_1024_bpe.model"
FINEWEB_PY = REPO / "data" / "fineweb.py"
BOS = 1


def documents(tokens: np.ndarray) -> list[np.ndarray]:
    starts = np.flatnonzero(tokens == BOS)
    return [tokens[s:e] for s, e in zip(starts, list(starts[1:]) + [tokens.size])]


# ----------------------------------------------------------------------------- shard format


def test_header_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 65536, size=12345).astype(np.int64)
    path = write_shard(tmp_path / "x.bin", tokens)
    raw = path.read_bytes()
    assert len(raw) == SHARD_HEADER_WORDS * 4 + 2 * tokens.size
    header = np.frombuffer(raw[: SHARD_HEADER_WORDS * 4], dtype="<i4")
    assert (header[0], header[1], header[2]) == (SHARD_MAGIC, SHARD_VERSION, tokens.size)
    assert not header[3:].any()
    back = load_data_shard(path)
    assert back.dtype == np.uint16 and np.array_equal(back.astype(np.int64), tokens)
    assert load_data_shard(write_shard(tmp_path / "empty.bin", np.array([], dtype=np.uint16))).size == 0


def test_writer_rejects_ids_outside_uint16(tmp_path):
    for bad in (np.array([1, 65536]), np.array([-1, 2]), np.zeros((2, 2), dtype=np.int64)):
        with pytest.raises(ValueError):
            write_shard(tmp_path / "bad.bin", bad)
    assert not (tmp_path / "bad.bin").exists()


@pytest.mark.parametrize(
    "damage", ["truncated_body", "truncated_header", "wrong_magic", "wrong_version", "wrong_size", "extra_bytes"]
)
def test_damaged_shards_are_rejected_naming_the_file(tmp_path, damage):
    good = write_shard(tmp_path / "good.bin", np.arange(1000) % 1024).read_bytes()
    header = np.frombuffer(good[: SHARD_HEADER_WORDS * 4], dtype="<i4").copy()
    raw = {
        "truncated_body": good[:-7],
        "truncated_header": good[:500],
        "wrong_magic": shard_header(1000).replace(np.int32(SHARD_MAGIC).tobytes(), np.int32(12345).tobytes(), 1)
        + good[SHARD_HEADER_WORDS * 4 :],
        "wrong_version": (lambda h: (h.__setitem__(1, 7), h.tobytes())[1])(header.copy())
        + good[SHARD_HEADER_WORDS * 4 :],
        "wrong_size": shard_header(999) + good[SHARD_HEADER_WORDS * 4 :],
        "extra_bytes": good + b"\0\0",
    }[damage]
    path = tmp_path / f"shard_{damage}.bin"
    path.write_bytes(raw)
    with pytest.raises(Fail) as err:
        load_data_shard(path)
    assert str(path) in str(err.value)


# ----------------------------------------------------------------------------- the data/ modules


def data_modules_imported(path: Path, modules: set[str]) -> set[str]:
    """The data/ modules that the file at path imports anywhere: at top level or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.update([node.module] if node.module else [alias.name for alias in node.names])
    return {name.split(".")[0] for name in names} & modules


def import_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph (module -> the modules it imports) as [a, b, ..., a], or None when it has none."""
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str] | None:
        if module in path:
            return path[path.index(module) :] + [module]
        if module in done:
            return None
        for imported in sorted(graph[module]):
            if cycle := visit(imported, path + [module]):
                return cycle
        done.add(module)
        return None

    return next((cycle for module in sorted(graph) if (cycle := visit(module, []))), None)


def test_import_cycle_finds_a_cycle_and_only_a_cycle():
    assert import_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert import_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_data_modules_import_each_other_without_a_cycle():
    files = {path.stem: path for path in (REPO / "data").glob("*.py")}
    graph = {name: data_modules_imported(path, set(files)) for name, path in files.items()}
    assert {"caseops", "fineweb"} <= set(graph)
    cycle = import_cycle(graph)
    assert cycle is None, "data/ modules import each other in a cycle: " + " -> ".join(cycle)


# ----------------------------------------------------------------------------- the embedded sample


@pytest.fixture(scope="module")
def sample_sp():
    return spm.SentencePieceProcessor(model_file=str(SAMPLE_TOKENIZER))


def test_sample_files_are_valid_shards_of_the_required_size():
    train, val = load_data_shard(SAMPLE_TRAIN), load_data_shard(SAMPLE_VAL)
    assert train.size >= 2_000_000
    assert val.size >= 200_000
    assert train[0] == BOS and val[0] == BOS
    assert len(documents(val)) >= 50
    assert int(train.max()) < 1024 and int(val.max()) < 1024
    total = sum(p.stat().st_size for p in (SAMPLE_TRAIN, SAMPLE_VAL, SAMPLE_TOKENIZER))
    assert total <= 12_000_000


def proto_fields(buf: bytes) -> dict[int, list]:
    """Fields of a protobuf message by number, through data/caseops.py's reader (the one in the repo)."""
    fields = {}
    for number, value in caseops._messages(buf):
        fields.setdefault(number, []).append(value)
    return fields


def test_sample_tokenizer_has_the_challenge_settings(sample_sp):
    model = proto_fields(SAMPLE_TOKENIZER.read_bytes())
    trainer, normalizer = proto_fields(model[2][0]), proto_fields(model[3][0])  # ModelProto.trainer/normalizer_spec
    # (field numbers from sentencepiece_model.proto; an absent field holds the proto default)
    assert trainer[3] == [2]  # model_type BPE
    assert trainer[4] == [1024]  # vocab_size
    assert abs(trainer[10][0] - 0.999) < 1e-6  # character_coverage
    assert trainer[35] == [1] and trainer[25] == [1]  # byte_fallback, split_digits
    assert trainer[33] == [0]  # hard_vocab_limit off
    assert (trainer[43], trainer[41], trainer[42], trainer[40]) == ([0], [1], [2], [3])  # pad bos eos unk
    assert normalizer[1] == [b"nmt_nfkc"] and normalizer[3] == [0]  # name, add_dummy_prefix off
    assert sample_sp.vocab_size() == 1024
    assert (sample_sp.pad_id(), sample_sp.bos_id(), sample_sp.eos_id(), sample_sp.unk_id()) == (0, 1, 2, 3)
    assert sum(sample_sp.is_byte(i) for i in range(1024)) == 256
    assert sample_sp.encode("2024") == [sample_sp.piece_to_id(c) for c in "2024"]  # digits split
    assert not sample_sp.id_to_piece(sample_sp.encode("Python")[0]).startswith("\u2581")  # no dummy prefix


def test_sample_splits_share_no_document_and_have_no_eos(sample_sp):
    train_docs = {d.tobytes() for d in documents(load_data_shard(SAMPLE_TRAIN))}
    val_docs = [d.tobytes() for d in documents(load_data_shard(SAMPLE_VAL))]
    assert not train_docs.intersection(val_docs)
    for path in (SAMPLE_TRAIN, SAMPLE_VAL):
        assert not np.any(load_data_shard(path) == sample_sp.eos_id())


def test_sample_is_english_prose(sample_sp):
    val = load_data_shard(SAMPLE_VAL)
    text = " ".join(sample_sp.decode(d[1:].tolist()) for d in documents(val)[:20])
    words = text.lower().split()
    common = {"the", "of", "and", "to", "a", "is", "in", "that", "for", "be"}
    assert len(words) > 2000
    assert sum(w in common for w in words) / len(words) > 0.12
    assert sum(c.isalpha() or c.isspace() for c in text) / len(text) > 0.85


def test_byte_accounting_matches_decoded_utf8_on_every_val_document(sample_sp):
    """SPEC §4 via train_gpt's tables: the bytes of a document's targets (BOS as the first context) add up to the
    UTF-8 length of the document's decoded text, document by document."""
    luts = build_sentencepiece_luts(sample_sp, 1024, torch.device("cpu"))
    val = load_data_shard(SAMPLE_VAL)
    docs = documents(val)
    assert len(docs) >= 50
    total_bytes = 0
    for doc in docs:
        ids = torch.from_numpy(doc.astype(np.int64))
        counted = int(target_bytes(ids[:-1], ids[1:], luts).sum())
        expected = len(sample_sp.decode(doc[1:].tolist()).encode("utf-8"))
        assert counted == expected, f"document of {doc.size} tokens: counted {counted} bytes, decoded {expected}"
        total_bytes += counted
    # also over the stream as the evaluator sees it (document boundaries inside windows)
    ids = torch.from_numpy(val.astype(np.int64))
    assert int(target_bytes(ids[:-1], ids[1:], luts).sum()) == total_bytes


# ----------------------------------------------------------------------------- inspect


def run_tool(*args, env=None, timeout=120):
    """The tool as a user runs it: a separate process (slow to start: train_gpt imports torch)."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run(
        [sys.executable, str(FINEWEB_PY), *map(str, args)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
    )


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def tool(capsys):
    """The tool in this process (fineweb.main), for speed; same argv, exit code and output as the command line."""
    import fineweb

    def run(*args):
        capsys.readouterr()
        code = fineweb.main([str(a) for a in args])
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return run


def test_inspect_reports_counts_and_first_document(sample_sp, tool):
    r = tool("inspect", SAMPLE_VAL)
    assert r.returncode == 0, r.stderr
    val = load_data_shard(SAMPLE_VAL)
    first = documents(val)[0]
    out = r.stdout
    assert f"magic {SHARD_MAGIC}, version {SHARD_VERSION}, count {val.size}" in out
    assert f"tokens: {val.size:,}" in out
    assert f"documents (BOS=1): {len(documents(val)):,}" in out
    assert f"ids {int(val.min())}..{int(val.max())}" in out
    assert "sample_1024_bpe.model" in out
    assert sample_sp.decode(first[1:].tolist())[:200] in out


@pytest.mark.parametrize("damage", ["truncated", "wrong_magic", "missing"])
def test_inspect_rejects_bad_files_in_one_line(tmp_path, damage, tool):
    path = tmp_path / "fineweb_val_000000.bin"
    if damage != "missing":
        raw = write_shard(path, np.arange(500) % 1024).read_bytes()
        path.write_bytes(raw[:-10] if damage == "truncated" else b"\0\0\0\0" + raw[4:])
    r = run_tool("inspect", path) if damage == "wrong_magic" else tool("inspect", path)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "Traceback" not in r.stderr


def test_inspect_of_a_folder_without_shards_names_the_folder(tmp_path, tool):
    empty = tmp_path / "nothing_here"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a shard")
    r = tool("inspect", empty)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert lines == [f"error: {empty}: no .bin files in this folder"]
    r = tool("inspect", SAMPLE_VAL, empty)  # the good file is still shown, the run still fails
    assert r.returncode == 1 and "first document" in r.stdout and str(empty) in r.stderr


# ----------------------------------------------------------------------------- the Hub stand-in

COMMIT = hashlib.sha1(b"fake hub commit").hexdigest()


class FakeHub:
    """Two loopback HTTP servers standing in for the Hub, enough for huggingface_hub's own downloader: `hub` answers
    GET /api/datasets/<repo>/revision/<rev> (the commit, as repo_info reads it), GET
    /api/datasets/<repo>/tree/<rev>[/<folder>] (the file list, as list_repo_tree and snapshot_download read it) and
    HEAD/GET /datasets/<repo>/resolve/<rev>/<path> like huggingface.co (X-Repo-Commit, ETag, Content-Length, and for
    large files a 302 to the CDN with X-Linked-Size / X-Linked-Etag); `cdn` (another loopback address) serves the
    bytes with HTTP Range support. `cut` makes the CDN drop the connection once after that many bytes of a file;
    with `outage_after_cut`, every later request for that file answers 503 (it stays unreachable: `broken`), and
    `outage` makes every request answer 503. `gate(n)` holds
    the first n CDN transfers until all n have started (or 5 s passed); `peak` is the most transfers in flight at
    once."""

    LFS_SUFFIXES = (".bin", ".model")

    def __init__(self, repo_id: str = "willdepueoai/parameter-golf"):
        self.repo_id, self.files, self.log = repo_id, {}, []
        self.cut: dict[str, int] = {}
        self.outage_after_cut = False
        self.outage = False
        self.broken: set[str] = set()
        self.lock = threading.Lock()
        self.servers = []
        self.gate(0)

    def gate(self, n: int):
        self.gate_size, self.arrivals, self.inflight, self.peak = n, 0, 0, 0
        self.gate_open = threading.Event()
        if n == 0:
            self.gate_open.set()

    def add(self, path: str, data: bytes):
        self.files[path] = data

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.servers[0].server_port}"

    def cdn_url(self, sha: str) -> str:
        host, port = self.servers[1].server_address[:2]
        return f"http://{host}:{port}/cdn/{sha}"

    def requests(self, method=None, suffix=""):
        return [e for e in self.log if (method is None or e[0] == method) and e[1].endswith(suffix)]

    def start(self):
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_HEAD(self):
                self.handle_request(body=False)

            def do_GET(self):
                self.handle_request(body=True)

            def reply(self, status, headers, body=b"", send_body=True):
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if send_body and body:
                    self.wfile.write(body)

            def handle_request(self, body):
                path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
                with hub.lock:
                    hub.log.append((self.command, path, self.headers.get("Range")))
                    down = hub.outage or any(
                        path.endswith(n) or path.endswith(hashlib.sha256(hub.files[n]).hexdigest()) for n in hub.broken
                    )
                if down:
                    return self.reply(503, {}, b"service unavailable", body)
                if path.startswith("/cdn/"):
                    return self.serve_cdn(path[len("/cdn/") :], body)
                if path.startswith("/api/"):
                    return self.serve_api(path)
                prefix = f"/datasets/{hub.repo_id}/resolve/"
                if not path.startswith(prefix):
                    return self.reply(404, {"X-Error-Code": "RepoNotFound"}, b"repository not found", body)
                revision, _, name = path[len(prefix) :].partition("/")
                if revision not in ("main", COMMIT):
                    return self.reply(404, {"X-Error-Code": "RevisionNotFound"}, b"revision not found", body)
                base = {"X-Repo-Commit": COMMIT}
                if name not in hub.files:
                    return self.reply(404, dict(base, **{"X-Error-Code": "EntryNotFound"}), b"entry not found", body)
                data = hub.files[name]
                sha = hashlib.sha256(data).hexdigest()
                if name.endswith(hub.LFS_SUFFIXES):
                    return self.reply(
                        302,
                        dict(
                            base,
                            **{
                                "Location": hub.cdn_url(sha),
                                "X-Linked-Size": str(len(data)),
                                "X-Linked-Etag": f'"{sha}"',
                                "ETag": '"pointer"',
                            },
                        ),
                        b"",
                        body,
                    )
                self.reply(200, dict(base, ETag=f'"{sha[:40]}"'), data, body)

            def serve_api(self, path):
                prefix = f"/api/datasets/{hub.repo_id}/"
                if not path.startswith(prefix):
                    return self.reply(404, {"X-Error-Code": "RepoNotFound"}, b"repository not found")
                kind, _, rest = path[len(prefix) :].partition("/")
                revision, _, folder = rest.partition("/")
                if revision not in ("main", COMMIT):
                    return self.reply(404, {"X-Error-Code": "RevisionNotFound"}, b"revision not found")
                if kind == "revision":
                    info = {
                        "id": hub.repo_id,
                        "sha": COMMIT,
                        "private": False,
                        "siblings": [{"rfilename": n} for n in sorted(hub.files)],
                    }
                elif kind == "tree":
                    info = [
                        {"type": "file", "path": n, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                        for n, d in sorted(hub.files.items())
                        if not folder or n.startswith(folder + "/")
                    ]
                else:
                    return self.reply(404, {}, b"not found")
                self.reply(200, {"Content-Type": "application/json"}, json.dumps(info).encode())

            def serve_cdn(self, sha, body):
                if not body:
                    return self.serve_blob(sha, body)
                with hub.lock:
                    hub.arrivals += 1
                    hub.inflight += 1
                    hub.peak = max(hub.peak, hub.inflight)
                    if hub.arrivals >= hub.gate_size:
                        hub.gate_open.set()
                try:
                    hub.gate_open.wait(timeout=5)
                    self.serve_blob(sha, body)
                finally:
                    with hub.lock:
                        hub.inflight -= 1

            def serve_blob(self, sha, body):
                data = next((d for d in hub.files.values() if hashlib.sha256(d).hexdigest() == sha), None)
                name = next((n for n, d in hub.files.items() if d is data), None)
                if data is None:
                    return self.reply(404, {}, b"no such blob", body)
                start = 0
                rng = self.headers.get("Range")
                if rng:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(data):
                        return self.reply(416, {"Content-Range": f"bytes */{len(data)}"}, b"", body)
                    chunk = data[start:]
                    headers = {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}", "Accept-Ranges": "bytes"}
                    status = 206
                else:
                    chunk, headers, status = data, {"Accept-Ranges": "bytes"}, 200
                with hub.lock:
                    cut = hub.cut.pop(name, None) if body else None
                if cut is None:
                    return self.reply(status, headers, chunk, body)
                # send the full headers, part of the body, then drop the connection
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(chunk)))
                self.end_headers()
                self.wfile.write(chunk[:cut])
                self.wfile.flush()
                with hub.lock:
                    if hub.outage_after_cut:
                        hub.broken.add(name)
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)

        for host in ("127.0.0.1", "127.0.0.2"):
            try:
                server = http.server.ThreadingHTTPServer((host, 0), Handler)
            except OSError:  # a system without the whole loopback range: the CDN shares the hub's address
                server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, daemon=True).start()
            self.servers.append(server)
        return self

    def stop(self):
        for s in self.servers:
            s.shutdown()
            s.server_close()


def make_manifest(train_files: int, style: str = "stats", sizes: dict | None = None) -> dict:
    tokenizers = [
        {
            "name": "fineweb_1024_bpe",
            "kind": "sentencepiece",
            "vocab_size": 1024,
            "model_path": "tokenizers/fineweb_1024_bpe.model",
            "vocab_path": "tokenizers/fineweb_1024_bpe.vocab",
        }
    ]
    if style == "stats":  # the shape of the challenge's manifest: counts per split
        dataset = {
            "name": "fineweb10B_sp1024",
            "tokenizer_name": "fineweb_1024_bpe",
            "stats": {"files_train": train_files, "files_val": 1, "tokens_train": 0},
        }
    else:  # explicit shard lists with sizes
        names = ["fineweb_val_000000.bin"] + [f"fineweb_train_{i:06d}.bin" for i in range(train_files)]
        dataset = {
            "name": "fineweb10B_sp1024",
            "tokenizer_name": "fineweb_1024_bpe",
            "files": [{"path": n, **({"bytes": sizes[n]} if sizes and n in sizes else {})} for n in names],
        }
    return {"version": 1, "datasets": [dataset], "tokenizers": tokenizers}


@pytest.fixture
def hub(tmp_path):
    hub = FakeHub().start()
    val = load_data_shard(SAMPLE_VAL)
    shards = {"fineweb_val_000000.bin": val[:20_000]}
    for i in range(3):
        shards[f"fineweb_train_{i:06d}.bin"] = val[20_000 * (i + 1) : 20_000 * (i + 2)]
    hub.shards = {}
    for name, toks in shards.items():
        data = write_shard(tmp_path / "src" / name, toks).read_bytes()
        hub.shards[name] = data
        hub.add(f"datasets/datasets/fineweb10B_sp1024/{name}", data)
    hub.add("datasets/tokenizers/fineweb_1024_bpe.model", SAMPLE_TOKENIZER.read_bytes())
    hub.add("datasets/tokenizers/fineweb_1024_bpe.vocab", b"<pad>\t0\n<s>\t0\n")
    hub.add("datasets/manifest.json", json.dumps(make_manifest(3)).encode())
    yield hub
    hub.stop()


@pytest.fixture
def download(tool, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    for name in (
        "HF_TOKEN",
        "FINEWEB_REPO_ID",
        "FINEWEB_REMOTE_DIR",
        "MATCHED_FINEWEB_REPO_ID",
        "MATCHED_FINEWEB_REMOTE_ROOT_PREFIX",
    ):
        monkeypatch.delenv(name, raising=False)

    def run(hub, root, *extra):
        return tool("download", "--root", root, "--endpoint", hub.endpoint, *extra)

    return run


def assert_layout_complete(hub, root, train_shards):
    ds = root / "datasets" / "fineweb10B_sp1024"
    names = ["fineweb_val_000000.bin"] + [f"fineweb_train_{i:06d}.bin" for i in range(train_shards)]
    assert sorted(p.name for p in ds.iterdir()) == sorted(names)
    for n in names:
        assert (ds / n).read_bytes() == hub.shards[n]
    assert (root / "tokenizers" / "fineweb_1024_bpe.model").read_bytes() == SAMPLE_TOKENIZER.read_bytes()
    assert json.loads((root / "manifest.json").read_text())["datasets"][0]["name"] == "fineweb10B_sp1024"


def test_download_fresh(hub, tmp_path, download):
    root = tmp_path / "data"
    r = download(hub, root, "--variant", "sp1024", "--train-shards", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert_layout_complete(hub, root, 2)
    assert not hub.requests(suffix="fineweb_train_000002.bin")
    assert "5 downloaded, 0 already present" in r.stdout


def test_download_with_docs_fetches_the_raw_documents_that_caseops_prep_reads(hub, tmp_path, download):
    docs = "".join(json.dumps({"text": f"Document {i}."}) + "\n" for i in range(3)).encode()
    hub.add("datasets/docs_selected.jsonl", docs)
    hub.add("datasets/docs_selected.source_manifest.json", b'{"documents": 3}')
    root = tmp_path / "data"
    assert download(hub, root, "--train-shards", "1").returncode == 0
    assert not hub.requests(suffix="docs_selected.jsonl") and not (root / "docs_selected.jsonl").exists()
    r = download(hub, root, "--train-shards", "1", "--with-docs")
    assert r.returncode == 0, r.stdout + r.stderr
    assert (root / "docs_selected.jsonl").read_bytes() == docs
    assert (root / "docs_selected.source_manifest.json").read_bytes() == b'{"documents": 3}'
    assert "2 downloaded, 4 already present" in r.stdout
    assert list(caseops.read_documents(root / "docs_selected.jsonl")) == [f"Document {i}." for i in range(3)]
    # A documents file that is not JSON lines of {"text": ...} is refused, and removed.
    hub.add("datasets/docs_selected.jsonl", b"<html>not found</html>\n")
    (root / "docs_selected.jsonl").unlink()
    r = download(hub, root, "--train-shards", "1", "--with-docs")
    assert r.returncode == 1 and not (root / "docs_selected.jsonl").exists()
    assert r.stderr.strip().splitlines() == [
        f"error: refusing the download: {root / 'docs_selected.jsonl'}: its first line is not a JSON object with a "
        "string field 'text' (removed)"
    ]


def test_download_defaults_to_every_train_shard_in_the_manifest(hub, tmp_path, download):
    root = tmp_path / "data"
    r = download(hub, root, "--variant", "sp1024")
    assert r.returncode == 0, r.stdout + r.stderr
    listed = sum(1 for n in hub.shards if n.startswith("fineweb_train_"))
    assert listed >= 2
    assert_layout_complete(hub, root, listed)


def test_download_skips_files_already_complete(hub, tmp_path, download):
    root = tmp_path / "data"
    assert download(hub, root, "--train-shards", "2").returncode == 0
    hub.log.clear()
    r = download(hub, root, "--train-shards", "3")
    assert r.returncode == 0, r.stdout + r.stderr
    assert_layout_complete(hub, root, 3)
    asked = {path.rsplit("/", 1)[-1] for _, path, _ in hub.log if "/resolve/" in path}
    assert asked == {"manifest.json", "fineweb_train_000002.bin"}
    blobs = [path for _, path, _ in hub.requests("GET") if path.startswith("/cdn/")]
    assert blobs == [f"/cdn/{hashlib.sha256(hub.shards['fineweb_train_000002.bin']).hexdigest()}"]
    assert "1 downloaded, 5 already present" in r.stdout


def test_download_replaces_a_damaged_local_shard(hub, tmp_path, download):
    root = tmp_path / "data"
    assert download(hub, root, "--train-shards", "1").returncode == 0
    shard = root / "datasets" / "fineweb10B_sp1024" / "fineweb_train_000000.bin"
    shard.write_bytes(shard.read_bytes()[:-100])
    r = download(hub, root, "--train-shards", "1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert_layout_complete(hub, root, 1)
    assert "fetching it again" in r.stdout


def test_download_resumes_a_dropped_connection(hub, tmp_path, download):
    """huggingface_hub's downloader picks a transfer up where the connection dropped, in the same run: it asks for
    the rest (HTTP Range) from the last whole chunk it wrote (10 MiB chunks), so the shard here is 12 MB."""
    from huggingface_hub import constants

    root = tmp_path / "data"
    name = "datasets/datasets/fineweb10B_sp1024/fineweb_train_000001.bin"
    big = np.resize(load_data_shard(SAMPLE_VAL), 6_000_000)
    hub.shards["fineweb_train_000001.bin"] = write_shard(tmp_path / "big.bin", big).read_bytes()
    hub.add(name, hub.shards["fineweb_train_000001.bin"])
    hub.cut[name] = constants.DOWNLOAD_CHUNK_SIZE + 500_000
    r = download(hub, root, "--train-shards", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert_layout_complete(hub, root, 2)
    blob = f"/cdn/{hashlib.sha256(hub.files[name]).hexdigest()}"
    assert [rng for m, p, rng in hub.requests("GET") if p == blob] == [None, f"bytes={constants.DOWNLOAD_CHUNK_SIZE}-"]


def test_download_interrupted_keeps_completed_files_and_the_next_run_fetches_the_rest(hub, tmp_path, download):
    root = tmp_path / "data"
    ds = root / "datasets" / "fineweb10B_sp1024"
    hub.cut["datasets/datasets/fineweb10B_sp1024/fineweb_train_000001.bin"] = 15_000
    hub.outage_after_cut = True  # the connection drops mid-file and that file stays unreachable
    r = download(hub, root, "--train-shards", "3")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "503" in lines[0] and "run the same command again" in lines[0], r.stderr
    assert not (ds / "fineweb_train_000001.bin").exists()
    kept = sorted(p.name for p in ds.iterdir()) if ds.is_dir() else []
    for n in kept:  # whatever is in place is complete and verified; nothing half-written
        assert (ds / n).read_bytes() == hub.shards[n]
    assert not (root / ".download").exists()

    hub.broken.clear()
    hub.log.clear()
    r = download(hub, root, "--train-shards", "3")
    assert r.returncode == 0, r.stdout + r.stderr
    assert_layout_complete(hub, root, 3)
    fetched = {p.rsplit("/", 1)[-1] for _, p, _ in hub.log if "/resolve/" in p} - {"manifest.json"}
    shards = {n for n in fetched if n.endswith(".bin")}
    assert shards == {"fineweb_train_000001.bin"} and len(kept) == 3
    assert "1 downloaded, 5 already present" in r.stdout


def test_download_ctrl_c_keeps_the_files_that_arrived(hub, tmp_path, download, monkeypatch):
    import huggingface_hub

    real = huggingface_hub.snapshot_download

    def interrupted(*args, **kwargs):  # the transfers finish, then the user presses Ctrl-C
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(huggingface_hub, "snapshot_download", interrupted)
    root = tmp_path / "data"
    r = download(hub, root, "--train-shards", "2")
    assert r.returncode == 130 and "interrupted" in r.stderr and "Traceback" not in r.stderr
    assert_layout_complete(hub, root, 2)


def test_download_fetches_files_concurrently_through_hf_endpoint(hub, tmp_path):
    """As a user runs it (a separate process, the Hub named by HF_ENDPOINT): the shards come down at once,
    --workers at a time, each verified, every request pinned to the manifest's commit."""
    env = {
        "HF_ENDPOINT": hub.endpoint,
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_OFFLINE": "0",
    }
    blobs = 5  # the tokenizer model, the val shard and 3 train shards go through the CDN
    hub.gate(blobs)  # each transfer waits until all five have started
    r = run_tool("download", "--root", tmp_path / "all", "--train-shards", "3", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert_layout_complete(hub, tmp_path / "all", 3)
    assert hub.peak == blobs
    resolved = [p for _, p, _ in hub.log if "/resolve/" in p]
    assert resolved and all(f"/resolve/{COMMIT}/" in p for p in resolved)
    hub.gate(2)
    r = run_tool("download", "--root", tmp_path / "two", "--train-shards", "3", "--workers", "2", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert_layout_complete(hub, tmp_path / "two", 3)
    assert hub.peak == 2


def test_download_names_a_file_the_hub_lacks_before_any_transfer(hub, tmp_path, download):
    del hub.files["datasets/datasets/fineweb10B_sp1024/fineweb_train_000002.bin"]
    r = download(hub, tmp_path / "data", "--train-shards", "3")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "fineweb_train_000002.bin is not on the Hub" in lines[0] and COMMIT in lines[0]
    assert not [p for _, p, _ in hub.log if p.startswith("/cdn/")]


def test_download_of_a_repo_the_hub_lacks(hub, tmp_path, download):
    r = download(hub, tmp_path / "data", "--repo-id", "nobody/nothing")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot read the dataset repo nobody/nothing" in lines[0] and "--repo-id" in lines[0]
    r = download(hub, tmp_path / "data", "--revision", "v9")
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and "no revision 'v9'" in lines[0]


def test_download_refuses_a_size_mismatch(hub, tmp_path, download):
    root = tmp_path / "data"
    true_size = len(hub.shards["fineweb_train_000000.bin"])
    hub.add(
        "datasets/manifest.json",
        json.dumps(make_manifest(2, style="files", sizes={"fineweb_train_000000.bin": true_size + 2})).encode(),
    )
    r = download(hub, root, "--train-shards", "2")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "fineweb_train_000000.bin" in lines[0] and "manifest says" in lines[0]
    ds = root / "datasets" / "fineweb10B_sp1024"
    assert not (ds / "fineweb_train_000000.bin").exists() and not list(ds.glob("*.part"))


def test_download_refuses_a_corrupt_shard(hub, tmp_path, download):
    root = tmp_path / "data"
    bad = bytearray(hub.shards["fineweb_val_000000.bin"])
    bad[:4] = b"\0\0\0\0"
    hub.add("datasets/datasets/fineweb10B_sp1024/fineweb_val_000000.bin", bytes(bad))
    r = download(hub, root, "--train-shards", "0")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "fineweb_val_000000.bin" in lines[0] and "not a token shard" in lines[0]


def test_download_of_a_variant_the_manifest_lacks(hub, tmp_path, download):
    # (sp4096 and sp8192 name their own repos now; sp2048 has none, so it is looked for in the default one)
    r = download(hub, tmp_path / "data", "--variant", "sp2048")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "sp2048" in lines[0] and "fineweb10B_sp1024" in lines[0]


def test_download_offline(tmp_path):
    """As a user sees it (a separate process): one line on stderr, non-zero exit, no traceback."""
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "0"}
    r = run_tool("download", "--root", tmp_path / "data", env=env)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach the Hub" in lines[0] and "Traceback" not in r.stderr
    r = run_tool("download", "--root", tmp_path / "data", env=dict(env, HF_HUB_OFFLINE="1"))
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "HF_HUB_OFFLINE" in lines[0] and "Traceback" not in r.stderr
    assert not (tmp_path / "data" / "datasets").exists()


def test_download_repo_id_and_remote_dir_overrides(tmp_path, download, monkeypatch):
    hub = FakeHub("someone/other-export").start()
    try:
        val = write_shard(tmp_path / "v.bin", load_data_shard(SAMPLE_VAL)[:5000]).read_bytes()
        hub.shards = {"fineweb_val_000000.bin": val}
        hub.add("export2/datasets/fineweb10B_sp1024/fineweb_val_000000.bin", val)
        hub.add("export2/tokenizers/fineweb_1024_bpe.model", SAMPLE_TOKENIZER.read_bytes())
        hub.add("export2/tokenizers/fineweb_1024_bpe.vocab", b"x")
        hub.add("export2/manifest.json", json.dumps(make_manifest(0)).encode())
        root = tmp_path / "by_flag"
        r = download(hub, root, "--repo-id", "someone/other-export", "--remote-dir", "export2", "--train-shards", "0")
        assert r.returncode == 0, r.stdout + r.stderr
        assert_layout_complete(hub, root, 0)
        root = tmp_path / "by_env"
        monkeypatch.setenv("FINEWEB_REPO_ID", "someone/other-export")
        monkeypatch.setenv("FINEWEB_REMOTE_DIR", "export2")
        r = download(hub, root, "--train-shards", "0")
        assert r.returncode == 0, r.stdout + r.stderr
        assert_layout_complete(hub, root, 0)
    finally:
        hub.stop()


# ----------------------------------------------------------------------------- rebuild


@pytest.mark.slow
def test_sample_rebuild_is_deterministic(tmp_path):
    """Rebuild from the Debian package: the same bytes as committed when the package and sentencepiece are the
    versions the sample was built from; otherwise two rebuilds must at least agree with each other."""
    import build_sample

    recorded = json.loads((REPO / "data" / "sample_build.json").read_text())
    deb = os.environ.get("SAMPLE_DEB")
    if deb:
        deb = Path(deb)
    else:
        if shutil.which("apt-get") is None:
            pytest.skip("no apt-get to fetch python3.11-doc (set SAMPLE_DEB=/path/to/python3.11-doc_*.deb)")
        try:
            deb = build_sample.fetch_deb(tmp_path)
        except SystemExit as e:
            pytest.skip(f"cannot fetch the source package: {e}")
    out1 = tmp_path / "build1"
    assert build_sample.main(["--deb", str(deb), "--out", str(out1)]) == 0
    built = json.loads((out1 / "sample_build.json").read_text())
    rel = sorted(recorded["sha256"])
    same_inputs = (
        built["source_sha256"] == recorded["source_sha256"] and built["sentencepiece"] == recorded["sentencepiece"]
    )
    if same_inputs:
        for r in rel:
            assert (out1 / r).read_bytes() == (REPO / "data" / r).read_bytes(), f"{r} differs from the committed file"
        assert built == recorded
    else:
        out2 = tmp_path / "build2"
        assert build_sample.main(["--deb", str(deb), "--out", str(out2)]) == 0
        for r in rel:
            assert (out1 / r).read_bytes() == (out2 / r).read_bytes(), f"{r}: two rebuilds differ"


# ----------------------------------------------------------------------------- manifest schemas


def test_manifest_parser_tolerates_the_shapes_it_documents(tmp_path):
    from fineweb import plan_download

    root = tmp_path
    ds = root / "datasets" / "fineweb10B_sp1024"

    # the challenge's shape: lists of datasets and tokenizers, shard counts under stats
    plan = plan_download(make_manifest(5), "sp1024", 2, root)
    assert [a.remote for a in plan] == [
        "tokenizers/fineweb_1024_bpe.model",
        "tokenizers/fineweb_1024_bpe.vocab",
        "datasets/fineweb10B_sp1024/fineweb_val_000000.bin",
        "datasets/fineweb10B_sp1024/fineweb_train_000000.bin",
        "datasets/fineweb10B_sp1024/fineweb_train_000001.bin",
    ]
    assert plan[0].local == root / "tokenizers" / "fineweb_1024_bpe.model" and plan[0].kind == "tokenizer"
    assert plan[2].local == ds / "fineweb_val_000000.bin" and plan[2].vocab_size == 1024

    # objects keyed by name, explicit per-split lists with sizes, a tokenizer given inline
    keyed = {
        "datasets": {
            "fineweb10B_sp1024": {
                "tokenizer": {"model_path": "tok/x_1024.model", "vocab_size": 1024},
                "path": "data/sp1024",
                "val": [{"name": "fineweb_val_000000.bin", "num_tokens": 10, "sha256": "ab"}],
                "train": ["fineweb_train_000001.bin", "fineweb_train_000000.bin"],
            }
        }
    }
    plan = plan_download(keyed, "sp1024", 1, root)
    assert [a.remote for a in plan] == [
        "tok/x_1024.model",
        "data/sp1024/fineweb_val_000000.bin",
        "data/sp1024/fineweb_train_000000.bin",
    ]
    assert plan[1].tokens == 10 and plan[1].sha256 == "ab" and plan[1].size is None

    # no counts at all: the requested number of train shards, one val shard, the tokenizer by convention
    bare = {"datasets": [{"name": "fineweb10B_sp1024"}]}
    plan = plan_download(bare, "sp1024", 3, root)
    assert [a.local.name for a in plan] == [
        "fineweb_1024_bpe.model",
        "fineweb_val_000000.bin",
        "fineweb_train_000000.bin",
        "fineweb_train_000001.bin",
        "fineweb_train_000002.bin",
    ]

    with pytest.raises(Fail, match="has 5 train shards"):
        plan_download(make_manifest(5), "sp1024", 6, root)
    with pytest.raises(Fail, match="variant sp2048 is not in the manifest"):
        plan_download(make_manifest(5), "sp2048", 1, root)
    with pytest.raises(Fail, match="not a number"):
        plan_download(
            {"datasets": [{"name": "fineweb10B_sp1024", "stats": {"files_train": "many"}}]}, "sp1024", 1, root
        )

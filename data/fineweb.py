"""Token shards of the challenge's FineWeb export: download, inspect, write.

    python data/fineweb.py download --variant sp1024 --train-shards 10
    python data/fineweb.py inspect data/datasets/sample_sp1024/fineweb_val_000000.bin

Shards are read, written and named through data/shards.py (the reader is training's own, train_gpt.load_data_shard);
this file adds the downloader, the inspector and the bits-per-byte audit. See data/README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import caseops
import numpy as np
from shards import BOS_ID, SIDECAR_TAG, load_data_shard, read_header, shard_name, sidecar_name

DATA_DIR = Path(__file__).resolve().parent
REPO_ROOT = DATA_DIR.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from train_gpt import Fail  # noqa: E402

DEFAULT_REPO_ID = "willdepueoai/parameter-golf"
DEFAULT_REMOTE_DIR = "datasets"
# Environment overrides (first one set wins); the second names are those of the challenge's own downloader.
REPO_ID_VARS = ("FINEWEB_REPO_ID", "MATCHED_FINEWEB_REPO_ID")
REMOTE_DIR_VARS = ("FINEWEB_REMOTE_DIR", "MATCHED_FINEWEB_REMOTE_ROOT_PREFIX")
# The variants the records use and the Hub repos that hold them (--repo-id / --remote-dir, or the env, override).
# A variant with a sidecar also has fineweb_val_bytes_NNNNNN.bin beside each val shard (see data/caseops.py).
CASEOPS_VARIANT = "sp8192_lossless_caps_caseops_v1_reserved"
VARIANTS = {
    "sp1024": dict(repo_id=DEFAULT_REPO_ID, remote_dir="datasets"),
    "sp4096": dict(repo_id="kevclark/parameter-golf", remote_dir="datasets"),
    "sp8192": dict(repo_id="kevclark/parameter-golf", remote_dir="datasets"),
    CASEOPS_VARIANT: dict(repo_id="romeerp/parameter-golf-caseops-v1", remote_dir="datasets", sidecar=True),
}


def has_sidecar(variant: str) -> bool:
    return bool(VARIANTS.get(variant, {}).get("sidecar")) or "caseops" in variant


# ----------------------------------------------------------------------------- manifest


@dataclass
class Artifact:
    """One file to fetch: where it is on the Hub (relative to the remote folder) and where it goes locally."""

    remote: str
    local: Path
    kind: str  # "shard" | "tokenizer" | "file"
    size: int | None = None  # bytes, when the manifest says
    tokens: int | None = None  # shard token count, when the manifest says
    sha256: str | None = None
    vocab_size: int | None = None  # tokenizer vocabulary, when the manifest says


def _first(d: dict, *keys):
    for k in keys:
        if isinstance(d, dict) and d.get(k) is not None:
            return d[k]
    return None


def _as_int(value, what: str) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise Fail(f"manifest: {what} is {value!r}, not a number") from None


def _entries(section) -> list[dict]:
    """A manifest section given either as a list of objects or as an object keyed by name."""
    if isinstance(section, list):
        return [e for e in section if isinstance(e, dict)]
    if isinstance(section, dict):
        return [dict(v, name=v.get("name", k)) for k, v in section.items() if isinstance(v, dict)]
    return []


def _vocab_of(variant: str) -> int | None:
    m = re.match(r"sp(\d+)(?:_|$)", variant)
    return int(m.group(1)) if m else None


def find_dataset(manifest: dict, variant: str) -> dict:
    entries = _entries(_first(manifest, "datasets", "variants"))
    wanted = {variant, f"fineweb10B_{variant}"}
    for e in entries:
        if e.get("name") in wanted or e.get("variant") == variant or e.get("dataset_dir") in wanted:
            return e
    for e in entries:
        if str(e.get("name", "")).endswith(f"_{variant}"):
            return e
    names = sorted(str(e.get("name")) for e in entries)
    raise Fail(f"variant {variant} is not in the manifest (it has: {', '.join(names) or 'no datasets'})")


def _item_name(x) -> str:
    return Path(str(_first(x, "path", "name", "file") if isinstance(x, dict) else x)).name


def _shard_items(entry: dict, split: str) -> list | None:
    """The explicit shard list of one split, if the manifest gives one (byte sidecars left out)."""
    found = None
    for key in (f"{split}_files", f"{split}_shards", split):
        if isinstance(entry.get(key), list):
            found = entry[key]
            break
    for key in ("files", "shards"):
        if found is not None:
            break
        value = entry.get(key)
        if isinstance(value, dict) and isinstance(value.get(split), list):
            found = value[split]
        elif isinstance(value, list):
            found = [x for x in value if f"_{split}_" in _item_name(x)]
    if found is None:
        return None
    return [x for x in found if SIDECAR_TAG not in _item_name(x)]


FULL_TRAIN_SHARDS = 80  # the challenge's sp1024 export: 80 train shards of 100M tokens (SPEC §3)


def shard_artifacts(entry: dict, split: str, root: Path, vocab: int | None, wanted: int | None) -> list[Artifact]:
    """The shards of one split; when the manifest gives neither a list nor a count, the first `wanted` names."""
    name = str(entry.get("name"))
    remote_dir = str(_first(entry, "path", "dir", "remote_path") or f"datasets/{name}").strip("/")
    local_dir = root / "datasets" / name
    items = _shard_items(entry, split)
    if items is None:
        stats = entry.get("stats") if isinstance(entry.get("stats"), dict) else {}
        count = _as_int(_first(stats, f"files_{split}") if stats else None, f"{name} stats.files_{split}")
        if count is None:
            count = _as_int(
                _first(entry, f"files_{split}", f"num_{split}_shards", f"{split}_shard_count"),
                f"{name} {split} shard count",
            )
        if count is None:
            count = FULL_TRAIN_SHARDS if wanted is None else wanted
        items = [shard_name(split, i) for i in range(count)]
    out = []
    for item in items:
        meta = item if isinstance(item, dict) else {}
        path = str(_first(meta, "path", "name", "file") if meta else item)
        remote = path.strip("/") if "/" in path else f"{remote_dir}/{path}"
        out.append(
            Artifact(
                remote=remote,
                local=local_dir / Path(path).name,
                kind="shard",
                size=_as_int(_first(meta, "bytes", "size", "num_bytes", "size_bytes"), f"{path} size"),
                tokens=_as_int(_first(meta, "tokens", "num_tokens", "n_tokens", "token_count"), f"{path} tokens"),
                sha256=_first(meta, "sha256"),
                vocab_size=vocab,
            )
        )
    return sorted(out, key=lambda a: a.local.name)


def tokenizer_artifacts(manifest: dict, entry: dict, variant: str, root: Path) -> list[Artifact]:
    tok = _first(entry, "tokenizer_name", "tokenizer")
    tok_entry = tok if isinstance(tok, dict) else None
    if tok_entry is None:
        for e in _entries(manifest.get("tokenizers")):
            if tok is not None and e.get("name") == tok:
                tok_entry = e
                break
    vocab = _vocab_of(variant)
    if tok_entry is None:
        if tok is not None:
            raise Fail(f"manifest: dataset {entry.get('name')} names tokenizer {tok}, which the manifest does not list")
        if vocab is None:
            raise Fail(f"manifest: dataset {entry.get('name')} names no tokenizer")
        suffix = variant[len(f"sp{vocab}") :]  # sp8192_lossless_caps_... -> fineweb_8192_bpe_lossless_caps_...
        tok_entry = {"model_path": f"tokenizers/fineweb_{vocab}_bpe{suffix}.model"}
    paths = []
    for key in ("model_path", "vocab_path", "path"):
        value = tok_entry.get(key)
        if isinstance(value, str) and value and value not in paths:
            paths.append(value)
    if not paths:
        raise Fail(f"manifest: tokenizer {tok_entry.get('name', tok)} lists no files")
    vocab_size = _as_int(tok_entry.get("vocab_size"), "tokenizer vocab_size") or vocab
    return [
        Artifact(
            remote=p.strip("/"),
            local=root / "tokenizers" / Path(p).name,
            kind="tokenizer" if p.endswith(".model") else "file",
            size=_as_int(_first(tok_entry, "bytes", "size") if p.endswith(".model") else None, "size"),
            sha256=tok_entry.get("sha256") if p.endswith(".model") else None,
            vocab_size=vocab_size,
        )
        for p in paths
    ]


# The challenge's raw documents, in the canonical order (the first 50,000 are validation), beside the manifest:
# what data/caseops.py prep (and a tokenizer retrain) reads. `download --with-docs` fetches them, as the
# challenge's own downloader's --with-docs does, into <root>/.
DOCS_FILES = ("docs_selected.jsonl", "docs_selected.source_manifest.json")


def plan_download(
    manifest: dict, variant: str, train_shards: int | None, root: Path, with_docs: bool = False
) -> list[Artifact]:
    if not isinstance(manifest, dict):
        raise Fail("manifest: expected a JSON object at the top level")
    entry = find_dataset(manifest, variant)
    tokenizer = tokenizer_artifacts(manifest, entry, variant, root)
    vocab = next((a.vocab_size for a in tokenizer if a.kind == "tokenizer"), None) or _vocab_of(variant)
    val = shard_artifacts(entry, "val", root, vocab, wanted=1)
    train = shard_artifacts(entry, "train", root, vocab, wanted=train_shards)
    if not val:
        raise Fail(f"manifest: variant {variant} lists no validation shard")
    if train_shards is None:
        train_shards = len(train)
    if train_shards > len(train):
        raise Fail(f"variant {variant} has {len(train)} train shards in the manifest; asked for {train_shards}")
    sidecars = []
    if has_sidecar(variant):  # one byte sidecar per val shard, beside it
        sidecars = [
            Artifact(
                remote=a.remote.rsplit("/", 1)[0] + "/" + sidecar_name(a.local.name),
                local=a.local.with_name(sidecar_name(a.local.name)),
                kind="sidecar",
            )
            for a in val
        ]
    docs = [
        Artifact(remote=name, local=root / name, kind="docs" if name.endswith(".jsonl") else "file")
        for name in DOCS_FILES
    ]
    return (docs if with_docs else []) + tokenizer + val + sidecars + train[:train_shards]


# ----------------------------------------------------------------------------- verification


class Invalid(Fail):
    """A file that is there but is not a complete, valid copy."""


def verify(a: Artifact, path: Path | None = None) -> None:
    """Raise Invalid when the file at path (default: its final place) is not a complete, valid copy of a."""
    path = Path(path or a.local)
    size = path.stat().st_size
    if a.size is not None and size != a.size:
        raise Invalid(f"{a.local}: {size:,} bytes but the manifest says {a.size:,}")
    if a.kind == "shard":
        try:
            tokens = load_data_shard(path)
        except Fail as e:  # name the final file, not the .part it was checked under
            raise Invalid(str(e).replace(str(path), str(a.local))) from None
        if a.tokens is not None and tokens.size != a.tokens:
            raise Invalid(f"{a.local}: {tokens.size:,} tokens but the manifest says {a.tokens:,}")
        if a.vocab_size is not None and tokens.size and int(tokens.max()) >= a.vocab_size:
            raise Invalid(f"{a.local}: token id {int(tokens.max())} is outside the vocab of {a.vocab_size}")
    elif a.kind == "sidecar":  # same format as a shard; checked against its val shard once both are in place
        try:
            load_data_shard(path)
        except Fail as e:
            raise Invalid(str(e).replace(str(path), str(a.local))) from None
    elif a.kind == "tokenizer":
        import sentencepiece as spm

        try:
            sp = spm.SentencePieceProcessor(model_file=str(path))
        except Exception:  # sentencepiece raises RuntimeError/OSError with long messages
            raise Invalid(f"{a.local}: not a loadable SentencePiece model") from None
        if a.vocab_size is not None and sp.vocab_size() != a.vocab_size:
            raise Invalid(f"{a.local}: vocab {sp.vocab_size()} but {a.vocab_size} was expected")
    elif a.kind == "docs":  # one JSON object per line with the document in "text" (read: the first line only)
        with open(path, "rb") as f:
            first = f.readline(1 << 24)
        try:
            doc = json.loads(first)
        except (ValueError, UnicodeDecodeError):
            doc = None
        if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
            raise Invalid(f"{a.local}: its first line is not a JSON object with a string field 'text'")
    elif size == 0:
        raise Invalid(f"{a.local}: empty file")
    if a.sha256 and path != a.local and sha256_of(path) != str(a.sha256).lower():
        raise Invalid(f"{a.local}: SHA-256 differs from the manifest's")


def sha256_of(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# ----------------------------------------------------------------------------- download (huggingface_hub)

DEFAULT_WORKERS = 8  # files fetched at once: snapshot_download's max_workers


class Hub:
    """One dataset repo, read at one commit through huggingface_hub into its local_dir <root>/.download, from where
    each file is verified and moved into the layout."""

    def __init__(self, repo_id: str, remote_dir: str, revision: str, endpoint: str | None, root: Path):
        from huggingface_hub import constants

        self.repo_id, self.remote_dir, self.revision = repo_id, remote_dir.strip("/"), revision
        self.endpoint, self.staging = (endpoint or constants.ENDPOINT).rstrip("/"), root / ".download"

    def path(self, remote: str = "") -> str:
        return f"{self.remote_dir}/{remote}".strip("/")

    def describe(self, remote: str = "") -> str:
        return f"{self.repo_id}/{self.path(remote)}"

    def explain(self, e: BaseException, what: str) -> str:
        """One line for an error of huggingface_hub or of the HTTP client under it (looked for along the causes)."""
        from huggingface_hub import errors as hf

        chain = [e]
        while (chain[-1].__cause__ or chain[-1].__context__) and len(chain) < 20:
            chain.append(chain[-1].__cause__ or chain[-1].__context__)
        find = lambda *types: next((c for c in chain if isinstance(c, types)), None)  # noqa: E731
        status = getattr(getattr(find(hf.HfHubHTTPError), "response", None), "status_code", None)
        if find(hf.OfflineModeIsEnabled):
            return f"cannot download {what}: HF_HUB_OFFLINE is set (unset it to download)"
        if find(hf.RevisionNotFoundError):
            return f"the dataset repo {self.repo_id} has no revision {self.revision!r} (check --revision)"
        if find(hf.EntryNotFoundError):
            return f"{what} is not on the Hub (revision {self.revision})"
        if find(hf.RepositoryNotFoundError, hf.GatedRepoError):
            return (
                f"cannot read the dataset repo {self.repo_id} at {self.endpoint}: check --repo-id, or log in "
                f"(hf auth login, or HF_TOKEN) if it is private or gated"
            )
        if status is not None:
            return f"the Hub answered {status} for {what}: {one_line(find(hf.HfHubHTTPError))}"
        net = next(
            (
                c
                for c in chain
                if isinstance(c, (ConnectionError, TimeoutError))
                or any(k in type(c).__name__ for k in ("Connect", "Timeout", "Network", "Protocol"))
            ),
            None,
        )
        if net is not None:
            return f"cannot reach the Hub at {self.endpoint} (offline?): {one_line(net)}"
        return f"downloading {what} failed: {one_line(e)}"


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _setting(flag_value, env_names, default):
    for value in (flag_value, *(os.environ.get(name) for name in env_names)):
        if value:
            return value
    return default


def sidecar_problem(tokens: np.ndarray, sidecar: np.ndarray) -> str | None:
    """Why a byte sidecar is not parallel to its val tokens, or None."""
    if sidecar.size != tokens.size:
        return f"{sidecar.size:,} byte counts for {tokens.size:,} val tokens"
    bos = tokens == BOS_ID
    if np.any(sidecar[bos] != 0):
        return f"BOS token {int(np.flatnonzero(bos & (sidecar != 0))[0])} counts bytes (must count 0)"
    return None


def cmd_download(args) -> int:
    if args.train_shards is not None and args.train_shards < 0:
        raise Fail(f"--train-shards {args.train_shards}: must be 0 or more")
    if args.workers < 1:
        raise Fail(f"--workers {args.workers}: must be 1 or more")
    try:
        from huggingface_hub.utils import disable_progress_bars
        from huggingface_hub.utils import logging as hf_logging
    except ImportError:
        raise Fail("huggingface_hub is not installed: pip install huggingface_hub") from None
    if args.no_progress or not sys.stderr.isatty():
        disable_progress_bars()
    if "HF_HUB_VERBOSITY" not in os.environ:  # its retry warnings would break the one-line errors
        hf_logging.set_verbosity_error()
    root = Path(args.root)
    defaults = VARIANTS.get(args.variant, {})
    hub = Hub(
        _setting(args.repo_id, REPO_ID_VARS, defaults.get("repo_id", DEFAULT_REPO_ID)),
        _setting(args.remote_dir, REMOTE_DIR_VARS, defaults.get("remote_dir", DEFAULT_REMOTE_DIR)),
        args.revision,
        args.endpoint,
        root,
    )
    try:
        code = download(hub, root, args.variant, args.train_shards, args.workers, args.with_docs)
    except KeyboardInterrupt:
        raise  # <root>/.download stays: a file that arrived but was not moved yet is reused next time
    except BaseException:
        shutil.rmtree(hub.staging, ignore_errors=True)  # verified files were moved out; the rest is of no use
        raise
    shutil.rmtree(hub.staging, ignore_errors=True)
    return code


def download(hub: Hub, root: Path, variant: str, train_shards: int | None, workers: int, with_docs=False) -> int:
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    api = HfApi(endpoint=hub.endpoint)
    try:  # the manifest's commit pins every other file
        hub.revision = api.repo_info(hub.repo_id, repo_type="dataset", revision=hub.revision).sha or hub.revision
        staged = Path(
            hf_hub_download(
                hub.repo_id,
                hub.path("manifest.json"),
                repo_type="dataset",
                revision=hub.revision,
                local_dir=hub.staging,
                endpoint=hub.endpoint,
            )
        )
    except Exception as e:
        raise Fail(hub.explain(e, hub.describe("manifest.json"))) from None
    try:
        manifest = json.loads(staged.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise Fail(f"{hub.describe('manifest.json')} is not valid JSON ({one_line(e)})") from None
    root.mkdir(parents=True, exist_ok=True)
    os.replace(staged, root / "manifest.json")
    print(f"manifest: {hub.describe('manifest.json')} at commit {hub.revision} -> {root / 'manifest.json'}", flush=True)

    plan = plan_download(manifest, variant, train_shards, root, with_docs)
    labels = {
        id(a): f"[{i}/{len(plan)}] {a.local.relative_to(root) if a.local.is_relative_to(root) else a.local}"
        for i, a in enumerate(plan, 1)
    }
    wanted = []
    for a in plan:
        if a.local.is_file():
            try:
                verify(a)
                print(f"{labels[id(a)]}: present, verified", flush=True)
                continue
            except Fail as e:
                print(f"{labels[id(a)]}: {e}; fetching it again", flush=True)
                a.local.unlink()
        wanted.append(a)
    if wanted:
        try:  # fail before any transfer when the manifest lists a file the commit does not have
            listed = {
                f.path
                for f in api.list_repo_tree(
                    hub.repo_id, hub.remote_dir or None, recursive=True, revision=hub.revision, repo_type="dataset"
                )
            }
        except Exception as e:
            raise Fail(hub.explain(e, f"the file list of {hub.describe()}")) from None
        absent = [a.remote for a in wanted if hub.path(a.remote) not in listed]
        if absent:
            raise Fail(
                f"{hub.describe(absent[0])} is not on the Hub (commit {hub.revision})"
                + (f", nor {len(absent) - 1} other file(s) the manifest lists" if len(absent) > 1 else "")
            )
        print(f"downloading {len(wanted)} file(s), {workers} at a time, from {hub.describe()}", flush=True)
    error = refused = None
    if wanted:
        try:
            snapshot_download(
                hub.repo_id,
                repo_type="dataset",
                revision=hub.revision,
                local_dir=hub.staging,
                allow_patterns=[hub.path(a.remote) for a in wanted],
                max_workers=workers,
                endpoint=hub.endpoint,
            )
        except BaseException as e:  # Ctrl-C included: the files completed before it are kept all the same
            error = e
    fetched = 0
    for a in wanted:  # verify what arrived and move it into the layout; a bad file is deleted
        staged = hub.staging.joinpath(*hub.path(a.remote).split("/"))
        if staged.is_file():
            try:
                verify(a, staged)
            except Invalid as e:
                staged.unlink()
                refused = refused or e
                continue
            a.local.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, a.local)
            fetched += 1
            print(f"{labels[id(a)]}: downloaded, verified", flush=True)
    if isinstance(error, KeyboardInterrupt):
        raise error
    for a in wanted:  # a sidecar must be parallel to its val shard: same count, 0 at every BOS
        if a.kind == "sidecar" and a.local.is_file():
            val_path = a.local.with_name(a.local.name.replace("fineweb_val" + SIDECAR_TAG, "fineweb_val_", 1))
            problem = (
                sidecar_problem(load_data_shard(val_path), load_data_shard(a.local)) if val_path.is_file() else None
            )
            if problem:
                a.local.unlink()
                fetched -= 1
                refused = refused or Invalid(f"{a.local}: {problem}")
    if refused is not None:
        raise Fail(f"refusing the download: {refused} (removed)")
    if error is not None or fetched < len(wanted):
        reason = hub.explain(error, hub.describe()) if error else f"some files did not arrive from {hub.describe()}"
        raise Fail(
            f"{reason}; {fetched} of {len(wanted)} file(s) downloaded and kept, run the same command again for the rest"
        )
    print(f"done: {fetched} downloaded, {len(plan) - fetched} already present, in {root}", flush=True)
    return 0


# ----------------------------------------------------------------------------- inspect


def default_tokenizer(shard: Path) -> Path | None:
    """The tokenizer that belongs beside a shard in the canonical layout: <root>/datasets/<name>_spN/ ->
    <root>/tokenizers/<prefix>_N_bpe.model (sample_sp1024 -> sample_1024_bpe.model, fineweb10B_sp1024 ->
    fineweb_1024_bpe.model)."""
    ds = shard.resolve().parent
    m = re.search(r"(?:^|_)sp(\d+)(.*)$", ds.name)  # sample_sp8192_caseops -> sample_8192_bpe_caseops.model
    tok_dir = ds.parent.parent / "tokenizers"
    if not m or not tok_dir.is_dir():
        return None
    vocab, suffix = m.group(1), m.group(2)
    prefix = re.sub(r"\d+B$", "", ds.name[: m.start()])
    exact = tok_dir / f"{prefix}_{vocab}_bpe{suffix}.model"
    if exact.is_file():
        return exact
    others = sorted(tok_dir.glob(f"*_{vocab}_bpe{suffix}.model"))
    return others[0] if others else None


def inspect_one(path: Path, tokenizer: Path | None, chars: int) -> None:
    if not path.is_file():
        raise Fail(f"{path}: no such file")
    tokens = load_data_shard(path)
    header = read_header(path)
    extra = int(np.count_nonzero(header[3:]))
    docs = int(np.count_nonzero(tokens == BOS_ID))
    print(path)
    print(
        f"  header: magic {header[0]}, version {header[1]}, count {header[2]}"
        f"{f', {extra} other non-zero words' if extra else ''}; file {path.stat().st_size:,} bytes"
    )
    if tokens.size == 0:
        print("  tokens: 0 (empty shard)")
        return
    print(
        f"  tokens: {tokens.size:,}; documents (BOS={BOS_ID}): {docs:,}; "
        f"ids {int(tokens.min())}..{int(tokens.max())}, {np.unique(tokens).size} distinct"
    )
    if tokens[0] != BOS_ID:
        print(f"  note: the shard does not start with BOS ({BOS_ID}); first token {tokens[0]}")
    if SIDECAR_TAG in path.name:
        print(f"  byte sidecar: {int(tokens.sum(dtype=np.int64)):,} original bytes over {tokens.size:,} tokens")
        return
    tok = tokenizer or default_tokenizer(path)
    if tok is None:
        print("  first document: not decoded (no tokenizer found beside the shard; pass --tokenizer)")
        return
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_file=str(tok))
    except Exception:
        raise Fail(f"{tok}: not a loadable SentencePiece model") from None
    if int(tokens.max()) >= sp.vocab_size():
        print(f"  note: ids reach {int(tokens.max())}, beyond the tokenizer's vocab of {sp.vocab_size()}")
        return
    starts = np.flatnonzero(tokens == BOS_ID)
    begin = int(starts[0]) + 1 if starts.size else 0
    end = int(starts[1]) if starts.size > 1 else tokens.size
    text = sp.decode(tokens[begin:end].tolist())
    shown = text if len(text) <= chars else text[:chars] + " [...]"
    print(
        f"  first document: {end - begin:,} tokens, {len(text.encode('utf-8')):,} bytes "
        f"(tokenizer {tok.name}, vocab {sp.vocab_size()}):"
    )
    print("    " + shown)


# ----------------------------------------------------------------------------- bpb audit


class AuditFailure(Fail):
    pass


def lut_arrays(sp) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """train_gpt's own byte tables (base bytes, leading-space flag, boundary flag) as numpy arrays."""
    import torch

    from train_gpt import build_sentencepiece_luts

    return tuple(t.numpy() for t in build_sentencepiece_luts(sp, sp.vocab_size(), torch.device("cpu")))


def lut_counts(tokens: np.ndarray, luts) -> np.ndarray:
    """Bytes the LUT credits each token with as a target (the first token's context is taken as a boundary)."""
    base, space, boundary = (np.asarray(a) for a in luts)
    t = tokens.astype(np.int64)
    prev_boundary = np.concatenate([[True], boundary[t[:-1]]]) if t.size else np.zeros(0, bool)
    return base[t].astype(np.int64) + (space[t] & ~prev_boundary).astype(np.int64)


def _byte_value(sp, i: int) -> int | None:
    return int(sp.id_to_piece(i)[3:5], 16) if sp.is_byte(i) else None


def _first_disagreement(sp, ids: list[int], counted: np.ndarray, text_bytes) -> int | None:
    """The first token after which the counted bytes and the bytes of the decoded prefix differ (prefixes that end
    inside a multi-byte character are skipped). text_bytes(prefix ids) -> bytes of that prefix's text."""
    cum = np.cumsum(counted)
    n = len(ids)

    def boundary(t):  # the prefix ids[:t] ends on a character boundary
        b = _byte_value(sp, ids[t]) if t < n else None
        return b is None or not (0x80 <= b < 0xC0)

    def agrees(t):
        return not boundary(t) or int(cum[t - 1]) == text_bytes(ids[:t])

    step, lo = 64, 0
    for hi in list(range(step, n, step)) + [n]:
        if not agrees(hi):
            for t in range(lo + 1, hi + 1):
                if not agrees(t):
                    return t - 1
            return hi - 1
        lo = hi
    return None


def _text(sp, ids) -> str:
    """The text tokens stand for: SentencePiece's decoding, with U+2581 read as the space it stands for (byte
    pieces can spell U+2581 out when the vocab has no '\u2581' piece, and the decoder leaves those as a 3-byte
    character; the normalizer turns every space into U+2581, so U+2581 in decoded text always was a space)."""
    return sp.decode(ids).replace("\u2581", " ")


def _describe_piece(sp, ids, k, counted, shard_offset) -> str:
    piece = sp.id_to_piece(ids[k])
    return f"piece {piece!r} (id {ids[k]}, token {shard_offset + k}) counted {int(counted[k])} byte(s)"


def audit_tokens(
    tokens: np.ndarray,
    sp,
    *,
    luts=None,
    sidecar: np.ndarray | None = None,
    originals=None,
    name: str = "val",
    first_doc: int = 0,
) -> dict:
    """Check the byte accounting of validation tokens document by document: Σ counted bytes of each document
    (BOS excluded) must equal the UTF-8 length of its text. Plain tokenizer: counted by the LUT (default train_gpt's),
    text = the decoded tokens. CaseOps (sidecar given): counted by the sidecar, text = the inverse transform of the
    decoded tokens, or, with originals (an iterable of the original documents), the original text. Raises
    AuditFailure naming the first document and piece that disagree; returns counts."""
    if sidecar is not None:
        problem = sidecar_problem(tokens, sidecar)
        if problem:
            raise AuditFailure(f"{name}: sidecar is not parallel to the tokens: {problem}")
        counted_all = sidecar.astype(np.int64)
    else:
        counted_all = lut_counts(tokens, luts if luts is not None else lut_arrays(sp))
    starts = np.flatnonzero(tokens == BOS_ID)
    if not starts.size or starts[0] != 0:
        raise AuditFailure(f"{name}: the tokens do not start with BOS ({BOS_ID}); documents cannot be found")
    originals = iter(originals) if originals is not None else None
    ends = list(starts[1:]) + [tokens.size]
    total = 0
    for d, (s, e) in enumerate(zip(starts, ends)):
        ids = tokens[s + 1 : e].tolist()
        counted = counted_all[s + 1 : e]
        decoded = _text(sp, ids)
        if sidecar is None:
            expected = len(decoded.encode("utf-8"))
            prefix_bytes = lambda p: len(_text(sp, p).encode("utf-8"))  # noqa: E731
            what = "its decoded text"
        else:
            if originals is not None:
                original = next(originals, None)
                if original is None:
                    raise AuditFailure(f"{name}: more validation documents than --docs holds ({first_doc + d})")
                expected, what = len(original.encode("utf-8")), "the original document"
            else:
                try:
                    expected = len(caseops.decode(decoded).encode("utf-8"))
                except ValueError as err:
                    raise AuditFailure(f"{name}: document {first_doc + d} does not invert: {err}") from None
                what = "its decoded text after the inverse transform"
            prefix_bytes = lambda p: caseops.original_byte_counts([_text(sp, p)])[0][0]  # noqa: E731
        got = int(counted.sum())
        if got != expected:
            k = _first_disagreement(sp, ids, counted, prefix_bytes)
            where = f"; first disagreement at {_describe_piece(sp, ids, k, counted, s + 1)}" if k is not None else ""
            raise AuditFailure(
                f"{name}: document {first_doc + d} (tokens {s}..{e - 1}): {got:,} bytes counted, "
                f"{what} has {expected:,}{where}"
            )
        total += got
    return dict(documents=len(starts), tokens=int(tokens.size), bytes=total)


def audit_paths(paths: list[Path], tokenizer: Path | None, docs: Path | None) -> int:
    import sentencepiece as spm

    shards = []
    for p in paths:
        found = sorted(p.glob("fineweb_val_*.bin")) if p.is_dir() else [p]
        shards.extend(f for f in found if SIDECAR_TAG not in f.name)
    if not shards:
        raise Fail(f"{', '.join(map(str, paths))}: no validation shards (fineweb_val_*.bin) to audit")
    originals = caseops.read_documents(docs) if docs is not None else None
    first_doc = 0
    for path in shards:
        tok = tokenizer or default_tokenizer(path)
        if tok is None:
            raise Fail(f"{path}: no tokenizer found beside the shard; pass --tokenizer")
        try:
            sp = spm.SentencePieceProcessor(model_file=str(tok))
        except Exception:
            raise Fail(f"{tok}: not a loadable SentencePiece model") from None
        tokens = load_data_shard(path)
        side = path.with_name(sidecar_name(path.name))
        sidecar = load_data_shard(side) if side.is_file() else None
        if sidecar is None and sp.piece_to_id("\u2581") == sp.unk_id():
            print(f"  note: {tok.name} has no standalone '\u2581' piece: spaces before some pieces fall back to bytes")
        r = audit_tokens(
            tokens,
            sp,
            sidecar=sidecar,
            originals=originals if sidecar is not None else None,
            name=str(path),
            first_doc=first_doc,
        )
        first_doc += r["documents"]
        how = (
            (
                f"sidecar {side.name} vs "
                + (
                    "--docs"
                    if docs is not None and sidecar is not None
                    else "the inverse transform of the decoded text"
                )
            )
            if sidecar is not None
            else f"train_gpt's LUT of {tok.name} vs the decoded text"
        )
        print(
            f"audit ok: {path}: {r['documents']:,} documents, {r['tokens']:,} tokens, {r['bytes']:,} bytes ({how})",
            flush=True,
        )
    return 0


def cmd_inspect(args) -> int:
    if args.audit:
        return audit_paths(
            [Path(p) for p in args.paths],
            Path(args.tokenizer) if args.tokenizer else None,
            Path(args.docs) if args.docs else None,
        )
    paths, failed = [], 0
    for p in map(Path, args.paths):
        found = sorted(p.glob("*.bin")) if p.is_dir() else [p]
        if not found:
            print(f"error: {p}: no .bin files in this folder", file=sys.stderr, flush=True)
            failed += 1
        paths.extend(found)
    for p in paths:
        try:
            inspect_one(p, Path(args.tokenizer) if args.tokenizer else None, args.chars)
        except Fail as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            failed += 1
    return 1 if failed else 0


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fineweb.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    d = sub.add_parser("download", help="fetch the manifest, tokenizer and shards from the Hub")
    d.add_argument("--variant", default="sp1024", help="tokenizer variant, e.g. sp1024 (default)")
    d.add_argument(
        "--train-shards",
        type=int,
        default=None,
        help="how many train shards, from the first (default: all the manifest lists, 80 for sp1024)",
    )
    d.add_argument(
        "--root", default=str(DATA_DIR), help="layout root: <root>/datasets, <root>/tokenizers (default data/)"
    )
    d.add_argument(
        "--repo-id", default=None, help=f"Hub dataset repo (default {DEFAULT_REPO_ID}; env {' or '.join(REPO_ID_VARS)})"
    )
    d.add_argument(
        "--remote-dir",
        default=None,
        help=f"folder of the export in the repo (default {DEFAULT_REMOTE_DIR}; env {' or '.join(REMOTE_DIR_VARS)})",
    )
    d.add_argument(
        "--revision",
        default="main",
        help="branch, tag or commit (default main); resolved once, every file comes from that commit",
    )
    d.add_argument("--endpoint", default=None, help="Hub endpoint (default: HF_ENDPOINT or huggingface.co)")
    d.add_argument(
        "--workers", type=int, default=DEFAULT_WORKERS, help=f"files downloaded at once (default {DEFAULT_WORKERS})"
    )
    d.add_argument("--no-progress", action="store_true", help="no progress bars (there are none off a terminal)")
    d.add_argument(
        "--with-docs",
        action="store_true",
        help=f"also fetch {' and '.join(DOCS_FILES)} into the root: the raw documents that data/caseops.py prep "
        "reads (as the challenge's downloader's --with-docs)",
    )
    d.set_defaults(run=cmd_download)
    i = sub.add_parser("inspect", help="header, counts and first document of shard files")
    i.add_argument("paths", nargs="+", help="shard files (or folders of them)")
    i.add_argument("--tokenizer", default=None, help="SentencePiece model (default: the one beside the shard)")
    i.add_argument("--chars", type=int, default=600, help="characters of the first document to show")
    i.add_argument(
        "--audit",
        action="store_true",
        help="check the bpb byte accounting of the validation shards, document by document",
    )
    i.add_argument(
        "--docs",
        default=None,
        help="with --audit on a CaseOps dataset: the original validation documents (jsonl, field text), "
        "to check the sidecar against the original bytes rather than the decoded text",
    )
    i.set_defaults(run=cmd_inspect)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except Fail as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; run the same command again: files already in place are kept", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())

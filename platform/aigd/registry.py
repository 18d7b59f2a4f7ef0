"""The adapter registry: immutable, versioned adapter folders under a root (local path, s3://, gs://).

    <root>/<name>/<version>/                adapter_model.safetensors, adapter_config.json, manifest.json
    <root>/<name>/_evaluations/<version>/   <evaluation set id>.json, one per jobs/evaluate.py run
    <root>/<name>/_promotions/              <time>-<version>.json, one per `aigd promote`

A version is `<UTC time, ms>Z-<8 hex of the content hash>` (sorting by name sorts by time) and is
never written again once published:
locally it is written into a hidden folder and renamed into place (a reader sees all of it or
nothing); on an object store, where nothing renames, manifest.json is written last and a version
without one is incomplete. Sidecars (evaluations, promotions) sit beside the versions, so
recording what happened to a version never edits the folder a replica serves.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import shutil
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from aigd.errors import ManifestMismatch

WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
MANIFEST = "manifest.json"
FILES = (WEIGHTS, ADAPTER_CONFIG)
VERSION = re.compile(r"\d{8}T\d{9}Z-[0-9a-f]{8}")  # UTC time to the millisecond, content hash
EVALUATIONS, PROMOTIONS = "_evaluations", "_promotions"


class VersionError(ManifestMismatch):
    """A version that is missing, incomplete, corrupt, or in the old unversioned layout."""

    code = "adapter_version_invalid"


@dataclass(frozen=True)
class Version:
    entry: str  # the name's folder: <root>/<name>
    version: str

    @property
    def name(self) -> str:
        return _basename(self.entry)

    @property
    def uri(self) -> str:
        return f"{self.entry.rstrip('/')}/{self.version}"

    def __str__(self) -> str:
        return f"{self.name}@{self.version}"


# --------------------------------------------------------------------------- storage


def is_remote(uri: str) -> bool:
    return "://" in uri


def _fs(uri: str) -> tuple[pafs.FileSystem, str]:
    if is_remote(uri):
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), str(Path(os.path.expanduser(uri)).resolve())


def _basename(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1]


def _read(uri: str) -> bytes:
    fs, path = _fs(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def _write(uri: str, data: bytes) -> None:
    fs, path = _fs(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def _kind(uri: str) -> pafs.FileType:
    fs, path = _fs(uri)
    return fs.get_file_info(path).type


def _children(uri: str) -> list[tuple[str, pafs.FileType]]:
    fs, path = _fs(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    return sorted((_basename(i.path), i.type) for i in fs.get_file_info(pafs.FileSelector(path)))


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _stamp(entry: str) -> str:
    """Now, to the millisecond, or 1 ms after the entry's newest version if that is not earlier
    (a clock behind another machine's): the newest version is always the last published."""
    newest = max((n.split("Z-")[0] for n, _ in _children(entry) if VERSION.fullmatch(n)), default="")
    t = _now()
    if newest:
        last = datetime.datetime.strptime(newest[:15], "%Y%m%dT%H%M%S").replace(
            microsecond=int(newest[15:]) * 1000, tzinfo=datetime.timezone.utc)
        t = max(t, last + datetime.timedelta(milliseconds=1))
    return f"{t:%Y%m%dT%H%M%S}{t.microsecond // 1000:03d}"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- publishing


def publish(entry: str, files: dict[str, bytes], manifest: dict, parent: str | None = None) -> Version:
    """Write a new version of `entry` from the adapter's files; returns it. `manifest` is completed
    with the version's identity (name, version, content hashes, parent version)."""
    hashes = {n: _sha256(files[n]) for n in FILES}
    content = _sha256(json.dumps([hashes, manifest.get("calibration")], sort_keys=True).encode())
    version = Version(entry, f"{_stamp(entry)}Z-{content[:8]}")
    manifest = {**manifest, "adapter": {"name": version.name, "version": version.version, "sha256": hashes,
                                        "parent": parent}}
    payload = {**files, MANIFEST: json.dumps(manifest, indent=2, sort_keys=True).encode()}
    if _kind(version.uri) != pafs.FileType.NotFound:
        raise VersionError(f"{version.uri} exists already; versions are never rewritten")
    if is_remote(entry):
        for name in (*FILES, MANIFEST):  # manifest last: until it lands, readers see an incomplete version
            _write(f"{version.uri}/{name}", payload[name])
    else:
        tmp = f"{entry.rstrip('/')}/.tmp-{version.version}-{uuid.uuid4().hex[:6]}"
        for name, data in payload.items():
            _write(f"{tmp}/{name}", data)
        os.rename(_fs(tmp)[1], _fs(version.uri)[1])  # atomic: the version appears whole
    return version


def files_of(version_dir: str) -> dict[str, bytes]:
    return {n: _read(f"{version_dir.rstrip('/')}/{n}") for n in FILES}


# --------------------------------------------------------------------------- reading


def versions(entry: str) -> list[Version]:
    """Complete versions of one name, oldest first (the version string sorts by time)."""
    return [Version(entry, n) for n, t in _children(entry)
            if t == pafs.FileType.Directory and VERSION.fullmatch(n) and _kind(f"{entry}/{n}/{MANIFEST}") ==
            pafs.FileType.File]


def exists(uri: str) -> bool:
    return _kind(uri) == pafs.FileType.Directory


def names(root: str) -> list[str]:
    return [n for n, t in _children(root) if t == pafs.FileType.Directory and not n.startswith((".", "_"))]


def _check_not_flat(uri: str) -> None:
    if _kind(f"{uri.rstrip('/')}/{WEIGHTS}") == pafs.FileType.File:
        raise VersionError(f"{uri} is an adapter in the old unversioned layout (files directly in the folder); "
                           f"move it into the registry with: aigd adapters migrate {uri}")


def resolve(ref: str) -> Version:
    """A version folder, or a name's folder (its newest complete version)."""
    ref = ref.rstrip("/")
    base = _basename(ref)
    if VERSION.fullmatch(base):
        return Version(ref[: -len(base) - 1], base)
    _check_not_flat(ref)
    found = versions(ref)
    if not found:
        raise VersionError(f"{ref}: no published adapter version here (expected <name>/<version>/ folders "
                           "written by a training job)")
    return found[-1]


def read_manifest(version: Version) -> dict:
    """The manifest of a published version; a missing or half-written version is refused."""
    if _kind(version.uri) == pafs.FileType.NotFound:
        raise VersionError(f"{version.uri}: no such version")
    try:
        manifest = json.loads(_read(f"{version.uri}/{MANIFEST}"))
    except (FileNotFoundError, OSError):
        raise VersionError(f"{version.uri}: incomplete version (no {MANIFEST}; a publish was interrupted)") from None
    except ValueError:
        raise VersionError(f"{version.uri}: {MANIFEST} is not valid JSON") from None
    ident = manifest.get("adapter") or {}
    if ident.get("version") != version.version:
        raise VersionError(f"{version.uri}: the manifest names version {ident.get('version')!r}")
    return manifest


def verify(version: Version) -> dict:
    """Every file present, unaltered (the manifest's sha256) and a readable safetensors; returns the
    manifest. Run before a version is loaded anywhere, so a bad one is refused before any switch."""
    manifest = read_manifest(version)
    for name, want in manifest["adapter"]["sha256"].items():
        try:
            data = _read(f"{version.uri}/{name}")
        except (FileNotFoundError, OSError):
            raise VersionError(f"{version.uri}: {name} is missing") from None
        if _sha256(data) != want:
            raise VersionError(f"{version.uri}: {name} does not match its recorded sha256 (corrupt or altered)")
        if name == WEIGHTS:
            _check_safetensors(data, version.uri)
    return manifest


def _check_safetensors(data: bytes, where: str) -> None:
    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8: 8 + n])
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except Exception:
        raise VersionError(f"{where}: {WEIGHTS} is not a readable safetensors file") from None
    if 8 + n + end != len(data):
        raise VersionError(f"{where}: {WEIGHTS} is truncated or padded ({len(data)} bytes, header says {8 + n + end})")


def local_copy(version: Version, cache: str | None = None) -> Path:
    """A local folder holding the verified version (peft loads from local files). Remote versions
    are downloaded once into the cache (a version never changes) and the copy is verified too."""
    if not is_remote(version.entry):
        verify(version)
        return Path(_fs(version.uri)[1])
    cache = cache or os.path.expanduser(os.path.join(os.environ.get("AIGD_HOME", "~/.cache/aigd"), "cache", "adapters"))
    out = Path(cache) / version.name / version.version
    local = Version(str(out.parent), version.version)
    if (out / MANIFEST).exists():
        try:
            verify(local)
            return out
        except VersionError:  # a damaged cache: fetch it again
            shutil.rmtree(out, ignore_errors=True)
    verify(version)  # a bad version is refused before anything is copied
    tmp = out.with_name(f".tmp-{version.version}-{uuid.uuid4().hex[:6]}")
    tmp.mkdir(parents=True)
    for name in (*FILES, MANIFEST):
        (tmp / name).write_bytes(_read(f"{version.uri}/{name}"))
    try:
        os.rename(tmp, out)
    except OSError:  # another replica on this node won the race: its copy is the same version
        shutil.rmtree(tmp, ignore_errors=True)
    verify(local)
    return out


# --------------------------------------------------------------------------- sidecars


def record_evaluation(version: Version, evalset: dict, metrics: dict, report: str) -> str:
    """One evaluation of a version on one evaluation set (`evalset["id"]`); a rerun replaces it."""
    uri = f"{version.entry}/{EVALUATIONS}/{version.version}/{evalset['id']}.json"
    _write(uri, json.dumps({"evalset": evalset, "metrics": metrics, "report": report,
                            "recorded_at": _now().isoformat(timespec="seconds")}, indent=2, sort_keys=True).encode())
    return uri


def evaluations(version: Version) -> dict[str, dict]:
    """Evaluation set id -> record, for one version."""
    folder = f"{version.entry}/{EVALUATIONS}/{version.version}"
    return {n[:-5]: json.loads(_read(f"{folder}/{n}")) for n, t in _children(folder)
            if t == pafs.FileType.File and n.endswith(".json")}


def record_promotion(entry: str, app: str, serving: str | None, promoted: str, action: str) -> None:
    t = _now()
    _write(f"{entry}/{PROMOTIONS}/{t:%Y%m%dT%H%M%S%fZ}-{promoted}.json",
           json.dumps({"app": app, "from": serving, "to": promoted, "action": action,
                       "at": t.isoformat(timespec="seconds")}, sort_keys=True).encode())


def promotions(entry: str) -> list[dict]:
    """Every promotion and rollback of this name, oldest first."""
    folder = f"{entry}/{PROMOTIONS}"
    return [json.loads(_read(f"{folder}/{n}")) for n, t in _children(folder) if t == pafs.FileType.File]


# --------------------------------------------------------------------------- migration


def migrate(folder: str, upgrade) -> Version:
    """Publish an adapter of the old unversioned layout as the first version of the same folder;
    the old files move to `_unversioned/` (nothing is deleted). `upgrade` turns its manifest into
    this version's schema."""
    if is_remote(folder):
        raise VersionError("migrate a local folder (copy it down, migrate, copy the registry up)")
    path = Path(_fs(folder)[1])
    if not (path / WEIGHTS).exists():
        raise VersionError(f"{folder}: no {WEIGHTS} directly inside; nothing to migrate")
    old = json.loads((path / MANIFEST).read_text()) if (path / MANIFEST).exists() else None
    if old is None:
        raise VersionError(f"{folder}: no {MANIFEST}; only adapters exported by aigd can be migrated")
    version = publish(str(path), {n: (path / n).read_bytes() for n in FILES}, upgrade(old))
    keep = path / "_unversioned"
    keep.mkdir(exist_ok=True)
    for name in (*FILES, MANIFEST):
        os.rename(path / name, keep / name)
    return version

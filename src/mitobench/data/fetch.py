"""``mitobench data fetch``: download the public data into a data root, verified and resumable.

Two downloads, both pinned to a commit:

- the archive of ``DeepMicroscopy/AMi-Br_Benchmark`` (patches, the paper's train split, AtNorM-Br,
  AtNorM-MD and its expert votes). GitHub generates archives on the fly, so their checksum is not
  known in advance: the size is checked against ``Content-Length`` and the sha256 is recorded in
  ``fetch_manifest.json`` (pass ``expected={"archive": "<sha256>"}`` to enforce one). After unpacking,
  ``amibr_train_split.csv`` is checked against its pinned sha256.
- ``AMI-BR.csv`` from ``DeepMicroscopy/AMi-Br`` (all labels, slides and expert votes), pinned sha256.

Downloads stream into ``<name>.part`` next to their final name and resume with an HTTP ``Range``
request after a broken connection. The archive is unpacked into a temporary folder inside the data
root and only the data (``DATA_ITEMS``) is moved into place, each item with one atomic rename; the
reference scripts are never unpacked. Files already present and verified are kept: nothing the user
has is overwritten unless ``force=True``.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
import shutil
import tempfile
import time
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from urllib.error import HTTPError
from urllib.parse import urlparse
from urllib.request import Request, urlopen

from mitobench import __version__
from mitobench.data.records import AMIBR_LABEL_CSV, AMIBR_TRAIN_CSV, ATNORM_MD_VOTES_CSV
from mitobench.errors import MitobenchError
from mitobench.io import atomic_write_json, sha256_file
from mitobench.progress import console, progress_bar

BENCHMARK_COMMIT = "3acf4dad662ed71b63f283858892b54c84a49696"
LABELS_COMMIT = "20a217b33a8708279600e30129bc55a504ee6620"
BENCHMARK_URL = f"https://github.com/DeepMicroscopy/AMi-Br_Benchmark/archive/{BENCHMARK_COMMIT}.zip"
LABELS_URL = f"https://raw.githubusercontent.com/DeepMicroscopy/AMi-Br/{LABELS_COMMIT}/{AMIBR_LABEL_CSV}"

#: sha256 pinned per file. ``archive`` is the zip itself (None: not known in advance, only recorded);
#: ``AMI-BR.csv`` is the label download; any other key is a path inside the data root checked after
#: unpacking.
DEFAULT_EXPECTED: dict[str, str | None] = {
    "archive": None,
    AMIBR_LABEL_CSV: "49eb286b4b45f524f34ee2655c4d2e8f1e0c94618424a59b30ff7412fea77690",
    AMIBR_TRAIN_CSV: "55b9e82113bea36da10461f6c4be3c8c7e920be86176d7def527507c1d9ec3e1",
}
#: What is kept from the archive: everything else (the reference scripts) stays in the zip.
DATA_ITEMS = ("AMi-Br", "AtNorM-Br", "AtNorM-MD", AMIBR_TRAIN_CSV, ATNORM_MD_VOTES_CSV)
FILE_ITEMS = {AMIBR_TRAIN_CSV, ATNORM_MD_VOTES_CSV}
REQUIRED_ITEMS = ("AMi-Br", AMIBR_TRAIN_CSV)
MANIFEST = "fetch_manifest.json"
MANIFEST_FORMAT = 1
CHUNK = 1 << 16
TIMEOUT_S = 60


class WrongArchiveError(MitobenchError):
    """The archive is readable but not the one expected: a downloaded copy is deleted, never reused."""


class DownloadError(MitobenchError):
    """The network failed (offline, proxy, HTTP error): the message says how to download the file by hand."""


def _log(message: str) -> None:
    if not os.environ.get("MITOBENCH_QUIET"):
        console.print(message, highlight=False)


def archive_file_name(url: str) -> str:
    """Local name of a downloaded archive: ``<repo>-<ref>.zip`` for a GitHub archive URL."""
    path = urlparse(url).path
    match = re.search(r"/([^/]+)/archive/(?:refs/heads/|refs/tags/)?([^/]+?)(\.zip)$", path)
    if match:
        return f"{match.group(1)}-{match.group(2)}.zip"
    return PurePosixPath(path).name or "archive.zip"


def _manual_hint(url: str, dest: Path) -> str:
    return (f"You can download {url} yourself (browser, curl, wget) and save it as {dest}; "
            "`mitobench data fetch` then verifies and uses that file.")


def _network_error(url: str, dest: Path, part: Path, exc: BaseException) -> MitobenchError:
    reason = getattr(exc, "reason", None) or exc
    kept = ""
    if part.exists() and part.stat().st_size:
        kept = (f" The {part.stat().st_size:,} bytes received so far are kept in {part}; run "
                "`mitobench data fetch` again to resume. ")
    return DownloadError(
        f"Could not download {url} ({reason}). Are you offline, or behind a proxy/firewall?{kept} "
        + _manual_hint(url, dest))


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """``bytes START-END/TOTAL`` (or ``bytes */TOTAL``) -> (START, TOTAL); None where absent or ``*``."""
    match = re.match(r"\s*bytes\s+(\*|(\d+)-\d+)/(\*|\d+)", value or "")
    if not match:
        return None, None
    start = int(match.group(2)) if match.group(2) else None
    total = int(match.group(3)) if match.group(3) != "*" else None
    return start, total


def _check_space(folder: Path, needed: int | None, what: str) -> None:
    if not needed:
        return
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise MitobenchError(f"{folder}: {what} needs about {needed / 1e6:,.0f} MB but only "
                             f"{free / 1e6:,.0f} MB are free. Free some space or choose another --data-root.")


def download(url: str, dest: Path, *, sha256: str | None = None, force: bool = False,
             _restarted: bool = False) -> dict:
    """Stream ``url`` into ``dest`` (via ``dest.part``), resuming a previous partial download.

    Returns ``{"url", "sha256", "size", "content_length", "resumed_from"}``. A size short of the
    announced length keeps the part file (run again to resume); a checksum mismatch deletes it.
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    if force and part.exists():
        part.unlink()
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": f"mitobench/{__version__}", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urlopen(Request(url, headers=headers), timeout=TIMEOUT_S)
    except HTTPError as exc:
        if exc.code == 416 and offset and not _restarted:
            _, total = _content_range(exc.headers.get("Content-Range"))
            if total is not None and total == offset:  # the part file already holds everything
                return _finish(url, part, dest, sha256, content_length=total, resumed_from=offset)
            _log(f"[yellow]{part.name}: the server cannot resume from byte {offset:,}; starting over.[/]")
            part.unlink()
            return download(url, dest, sha256=sha256, _restarted=True)
        raise DownloadError(f"Could not download {url}: the server answered HTTP {exc.code} ({exc.reason}). "
                             + _manual_hint(url, dest)) from exc
    except (OSError, http.client.HTTPException) as exc:  # URLError, timeouts, refused/reset connections
        raise _network_error(url, dest, part, exc) from exc

    with response:
        length = response.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        if offset and response.status == 206:
            start, total = _content_range(response.headers.get("Content-Range"))
            if start != offset:
                if _restarted:
                    raise MitobenchError(f"{url}: the server sent bytes from {start} when asked for {offset}. "
                                         + _manual_hint(url, dest))
                _log(f"[yellow]{part.name}: the server answered with another byte range; starting over.[/]")
                response.close()
                part.unlink()
                return download(url, dest, sha256=sha256, _restarted=True)
            if total is None and length is not None:
                total = offset + length
            mode, resumed_from = "ab", offset
            _log(f"Resuming {dest.name} from byte {offset:,}.")
        else:
            if offset:
                _log(f"[yellow]{url}: the server does not support resuming; downloading {dest.name} again.[/]")
            mode, resumed_from, total = "wb", 0, length
        _check_space(dest.parent, (total - resumed_from) if total else None, f"downloading {dest.name}")
        try:
            fh = open(part, mode)
        except OSError as exc:  # a read-only or full data root
            raise MitobenchError(f"cannot write {part} ({exc.strerror or exc}). Choose a writable --data-root, or "
                                 "free some space.") from exc
        with fh, progress_bar(f"download {dest.name} (bytes)", total) as advance:
            advance(resumed_from)
            while True:
                try:
                    block = response.read(CHUNK)
                except (OSError, http.client.HTTPException) as exc:  # reset, timeout, truncated chunk
                    fh.flush()
                    raise _network_error(url, dest, part, exc) from exc
                if not block:
                    break
                try:
                    fh.write(block)
                except OSError as exc:
                    raise MitobenchError(f"{part}: cannot write the download ({exc}).") from exc
                advance(len(block))
    size = part.stat().st_size
    if total is not None and size != total:
        raise MitobenchError(
            f"The download of {url} stopped at {size:,} of {total:,} bytes (connection closed early). "
            f"The partial file {part} is kept: run `mitobench data fetch` again to resume. " + _manual_hint(url, dest))
    return _finish(url, part, dest, sha256, content_length=total, resumed_from=resumed_from)


def _finish(url: str, part: Path, dest: Path, sha256: str | None, *, content_length: int | None,
            resumed_from: int) -> dict:
    digest = sha256_file(part)
    if sha256 and digest != sha256:
        size = part.stat().st_size
        part.unlink()
        raise MitobenchError(
            f"Checksum mismatch for {url}: got sha256 {digest} ({size:,} bytes), expected {sha256}. "
            f"The bad download was deleted ({part}). Run `mitobench data fetch` again; if it keeps failing, "
            "the file on the server changed or something between you and the server alters it.")
    os.replace(part, dest)
    return {"url": url, "sha256": digest, "size": dest.stat().st_size, "content_length": content_length,
            "resumed_from": resumed_from}


def _read_manifest(root: Path) -> dict:
    path = root / MANIFEST
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        _log(f"[yellow]{path} is unreadable; ignoring it.[/]")
        return {}
    return data if isinstance(data, dict) else {}


def _write_manifest(root: Path, manifest: dict, old: dict) -> None:
    """Record what fetch did; nothing to record (a rerun on a complete root) writes nothing."""
    if {k: v for k, v in manifest.items() if k != "mitobench_version"} == \
            {k: old.get(k) for k in manifest if k != "mitobench_version"}:
        return
    try:
        atomic_write_json(root / MANIFEST, manifest)
    except OSError as exc:
        raise MitobenchError(f"cannot write {root / MANIFEST} ({exc}). Choose a writable --data-root.") from exc


def _verify_file(path: Path, sha256: str | None) -> str | None:
    """None if ``path`` matches ``sha256`` (or there is nothing to check), else its actual digest."""
    if not sha256:
        return None
    digest = sha256_file(path)
    return None if digest == sha256 else digest


def _changed_items(root: Path, manifest: dict) -> dict[str, list[str]]:
    """Per data item, the files recorded by a previous fetch that are now missing or of another size."""
    bad: dict[str, list[str]] = {}
    for rel, size in (manifest.get("files") or {}).items():
        path = root / rel
        if not path.is_file() or path.stat().st_size != size:
            bad.setdefault(rel.split("/")[0], []).append(rel)
    return bad


def _plan_members(zf: zipfile.ZipFile) -> tuple[dict[str, tuple[str, ...]], list[tuple[zipfile.ZipInfo, tuple]]]:
    """Find each data item in the archive (at its root or at any depth; the shallowest wins).

    Returns ``{item: prefix parts}`` and the members to unpack as ``(info, relative parts)``.
    """
    prefixes: dict[str, tuple[str, ...]] = {}
    infos = zf.infolist()
    for info in infos:
        parts = PurePosixPath(info.filename.replace("\\", "/")).parts
        for depth, name in enumerate(parts):
            if name not in DATA_ITEMS:
                continue
            is_file_item = name in FILE_ITEMS
            last = depth == len(parts) - 1
            if is_file_item and not (last and not info.is_dir()):
                continue
            if not is_file_item and last and not info.is_dir():
                continue
            if name not in prefixes or depth < len(prefixes[name]):
                prefixes[name] = parts[:depth]
            break
    members = []
    for info in infos:
        if info.is_dir():
            continue
        if (info.external_attr >> 16) & 0o170000 == 0o120000:  # symbolic link: never follow or create
            continue
        parts = PurePosixPath(info.filename.replace("\\", "/")).parts
        for item, prefix in prefixes.items():
            n = len(prefix)
            if parts[:n] == prefix and len(parts) > n and parts[n] == item:
                rel = parts[n:]
                if any(p in ("", ".", "..") or p.startswith("/") for p in rel):
                    raise MitobenchError(f"archive member {info.filename!r} has an unsafe path; refusing to unpack.")
                members.append((info, rel))
                break
    return prefixes, members


def _corrupt_archive(archive: Path, why: str, owned: bool) -> MitobenchError:
    """The error for an archive that cannot be read: one this fetch downloaded is deleted (the next fetch downloads
    it anew); one the user placed there is theirs, and is kept and named."""
    if owned:
        archive.unlink(missing_ok=True)
        return MitobenchError(f"{archive} {why}; it was deleted and nothing was unpacked. Run `mitobench data fetch` "
                              "again to download it anew.")
    return MitobenchError(f"{archive} {why}; nothing was unpacked, and the file was left as it is (mitobench did not "
                          "download it). Delete it, or replace it with a complete copy, and run `mitobench data fetch` "
                          "again (or add --force to download it anew).")


def _check_version_unpacked_apart(archive: Path, zf: zipfile.ZipFile, members: list, wanted: list[str],
                                  expected: dict) -> None:
    """The pinned files that this unpack leaves in the archive (already present in the data root) still identify
    its version: hashed inside the zip, so images of another commit never join a pinned train split."""
    by_rel = {"/".join(rel): info for info, rel in members}
    for rel, digest in expected.items():
        if rel in ("archive", AMIBR_LABEL_CSV) or not digest or rel.split("/")[0] in wanted:
            continue  # the wanted ones are checked once unpacked
        info = by_rel.get(rel)
        if info is None:
            raise WrongArchiveError(f"{archive} lacks {rel}, whose sha256 is pinned. Nothing was unpacked.")
        digest_now = hashlib.sha256()
        with zf.open(info) as src:
            for chunk in iter(lambda: src.read(CHUNK), b""):
                digest_now.update(chunk)
        if digest_now.hexdigest() != digest:
            raise WrongArchiveError(f"{rel} in {archive} has sha256 {digest_now.hexdigest()}, expected {digest}: the "
                                    "archive is not the pinned version. Nothing was unpacked.")


def unpack(archive: Path, root: Path, items: list[str], *, expected: dict, force: bool = False,
           owned: bool = True) -> dict:
    """Unpack the data ``items`` of ``archive`` into ``root`` (temp folder, then one rename per item). ``owned``:
    this fetch downloaded the archive, so a corrupt one is deleted; else it is the user's, and kept.

    Returns ``{"found": [...], "unpacked": [...], "files": {relpath: size}}``.
    """
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise _corrupt_archive(archive, f"is not a valid zip archive ({exc})", owned) from exc
    for stale in root.glob(".fetch-unpack-*"):  # left by a fetch that was killed while unpacking
        shutil.rmtree(stale, ignore_errors=True)
    with zf:
        prefixes, members = _plan_members(zf)
        with_files = {rel[0] for _, rel in members}
        prefixes = {item: prefix for item, prefix in prefixes.items() if item in with_files}  # a bare folder entry
        missing_required = [i for i in REQUIRED_ITEMS if i not in prefixes]
        if missing_required:
            raise WrongArchiveError(f"{archive} does not contain {missing_required}: it is not the AMi-Br_Benchmark "
                                 f"archive mitobench expects ({BENCHMARK_URL}). Check the URL.")
        wanted = [i for i in items if i in prefixes]
        _check_version_unpacked_apart(archive, zf, members, wanted, expected)
        members = [(info, rel) for info, rel in members if rel[0] in wanted]
        total = sum(info.file_size for info, _ in members)
        _check_space(root, total, f"unpacking {archive.name}")
        tmp = Path(tempfile.mkdtemp(prefix=".fetch-unpack-", dir=root))
        files: dict[str, int] = {}
        try:
            try:
                with progress_bar(f"unpack {archive.name} (bytes)", total) as advance:
                    for info, rel in members:
                        target = tmp.joinpath(*rel)
                        target.parent.mkdir(parents=True, exist_ok=True)
                        with zf.open(info) as src, open(target, "wb") as dst:
                            shutil.copyfileobj(src, dst, CHUNK)
                        files["/".join(rel)] = info.file_size
                        advance(info.file_size)
            except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
                raise _corrupt_archive(archive, f"is corrupt ({exc})", owned) from exc
            except OSError as exc:  # no space left, a quota, a permission on the destination
                raise MitobenchError(f"cannot unpack {archive.name} into {root} ({exc.strerror or exc}); nothing was "
                                     f"unpacked. It needs about {total / 1e6:,.0f} MB free: free some space or choose "
                                     "another --data-root, then run `mitobench data fetch` again.") from exc
            for rel, digest in expected.items():
                if rel in ("archive", AMIBR_LABEL_CSV) or not digest or rel.split("/")[0] not in wanted:
                    continue
                path = tmp / rel
                if not path.is_file():
                    raise WrongArchiveError(f"{archive} lacks {rel}, whose sha256 is pinned. Nothing was unpacked.")
                actual = _verify_file(path, digest)
                if actual:
                    raise WrongArchiveError(f"{rel} in {archive} has sha256 {actual}, expected {digest}: the archive "
                                         "is not the pinned version. Nothing was unpacked.")
            unpacked = []
            for item in wanted:
                final = root / item
                if final.exists() or final.is_symlink():
                    if not force:  # never replace the user's files without --force
                        continue
                    os.replace(final, tmp / f".replaced-{item}")
                try:
                    os.replace(tmp / item, final)
                except OSError:
                    if (tmp / f".replaced-{item}").exists():  # put the user's copy back before the temp folder goes
                        os.replace(tmp / f".replaced-{item}", final)
                    raise
                unpacked.append(item)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return {"found": sorted(prefixes), "unpacked": unpacked,
            "files": {k: v for k, v in files.items() if k.split("/")[0] in unpacked}}


@contextlib.contextmanager
def _one_fetch_at_a_time(root: Path):
    """Hold ``root`` for this fetch: two fetches into one data root would resume the same ``.part`` file and clear
    each other's unpack folder. The lock is on the folder itself, so the data root holds nothing but data. (No-op
    where fcntl or directory locks are missing.)"""
    try:
        import fcntl

        handle = os.open(root, os.O_RDONLY)
    except (ImportError, OSError):
        yield
        return
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise MitobenchError(f"another `mitobench data fetch` is writing into {root}: wait for it to finish "
                                 "(or stop it), then run this one again.") from None
        except OSError:  # a file system without locks
            pass
        yield
    finally:
        os.close(handle)


def fetch(data_root: Path, *, benchmark_url: str | None = None, labels_url: str | None = None,
          expected: dict | None = None, force: bool = False, keep_archive: bool = False) -> Path:
    """Download and unpack the public data into ``data_root``; return ``data_root``.

    ``expected`` overrides/extends ``DEFAULT_EXPECTED`` (sha256 per file; None disables a check).
    Items already present and verified are skipped; a present file that fails verification is an
    error (it is left untouched) unless ``force``, which re-downloads and replaces everything.
    """
    root = Path(data_root).expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MitobenchError(f"cannot create the data root {root} ({exc}). Choose another --data-root.") from exc
    with _one_fetch_at_a_time(root):
        return _fetch(root, benchmark_url, labels_url, expected, force, keep_archive)


def _fetch(root: Path, benchmark_url: str | None, labels_url: str | None, expected: dict | None, force: bool,
           keep_archive: bool) -> Path:
    benchmark_url = benchmark_url or BENCHMARK_URL
    labels_url = labels_url or LABELS_URL
    checks = {**DEFAULT_EXPECTED, **(expected or {})}
    old = _read_manifest(root)
    manifest = {"format": MANIFEST_FORMAT, "mitobench_version": __version__,
                "archive": old.get("archive"), "labels": old.get("labels"), "files": dict(old.get("files") or {})}

    # 1. AMI-BR.csv (labels, slides, expert votes)
    labels = root / AMIBR_LABEL_CSV
    if labels.exists() and not force:
        actual = _verify_file(labels, checks.get(AMIBR_LABEL_CSV))
        if actual:
            raise MitobenchError(
                f"{labels} exists but is not the pinned version (sha256 {actual}, expected "
                f"{checks[AMIBR_LABEL_CSV]}). It was left untouched: move it away, or run "
                "`mitobench data fetch --force` to replace it.")
        _log(f"{AMIBR_LABEL_CSV}: present and verified, skipped.")
        if not manifest["labels"]:
            manifest["labels"] = {"url": None, "sha256": sha256_file(labels), "size": labels.stat().st_size,
                                  "note": "present before fetch"}
    else:
        _log(f"Downloading {labels_url}")
        try:
            info = download(labels_url, labels, sha256=checks.get(AMIBR_LABEL_CSV), force=force)
        except DownloadError as exc:  # offline: name every file still needed at once, not one per attempt
            archive = root / archive_file_name(benchmark_url)
            if any(force or not (root / i).exists() for i in DATA_ITEMS) and not archive.is_file():
                raise DownloadError(f"{exc} The images are needed too: download {benchmark_url} and save it as "
                                    f"{archive}.") from exc
            raise
        manifest["labels"] = {**info, "fetched": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        _write_manifest(root, manifest, old)

    # 2. The benchmark archive: which data items do we still need?
    train_csv = root / AMIBR_TRAIN_CSV
    if train_csv.is_file() and not force:
        actual = _verify_file(train_csv, checks.get(AMIBR_TRAIN_CSV))
        if actual:
            raise MitobenchError(
                f"{train_csv} exists but is not the pinned version (sha256 {actual}, expected "
                f"{checks[AMIBR_TRAIN_CSV]}). It was left untouched: move it away, or run "
                "`mitobench data fetch --force` to replace it.")
    if not force:
        changed = _changed_items(root, old)
        changed = {k: v for k, v in changed.items() if (root / k).exists()}
        if changed:
            item, rels = next(iter(changed.items()))
            raise MitobenchError(
                f"{root / item}: {len(rels)} file(s) written by an earlier fetch are missing or changed "
                f"(e.g. {rels[0]}). Nothing was overwritten: run `mitobench data fetch --force` to replace them.")
    previous = old.get("archive") or {}
    not_in_archive = set(previous.get("not_in_archive") or []) if previous.get("url") == benchmark_url else set()
    need = [i for i in DATA_ITEMS if force or not (root / i).exists()]
    need_download = [i for i in need if i not in not_in_archive]
    for item in DATA_ITEMS:
        if item not in need:
            _log(f"{item}: present, kept.")
    if need_download:
        if not os.access(root, os.W_OK):
            raise MitobenchError(f"{root} is not writable, and {', '.join(need_download)} still need to be "
                                 "downloaded into it. Choose a writable --data-root.")
        archive = root / archive_file_name(benchmark_url)
        downloaded = not (archive.is_file() and not force)
        pending = old.get("pending_archive") or {}
        if not downloaded and pending.get("file") == archive.name and pending.get("size") == archive.stat().st_size \
                and pending.get("sha256") == sha256_file(archive):
            downloaded = True  # an earlier fetch downloaded it and stopped before unpacking it: still ours to delete
            info = {k: v for k, v in pending.items() if k != "file"}
            _log(f"Using the archive an earlier fetch downloaded, {archive}.")
        elif not downloaded:
            _log(f"Using the archive already at {archive}.")
            actual = _verify_file(archive, checks.get("archive"))
            if actual:
                raise MitobenchError(f"{archive} has sha256 {actual}, expected {checks['archive']}. Delete it "
                                     "(or run with --force) to download it again.")
            info = {"url": benchmark_url, "sha256": sha256_file(archive), "size": archive.stat().st_size,
                    "content_length": None, "resumed_from": 0}
        else:
            _log(f"Downloading {benchmark_url} (needed for {', '.join(need_download)})")
            info = download(benchmark_url, archive, sha256=checks.get("archive"), force=force)
            _write_manifest(root, {**manifest, "pending_archive": {**info, "file": archive.name}}, old)
        try:
            result = unpack(archive, root, need_download, expected=checks, force=force, owned=downloaded)
        except WrongArchiveError as exc:
            if not downloaded:
                raise MitobenchError(f"{exc} Delete {archive} (or run with --force) to download it again.") from exc
            archive.unlink(missing_ok=True)
            _write_manifest(root, manifest, {})  # without the pending download it recorded
            raise MitobenchError(f"{exc} The download was deleted; check the URL ({benchmark_url}).") from exc
        absent = [i for i in need_download if i not in result["found"]]
        for item in absent:
            _log(f"[yellow]{item}: not in the archive.[/]")
        for item in result["unpacked"]:
            _log(f"{item}: unpacked.")
            manifest["files"] = {k: v for k, v in manifest["files"].items() if k.split("/")[0] != item}
        manifest["files"].update(result["files"])
        manifest["archive"] = {**info, "file": archive.name, "found": result["found"], "not_in_archive": absent,
                               "fetched": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        if downloaded and not keep_archive:  # an archive the user placed there stays
            archive.unlink(missing_ok=True)
    _write_manifest(root, manifest, old)
    _log(f"Data root ready: {root}. Check it with `mitobench data check --data-root {root}`.")
    return root

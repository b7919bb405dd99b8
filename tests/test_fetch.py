"""``mitobench data fetch`` against an archive built here and served on loopback (no real network)."""

from __future__ import annotations

import hashlib
import io
import json
import socket
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from fixtures import make_amibr, make_atnorm_br, make_atnorm_md
from mitobench.data import fetch as fetch_mod
from mitobench.data.fetch import BENCHMARK_COMMIT, DATA_ITEMS, MANIFEST, archive_file_name, fetch
from mitobench.data.records import discover
from mitobench.errors import MitobenchError

TOP = f"AMi-Br_Benchmark-{BENCHMARK_COMMIT}"
ARCHIVE_PATH = f"/DeepMicroscopy/AMi-Br_Benchmark/archive/{BENCHMARK_COMMIT}.zip"
LABELS_PATH = "/DeepMicroscopy/AMi-Br/20a217b33a8708279600e30129bc55a504ee6620/AMI-BR.csv"
SCRIPTS = {
    "README.md": b"# AMi-Br benchmark\n",
    "train.py": b"print('reference training script')\n",
    "models/linear_probe.py": b"class Probe: pass\n",
    "utils/AMi-Br_loader.py": b"# not data\n",
}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- the fake public sources
class FakeSource:
    """The two public files, built once per test from the synthetic fixtures."""

    def __init__(self, tmp: Path, top: str | None = TOP):
        src = tmp / "source"
        make_amibr(src)
        make_atnorm_br(src)
        make_atnorm_md(src)
        self.labels_csv = (src / "AMI-BR.csv").read_bytes()
        self.data_files: dict[str, bytes] = {}  # relative path in the data root -> bytes
        for path in sorted(src.rglob("*")):
            rel = path.relative_to(src).as_posix()
            if path.is_file() and rel.split("/")[0] in DATA_ITEMS:
                self.data_files[rel] = path.read_bytes()
        buffer = io.BytesIO()
        prefix = f"{top}/" if top else ""
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
            if top:
                zf.writestr(f"{top}/", b"")
            for rel, data in SCRIPTS.items():
                zf.writestr(prefix + rel, data)
            for rel, data in self.data_files.items():
                zf.writestr(prefix + rel, data)
        self.archive = buffer.getvalue()
        self.expected = {"AMI-BR.csv": sha(self.labels_csv),
                         "amibr_train_split.csv": sha(self.data_files["amibr_train_split.csv"])}


class Server:
    """A loopback HTTP server with ``Range`` support that records every request."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.requests: list[dict] = []
        self.truncate_at: int | None = None  # close the connection after this many body bytes (once)
        self.ignore_range = False
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                record = {"path": self.path, "range": self.headers.get("Range"), "status": None, "sent": 0}
                server.requests.append(record)
                data = server.files.get(self.path)
                if data is None:
                    record["status"] = 404
                    self.send_error(404)
                    return
                start = 0
                rng = self.headers.get("Range")
                if rng and not server.ignore_range:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(data):
                        record["status"] = 416
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    record["status"] = 206
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    record["status"] = 200
                    self.send_response(200)
                    self.send_header("Accept-Ranges", "bytes")
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()
                if server.truncate_at is not None:
                    body = body[:server.truncate_at]
                    server.truncate_at = None
                    self.close_connection = True
                self.wfile.write(body)
                record["sent"] = len(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def url(self, path: str) -> str:
        return self.base + path

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def requests_for(self, path: str) -> list[dict]:
        return [r for r in self.requests if r["path"] == path]


@pytest.fixture
def source(tmp_path):
    return FakeSource(tmp_path)


@pytest.fixture
def server(source):
    srv = Server({ARCHIVE_PATH: source.archive, LABELS_PATH: source.labels_csv})
    yield srv
    srv.close()


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("MITOBENCH_QUIET", "1")


def run_fetch(root: Path, server: Server, source: FakeSource, **kwargs) -> Path:
    expected = {**source.expected, **kwargs.pop("expected", {})}
    return fetch(root, benchmark_url=server.url(ARCHIVE_PATH), labels_url=server.url(LABELS_PATH),
                 expected=expected, **kwargs)


def files_under(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


ARCHIVE_NAME = archive_file_name(f"https://github.com{ARCHIVE_PATH}")


# --------------------------------------------------------------------------- tests
def test_archive_file_name():
    assert ARCHIVE_NAME == f"AMi-Br_Benchmark-{BENCHMARK_COMMIT}.zip"
    assert archive_file_name("http://127.0.0.1:8000/x/y/data.zip") == "data.zip"


def test_full_fetch_keeps_only_data(tmp_path, server, source):
    root = tmp_path / "root"
    assert run_fetch(root, server, source) == root
    got = files_under(root)
    manifest = json.loads(got.pop(MANIFEST))
    assert got.pop("AMI-BR.csv") == source.labels_csv
    # exactly the data, byte for byte, in the public layout; no scripts, no temp or part files, no zip
    assert got == source.data_files
    assert not any(p.name.startswith(".") for p in root.iterdir())
    assert sorted(p.name for p in root.iterdir()) == sorted([*DATA_ITEMS, "AMI-BR.csv", MANIFEST])
    # the archive's sha256 and size are recorded, and the size matched Content-Length
    assert manifest["archive"]["sha256"] == sha(source.archive)
    assert manifest["archive"]["size"] == manifest["archive"]["content_length"] == len(source.archive)
    assert manifest["labels"]["sha256"] == sha(source.labels_csv)
    assert manifest["files"]["amibr_train_split.csv"] == len(source.data_files["amibr_train_split.csv"])
    assert len(manifest["files"]) == len(source.data_files)
    # one request per file, no ranges
    assert [(r["path"], r["range"], r["status"]) for r in server.requests] == [
        (LABELS_PATH, None, 200), (ARCHIVE_PATH, None, 200)]
    # the result is a data root the loaders accept
    found = discover(root)
    assert sorted(found) == ["AMi-Br", "AtNorM-Br", "AtNorM-MD"]
    assert len(found["AMi-Br"]) == 65


def test_second_fetch_downloads_nothing(tmp_path, server, source):
    root = tmp_path / "root"
    run_fetch(root, server, source)
    before = files_under(root)
    server.requests.clear()
    run_fetch(root, server, source)
    assert server.requests == []
    assert files_under(root) == before


def test_resume_after_truncated_part(tmp_path, server, source):
    root = tmp_path / "root"
    root.mkdir()
    n = len(source.archive) // 3
    (root / (ARCHIVE_NAME + ".part")).write_bytes(source.archive[:n])
    run_fetch(root, server, source)
    [req] = server.requests_for(ARCHIVE_PATH)
    assert req["range"] == f"bytes={n}-"
    assert req["status"] == 206
    assert req["sent"] == len(source.archive) - n  # only the remaining bytes travelled
    manifest = json.loads((root / MANIFEST).read_text())
    assert manifest["archive"]["resumed_from"] == n
    assert manifest["archive"]["sha256"] == sha(source.archive)
    got = files_under(root)
    assert {k: got[k] for k in source.data_files} == source.data_files
    assert not (root / (ARCHIVE_NAME + ".part")).exists()


def test_broken_connection_then_resume(tmp_path, server, source):
    root = tmp_path / "root"
    k = len(source.archive) // 2
    original = server.files[ARCHIVE_PATH]
    # the labels file is already there, so the one broken connection hits the archive download
    root.mkdir()
    (root / "AMI-BR.csv").write_bytes(source.labels_csv)
    server.truncate_at = k
    with pytest.raises(MitobenchError, match=r"stopped at .* bytes.*run `mitobench data fetch` again to resume"):
        run_fetch(root, server, source)
    part = root / (ARCHIVE_NAME + ".part")
    assert part.read_bytes() == original[:k]
    assert not (root / "AMi-Br").exists()
    server.requests.clear()
    run_fetch(root, server, source)
    [req] = server.requests_for(ARCHIVE_PATH)
    assert (req["range"], req["status"], req["sent"]) == (f"bytes={k}-", 206, len(original) - k)
    assert json.loads((root / MANIFEST).read_text())["archive"]["sha256"] == sha(original)
    assert not part.exists()


def test_server_without_range_support_restarts(tmp_path, server, source):
    root = tmp_path / "root"
    root.mkdir()
    (root / (ARCHIVE_NAME + ".part")).write_bytes(source.archive[:1000])
    server.ignore_range = True
    run_fetch(root, server, source)
    [req] = server.requests_for(ARCHIVE_PATH)
    assert req["range"] == "bytes=1000-" and req["status"] == 200 and req["sent"] == len(source.archive)
    assert json.loads((root / MANIFEST).read_text())["archive"]["sha256"] == sha(source.archive)


def test_part_already_complete(tmp_path, server, source):
    root = tmp_path / "root"
    root.mkdir()
    (root / (ARCHIVE_NAME + ".part")).write_bytes(source.archive)
    run_fetch(root, server, source)
    assert [r["status"] for r in server.requests_for(ARCHIVE_PATH)] == [416]
    assert (root / "AMi-Br").is_dir()


def test_archive_checksum_mismatch_deletes_part(tmp_path, server, source):
    root = tmp_path / "root"
    with pytest.raises(MitobenchError, match="Checksum mismatch.*deleted"):
        run_fetch(root, server, source, expected={"archive": "0" * 64})
    assert not (root / (ARCHIVE_NAME + ".part")).exists()
    assert not (root / ARCHIVE_NAME).exists()
    assert not any((root / item).exists() for item in DATA_ITEMS)


def test_archive_checksum_match_accepted(tmp_path, server, source):
    root = tmp_path / "root"
    run_fetch(root, server, source, expected={"archive": sha(source.archive)})
    assert (root / "AtNorM-MD").is_dir()


def test_labels_checksum_mismatch(tmp_path, server, source):
    root = tmp_path / "root"
    with pytest.raises(MitobenchError, match="Checksum mismatch.*AMI-BR.csv"):
        run_fetch(root, server, source, expected={"AMI-BR.csv": "1" * 64})
    assert not (root / "AMI-BR.csv").exists()
    assert not (root / "AMI-BR.csv.part").exists()


def test_train_csv_checked_after_unpacking(tmp_path, server, source):
    root = tmp_path / "root"
    with pytest.raises(MitobenchError, match="amibr_train_split.csv.*not the pinned version. Nothing was unpacked"):
        run_fetch(root, server, source, expected={"amibr_train_split.csv": "2" * 64})
    assert not any((root / item).exists() for item in DATA_ITEMS)
    assert not [p for p in root.iterdir() if p.name.startswith(".fetch-")]
    assert not (root / ARCHIVE_NAME).exists()  # a wrong download is deleted, never reused
    with pytest.raises(MitobenchError, match="not the pinned version"):
        run_fetch(root, server, source, expected={"amibr_train_split.csv": "2" * 64})
    assert len(server.requests_for(ARCHIVE_PATH)) == 2


def test_placed_archive_that_is_not_the_pinned_version_is_kept_and_named(tmp_path, server, source):
    root = tmp_path / "root"
    root.mkdir()
    (root / ARCHIVE_NAME).write_bytes(source.archive)
    with pytest.raises(MitobenchError, match=f"not the pinned version.*Delete .*{ARCHIVE_NAME}"):
        run_fetch(root, server, source, expected={"amibr_train_split.csv": "2" * 64})
    assert (root / ARCHIVE_NAME).read_bytes() == source.archive


def test_fetch_interrupted_while_unpacking_resumes_with_its_own_download(tmp_path, server, source, monkeypatch):
    """The archive it downloaded is reused, not fetched again, and still deleted once unpacked; a temp folder that a
    killed fetch left behind is removed."""
    root = tmp_path / "root"
    real_unpack = fetch_mod.unpack

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fetch_mod, "unpack", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_fetch(root, server, source)
    assert (root / ARCHIVE_NAME).is_file() and not (root / "AMi-Br").exists()
    (root / ".fetch-unpack-killed" / "AMi-Br").mkdir(parents=True)
    monkeypatch.setattr(fetch_mod, "unpack", real_unpack)
    run_fetch(root, server, source)
    assert len(server.requests_for(ARCHIVE_PATH)) == 1
    assert not (root / ARCHIVE_NAME).exists() and (root / "AMi-Br").is_dir()
    assert not [p for p in root.iterdir() if p.name.startswith(".fetch-")]
    assert "pending_archive" not in json.loads((root / MANIFEST).read_text())


def test_disk_full_while_unpacking_is_one_clear_error(tmp_path, server, source, monkeypatch):
    root = tmp_path / "root"

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fetch_mod.shutil, "copyfileobj", no_space)
    with pytest.raises(MitobenchError, match="cannot unpack.*No space left.*MB free"):
        run_fetch(root, server, source)
    assert not any((root / item).exists() for item in DATA_ITEMS)
    assert not [p for p in root.iterdir() if p.name.startswith(".fetch-")]
    monkeypatch.undo()
    monkeypatch.setenv("MITOBENCH_QUIET", "1")
    run_fetch(root, server, source)  # after freeing space: the download is reused
    assert len(server.requests_for(ARCHIVE_PATH)) == 1 and (root / "AMi-Br").is_dir()


def test_unwritable_destination_is_one_clear_error(tmp_path, server):
    (tmp_path / "a-file").write_text("")  # as a folder it cannot be written into, even by root
    dest = tmp_path / "a-file" / "AMI-BR.csv"
    with pytest.raises(MitobenchError, match="cannot write .*AMI-BR.csv.part.*writable --data-root"):
        fetch_mod.download(server.url(LABELS_PATH), dest)


def test_set_present_only_as_a_folder_entry_counts_as_absent(tmp_path, source):
    """A bare ``AtNorM-MD/`` entry (a submodule placeholder) unpacks nothing, and --force keeps the user's copy."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for rel, data in source.data_files.items():
            if not rel.startswith("AtNorM-MD"):
                zf.writestr(f"{TOP}/{rel}", data)
        zf.writestr(f"{TOP}/AtNorM-MD/", b"")
    srv = Server({ARCHIVE_PATH: buffer.getvalue(), LABELS_PATH: source.labels_csv})
    try:
        root = tmp_path / "root"
        run_fetch(root, srv, source)
        assert (root / "AMi-Br").is_dir() and not (root / "AtNorM-MD").exists()
        assert "AtNorM-MD" in json.loads((root / MANIFEST).read_text())["archive"]["not_in_archive"]
        mine = root / "AtNorM-MD" / "Atypical" / "mine.png"
        mine.parent.mkdir(parents=True)
        mine.write_bytes(b"my own patch")
        run_fetch(root, srv, source, force=True)
        assert mine.read_bytes() == b"my own patch"
    finally:
        srv.close()


def test_default_checksums_are_pinned():
    assert fetch_mod.DEFAULT_EXPECTED["AMI-BR.csv"] == \
        "49eb286b4b45f524f34ee2655c4d2e8f1e0c94618424a59b30ff7412fea77690"
    assert fetch_mod.DEFAULT_EXPECTED["amibr_train_split.csv"] == \
        "55b9e82113bea36da10461f6c4be3c8c7e920be86176d7def527507c1d9ec3e1"
    assert fetch_mod.BENCHMARK_URL == ("https://github.com/DeepMicroscopy/AMi-Br_Benchmark/archive/"
                                       "3acf4dad662ed71b63f283858892b54c84a49696.zip")
    assert fetch_mod.LABELS_URL == ("https://raw.githubusercontent.com/DeepMicroscopy/AMi-Br/"
                                    "20a217b33a8708279600e30129bc55a504ee6620/AMI-BR.csv")


def test_bad_zip(tmp_path, server, source):
    root = tmp_path / "root"
    server.files[ARCHIVE_PATH] = b"<html>this is not a zip</html>" * 10
    with pytest.raises(MitobenchError, match="not a valid zip archive"):
        run_fetch(root, server, source)
    assert not (root / ARCHIVE_NAME).exists()
    assert not any((root / item).exists() for item in DATA_ITEMS)


@pytest.mark.parametrize("damage", ["not a zip", "bad member"])
def test_a_placed_archive_that_is_corrupt_is_kept_and_named(tmp_path, server, source, damage):
    """An archive the user put there (say, a browser download cut short) is theirs: named, never deleted; only
    an archive that fetch downloaded itself is deleted when it turns out corrupt."""
    root = tmp_path / "root"
    root.mkdir()
    data = bytearray(source.archive)
    if damage == "not a zip":
        data = data[: len(data) // 2]
    else:
        with zipfile.ZipFile(io.BytesIO(bytes(data))) as zf:
            info = max(zf.infolist(), key=lambda i: i.compress_size)
        offset = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + info.compress_size // 2
        data[offset] ^= 0xFF
        data[offset + 1] ^= 0xFF
    (root / ARCHIVE_NAME).write_bytes(bytes(data))
    with pytest.raises(MitobenchError, match=f"{ARCHIVE_NAME} .*left as it is.*Delete it") as err:
        run_fetch(root, server, source)
    assert "deleted" not in str(err.value)
    assert (root / ARCHIVE_NAME).read_bytes() == bytes(data)
    assert server.requests_for(ARCHIVE_PATH) == []
    assert not any((root / item).exists() for item in DATA_ITEMS)


def test_corrupt_zip_member(tmp_path, server, source):
    root = tmp_path / "root"
    data = bytearray(source.archive)
    # flip bytes inside the largest member's compressed data: the CRC check must catch it
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as zf:
        info = max(zf.infolist(), key=lambda i: i.compress_size)
    offset = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + info.compress_size // 2
    data[offset] ^= 0xFF
    data[offset + 1] ^= 0xFF
    server.files[ARCHIVE_PATH] = bytes(data)
    with pytest.raises(MitobenchError, match="corrupt|not a valid zip"):
        run_fetch(root, server, source)
    assert not any((root / item).exists() for item in DATA_ITEMS)
    assert not [p for p in root.iterdir() if p.name.startswith(".fetch-")]


def test_offline(tmp_path, source):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/AMI-BR.csv"
    root = tmp_path / "root"
    with pytest.raises(MitobenchError) as err:
        fetch(root, benchmark_url=url.replace("AMI-BR.csv", "a.zip"), labels_url=url, expected=source.expected)
    message = str(err.value)
    assert url in message and "offline" in message and str(root / "AMI-BR.csv") in message
    # both files an offline user must fetch by hand, named at once
    assert url.replace("AMI-BR.csv", "a.zip") in message and str(root / "a.zip") in message


def test_http_error(tmp_path, server, source):
    root = tmp_path / "root"
    with pytest.raises(MitobenchError, match=r"HTTP 404.*save it as"):
        fetch(root, benchmark_url=server.url("/missing.zip"), labels_url=server.url(LABELS_PATH),
              expected=source.expected)


def test_existing_files_are_not_overwritten(tmp_path, server, source):
    root = tmp_path / "root"
    root.mkdir()
    (root / "AMI-BR.csv").write_text("my own edited labels\n")
    with pytest.raises(MitobenchError, match="left untouched.*--force"):
        run_fetch(root, server, source)
    assert (root / "AMI-BR.csv").read_text() == "my own edited labels\n"
    assert server.requests == []
    run_fetch(root, server, source, force=True)
    assert (root / "AMI-BR.csv").read_bytes() == source.labels_csv


def test_changed_file_from_earlier_fetch_is_reported(tmp_path, server, source):
    root = tmp_path / "root"
    run_fetch(root, server, source)
    victim = next(p for p in sorted((root / "AtNorM-Br" / "Normal").iterdir()))
    victim.unlink()
    with pytest.raises(MitobenchError, match="AtNorM-Br.*missing or changed.*--force"):
        run_fetch(root, server, source)
    run_fetch(root, server, source, force=True)
    assert victim.is_file()
    assert files_under(root).keys() >= source.data_files.keys()


def test_partial_root_gets_only_what_is_missing(tmp_path, server, source):
    """A data root like ../shared/data (no AtNorM-MD) gains AtNorM-MD; what is there stays untouched."""
    root = tmp_path / "root"
    for rel, data in source.data_files.items():
        if not rel.startswith("AtNorM-MD"):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
    (root / "AMI-BR.csv").write_bytes(source.labels_csv)
    mine = root / "AMi-Br" / "notes.txt"
    mine.write_text("keep me")
    run_fetch(root, server, source)
    assert mine.read_text() == "keep me"
    assert (root / "AtNorM-MD_expert_votes.csv").read_bytes() == source.data_files["AtNorM-MD_expert_votes.csv"]
    assert {k: v for k, v in files_under(root).items() if k.startswith("AtNorM-MD")} == \
        {k: v for k, v in source.data_files.items() if k.startswith("AtNorM-MD")}
    manifest = json.loads((root / MANIFEST).read_text())
    assert all(k.startswith("AtNorM-MD") for k in manifest["files"])
    assert [r["path"] for r in server.requests] == [ARCHIVE_PATH]


def test_an_archive_of_another_version_is_refused_even_when_its_split_is_not_unpacked(tmp_path, server, source):
    """The pinned train split is already in the data root, so only images would be unpacked: the archive's own copy
    of the split still identifies its version, and one of another commit is refused (images of another release
    never join the pinned split)."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "AMI-BR.csv").write_bytes(source.labels_csv)
    (root / "amibr_train_split.csv").write_bytes(source.data_files["amibr_train_split.csv"])
    other = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(source.archive)) as old, zipfile.ZipFile(other, "w") as new:
        for info in old.infolist():
            data = old.read(info)
            if info.filename.endswith("amibr_train_split.csv"):
                data += b"a row of another release\n"
            new.writestr(info, data)
    (root / ARCHIVE_NAME).write_bytes(other.getvalue())
    with pytest.raises(MitobenchError, match="amibr_train_split.csv in .* is not the pinned version.*Delete"):
        run_fetch(root, server, source)
    assert not (root / "AMi-Br").exists() and (root / ARCHIVE_NAME).is_file()


def test_a_second_fetch_into_the_same_root_waits_its_turn(tmp_path, server, source):
    """Two fetches into one data root would resume one .part file and clear each other's unpack folder: the second
    is refused at once, touching nothing, and runs once the first is done."""
    import fcntl
    import os

    root = tmp_path / "root"
    root.mkdir()
    held = os.open(root, os.O_RDONLY)  # as a fetch in another process holds it
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(MitobenchError, match=f"another `mitobench data fetch` is writing into {root}"):
            run_fetch(root, server, source)
        assert server.requests == [] and list(root.iterdir()) == []
    finally:
        os.close(held)
    run_fetch(root, server, source)
    assert (root / "AMi-Br").is_dir()


def test_data_at_archive_root(tmp_path):
    source = FakeSource(tmp_path, top=None)
    srv = Server({ARCHIVE_PATH: source.archive, LABELS_PATH: source.labels_csv})
    try:
        root = tmp_path / "root"
        run_fetch(root, srv, source)
        got = files_under(root)
        got.pop(MANIFEST)
        got.pop("AMI-BR.csv")
        assert got == source.data_files
    finally:
        srv.close()


def test_manually_downloaded_archive_is_used(tmp_path, server, source):
    root = tmp_path / "root"
    root.mkdir()
    (root / ARCHIVE_NAME).write_bytes(source.archive)
    run_fetch(root, server, source)
    assert server.requests_for(ARCHIVE_PATH) == []
    assert (root / ARCHIVE_NAME).is_file()
    assert (root / "AMi-Br").is_dir()


def test_unsafe_member_path_refused(tmp_path, source):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for rel, data in source.data_files.items():
            zf.writestr(f"{TOP}/{rel}", data)
        zf.writestr(f"{TOP}/AMi-Br/../../evil.txt", b"x")
    srv = Server({ARCHIVE_PATH: buffer.getvalue(), LABELS_PATH: source.labels_csv})
    try:
        with pytest.raises(MitobenchError, match="unsafe path"):
            run_fetch(tmp_path / "root", srv, source)
        assert not (tmp_path / "evil.txt").exists()
    finally:
        srv.close()


REAL_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def test_pinned_checksums_match_real_files_and_nothing_is_downloaded(tmp_path, server, source):
    """A complete data root (the real AMi-Br files, linked) verifies against the pinned checksums."""
    if not (REAL_DATA / "AMi-Br").is_dir():
        pytest.skip(f"real data not found at {REAL_DATA}")
    root = tmp_path / "root"
    root.mkdir()
    for item in ("AMi-Br", "AtNorM-Br", "AMI-BR.csv", "amibr_train_split.csv"):
        (root / item).symlink_to(REAL_DATA / item)
    make_atnorm_md(root)
    fetch(root, benchmark_url=server.url(ARCHIVE_PATH), labels_url=server.url(LABELS_PATH))  # default pins
    assert server.requests == []
    assert json.loads((root / MANIFEST).read_text())["labels"]["sha256"] == fetch_mod.DEFAULT_EXPECTED["AMI-BR.csv"]

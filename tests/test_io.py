"""Atomic writes: the final file gets a normal open()'s mode, and ``exclusive`` never replaces a file."""

from __future__ import annotations

import errno
import os

import pytest

from mitobench import io as mio


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
@pytest.mark.parametrize("exclusive", [False, True])
def test_atomic_write_gives_the_umask_mode_not_0600(tmp_path, monkeypatch, umask, mode, exclusive):
    monkeypatch.setattr(mio, "_UMASK", umask)
    path = mio.atomic_write(tmp_path / "a.txt", lambda p: p.write_text("x"), exclusive=exclusive)
    assert path.stat().st_mode & 0o777 == mode
    assert mio.atomic_write_json(tmp_path / "b.json", {}).stat().st_mode & 0o777 == mode


def test_the_umask_is_read_once_and_left_as_it_was(tmp_path):
    current = os.umask(0o022)
    os.umask(current)
    assert mio._read_umask() == current and os.umask(current) == current
    path = mio.atomic_write_text(tmp_path / "a.txt", "x")  # the real umask of this process
    assert path.stat().st_mode & 0o777 == 0o666 & ~mio._UMASK


def test_exclusive_write_never_replaces_a_file(tmp_path):
    target = tmp_path / "p.csv"
    target.write_text("theirs\n")
    with pytest.raises(FileExistsError):
        mio.atomic_write(target, lambda p: p.write_text("mine\n"), exclusive=True)
    assert target.read_text() == "theirs\n" and _files(tmp_path) == ["p.csv"]


def test_exclusive_write_refuses_a_file_that_appeared_while_writing(tmp_path):
    target = tmp_path / "p.csv"

    def write(p):
        p.write_text("mine\n")
        target.write_text("theirs\n")  # another process, in between

    with pytest.raises(FileExistsError):
        mio.atomic_write(target, write, exclusive=True)
    assert target.read_text() == "theirs\n" and _files(tmp_path) == ["p.csv"]
    mio.atomic_write(tmp_path / "q.csv", lambda p: p.write_text("mine\n"), exclusive=True)
    assert (tmp_path / "q.csv").read_text() == "mine\n" and _files(tmp_path) == ["p.csv", "q.csv"]


def test_exclusive_write_without_hard_links(tmp_path, monkeypatch):
    """A file system without hard links: reserve the name with O_EXCL, then rename over the placeholder."""

    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(mio.os, "link", no_links)
    target = tmp_path / "p.csv"
    mio.atomic_write(target, lambda p: p.write_text("mine\n"), exclusive=True)
    assert target.read_text() == "mine\n" and _files(tmp_path) == ["p.csv"]
    with pytest.raises(FileExistsError):
        mio.atomic_write(target, lambda p: p.write_text("again\n"), exclusive=True)
    assert target.read_text() == "mine\n" and _files(tmp_path) == ["p.csv"]


def test_plain_atomic_write_still_replaces(tmp_path):
    target = tmp_path / "status.json"
    mio.atomic_write_json(target, {"state": "running"})
    mio.atomic_write_json(target, {"state": "complete"})
    assert '"complete"' in target.read_text() and _files(tmp_path) == ["status.json"]

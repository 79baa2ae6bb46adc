"""The disk cache's entries appear whole or not at all, whichever process makes them; a damaged entry is
found, removed with a warning and made again; an unwritable cache is named."""

from __future__ import annotations

import json
import os

import pytest

from xpu_coopt.disk_cache import MANIFEST, DiskCacheError, entry, make_entry, verified_entry


def _write(text: str):
    def write(folder):
        (folder / "part").write_text(text)
        (folder / "other").write_bytes(b"\0" * 100)

    return write


def test_an_entry_appears_whole_with_its_manifest_and_no_scratch_stays(tmp_path):
    target = tmp_path / "cache" / "entry"
    assert make_entry(target, _write("made")) == target
    assert (target / "part").read_text() == "made"
    manifest = json.loads((target / MANIFEST).read_text())["files"]
    assert sorted(manifest) == ["other", "part"] and manifest["other"]["size"] == 100
    assert [path.name for path in target.parent.iterdir()] == ["entry"]
    assert verified_entry(target) == target


def test_an_entry_another_process_made_meanwhile_stays(tmp_path):
    target = tmp_path / "entry"

    def racing_write(folder):
        make_entry(target, _write("the other process's"))  # it finishes first
        _write("this process's")(folder)

    make_entry(target, racing_write)
    assert (target / "part").read_text() == "the other process's"
    assert [path.name for path in tmp_path.iterdir()] == ["entry"]


def test_a_failed_write_leaves_no_entry(tmp_path):
    def failing_write(folder):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        make_entry(tmp_path / "entry", failing_write)
    assert list(tmp_path.iterdir()) == []


def _truncate(path):
    with open(path, "r+b") as handle:
        handle.truncate(10)


def _same_size_other_bytes(path):
    path.write_bytes(b"\1" * path.stat().st_size)
    os.utime(path, ns=(1, 1))  # written at another time


DAMAGES = {
    "truncated": (lambda folder: _truncate(folder / "other"), "other holds 10 bytes, not the 100 written"),
    "emptied": (lambda folder: (folder / "part").write_text(""), "part holds 0 bytes"),
    "deleted": (lambda folder: (folder / "other").unlink(), "other is missing"),
    "other bytes": (lambda folder: _same_size_other_bytes(folder / "other"), "other changed since it was written"),
    "no manifest": (lambda folder: (folder / MANIFEST).unlink(), "its manifest cannot be read"),
}  # fmt: skip


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_entry_is_removed_with_a_warning_and_made_again(tmp_path, damage):
    target = make_entry(tmp_path / "entry", _write("first"))
    harm, found = DAMAGES[damage]
    harm(target)
    with pytest.warns(UserWarning, match=f"disk cache entry {target} is damaged \\({found}"):
        assert entry(target, _write("second")) == target
    assert (target / "part").read_text() == "second"
    assert verified_entry(target) == target
    assert [path.name for path in tmp_path.iterdir()] == ["entry"]


def test_a_file_touched_but_unchanged_is_still_whole(tmp_path):
    target = make_entry(tmp_path / "entry", _write("made"))
    os.utime(target / "other", ns=(1, 1))
    assert verified_entry(target) == target  # its digest is read and matches


def test_an_unwritable_cache_names_the_variable_and_the_path(tmp_path, monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_text("")
    monkeypatch.setenv("XPU_COOPT_CACHE", str(a_file / "cache"))
    message = f"disk cache \\(XPU_COOPT_CACHE={a_file / 'cache'}\\) cannot be written: .*set XPU_COOPT_CACHE"
    with pytest.raises(DiskCacheError, match=message):
        make_entry(a_file / "cache" / "entry", _write("made"))

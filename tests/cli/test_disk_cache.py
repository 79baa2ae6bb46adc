"""The disk cache's entries appear whole or not at all, whichever process makes them."""

from __future__ import annotations

import pytest

from xpu_coopt.disk_cache import make_entry


def _write_folder(text: str):
    def write(folder):
        folder.mkdir()
        (folder / "part").write_text(text)

    return write


def test_an_entry_appears_whole_and_no_scratch_stays(tmp_path):
    target = tmp_path / "cache" / "entry"
    make_entry(target, _write_folder("made"))
    assert (target / "part").read_text() == "made"
    assert [path.name for path in target.parent.iterdir()] == ["entry"]


def test_an_entry_another_process_made_meanwhile_stays(tmp_path):
    target = tmp_path / "entry"

    def racing_write(folder):
        _write_folder("the other process's")(target)  # it finishes first
        _write_folder("this process's")(folder)

    make_entry(target, racing_write)
    assert (target / "part").read_text() == "the other process's"
    assert [path.name for path in tmp_path.iterdir()] == ["entry"]


def test_a_failed_write_leaves_no_entry(tmp_path):
    def failing_write(folder):
        folder.mkdir()
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        make_entry(tmp_path / "entry", failing_write)
    assert list(tmp_path.iterdir()) == []

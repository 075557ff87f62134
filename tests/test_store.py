"""The atomic store (bd_ray/store.py): a reader sees the old entry or the new one, never a partial one."""

from __future__ import annotations

import json
import os

import pytest

from bd_ray import store


def test_atomic_write_json_and_failed_write_keep_the_old_file(tmp_path):
    path = tmp_path / "sub" / "m.json"
    store.atomic_write_json(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}

    def dies(f):
        f.write('{"half": ')
        raise OSError("disk died")

    with pytest.raises(OSError, match="disk died"):
        store.atomic_write(path, dies)
    assert json.loads(path.read_text()) == {"a": 1}
    assert os.listdir(path.parent) == ["m.json"]  # no temp file left


def test_replace_dir_file_table_and_verify(tmp_path):
    dest = tmp_path / "entry"

    def build(d):
        os.makedirs(os.path.join(d, "x"))
        open(os.path.join(d, "x", "a.bin"), "wb").write(b"abc")
        open(os.path.join(d, "manifest.json"), "w").write("{}")

    store.replace_dir(dest, build)
    files = store.file_table(dest, skip=lambda rel: rel == "manifest.json")
    assert list(files) == ["x/a.bin"] and files["x/a.bin"]["size"] == 3
    assert store.verify_files(dest, files) is None

    with pytest.raises(RuntimeError):  # a failing build leaves the old entry and no temp dir
        store.replace_dir(dest, lambda d: (_ for _ in ()).throw(RuntimeError("boom")))
    assert sorted(os.listdir(tmp_path)) == ["entry"]

    (dest / "x" / "a.bin").write_bytes(b"abd")
    assert "does not match its SHA-256" in store.verify_files(dest, files, label=" (rank 0)")
    (dest / "x" / "a.bin").unlink()
    assert store.verify_files(dest, files) == "x/a.bin is missing"


def test_remove_stale_tmp(tmp_path):
    dest = tmp_path / "c"
    stale = tmp_path / f".c{store.TMP_MARK}123-dead"
    stale.mkdir()
    (tmp_path / ".other.tmp-1").mkdir()
    store.remove_stale_tmp(dest)
    assert sorted(os.listdir(tmp_path)) == [".other.tmp-1"]

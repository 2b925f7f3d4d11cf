"""Output folders (runtime/files.py): what exists and is not a previous output is refused, a
replaced output never takes anything else with it, and its path never goes missing. Real folders,
real renames; torch-free."""
import json
import os
import subprocess
import sys
import threading

import pytest

from runtime.bundle import bundle_file_names
from runtime.errors import PathError, UserError
from runtime.files import check_output_dir, exchange_paths, replace_dir, staging_dir


def _bundle(folder, tag="a", extra=()):
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_text(tag)
    files = {"onnx": {"name": "model.onnx", "size": len(tag), "sha256": "0" * 64}}
    (folder / "manifest.json").write_text(json.dumps({"files": files}))
    for name in extra:
        (folder / name).write_text("x")
    return folder


def _publish(target, tag):
    with staging_dir(target) as staging:
        _bundle(staging / "b", tag)  # written as a real build does: complete, then published
        for f in (staging / "b").iterdir():
            f.rename(staging / f.name)
        (staging / "b").rmdir()
        replace_dir(staging, target)


def test_what_is_not_a_previous_output_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(PathError, match="is a file"):
        check_output_dir(tmp_path / "file", "bundle", bundle_file_names)
    other = tmp_path / "engines"
    _bundle(other / "sibling")
    (other / "notes.txt").write_text("mine")
    with pytest.raises(PathError, match="not a bundle"):  # a folder of bundles is not a bundle
        check_output_dir(other, "bundle", bundle_file_names)
    _bundle(tmp_path / "b", extra=["notes.txt"])
    with pytest.raises(PathError, match="also holds notes.txt"):
        check_output_dir(tmp_path / "b", "bundle", bundle_file_names)
    assert isinstance(PathError("x"), UserError) and isinstance(PathError("x"), FileNotFoundError)
    # a previous bundle (with its precision report) may be replaced; a new path is fine
    _bundle(tmp_path / "ok", extra=["precision_report.json"])
    assert check_output_dir(tmp_path / "ok", "bundle", bundle_file_names) == tmp_path / "ok"
    assert check_output_dir(tmp_path / "new", "bundle", bundle_file_names) == tmp_path / "new"


def test_a_link_to_a_bundle_keeps_pointing_at_the_new_one(tmp_path):
    real = _bundle(tmp_path / "real", "old")
    link = tmp_path / "link"
    link.symlink_to(real)
    target = check_output_dir(link, "bundle", bundle_file_names)
    assert target == real
    _publish(target, "new")
    assert link.is_symlink() and (link / "model.onnx").read_text() == "new"


def test_replacing_keeps_siblings_and_leaves_no_staging(tmp_path):
    engines = tmp_path / "engines"
    _bundle(engines / "a", "old")
    _bundle(engines / "b", "other")
    (engines / "notes.txt").write_text("mine")
    _publish(engines / "a", "new")
    assert (engines / "a" / "model.onnx").read_text() == "new"
    assert (engines / "b" / "model.onnx").read_text() == "other" and (engines / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in engines.iterdir()) == ["a", "b", "notes.txt"]


def test_a_failed_write_leaves_the_previous_output(tmp_path):
    target = _bundle(tmp_path / "a", "old")
    with pytest.raises(RuntimeError, match="build failed"):
        with staging_dir(target) as staging:
            (staging / "model.onnx").write_text("half")
            raise RuntimeError("build failed")
    assert (target / "model.onnx").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="atomic exchange is Linux's renameat2")
def test_the_path_never_goes_missing_while_it_is_replaced(tmp_path):
    """A reader polling the output's path all along always finds a complete folder there. (A reader
    that opened the old folder may see it emptied after the swap: bundles are verified by hash on
    load, so such a reader refuses rather than mixes.)"""
    target = _bundle(tmp_path / "a", "v0")
    (tmp_path / "x").mkdir()
    assert exchange_paths(tmp_path / "x", target)  # supported on this file system
    assert exchange_paths(tmp_path / "x", target) and (target / "model.onnx").read_text() == "v0"
    (tmp_path / "x").rmdir()
    stop, seen = threading.Event(), {"missing": 0, "reads": 0}

    def reader():
        while not stop.is_set():
            if not (os.path.isfile(target / "manifest.json") and os.path.isfile(target / "model.onnx")):
                seen["missing"] += 1
            seen["reads"] += 1
    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(200):
            _publish(target, f"v{i + 1}")
    finally:
        stop.set()
        t.join()
    assert seen["reads"] > 100 and seen["missing"] == 0
    assert (target / "model.onnx").read_text() == "v200"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_staging_folders_of_killed_writers_are_removed(tmp_path):
    target = tmp_path / "a"
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f".a.partial-{proc.stdout.strip()}-0000"
    dead.mkdir()
    alive = tmp_path / f".a.partial-{os.getppid()}-0000"  # a writer still running is left alone
    alive.mkdir()
    umask = os.umask(0)
    os.umask(umask)
    with staging_dir(target) as staging:  # the mode a plain mkdir gives, as the published folder should have
        assert staging.is_dir() and staging.stat().st_mode & 0o777 == 0o777 & ~umask
    assert not dead.exists() and alive.exists() and not staging.exists()

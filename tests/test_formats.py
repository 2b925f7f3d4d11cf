"""``python -m runtime encode --format hloc``: the file is read the way hloc reads it
(``hloc/pairs_from_retrieval.py`` and ``hloc/utils/io.py:list_h5_names``: names from visiting the
datasets, descriptors from ``file[name]['global_descriptor']``), on real images, without torch."""
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from runtime.errors import PathError
from runtime.formats import FormatError, HlocWriter, save_hloc
from test_bundle import make_bundle

ROOT = Path(__file__).resolve().parents[1]
CORRIDOR = ROOT / "data" / "vprbench_corridor"


def run(*args, env_code: str = ""):
    code = env_code + "import sys, runtime.cli; sys.exit(runtime.cli.main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, capture_output=True, text=True)


def read_like_hloc(path: Path):
    """hloc's reading, in its order: the names, then each name's descriptor as float."""
    h5py = pytest.importorskip("h5py")
    with h5py.File(str(path), "r") as hfile:
        names = []
        hfile.visititems(
            lambda _, obj: names.append(obj.parent.name.strip("/")) if isinstance(obj, h5py.Dataset) else None)
        names = list(set(names))
        desc = {n: hfile[n]["global_descriptor"].__array__().astype(np.float32) for n in names}
    return desc


@pytest.fixture
def images(tmp_path):
    """Real images in nested folders (names with '/'), and one that is not an image."""
    root = tmp_path / "imgs"
    for sub, part in (("db/north", "database"), ("queries", "queries")):
        (root / sub).mkdir(parents=True)
        for f in sorted((CORRIDOR / part).iterdir())[:4]:
            shutil.copy(f, root / sub / f.name)
    return root


def test_hloc_file_holds_every_image_by_relative_name_equal_to_npy(images, tmp_path):
    pytest.importorskip("h5py")
    bundle = make_bundle(tmp_path / "b")
    h5 = tmp_path / "out" / "global-feats.h5"
    proc = run("encode", "--bundle", bundle, "--images", images, "--output", h5, "--format", "hloc", "--quiet")
    assert proc.returncode == 0, proc.stderr
    proc = run("encode", "--bundle", bundle, "--images", images, "--output", tmp_path / "d.npy", "--quiet")
    assert proc.returncode == 0, proc.stderr
    names = (tmp_path / "d.txt").read_text().split()
    npy = np.load(tmp_path / "d.npy")
    desc = read_like_hloc(h5)
    assert sorted(desc) == sorted(names) and len(names) == 8
    assert "db/north/0000000.jpg" in desc and "queries/0000003.jpg" in desc
    for i, n in enumerate(names):
        assert desc[n].shape == (3,) and np.array_equal(desc[n], npy[i])
    # pairs_from_retrieval's computation on it: queries by prefix, database by prefix, top 1
    q = sorted(n for n in desc if n.startswith("queries"))
    db = sorted(n for n in desc if n.startswith("db"))
    sim = np.stack([desc[n] for n in q]) @ np.stack([desc[n] for n in db]).T
    assert sim.shape == (4, 4) and np.isfinite(sim).all()
    assert not list(h5.parent.glob(".*.tmp"))  # no temporary file left behind



def test_hlocs_own_pairs_from_retrieval_reads_it(images, tmp_path):
    """Where hloc is installed (it is not on PyPI: pip install from its repository), its own
    retrieval pairs come from our file."""
    pairs_from_retrieval = pytest.importorskip("hloc.pairs_from_retrieval")
    bundle = make_bundle(tmp_path / "b")
    h5 = tmp_path / "global-feats.h5"
    proc = run("encode", "--bundle", bundle, "--images", images, "--output", h5, "--format", "hloc", "--quiet")
    assert proc.returncode == 0, proc.stderr
    pairs_from_retrieval.main(h5, tmp_path / "pairs.txt", num_matched=2, db_prefix="db/", query_prefix="queries/")
    pairs = [line.split() for line in (tmp_path / "pairs.txt").read_text().splitlines()]
    assert len(pairs) == 8 and {q for q, _ in pairs} == {f"queries/{i:07d}.jpg" for i in range(4)}
    assert all(d.startswith("db/north/") for _, d in pairs)

def test_list_files_and_globs_name_images_from_their_root(images, tmp_path):
    pytest.importorskip("h5py")
    bundle = make_bundle(tmp_path / "b")
    (images / "list.txt").write_text("queries/0000001.jpg\ndb/north/0000002.jpg\n")
    for spec, expected in ((images / "list.txt", {"queries/0000001.jpg", "db/north/0000002.jpg"}),
                           (f"{images}/db/**/*.jpg", {f"north/{i:07d}.jpg" for i in range(4)})):
        out = tmp_path / "g.h5"
        proc = run("encode", "--bundle", bundle, "--images", spec, "--output", out, "--format", "hloc", "--quiet")
        assert proc.returncode == 0, proc.stderr
        assert set(read_like_hloc(out)) == expected


def test_nothing_is_written_when_nothing_is_encoded_and_errors_are_one_line(images, tmp_path):
    pytest.importorskip("h5py")
    bundle = make_bundle(tmp_path / "b")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jpg").write_bytes(b"no image")
    out = tmp_path / "o" / "g.h5"
    proc = run("encode", "--bundle", bundle, "--images", bad, "--output", out, "--format", "hloc", "--quiet")
    assert proc.returncode == 1 and "x.jpg" in proc.stderr and "nothing written" in proc.stderr
    assert not out.exists() and not list(out.parent.glob("*"))
    proc = run("encode", "--bundle", bundle, "--images", images, "--output", out, "--format", "hloc", "--save-local")
    assert proc.returncode == 2 and proc.stderr.startswith("error: --save-local") and "Traceback" not in proc.stderr


def test_without_h5py_the_error_says_what_to_install(images, tmp_path):
    block = ("import importlib.abc, sys\n"
             "class B(importlib.abc.MetaPathFinder):\n"
             "    def find_spec(self, name, path=None, target=None):\n"
             "        if name.split('.')[0] == 'h5py': raise ImportError('no h5py')\n"
             "sys.meta_path.insert(0, B())\n")
    proc = run("encode", "--bundle", make_bundle(tmp_path / "b"), "--images", images, "--output", tmp_path / "g.h5",
               "--format", "hloc", env_code=block)
    assert proc.returncode == 2 and "needs h5py: pip install 'vpr-edge[hloc]'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "g.h5").exists()


def test_save_hloc_refuses_names_outside_the_root_and_leaves_nothing(tmp_path):
    pytest.importorskip("h5py")
    d = np.eye(2, dtype=np.float32)
    for name in ("/abs/x.jpg", "../x.jpg", "a//b.jpg"):
        with pytest.raises(FormatError, match="not a path under the image root"):
            save_hloc(tmp_path / "g.h5", ["ok.jpg", name], d)
    assert not list(tmp_path.iterdir())
    save_hloc(tmp_path / "g.h5", ["a.jpg", "b/c.jpg"], d)
    assert {k: v.tolist() for k, v in read_like_hloc(tmp_path / "g.h5").items()} == {"a.jpg": [1, 0], "b/c.jpg": [0, 1]}
    with pytest.raises(ValueError, match="2 names for 1 descriptors"), HlocWriter(tmp_path / "h.h5") as w:
        w.append(["a", "b"], d[:1])

    # an existing file is replaced whole; a folder or a path under a file is refused, naming it
    save_hloc(tmp_path / "g.h5", ["z.jpg"], d[1:])
    assert {k: v.tolist() for k, v in read_like_hloc(tmp_path / "g.h5").items()} == {"z.jpg": [0, 1]}
    (tmp_path / "folder").mkdir()
    for bad, words in ((tmp_path / "folder", "is a folder"), (tmp_path / "g.h5" / "x.h5", "a file is in the way")):
        with pytest.raises(PathError, match=words) as caught:
            save_hloc(bad, ["a.jpg"], d[:1])
        assert str(bad) in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "g.h5"]

"""integrations/rtabmap/vpr_edge_rtabmap.py called as RTAB-Map's PyDescriptor calls it: in Python
(the script's folder on sys.path, imported by name, ``init(int)``, ``extract`` of the frame's bytes
as a signed int8 (rows, cols, channels) BGR array), and from C through the same Python and numpy
C API calls (tests/fixtures/pydescriptor_host.c). No torch; also run on Python 3.10."""
import importlib
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from runtime.inputs import to_rgb
from test_bundle import make_bundle

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_DIR = ROOT / "integrations" / "rtabmap"
FRAME = ROOT / "data" / "vprbench_corridor" / "queries" / "0000007.jpg"
HOST = Path(__file__).parent / "fixtures" / "pydescriptor_host.c"


def as_rtabmap_passes(bgr: np.ndarray) -> np.ndarray:
    """A cv::Mat's bytes wrapped as NPY_BYTE, (rows, cols, channels), without a copy."""
    h, w = bgr.shape[:2]
    return np.frombuffer(bytearray(np.ascontiguousarray(bgr).tobytes()), dtype=np.int8).reshape(h, w, -1)


def bgr_frame(path: Path = FRAME) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(to_rgb(path))[:, :, ::-1])


@pytest.fixture
def bundle(tmp_path):
    return make_bundle(tmp_path / "b")


@pytest.fixture
def plugin(monkeypatch, bundle):
    """The script imported as RTAB-Map imports it, fresh, with VPR_EDGE_BUNDLE set."""
    monkeypatch.setenv("VPR_EDGE_BUNDLE", str(bundle))
    monkeypatch.setattr(sys, "path", sys.path + [str(PLUGIN_DIR)])
    sys.modules.pop("vpr_edge_rtabmap", None)
    module = importlib.import_module("vpr_edge_rtabmap")
    yield module
    if module._encoder is not None:
        module._encoder.close()
    sys.modules.pop("vpr_edge_rtabmap", None)


def runtime_encode(bundle: Path, image: Path, tmp_path: Path) -> np.ndarray:
    listing = tmp_path / "one.txt"
    listing.write_text(f"{image}\n")
    proc = subprocess.run([sys.executable, "-m", "runtime", "encode", "--bundle", str(bundle), "--images", str(listing),
                           "--output", str(tmp_path / "one.npy"), "--quiet"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return np.load(tmp_path / "one.npy")


def test_extract_of_rtabmaps_int8_bgr_frame_equals_runtime_encode(plugin, bundle, tmp_path, capsys):
    bgr = bgr_frame()
    frame = as_rtabmap_passes(bgr)
    assert frame.dtype == np.int8 and (bgr > 127).any() and (frame < 0).any()  # the case a signed read gets wrong
    assert plugin.init(3) is None
    got = plugin.extract(frame)
    assert type(got) is np.ndarray and got.dtype == np.float32 and got.shape == (1, 3) and got.flags.c_contiguous
    expected = runtime_encode(bundle, FRAME, tmp_path)
    assert np.abs(got - expected).max() <= 1e-6
    # read as signed pixels (the bug) or as RGB (no conversion) the frame gives another descriptor
    wrong = plugin._encoder.encode(np.clip(frame.astype(np.int16), 0, 255).astype(np.uint8), bgr=True)
    assert np.abs(wrong - expected).max() > 1e-3
    assert np.abs(plugin._encoder.encode(bgr) - expected).max() > 1e-3
    assert capsys.readouterr().err == ""


def test_grey_and_bgra_frames(plugin, bundle):
    plugin.init(3)
    bgr = bgr_frame()
    grey = np.asarray(to_rgb(FRAME).convert("L"))
    from_grey = plugin.extract(as_rtabmap_passes(grey[:, :, None]))
    assert np.abs(from_grey - plugin._encoder.encode(grey)).max() <= 1e-6
    bgra = np.dstack([bgr, np.full(bgr.shape[:2], 255, np.uint8)])
    assert np.abs(plugin.extract(as_rtabmap_passes(bgra)) - plugin.extract(as_rtabmap_passes(bgr))).max() <= 1e-6


def test_a_dimension_mismatch_names_both_and_never_raises(plugin, capsys):
    assert plugin.init(4096) is None  # an exception here would crash RTAB-Map
    err = capsys.readouterr().err
    assert "PyDescriptor/Dim is 4096 but the bundle" in err and "gives 3-D descriptors: set PyDescriptor/Dim 3" in err
    for _ in range(12):
        out = plugin.extract(as_rtabmap_passes(bgr_frame()))
        assert out.shape == (1, 4096) and out.dtype == np.float32 and not out.any()
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "no descriptor: PyDescriptor/Dim is 4096" in err[0] and "(10 times)" in err[1]
    plugin.init(3)  # RTAB-Map reloading its parameters: a second init recovers
    assert plugin.extract(as_rtabmap_passes(bgr_frame())).any()


def test_without_a_bundle_or_with_a_broken_one_init_says_so(plugin, monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("VPR_EDGE_BUNDLE")
    plugin.init(3)
    assert "VPR_EDGE_BUNDLE is not set" in capsys.readouterr().err
    assert not plugin.extract(as_rtabmap_passes(bgr_frame())).any()
    monkeypatch.setenv("VPR_EDGE_BUNDLE", str(tmp_path / "nowhere"))
    plugin.init(3)
    assert "no such bundle directory" in capsys.readouterr().err
    monkeypatch.setenv("VPR_EDGE_BUNDLE", str(tmp_path / "b"))
    monkeypatch.setenv("VPR_EDGE_THREADS", "many")
    plugin.init(3)
    assert "VPR_EDGE_THREADS=many: expected a number" in capsys.readouterr().err


@pytest.mark.parametrize("frame", [np.zeros((8, 8, 2), np.int8), np.zeros((0, 0, 3), np.int8),
                                   np.full((4, 4, 3), 200.0), None, "not an image"])
def test_a_frame_it_cannot_encode_gets_a_zero_descriptor_and_a_report(plugin, capsys, frame):
    plugin.init(3)
    out = plugin.extract(frame)
    assert out.shape == (1, 3) and out.dtype == np.float32 and not out.any() and out.flags.c_contiguous
    assert "cannot encode this frame" in capsys.readouterr().err
    assert plugin.extract(as_rtabmap_passes(bgr_frame())).any()  # the next frame is encoded


def test_the_settings_line_for_a_bundle(bundle):
    proc = subprocess.run([sys.executable, str(PLUGIN_DIR / "vpr_edge_rtabmap.py"), str(FRAME)], cwd=ROOT,
                          capture_output=True, text=True, env={**_env(), "VPR_EDGE_BUNDLE": str(bundle)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == (
        "--Mem/GlobalDescriptorStrategy 1 --Kp/TfIdfLikelihoodUsed false --Mem/RehearsalSimilarity 1 "
        f"--PyDescriptor/Dim 3 --PyDescriptor/Path {PLUGIN_DIR / 'vpr_edge_rtabmap.py'}")
    assert "descriptor (1, 3) float32, norm 1.000000" in proc.stdout
    for env, words in (({}, "error: set VPR_EDGE_BUNDLE"), ({"VPR_EDGE_BUNDLE": str(FRAME)}, f"error: {FRAME}")):
        proc = subprocess.run([sys.executable, str(PLUGIN_DIR / "vpr_edge_rtabmap.py")], cwd=ROOT,
                              capture_output=True, text=True, env={**_env(), **env})
        assert proc.returncode == 2 and proc.stderr.startswith(words), proc.stderr
        assert len(proc.stderr.splitlines()) == 1 and not proc.stdout


def _env() -> dict:
    import os
    return {k: v for k, v in os.environ.items() if k != "VPR_EDGE_BUNDLE"}


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    """The C host, compiled against this Python and numpy (skipped where a compiler, Python's
    headers or its shared library are missing)."""
    include, libdir = sysconfig.get_paths()["include"], sysconfig.get_config_var("LIBDIR")
    if not shutil.which("gcc") or not (Path(include) / "Python.h").is_file() \
            or not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        pytest.skip("needs gcc, Python.h and a shared libpython to embed Python as RTAB-Map does")
    exe = tmp_path_factory.mktemp("host") / "pydescriptor_host"
    proc = subprocess.run(["gcc", str(HOST), "-o", str(exe), f"-I{include}", f"-I{np.get_include()}", f"-L{libdir}",
                           f"-lpython{sysconfig.get_config_var('LDVERSION')}", f"-Wl,-rpath,{libdir}"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return exe


def run_host(host: Path, bundle: Path, dim: int, bgr: np.ndarray, tmp_path: Path):
    raw, out = tmp_path / "frame.raw", tmp_path / "descriptor.f32"
    raw.write_bytes(np.ascontiguousarray(bgr).tobytes())
    h, w = bgr.shape[:2]
    paths = [str(ROOT)] + site.getsitepackages()  # the embedded interpreter finds this environment's packages
    env = {**_env(), "VPR_EDGE_BUNDLE": str(bundle), "PYTHONPATH": ":".join(paths)}
    args = [PLUGIN_DIR, "vpr_edge_rtabmap", dim, raw, h, w, bgr.shape[2] if bgr.ndim == 3 else 1, out]
    proc = subprocess.run([str(host), *map(str, args)], capture_output=True, text=True, env=env)
    return proc, (np.fromfile(out, dtype=np.float32) if out.exists() else None)


def test_from_c_as_pydescriptor_cpp_calls_it(host, bundle, tmp_path):
    proc, got = run_host(host, bundle, 3, bgr_frame(), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert np.abs(got - runtime_encode(bundle, FRAME, tmp_path)[0]).max() <= 1e-6
    # a wrong PyDescriptor/Dim: init returns normally, extract gives a zero descriptor of that size
    proc, got = run_host(host, bundle, 16, bgr_frame(), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert got.shape == (16,) and not got.any() and "PyDescriptor/Dim is 16 but the bundle" in proc.stderr

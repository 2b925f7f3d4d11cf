"""Every command line meets the ordinary mistakes the same way: one line ``error: ...`` that names
the path or option, exit code 2, no traceback (runtime/cli_util.py). Real processes, real files;
the unreachable checkpoint URL is a closed local port."""
import subprocess
import sys

import pytest
from PIL import Image

from reference import DATA, ROOT
from runtime.trt_env import tensorrt_usable

QUERIES = DATA / "vprbench_corridor" / "queries"
CLOSED_URL = "https://127.0.0.1:1/dino_salad.ckpt"  # nothing listens on port 1: connection refused

# (command, arguments, what the error line must mention[, the per-file reports before it]). Placeholders: {missing} a path that
# does not exist, {file} a regular file, {empty} an empty folder, {bundle} a real small bundle,
# {nonbundle} a folder holding other things, {tmp} a scratch folder.
RUNTIME = ["-m", "runtime"]
CALIB = ["-m", "calibration"]
ENCODE = ["-m", "export.encode"]
BUILD = [str(ROOT / "export" / "build_engine.py")]
GEM = ["--model", "gem-dinov2-vits14", "--random-weights", "--depth", "1", "--image-size", "56"]
CASES = {
    "runtime encode: missing bundle": (RUNTIME, ["encode", "--bundle", "{missing}", "--images", QUERIES,
                                                 "--output", "{tmp}/x.npy"], "{missing}"),
    "runtime encode: file as bundle": (RUNTIME, ["encode", "--bundle", "{file}", "--images", QUERIES,
                                                 "--output", "{tmp}/x.npy"], "{file}"),
    "runtime encode: empty folder as bundle": (RUNTIME, ["encode", "--bundle", "{empty}", "--images", QUERIES,
                                                         "--output", "{tmp}/x.npy"], "not a bundle"),
    "runtime encode: missing images": (RUNTIME, ["encode", "--bundle", "{bundle}", "--images", "{missing}",
                                                 "--output", "{tmp}/x.npy"], "{missing}"),
    "runtime encode: file as images folder": (RUNTIME, ["encode", "--bundle", "{bundle}", "--images", "{file}",
                                                        "--output", "{tmp}/x.npy"], "not a folder"),
    "runtime encode: empty images folder": (RUNTIME, ["encode", "--bundle", "{bundle}", "--images", "{empty}",
                                                      "--output", "{tmp}/x.npy"], "no images found"),
    "runtime encode: output under a file": (RUNTIME, ["encode", "--bundle", "{bundle}", "--images", QUERIES,
                                                      "--output", "{file}/x.npy", "--quiet"], "a file is in the way"),
    "runtime encode: no --bundle": (RUNTIME, ["encode", "--images", QUERIES, "--output", "{tmp}/x.npy"], "--bundle"),
    "runtime map info: missing map": (RUNTIME, ["map", "info", "--map", "{missing}"], "{missing}"),
    "runtime map info: file as map": (RUNTIME, ["map", "info", "--map", "{file}"], "not a map"),
    "runtime localize: missing source": (RUNTIME, ["localize", "--bundle", "{bundle}", "--map", "{map}",
                                                   "--source", "{missing}"], "{missing}"),
    "runtime evaluate: empty dataset folder": (RUNTIME, ["evaluate", "--bundle", "{bundle}", "--dataset", "{empty}"],
                                               "{empty}"),
    "runtime evaluate: no readable database image": (RUNTIME, ["evaluate", "--bundle", "{bundle}", "--dataset",
                                                               "{broken_dataset}", "--quiet"], "database images",
                                                     ["{broken_dataset}/database/a.jpg: empty file"]),
    "runtime profile: batches outside the profile": (RUNTIME, ["profile", "--bundle", "{bundle}", "--batch", "16,32",
                                                               "--output", "{tmp}/p"], "outside the bundle's profile"),
    "runtime profile: empty images folder": (RUNTIME, ["profile", "--bundle", "{bundle}", "--batch", "1,2", "--images", "{empty}",
                                                       "--output", "{tmp}/p"], "no images found"),
    "calibration sample: missing bundle": (CALIB, ["sample", "--bundle", "{missing}", "--images", QUERIES,
                                                   "--output", "{tmp}/c.npy"], "{missing}"),
    "calibration sample: empty images folder": (CALIB, ["sample", "--bundle", "{bundle}", "--images", "{empty}",
                                                        "--output", "{tmp}/c.npy"], "no images"),
    "calibration quantize: file as output": (CALIB, ["quantize", "--bundle", "{bundle}", "--calibration-images",
                                                     QUERIES, "--count", "500", "--output", "{file}"], "{file}"),
    "calibration quantize: folder of other things as output": (
        CALIB, ["quantize", "--bundle", "{bundle}", "--calibration-images", QUERIES, "--output", "{nonbundle}"],
        "not a bundle"),
    "calibration report: missing dataset": (CALIB, ["report", "--bundle", "{bundle}", "--dataset", "{missing}"],
                                            "{missing}"),
    "export.encode: unreachable checkpoint URL": (ENCODE, GEM[:2] + ["--checkpoint", CLOSED_URL, "--images", QUERIES,
                                                                     "--output", "{tmp}/x.npy"], "download failed"),
    "export.encode: missing checkpoint": (ENCODE, GEM[:2] + ["--checkpoint", "{missing}", "--images", QUERIES,
                                                             "--output", "{tmp}/x.npy"], "{missing}"),
    "export.encode: file as images folder": (ENCODE, GEM + ["--images", "{file}", "--output", "{tmp}/x.npy"], "{file}"),
    "export.encode: empty images folder": (ENCODE, GEM + ["--images", "{empty}", "--output", "{tmp}/x.npy"],
                                           "no images found"),
    "build_engine: unreachable checkpoint URL": (BUILD, GEM[:2] + ["--checkpoint", CLOSED_URL, "--backend",
                                                                   "onnxruntime", "--output", "{tmp}/b"], "download failed"),
    "build_engine: image file as checkpoint": (BUILD, GEM[:2] + ["--checkpoint", "{file}", "--backend", "onnxruntime",
                                                                 "--output", "{tmp}/b"], "{file}"),
    "build_engine: missing source bundle": (BUILD, ["--from-bundle", "{missing}", "--backend", "onnxruntime"],
                                            "{missing}"),
    "build_engine: file as source bundle": (BUILD, ["--from-bundle", "{file}", "--backend", "onnxruntime",
                                                    "--output", "{tmp}/b"], "{file}"),
    "build_engine: output is a file": (BUILD, GEM + ["--backend", "onnxruntime", "--output", "{file}"], "{file}"),
    "build_engine: output holds other things": (BUILD, GEM + ["--backend", "onnxruntime", "--output", "{nonbundle}"],
                                                "not a bundle"),
    "build_engine: empty calibration folder": (BUILD, GEM + ["--precision", "int8", "--calibration-images", "{empty}",
                                                             "--output", "{tmp}/b"], "{empty}"),
    "build_engine: bad batch profile": (BUILD, GEM + ["--batch", "8:2:4", "--output", "{tmp}/b"], "MIN <= OPT <= MAX"),
    "benchmarks/loop.py: missing bundle": ([str(ROOT / "benchmarks" / "loop.py")], ["--bundle", "{missing}"],
                                           "{missing}"),
}


def _has_cuda_provider() -> bool:
    import onnxruntime as ort
    return "CUDAExecutionProvider" in ort.get_available_providers()


if not _has_cuda_provider():
    CASES["runtime encode: --device cuda without the CUDA provider"] = (
        RUNTIME, ["encode", "--bundle", "{bundle}", "--images", QUERIES, "--output", "{tmp}/x.npy", "--device", "cuda"],
        "--device cuda")


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    """The paths the placeholders stand for."""
    pytest.importorskip("torch")  # the small bundle is exported here
    root = tmp_path_factory.mktemp("mistakes")
    bundle = root / "bundle"
    proc = subprocess.run([sys.executable, *BUILD, *GEM, "--precision", "fp32", "--backend", "onnxruntime",
                           "--batch", "1:2:4", "--skip-parity", "--output", str(bundle)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    place_map = root / "map"
    proc = subprocess.run([sys.executable, "-m", "runtime", "map", "build", "--bundle", str(bundle), "--images",
                           str(QUERIES), "--output", str(place_map), "--quiet"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    (root / "empty").mkdir()
    Image.new("RGB", (8, 8)).save(root / "image.png")
    other = root / "nonbundle"
    other.mkdir()
    (other / "notes.txt").write_text("not a bundle")
    broken = root / "broken_dataset"
    for sub in ("database", "queries"):
        (broken / sub).mkdir(parents=True)
    (broken / "database" / "a.jpg").write_bytes(b"")
    Image.new("RGB", (8, 8)).save(broken / "queries" / "q.png")
    (broken / "ground_truth.json").write_text('{"positives": {"q.png": ["a.jpg"]}}')
    (root / "scratch").mkdir()
    return {"missing": root / "nope", "file": root / "image.png", "empty": root / "empty", "bundle": bundle,
            "map": place_map, "nonbundle": other, "broken_dataset": broken, "tmp": root / "scratch"}


@pytest.mark.parametrize("case", list(CASES))
def test_an_ordinary_mistake_is_one_line_and_exit_2(places, case):
    command, args, mention, *reports = CASES[case]
    fill = {k: str(v) for k, v in places.items()}
    argv = [str(a).format(**fill) for a in args]
    proc = subprocess.run([sys.executable, *command, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("[build] ")]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 2, proc.stderr
    expected_reports = [f"error: {r.format(**fill)}" for r in (reports[0] if reports else [])]
    assert lines[:-1] == expected_reports, proc.stderr  # nothing but the files that failed, then the error
    assert lines[-1].startswith("error: ") and mention.format(**fill) in lines[-1], proc.stderr
    assert places["nonbundle"].joinpath("notes.txt").is_file()  # nothing was replaced


def test_a_bug_keeps_its_traceback(tmp_path):
    """Only UserError is caught: anything else is a bug and must show where it happened."""
    code = ("from runtime.cli_util import run_cli\n"
            "def body():\n    raise ValueError('a bug')\n"
            "raise SystemExit(run_cli(body))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ValueError: a bug" in proc.stderr


@pytest.mark.skipif(tensorrt_usable(), reason="on a GPU machine with TensorRT the check runs for real")
def test_gpu_check_without_a_gpu_says_so_in_one_line():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py")], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: needs TensorRT")
    assert len(proc.stderr.strip().splitlines()) == 1

"""Property-based tests: decoding never crashes on arbitrary bytes or odd images, and manifest /
map-metadata parsing answers malformed input with its own error only."""
import io
import json
import string

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from runtime.bundle import BundleError, load_bundle
from runtime.encoder import decode
from runtime.maps import MapError, load_map
from runtime.preprocess import Preprocessing

PRE = {m: Preprocessing(size=(28, 28), resize=m) for m in ("pil_bilinear", "tensor_bilinear")}
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(data=st.binary(max_size=2048), suffix=st.sampled_from([".jpg", ".png", ".bmp", ".webp"]))
def test_arbitrary_bytes_decode_to_an_array_or_a_reason(tmp_path, data, suffix):
    path = tmp_path / f"x{suffix}"
    path.write_bytes(data)
    d = decode(path, PRE["pil_bilinear"])
    assert (d.image is None) != (d.error is None)
    if d.error is not None:
        assert isinstance(d.error, str) and d.error and "\n" not in d.error


@SETTINGS
@given(mode=st.sampled_from(["1", "L", "P", "RGB", "RGBA", "CMYK", "LA", "I;16", "I", "F"]),
       w=st.integers(1, 40), h=st.integers(1, 40), fmt=st.sampled_from(["PNG", "TIFF", "BMP"]),
       resize=st.sampled_from(sorted(PRE)), seed=st.integers(0, 2 ** 16))
def test_any_image_mode_and_size_becomes_a_finite_model_input(tmp_path, mode, w, h, fmt, resize, seed):
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    try:
        img.save(buf, format=fmt)
    except (OSError, ValueError, KeyError):
        return  # Pillow cannot write this mode in this format: nothing to decode
    path = tmp_path / f"img.{fmt.lower()}"
    path.write_bytes(buf.getvalue())
    d = decode(path, PRE[resize])
    assert d.error is None, d.error
    assert d.image.shape == (3, 28, 28) and d.image.dtype == np.float32 and np.isfinite(d.image).all()


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                           max_leaves=12)


@SETTINGS
@given(doc=st.one_of(json_values, st.fixed_dictionaries(
    {"format_version": st.sampled_from([1, 2, "1"]), "model": json_values, "preprocessing": json_values,
     "precision": st.sampled_from(["fp32", "fp8", 3]), "backend": st.sampled_from(["onnxruntime", "x"]),
     "inputs": json_values, "outputs": json_values, "batch": json_values, "files": json_values,
     "weights": json_values, "build": json_values})), raw=st.text(alphabet=string.printable, max_size=40))
def test_manifest_parsing_fails_only_with_bundle_errors(tmp_path, doc, raw):
    for text in (json.dumps(doc), raw):
        (tmp_path / "manifest.json").write_text(text)
        try:
            load_bundle(tmp_path)
        except BundleError:
            pass


@SETTINGS
@given(doc=st.one_of(json_values, st.fixed_dictionaries(
    {"format_version": st.just(2), "dim": json_values, "store_dtype": st.sampled_from(["float16", "x", None]),
     "bundle": json_values, "index": json_values, "metadata": json_values,
     "segments": st.one_of(json_values, st.lists(st.fixed_dictionaries(
         {"name": st.sampled_from(["s000001", "../x", 3]), "count": json_values, "files": json_values,
          "local_shape": json_values}), max_size=2))})),
       current=st.text(alphabet=string.ascii_letters + string.digits, min_size=1, max_size=8))
def test_map_metadata_parsing_fails_only_with_map_errors(tmp_path, doc, current):
    (tmp_path / "versions").mkdir(exist_ok=True)
    (tmp_path / "CURRENT").write_text("v000001" if current.startswith(("a", "b", "c", "d", "e")) else current)
    (tmp_path / "versions" / "v000001.json").write_text(json.dumps(doc))
    try:
        load_map(tmp_path)
    except MapError:
        pass

"""Our numpy preprocessing equals the official pipelines (PIL / torch reimplementations) on the
real images of data/, and handles orientation and odd modes."""
import numpy as np
import pytest
from PIL import Image

from reference import DATA
from runtime.preprocess import Preprocessing, list_images, load_rgb, preprocess_file, preprocess_image

FILES = list_images(DATA / "vprbench_corridor" / "queries")[:8] + list_images(DATA / "nordland_summer_winter_64x32" / "queries")[:8]


def _pil_reference(path, size):
    img = Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR)
    x = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0
    mean = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
    std = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]
    return (x - mean) / std


@pytest.mark.parametrize("size", [224, 322])
def test_pil_bilinear_equals_official_salad_transform(size):
    pre = Preprocessing(size=(size, size), resize="pil_bilinear")
    for f in FILES:
        np.testing.assert_array_equal(preprocess_file(f, pre), _pil_reference(f, size))


def test_tensor_bilinear_equals_torch_interpolate_without_antialias():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    pre = Preprocessing(size=(224, 224), resize="tensor_bilinear")
    big = Image.new("RGB", (300, 170))
    big.putdata([((i * 7) % 256, (i * 13) % 256, (i * 29) % 256) for i in range(300 * 170)])
    for img in [load_rgb(f) for f in FILES] + [big]:
        x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float().div(255)
        x = (x - torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
        ref = F.interpolate(x[None], size=[224, 224], mode="bilinear", align_corners=False, antialias=False)[0]
        assert np.abs(preprocess_image(img, pre) - ref.numpy()).max() <= 1e-6


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif.tobytes(), quality=95)
    out = load_rgb(path)
    assert out.size == (20, 40)
    top = np.asarray(out)[2, 10]
    assert top[2] > 200 and top[0] < 60  # the blue half is on top after rotation


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P"])
def test_non_rgb_modes_become_rgb(tmp_path, mode):
    path = tmp_path / f"img_{mode}.png" if mode != "CMYK" else tmp_path / "img.jpg"
    Image.new(mode, (30, 20)).save(path)
    x = preprocess_file(path, Preprocessing(size=(28, 28)))
    assert x.shape == (3, 28, 28) and x.dtype == np.float32


def test_unknown_resize_mode_is_refused():
    with pytest.raises(ValueError, match="unknown resize mode"):
        Preprocessing(size=(224, 224), resize="bicubic")


def _torch_official(img, size, mode, normalise_first, first=None):
    """The official tensor pipelines in torch: MegaLoc (normalise, antialiased bilinear; its own
    rounding resize after the evaluation's) and BoQ (antialiased bicubic on [0, 1], no clamp)."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float().div(255)[None]
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    if normalise_first:
        x = (x - mean) / std
    for s in ([first] if first else []) + [size]:
        x = F.interpolate(x, size=list(s), mode=mode, align_corners=False, antialias=True)
    return (x[0] if normalise_first else (x[0] - mean) / std).numpy()


def _big_image():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (170, 300, 3), dtype=np.uint8))


@pytest.mark.parametrize("size,first", [((322, 322), None), ((126, 154), None), ((238, 322), (240, 320)),
                                        ((98, 70), None)])
def test_antialiased_bilinear_equals_megaloc_pipeline(size, first):
    pre = Preprocessing(size=size, resize="tensor_bilinear_antialias", first_resize=first)
    for img in [load_rgb(f) for f in FILES[::4]] + [_big_image()]:  # up- and down-scales
        assert np.abs(preprocess_image(img, pre) - _torch_official(img, size, "bilinear", True, first)).max() <= 2e-6


@pytest.mark.parametrize("size", [(322, 322), (224, 308), (56, 84)])
def test_antialiased_bicubic_on_unit_range_equals_boq_pipeline(size):
    pre = Preprocessing(size=size, resize="tensor_bicubic_antialias")
    for img in [load_rgb(f) for f in FILES[::4]] + [_big_image()]:
        ours = preprocess_image(img, pre)
        assert np.abs(ours - _torch_official(img, size, "bicubic", False)).max() <= 1e-5
    # the overshoot of the cubic kernel is kept, as the official transform keeps it (no clamp)
    edge = Image.fromarray(np.kron(np.eye(8, dtype=np.uint8) * 255, np.ones((4, 4), np.uint8))).convert("RGB")
    unit = (preprocess_image(edge, pre) * 0.229 + 0.485)[0]
    assert unit.max() > 1.0 and unit.min() < 0.0


def test_first_resize_is_recorded_and_only_for_megaloc_mode():
    pre = Preprocessing(size=(238, 322), resize="tensor_bilinear_antialias", first_resize=(240, 320))
    assert Preprocessing.from_dict(pre.to_dict()) == pre
    assert "first_resize" not in Preprocessing(size=(322, 322)).to_dict()  # older manifests unchanged
    with pytest.raises(ValueError, match="first_resize"):
        Preprocessing(size=(224, 224), resize="tensor_bilinear", first_resize=(230, 230))

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

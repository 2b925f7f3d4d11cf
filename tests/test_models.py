"""Every registry model at reduced depth: shapes, layout and the properties each method promises."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from export.models.cricavpr import split_bounds  # noqa: E402
from export.models.dinov2 import interpolate_pos_embed  # noqa: E402
from export.models.salad import Sinkhorn  # noqa: E402
from export.registry import get_config, list_models  # noqa: E402
from export.zoo import create_model  # noqa: E402


@pytest.mark.parametrize("name", list_models())
def test_registry_model_outputs_match_config(name):
    model, cfg, info = create_model(name, random_weights=True, depth=1)
    assert info["random_weights"]
    x = torch.randn(2, 3, *cfg.image_size)
    with torch.no_grad():
        out = model(x)
    assert set(out) == set(cfg.outputs())
    for key, shape in cfg.outputs().items():
        assert list(out[key].shape) == [2] + shape
    np.testing.assert_allclose(out["descriptor"].norm(dim=-1).numpy(), 1.0, atol=1e-5)


def test_registry_lists_the_documented_models():
    names = set(list_models())
    for n in ["salad-dinov2-vitb14", "selavpr-dinov2-vitl14", "cricavpr-dinov2-vitb14",
              "cricavpr-dinov2-vitb14-independent", "gem-dinov2-vits14", "gem-dinov2-vitg14-reg"]:
        assert n in names
    assert get_config("salad-dinov2-vitb14").outputs() == {"descriptor": [8448]}
    assert get_config("salad-dinov2-vitb14").preprocessing.resize == "pil_bilinear"
    assert get_config("selavpr-dinov2-vitl14").preprocessing.resize == "tensor_bilinear"
    with pytest.raises(ValueError, match="known models"):
        get_config("netvlad")
    with pytest.raises(ValueError, match="multiples of the patch size 14"):
        get_config("salad-dinov2-vitb14", image_size=320)
    with pytest.raises(ValueError, match="224x224 only"):
        get_config("cricavpr-dinov2-vitb14", image_size=322)


def test_salad_at_another_size_derives_sinkhorn_marginals_from_patch_count():
    model, cfg, _ = create_model("salad-dinov2-vitb14", random_weights=True, depth=1, image_size=224)
    assert model.head.sinkhorn.log_b.shape[-1] == 256
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224))["descriptor"].shape == (1, 8448)
    with pytest.raises(ValueError, match="more patches"):
        Sinkhorn(num_clusters=64, num_patches=49)


def test_sinkhorn_is_stable_for_large_scores():
    sk = Sinkhorn(num_clusters=4, num_patches=10, iterations=3)
    scores = torch.randn(2, 4, 10) * 200  # a naive exp/log would overflow
    log_plan = sk(scores, torch.tensor(1.0))
    assert torch.isfinite(log_plan).all()
    np.testing.assert_allclose(log_plan.exp().sum(dim=1).numpy(), 1.0, atol=1e-5)


def test_salad_descriptor_layout_is_token_first_channel_major():
    model, _, _ = create_model("salad-dinov2-vitb14", random_weights=True, depth=1, image_size=224)
    head = model.head
    cls, patches = torch.randn(1, 768), torch.randn(1, 256, 768)
    with torch.no_grad():
        desc = head(cls, patches)["descriptor"][0]
        token = torch.nn.functional.normalize(head.token_features(cls), dim=-1)[0]
        log_plan = head.sinkhorn(head.scores(patches), head.dust_bin)
        f, p = head.cluster_features(patches)[0], log_plan[0, :64].exp()
        v = torch.nn.functional.normalize(f.T @ p.T, dim=0)  # (128, 64)
    ref = torch.nn.functional.normalize(torch.cat([token, v.reshape(-1)]), dim=0)
    torch.testing.assert_close(desc, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(desc[256 + 1], ref[256 + 1])  # channel 0, cluster 1 -> index 1


def test_cricavpr_independent_mode_equals_one_image_at_a_time_and_batched_does_not():
    model, cfg, _ = create_model("cricavpr-dinov2-vitb14", random_weights=True, depth=1)
    x = torch.randn(4, 3, 224, 224)
    with torch.no_grad():
        batched = model(x)["descriptor"]
        singles = torch.cat([model(x[i:i + 1])["descriptor"] for i in range(4)])
        model.head.mode = "independent"
        independent = model(x)["descriptor"]
        first_two = model(x[:2])["descriptor"]
    torch.testing.assert_close(independent, singles, atol=1e-6, rtol=0)
    torch.testing.assert_close(first_two, independent[:2], atol=1e-6, rtol=0)
    assert (batched - independent).abs().max() > 1e-4  # cross-image attention mixed the batch
    # permutation equivariance of the batched mode (the official authors' statement)
    model.head.mode = "batched"
    with torch.no_grad():
        perm = model(x[[2, 0, 3, 1]])["descriptor"]
    torch.testing.assert_close(perm, batched[[2, 0, 3, 1]], atol=1e-5, rtol=0)


def test_cricavpr_split_bounds_are_the_official_ones():
    assert split_bounds(16, 2) == [(0, 8), (8, 16)]
    assert split_bounds(16, 3) == [(0, 5), (5, 11), (11, 16)]


def test_pos_embed_native_size_is_untouched_and_offset_rule_is_used():
    pe = torch.randn(1, 1 + 37 * 37, 8)
    torch.testing.assert_close(interpolate_pos_embed(pe, (37, 37), registers=False), pe)
    out = interpolate_pos_embed(pe, (23, 23), registers=False)
    assert out.shape == (1, 1 + 23 * 23, 8)
    torch.testing.assert_close(out[:, :1], pe[:, :1])
    size_rule = torch.nn.functional.interpolate(pe[:, 1:].reshape(1, 37, 37, 8).permute(0, 3, 1, 2),
                                                size=(23, 23), mode="bicubic").permute(0, 2, 3, 1).reshape(1, -1, 8)
    assert (out[:, 1:] - size_rule).abs().max() > 1e-3  # the +0.1 offset moves the grid

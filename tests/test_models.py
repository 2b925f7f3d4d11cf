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


def test_image_size_parsing_and_non_square_configs():
    from export.registry import parse_image_size
    assert parse_image_size("322") == (322, 322) and parse_image_size("240x320") == (240, 320)
    assert parse_image_size("240X320") == (240, 320)
    for bad in ("", "abc", "240x", "0", "x320", "240x320x3", "-14"):
        with pytest.raises(Exception, match="expected N"):
            parse_image_size(bad)
    for name in ("salad-dinov2-vitb14", "boq-dinov2-vitb14", "gem-dinov2-vits14-reg"):
        cfg = get_config(name, image_size="224x308")
        assert cfg.image_size == (224, 308) and cfg.grid == (16, 22) and cfg.first_resize is None


def test_megaloc_rounds_sizes_as_the_official_model_with_pythons_round():
    cfg = get_config("megaloc-dinov2-vitb14", image_size=(240, 320))
    assert cfg.image_size == (238, 322) and cfg.first_resize == (240, 320)
    assert cfg.preprocessing.to_dict()["first_resize"] == [240, 320]
    # 147 / 14 = 10.5: Python's round goes to the even 10 (140), not 11 (154)
    assert get_config("megaloc-dinov2-vitb14", image_size=(147, 322)).image_size == (140, 322)
    assert get_config("megaloc-dinov2-vitb14", image_size=322).first_resize is None


@pytest.mark.parametrize("name,size,says", [
    ("megaloc-dinov2-vitb14", (32, 64), "rounded to 28x70: 10 patches"),
    ("megaloc-dinov2-vitb14", (112, 112), "more patches than its 64 clusters"),
    ("salad-dinov2-vitb14", (112, 112), "more than 64 patches"),
    ("boq-dinov2-vitb14", (240, 320), "multiples of the patch size 14"),
    ("selavpr-dinov2-vitl14", (224, 308), "224x224 only"),
])
def test_sizes_a_model_cannot_take_fail_in_one_line_saying_which_it_can(name, size, says):
    from export.registry import UnsupportedImageSizeError
    with pytest.raises(UnsupportedImageSizeError) as err:
        get_config(name, image_size=size)
    msg = str(err.value)
    assert "\n" not in msg and says in msg and "it takes" in msg and msg.startswith(f"{name} cannot take")


@pytest.mark.parametrize("name", ["gem-dinov2-vits14", "salad-dinov2-vitb14", "megaloc-dinov2-vitb14", "boq-dinov2-vitb14"])
def test_non_square_models_run_with_pos_embed_resampled_per_side(name):
    model, cfg, _ = create_model(name, random_weights=True, depth=1, image_size="224x308")
    assert model.backbone.vit.pos_embed.shape[1] == 1 + 16 * 22  # class token + a 16 x 22 grid
    with torch.no_grad():
        out = model(torch.randn(2, 3, 224, 308))
    assert list(out["descriptor"].shape) == [2] + cfg.outputs()["descriptor"]


def test_megaloc_head_is_the_salad_aggregation_then_linear_and_l2():
    model, _, _ = create_model("megaloc-dinov2-vitb14", random_weights=True, depth=1, image_size=126)
    head = model.head
    cls, patches = torch.randn(2, 768), torch.randn(2, 81, 768)
    with torch.no_grad():
        salad = head.agg(cls, patches)["descriptor"]
        desc = head(cls, patches)["descriptor"]
    assert salad.shape == (2, 256 + 64 * 256) and head.agg.sinkhorn.log_b.shape[-1] == 81
    torch.testing.assert_close(desc, torch.nn.functional.normalize(head.linear(salad), dim=-1))


def test_boq_descriptor_is_per_image_and_backbone_skips_the_final_norm():
    model, _, _ = create_model("boq-dinov2-vitb14", random_weights=True, depth=1, image_size=126)
    assert isinstance(model.backbone.vit.norm, torch.nn.Identity)
    patches = torch.randn(3, 81, 768)
    with torch.no_grad():
        batch = model.head.details(patches, with_attention=True)
        alone = model.head.details(patches[2:], with_attention=True)
    assert batch["rows"].shape == (3, 384, 32) and batch["descriptor"].shape == (3, 12288)
    torch.testing.assert_close(batch["descriptor"][2:], alone["descriptor"], atol=1e-6, rtol=0)
    # the cross-attention weights of each query sum to one over the patches
    torch.testing.assert_close(batch["attention"][0].sum(-1), torch.ones(3, 64))


def test_registry_checks_every_registration():
    from export.registry import ModelConfig, register_model
    with pytest.raises(ValueError, match="registered twice"):
        register_model(lambda: ModelConfig(name="salad-dinov2-vitb14", method="salad", arch="vitb14", image_size=(322, 322)))
    with pytest.raises(ValueError, match="not registered"):
        register_model(lambda: ModelConfig(name="x-new", method="netvlad", arch="vitb14", image_size=(322, 322)))
    with pytest.raises(ValueError, match="batch mode"):
        register_model(lambda: ModelConfig(name="x-new", method="salad", arch="vitb14", image_size=(322, 322),
                                           batch_mode="batched"))
    with pytest.raises(ValueError, match="not salad's"):
        register_model(lambda: ModelConfig(name="x-new", method="salad", arch="vitb14", image_size=(322, 322),
                                           checkpoint_formats=("boq-dinov2",)))
    with pytest.raises(ValueError, match="cannot take"):  # the official size itself is checked
        register_model(lambda: ModelConfig(name="x-new", method="salad", arch="vitb14", image_size=(320, 320)))
    assert "x-new" not in list_models()


@pytest.fixture()
def clean_registry():
    """Registrations made by a test are removed afterwards."""
    from export import registry
    saved = {k: dict(getattr(registry, k)) for k in ("_METHODS", "_MODELS", "_FORMATS")}
    yield registry
    for k, v in saved.items():
        getattr(registry, k).clear()
        getattr(registry, k).update(v)


def test_a_new_head_is_one_module(clean_registry, tmp_path):
    """Everything a method needs is declared by its Method subclass and one register_model
    function: the zoo builds it, checkpoints load by its format, the export and FP16 use its
    islands, and nothing else is edited."""
    from export.checkpoints import route_keys
    from export.models.dinov2 import DinoV2Backbone
    from export.models.vpr_model import VPRModel
    from export.onnx_export import export_onnx
    from export.precision import fp32_island_nodes
    from export.registry import CheckpointFormat, Method, ModelConfig, register_method, register_model

    class MeanHead(torch.nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.pool = torch.nn.Linear(dim, 32)

        def forward(self, cls, patches):
            return {"descriptor": torch.nn.functional.normalize(self.pool(patches).mean(1), dim=-1)}

    @register_method
    class Mean(Method):
        name = "toymean"
        layout = "L2(mean of projected patch tokens)"
        fp32_scopes = ("pool",)
        formats = (CheckpointFormat("toymean", "test", lambda keys: "toy.pool.weight" in keys,
                                    lambda sd, cfg: route_keys(sd, cfg, backbone="toy.vit.", head=[("toy.pool.", "pool.")])),)

        def build(self, cfg):
            backbone = DinoV2Backbone(cfg.arch, cfg.image_size, depth=cfg.depth)
            return VPRModel(backbone, MeanHead(backbone.dim))

        def outputs(self, cfg):
            return {"descriptor": [32]}

    @register_model
    def toymean_dinov2_vits14():
        """a toy head"""
        return ModelConfig(name="toymean-dinov2-vits14", method="toymean", arch="vits14", image_size=(112, 140))

    assert "toymean-dinov2-vits14" in list_models()
    model, cfg, _ = create_model("toymean-dinov2-vits14", random_weights=True, depth=1, image_size=112)
    assert cfg.description == "a toy head"
    sd = {"toy.vit." + k[len("backbone.vit."):]: v for k, v in model.state_dict().items() if k.startswith("backbone.vit.")}
    sd.update({"toy.pool.weight": model.head.pool.weight, "toy.pool.bias": model.head.pool.bias})
    torch.save(sd, tmp_path / "toy.pth")
    loaded, cfg, info = create_model("toymean-dinov2-vits14", checkpoint=str(tmp_path / "toy.pth"), depth=1)
    assert info["format"] == "toymean" and cfg.preprocessing.size == (112, 140)
    path = export_onnx(loaded, cfg.image_size, ["descriptor"], tmp_path / "toy.onnx")
    import onnx
    islands = fp32_island_nodes(onnx.load(str(path)))
    assert any("/pool/" in n for n in islands)

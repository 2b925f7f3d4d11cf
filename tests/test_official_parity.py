"""Our models, loaded from checkpoints in the official containers, reproduce the outputs of the
official SALAD, SelaVPR and CricaVPR code (tests/fixtures/reference). Full-size models: these are
the only tests that need them. Tolerances are the fixture README's."""
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from export.zoo import create_model  # noqa: E402
from reference import fixture, image_path, save_official_checkpoint, spec  # noqa: E402
from runtime.preprocess import preprocess_file  # noqa: E402
from runtime.rerank import mnn_counts, rerank  # noqa: E402

pytestmark = pytest.mark.slow


def _maxabs(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def _load(model_name: str, fixture_name: str, tmp_path_factory) -> tuple:
    ckpt = save_official_checkpoint(fixture_name, tmp_path_factory.mktemp(fixture_name) / "official.ckpt")
    model, cfg, info = create_model(model_name, checkpoint=str(ckpt))
    assert info["format"] == fixture_name
    return model, cfg


def _batch(files, cfg) -> np.ndarray:
    return np.stack([preprocess_file(image_path(f), cfg.preprocessing) for f in files])


@pytest.fixture(scope="module")
def salad(tmp_path_factory):
    return _load("salad-dinov2-vitb14", "salad", tmp_path_factory)


@pytest.fixture(scope="module")
def selavpr(tmp_path_factory):
    return _load("selavpr-dinov2-vitl14", "selavpr", tmp_path_factory)


@pytest.fixture(scope="module")
def cricavpr(tmp_path_factory):
    return _load("cricavpr-dinov2-vitb14", "cricavpr", tmp_path_factory)


def test_salad_matches_official(salad):
    model, cfg = salad
    s = spec("salad")
    assert _maxabs(model.backbone.vit.pos_embed.detach(), fixture("salad", "pos_embed_interpolated.npy")) <= 1e-6
    x = _batch(s["images"]["files_in_batch_order"], cfg)
    inter = [s["images"]["files_in_batch_order"].index(f) for f in s["intermediate_images"]]
    assert _maxabs(x[inter], fixture("salad", "input_tensors.npy")) <= 1e-5
    with torch.no_grad():
        cls, patches = model.backbone(torch.from_numpy(x))
        log_plan = model.head.sinkhorn(model.head.scores(patches), model.head.dust_bin)
        desc = model.head(cls, patches)["descriptor"].numpy()
    gh, gw = cfg.grid
    patch_map = patches[inter].numpy().transpose(0, 2, 1).reshape(len(inter), -1, gh, gw)
    assert _maxabs(cls[inter], fixture("salad", "backbone_cls_token.npy")) <= 1e-4
    assert _maxabs(patch_map, fixture("salad", "backbone_patch_map.npy")) <= 1e-4
    assert _maxabs(log_plan[inter], fixture("salad", "sinkhorn_log_P.npy")) <= 1e-4
    assert desc.shape == (12, 8448)
    assert _maxabs(desc, fixture("salad", "descriptors.npy")) <= 1e-6


def test_salad_sinkhorn_iterations_match_official_stress_case(salad):
    model, _ = salad
    scores = torch.from_numpy(fixture("salad", "sinkhorn_stress_scores.npy"))
    with torch.no_grad():
        log_plan = model.head.sinkhorn(scores, torch.tensor(1.0)).numpy()
    assert _maxabs(log_plan, fixture("salad", "sinkhorn_stress_log_P.npy")) <= 1e-4
    # every patch column of the plan sums to one over clusters + dustbin
    np.testing.assert_allclose(np.exp(log_plan).sum(axis=1), 1.0, atol=1e-5)


def test_selavpr_matches_official_including_rerank(selavpr):
    model, cfg = selavpr
    s = spec("selavpr")
    files = s["images"]["queries"] + s["images"]["database"]
    x = _batch(files, cfg)
    assert _maxabs(x[:1], fixture("selavpr", "input_tensor_query0.npy")) <= 1e-5
    with torch.no_grad():
        cls, patches = model.backbone(torch.from_numpy(x))
        out = model.head(cls, patches)
    assert _maxabs(patches[:1], fixture("selavpr", "backbone_patch_tokens_query0.npy")) <= 1e-4
    glob, local = out["descriptor"].numpy(), out["local_features"].numpy()
    assert glob.shape == (8, 1024) and local.shape == (8, 61, 61, 128)
    assert _maxabs(glob, fixture("selavpr", "global_descriptors.npy")) <= 1e-6
    local_rows = [files.index(f) for f in s["outputs_doc"]["local_features_images"]]
    assert _maxabs(local[local_rows], fixture("selavpr", "local_features.npy")) <= 1e-5

    predictions = fixture("selavpr", "rerank_first_stage_predictions.npy")
    official_counts = fixture("selavpr", "rerank_mnn_counts.npy")
    official_order = fixture("selavpr", "rerank_reordered_predictions.npy")
    database_local = local[len(s["images"]["queries"]):]
    for q in range(predictions.shape[0]):
        counts = mnn_counts(local[q], database_local[predictions[q]])
        assert np.abs(counts - official_counts[q]).max() <= 2
        np.testing.assert_array_equal(rerank(predictions[q], counts), official_order[q])


def test_cricavpr_batched_and_independent_match_official(cricavpr):
    model, cfg = cricavpr
    files = spec("cricavpr")["images"]["files_in_batch_order"]
    x = _batch(files, cfg)
    assert _maxabs(x[:1], fixture("cricavpr", "input_tensor_image0.npy")) <= 1e-5
    with torch.no_grad():
        cls, patches = model.backbone(torch.from_numpy(x))
        regions = model.head.regions(cls, patches)
        batched = model.head(cls, patches)["descriptor"].numpy()
        model.head.mode = "independent"
        try:
            independent = model.head(cls, patches)["descriptor"].numpy()
        finally:
            model.head.mode = "batched"
    assert _maxabs(regions, fixture("cricavpr", "pre_encoder_tokens.npy")) <= 1e-4
    assert batched.shape == (16, 10752)
    assert _maxabs(batched, fixture("cricavpr", "descriptors_batch16.npy")) <= 1e-6
    assert _maxabs(independent, fixture("cricavpr", "descriptors_single.npy")) <= 1e-6


def test_downscaled_photo_through_every_model(salad, selavpr, cricavpr):
    """The photo is larger than every input: this is where antialiasing (PIL on, tensor off) counts."""
    photo = Path(__file__).parent / "fixtures/reference/preprocessing/vprbench_oneimage_query_0000000.jpg"
    for (model, cfg), expected in ((salad, "salad_descriptor_322.npy"), (selavpr, "selavpr_global_224.npy"),
                                   (cricavpr, "cricavpr_descriptor_single_224.npy")):
        x = preprocess_file(photo, cfg.preprocessing)[None]
        ref_input = {"salad": "salad_input_322.npy"}.get(cfg.method, "lufeng_input_224.npy")
        assert _maxabs(x, fixture("preprocessing", ref_input)) <= 1e-5
        with torch.no_grad():
            desc = model(torch.from_numpy(x))["descriptor"].numpy()  # batch of 1: CricaVPR single mode
        assert _maxabs(desc, fixture("preprocessing", expected)) <= 1e-6

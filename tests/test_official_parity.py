"""Our models, loaded from checkpoints in the official containers, reproduce the outputs of the
official SALAD, SelaVPR, CricaVPR, MegaLoc and BoQ code (tests/fixtures/reference). Full-size
models: these are the only tests that need them. Tolerances are the fixture README's."""
from pathlib import Path
from typing import Iterator

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


PHOTO = Path(__file__).parent / "fixtures/reference/preprocessing/vprbench_oneimage_query_0000000.jpg"


def _load(model_name: str, fixture_name: str, tmp_path_factory, file_name: str = "official.ckpt",
          fmt: str = "") -> tuple:
    """The model from a checkpoint in its official container; the file goes once the weights are in
    memory (the five full-size checkpoints take several GB of disk)."""
    ckpt = save_official_checkpoint(fixture_name, tmp_path_factory.mktemp(fixture_name) / file_name)
    try:
        model, cfg, info = create_model(model_name, checkpoint=str(ckpt))
    finally:
        ckpt.unlink()
    assert info["format"] == (fmt or fixture_name)
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


@pytest.fixture(scope="module")
def megaloc_checkpoint(tmp_path_factory) -> Iterator[Path]:
    """The Hugging Face container: model.safetensors."""
    path = save_official_checkpoint("megaloc", tmp_path_factory.mktemp("megaloc") / "model.safetensors")
    yield path
    path.unlink()


@pytest.fixture(scope="module")
def megaloc(megaloc_checkpoint):
    model, cfg, info = create_model("megaloc-dinov2-vitb14", checkpoint=str(megaloc_checkpoint))
    assert (info["format"], info["container"]) == ("megaloc", "safetensors")
    return model, cfg


@pytest.fixture(scope="module")
def boq(tmp_path_factory):
    return _load("boq-dinov2-vitb14", "boq", tmp_path_factory, "dinov2_12288.pth", fmt="boq-dinov2")


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


def test_downscaled_photo_through_every_model(salad, selavpr, cricavpr, megaloc, boq):
    """The photo is larger than every input: this is where antialiasing (PIL on, Lu-Feng's tensor
    resize off, MegaLoc's and BoQ's tensor resizes on) counts."""
    for (model, cfg), expected in ((salad, "salad_descriptor_322.npy"), (selavpr, "selavpr_global_224.npy"),
                                   (cricavpr, "cricavpr_descriptor_single_224.npy"),
                                   (megaloc, "megaloc_descriptor_322.npy"), (boq, "boq_descriptor_322.npy")):
        x = preprocess_file(PHOTO, cfg.preprocessing)[None]
        ref_input = {"salad": "salad_input_322.npy", "megaloc": "megaloc_input_322.npy",
                     "boq": "boq_input_322.npy"}.get(cfg.method, "lufeng_input_224.npy")
        assert _maxabs(x, fixture("preprocessing", ref_input)) <= 1e-5
        with torch.no_grad():
            desc = model(torch.from_numpy(x))["descriptor"].numpy()  # batch of 1: CricaVPR single mode
        assert _maxabs(desc, fixture("preprocessing", expected)) <= 1e-6


def test_megaloc_matches_official(megaloc):
    model, cfg = megaloc
    s = spec("megaloc")
    files = s["images"]["files_in_batch_order"]
    inter = [files.index(f) for f in s["intermediate_images"]]
    x = _batch(files, cfg)
    assert _maxabs(x[inter], fixture("megaloc", "input_tensors.npy")) <= 1e-5
    head = model.head
    with torch.no_grad():
        cls, patches = model.backbone(torch.from_numpy(x))
        log_plan = head.agg.sinkhorn(head.agg.scores(patches), head.agg.dust_bin)
        pre_linear = head.agg(cls, patches)["descriptor"]
        linear = head.linear(pre_linear)
        desc = model(torch.from_numpy(x))["descriptor"].numpy()
    gh, gw = cfg.grid
    patch_map = patches[inter].numpy().transpose(0, 2, 1).reshape(len(inter), -1, gh, gw)
    assert _maxabs(cls[inter], fixture("megaloc", "backbone_cls_token.npy")) <= 1e-4
    assert _maxabs(patch_map, fixture("megaloc", "backbone_patch_map.npy")) <= 1e-4
    assert _maxabs(log_plan[inter], fixture("megaloc", "sinkhorn_log_P.npy")) <= 1e-4
    assert _maxabs(pre_linear[inter], fixture("megaloc", "aggregator_pre_linear.npy")) <= 1e-6
    assert _maxabs(linear[inter], fixture("megaloc", "linear_output.npy")) <= 1e-6
    assert desc.shape == (12, 8448)
    assert _maxabs(desc, fixture("megaloc", "descriptors.npy")) <= 1e-6


def test_megaloc_native_sizes_are_rounded_and_pos_embed_is_resampled_as_h_by_w(megaloc_checkpoint):
    """Native 120x160 corridor images: MegaLoc's own rounding gives 126x154 (a 9x11 grid); its
    position embedding must be resampled as (H, W) (the pre-4a23a2b (W, H) order moves this
    descriptor by 1.3e-4). Then the 960x540 photo at native size: 546x966 (39x69 patches)."""
    model, cfg, _ = create_model("megaloc-dinov2-vitb14", checkpoint=str(megaloc_checkpoint), image_size=(120, 160))
    assert cfg.image_size == (126, 154) and cfg.preprocessing.first_resize == (120, 160)
    assert _maxabs(model.backbone.vit.pos_embed.detach(), fixture("megaloc", "pos_embed_interpolated_native.npy")) <= 1e-6
    x = _batch(spec("megaloc")["images"]["native_corridor_files_in_batch_order"], cfg)
    assert _maxabs(x[:1], fixture("megaloc", "native_internal_resized_input_image0.npy")) <= 1e-5
    with torch.no_grad():
        desc = model(torch.from_numpy(x))["descriptor"].numpy()
    assert _maxabs(desc, fixture("megaloc", "descriptors_native_corridor.npy")) <= 1e-6
    del model
    model, cfg, _ = create_model("megaloc-dinov2-vitb14", checkpoint=str(megaloc_checkpoint), image_size=(540, 960))
    assert cfg.image_size == (546, 966)
    with torch.no_grad():
        desc = model(torch.from_numpy(preprocess_file(PHOTO, cfg.preprocessing)[None]))["descriptor"].numpy()
    assert _maxabs(desc, fixture("preprocessing", "megaloc_descriptor_native.npy")) <= 1e-6


def test_megaloc_github_release_layout_loads_the_same_weights(megaloc, tmp_path):
    legacy = save_official_checkpoint("megaloc", tmp_path / "megaloc.torch", legacy=True)
    model, _, info = create_model("megaloc-dinov2-vitb14", checkpoint=str(legacy))
    assert (info["format"], info["container"]) == ("megaloc-legacy", "state_dict")
    ours = megaloc[0].state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, ours[key]), key


def test_boq_matches_official_including_intermediates(boq):
    """Intermediates at 2e-5 catch what the descriptor cannot: an aggregator LayerNorm eps of 1e-6
    moves the descriptor by only 4e-7, but the block tokens by 1.1e-4."""
    model, cfg = boq
    s = spec("boq")
    files = s["images"]["files_in_batch_order"]
    inter = [files.index(f) for f in s["intermediate_images"]]
    x = _batch(files, cfg)
    assert _maxabs(x[inter], fixture("boq", "input_tensors.npy")) <= 1e-5
    with torch.no_grad():
        _, patches = model.backbone(torch.from_numpy(x))
        d = model.head.details(patches, with_attention=True)
        queries = torch.cat([block.learned_queries() for block in model.head.boqs])
        desc = model(torch.from_numpy(x))["descriptor"].numpy()
    gh, gw = cfg.grid
    patch_map = patches[inter].numpy().transpose(0, 2, 1).reshape(len(inter), -1, gh, gw)
    assert _maxabs(patch_map, fixture("boq", "backbone_patch_map.npy")) <= 1e-4  # no final LayerNorm
    tokens = torch.stack([t[inter[0]] for t in d["block_inputs"]])
    assert _maxabs(tokens, fixture("boq", "boq_tokens_image0.npy")) <= 2e-5
    assert _maxabs(queries, fixture("boq", "boq_queries_after_self_attn.npy")) <= 2e-5
    assert _maxabs(torch.stack(d["outputs"], dim=1)[inter], fixture("boq", "boq_block_outputs.npy")) <= 2e-5
    assert _maxabs(torch.stack(d["attention"], dim=1)[inter], fixture("boq", "boq_cross_attention.npy")) <= 1e-7
    assert _maxabs(d["rows"][inter], fixture("boq", "fc_output.npy")) <= 2e-5
    assert desc.shape == (12, 12288)
    assert _maxabs(desc, fixture("boq", "descriptors.npy")) <= 1e-6

"""Offline checkpoint loading: format detection, strict key mapping, unsafe pickles, URL cache."""
import pickle

import pytest

torch = pytest.importorskip("torch")

from export.checkpoints import CheckpointError, detect_format, fetch_checkpoint, read_state_dict  # noqa: E402
from export.models.dinov2 import interpolate_pos_embed  # noqa: E402
from export.registry import get_config  # noqa: E402
from export.zoo import build_module, create_model  # noqa: E402


def _official_dinov2_state_dict(depth: int, registers: bool) -> dict:
    """A DINOv2 state_dict in the official layout (518 grid, mask_token, register_tokens)."""
    torch.manual_seed(1)
    src = build_module(get_config("gem-dinov2-vits14" + ("-reg" if registers else ""), image_size=518, depth=depth))
    sd = {k[len("backbone.vit."):]: v.clone() for k, v in src.state_dict().items() if k.startswith("backbone.vit.")}
    sd["mask_token"] = torch.zeros(1, 384)
    if registers:
        sd["register_tokens"] = sd.pop("reg_token")
        pos0 = torch.randn(1, 1, 384) * 0.02
        sd["pos_embed"] = torch.cat([pos0, sd["pos_embed"]], dim=1)
        sd["cls_token"] = sd["cls_token"] - pos0
    return sd


@pytest.mark.parametrize("registers", [False, True])
def test_official_dinov2_checkpoint_loads_with_offical_pos_embed_rule(tmp_path, registers):
    sd = _official_dinov2_state_dict(depth=1, registers=registers)
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(sd, path)
    name = "gem-dinov2-vits14" + ("-reg" if registers else "")
    model, cfg, info = create_model(name, checkpoint=str(path), depth=1)
    assert info["format"] == "dinov2" and len(info["sha256"]) == 64
    vit = model.backbone.vit
    if registers:
        torch.testing.assert_close(vit.cls_token, sd["cls_token"] + sd["pos_embed"][:, :1])
        expected = interpolate_pos_embed(sd["pos_embed"][:, 1:], cfg.grid, registers=True, has_cls=False)
    else:
        expected = interpolate_pos_embed(sd["pos_embed"], cfg.grid, registers=False)
    torch.testing.assert_close(vit.pos_embed, expected)
    # timm layout of the same weights (no mask_token) is detected and loads too
    timm_sd = {k: v for k, v in sd.items() if k != "mask_token"}
    if registers:
        timm_sd = {"reg_token" if k == "register_tokens" else k: v for k, v in timm_sd.items()}
        timm_sd["cls_token"] = vit.cls_token.detach().clone()
        timm_sd["pos_embed"] = sd["pos_embed"][:, 1:]
    torch.save(timm_sd, tmp_path / "timm.pth")
    model2, _, info2 = create_model(name, checkpoint=str(tmp_path / "timm.pth"), depth=1)
    assert info2["format"] == "timm-dinov2"
    for (k, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        torch.testing.assert_close(a, b, msg=k)


def test_strict_mapping_names_missing_and_unexpected_keys(tmp_path):
    sd = _official_dinov2_state_dict(depth=1, registers=False)
    del sd["norm.weight"]
    sd["extra.thing"] = torch.zeros(3)
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError) as err:
        create_model("gem-dinov2-vits14", checkpoint=str(tmp_path / "broken.pth"), depth=1)
    msg = str(err.value)
    assert "format detected: dinov2" in msg and "backbone.vit.norm.weight" in msg and "extra.thing" in msg


def test_checkpoint_of_another_model_names_both_formats(tmp_path):
    torch.save(_official_dinov2_state_dict(depth=1, registers=False), tmp_path / "dino.pth")
    with pytest.raises(CheckpointError, match="'dinov2' checkpoint, but model salad-dinov2-vitb14 loads 'salad'"):
        create_model("salad-dinov2-vitb14", checkpoint=str(tmp_path / "dino.pth"), depth=1)


def test_unknown_format_and_missing_file_are_clear(tmp_path):
    torch.save({"layer.weight": torch.zeros(2)}, tmp_path / "odd.pth")
    sd, _ = read_state_dict(tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match="unrecognised checkpoint format"):
        detect_format(sd)
    with pytest.raises(CheckpointError, match="not found"):
        create_model("gem-dinov2-vits14", checkpoint=str(tmp_path / "nope.pth"), depth=1)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model_state_dict": {"w": _Evil()}}, f)
    with pytest.raises(CheckpointError, match="would run code"):
        read_state_dict(path)


def test_container_and_dataparallel_prefix_are_unwrapped(tmp_path):
    torch.save({"model_state_dict": {"module.a": torch.ones(1)}, "epoch_num": 3}, tmp_path / "c.pth")
    sd, container = read_state_dict(tmp_path / "c.pth")
    assert container == "model_state_dict" and list(sd) == ["a"]


def test_url_checkpoint_is_downloaded_once_with_its_hash(tmp_path):
    src = tmp_path / "release.pth"
    torch.save(_official_dinov2_state_dict(depth=1, registers=False), src)
    cache = tmp_path / "cache"
    got = fetch_checkpoint(src.as_uri(), cache)
    assert got.read_bytes() == src.read_bytes()
    digest = (cache / "release.pth.sha256").read_text().split()[0]
    assert len(digest) == 64
    mtime = got.stat().st_mtime_ns
    assert fetch_checkpoint(src.as_uri(), cache).stat().st_mtime_ns == mtime  # cached
    got.write_bytes(b"corrupted")
    assert fetch_checkpoint(src.as_uri(), cache).read_bytes() == src.read_bytes()  # hash mismatch: fetched again
    assert sorted(p.name for p in cache.iterdir()) == ["release.pth", "release.pth.sha256"]


def _boq_official_state_dict(depth: int) -> dict:
    """A BoQ state_dict in the released dinov2_12288.pth layout (backbone.dino.*, aggregator.*),
    from a reduced-depth model, with the keys the official forward never reads."""
    torch.manual_seed(2)
    src = build_module(get_config("boq-dinov2-vitb14", image_size=518, depth=depth))
    sd = {}
    for k, v in src.state_dict().items():
        if k.startswith("backbone.vit."):
            sd["backbone.dino." + k[len("backbone.vit."):]] = v.clone()
        else:
            sd["aggregator." + k[len("head."):]] = v.clone()
    sd["backbone.dino.mask_token"] = torch.zeros(1, 768)
    sd["backbone.dino.norm.weight"], sd["backbone.dino.norm.bias"] = torch.ones(768), torch.zeros(768)
    return sd


def test_boq_release_layout_loads_strictly_with_the_official_pos_embed_rule(tmp_path):
    sd = _boq_official_state_dict(depth=1)
    torch.save(sd, tmp_path / "dinov2_12288.pth")
    model, cfg, info = create_model("boq-dinov2-vitb14", checkpoint=str(tmp_path / "dinov2_12288.pth"), depth=1)
    assert (info["format"], info["container"]) == ("boq-dinov2", "state_dict")
    got = model.state_dict()
    torch.testing.assert_close(got["backbone.vit.pos_embed"],
                               interpolate_pos_embed(sd["backbone.dino.pos_embed"], cfg.grid, registers=False))
    torch.testing.assert_close(got["head.boqs.0.queries"], sd["aggregator.boqs.0.queries"])
    torch.testing.assert_close(got["head.proj_c.weight"], sd["aggregator.proj_c.weight"])


def test_checkpoint_of_another_size_names_format_missing_unexpected_and_shapes(tmp_path):
    sd = _boq_official_state_dict(depth=1)
    sd["aggregator.fc.weight"] = torch.zeros(16, 128)  # another output size
    torch.save(sd, tmp_path / "boq.pth")
    with pytest.raises(CheckpointError) as err:
        create_model("boq-dinov2-vitb14", checkpoint=str(tmp_path / "boq.pth"), depth=2)
    msg = str(err.value)
    assert "format detected: boq-dinov2" in msg and "missing" in msg and "backbone.vit.blocks.1.attn.qkv.weight" in msg
    assert "head.fc.weight: checkpoint (16, 128) vs model (32, 128)" in msg
    sd["aggregator.fc.weight"] = torch.zeros(32, 128)
    sd["epoch_stats"] = torch.zeros(1)
    torch.save(sd, tmp_path / "boq2.pth")
    with pytest.raises(CheckpointError, match=r"boq-dinov2\) does not match the model; unexpected 1 keys: unmapped\.epoch_stats$"):
        create_model("boq-dinov2-vitb14", checkpoint=str(tmp_path / "boq2.pth"), depth=1)


def test_checkpoint_of_another_method_is_refused_with_its_detected_format(tmp_path):
    torch.save(_boq_official_state_dict(depth=1), tmp_path / "boq.pth")
    with pytest.raises(CheckpointError, match="'boq-dinov2' checkpoint, but model megaloc-dinov2-vitb14 loads "
                                              "'megaloc' or 'megaloc-legacy'"):
        create_model("megaloc-dinov2-vitb14", checkpoint=str(tmp_path / "boq.pth"), depth=1)


def test_megaloc_formats_are_told_apart_by_their_keys():
    agg = {"aggregator.agg.dust_bin": 0, "aggregator.linear.weight": 0, "aggregator.linear.bias": 0}
    assert detect_format({"backbone.cls_token": 0, "backbone.blocks.0.attn.qkv.weight": 0, **agg}) == "megaloc"
    assert detect_format({"backbone.model.cls_token": 0, "backbone.model.mask_token": 0, **agg}) == "megaloc-legacy"
    salad = {"backbone.model.cls_token": 0, "aggregator.dust_bin": 0}
    assert detect_format(salad) == "salad"
    assert detect_format({"backbone.dino.cls_token": 0, "aggregator.boqs.0.queries": 0}) == "boq-dinov2"


def test_safetensors_files_load_offline_and_bad_ones_are_named(tmp_path):
    from safetensors.torch import save_file
    sd = {k: v.contiguous() for k, v in _official_dinov2_state_dict(depth=1, registers=False).items() if k != "mask_token"}
    save_file(sd, str(tmp_path / "model.safetensors"))
    _, _, info = create_model("gem-dinov2-vits14", checkpoint=str(tmp_path / "model.safetensors"), depth=1)
    assert (info["format"], info["container"]) == ("timm-dinov2", "safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json")
    with pytest.raises(CheckpointError, match="broken.safetensors: not a readable safetensors file"):
        read_state_dict(tmp_path / "broken.safetensors")

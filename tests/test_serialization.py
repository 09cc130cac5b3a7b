"""ghostify.save / ghostify.load: exact round trips, refusal to overwrite, bad files, atomic writes."""
from __future__ import annotations

import json
import os
import stat

import pytest
import safetensors.torch
import torch
import torchvision
from torch.testing import assert_close

import ghostify
from ghostify import GhostConv2d, GhostifyError, convert


def outputs_equal(a, b, x):
    with torch.no_grad():
        assert_close(a(x), b(x), rtol=0, atol=0)


@pytest.fixture
def resnet_ghost(bn_randomizer):
    model = bn_randomizer(torchvision.models.resnet18().eval())
    return convert(model)


def test_resnet18_round_trip(tmp_path, resnet_ghost):
    path = tmp_path / "r18.safetensors"
    assert ghostify.save(resnet_ghost, path) == path
    loaded = ghostify.load(path)
    assert type(loaded).__name__ == "ResNet"
    info, saved = loaded.ghostify_info, resnet_ghost.ghostify_info
    assert info.mode == saved.mode == "fx"
    assert info.plan == saved.plan
    assert info.folded == saved.folded and len(info.folded) > 0
    assert info.layer_info == saved.layer_info
    assert loaded.ghostify_arch["name"] == "resnet18"
    for e in info.plan.converted:
        g, ref = loaded.get_submodule(e.name), resnet_ghost.get_submodule(e.name)
        assert isinstance(g, GhostConv2d)
        assert g.emit_internal_order == ref.emit_internal_order
        assert torch.equal(g.channel_map, ref.channel_map)
    assert not loaded.training
    outputs_equal(loaded, resnet_ghost, torch.randn(2, 3, 32, 32))
    # get_model resolves a saved file to the same model
    outputs_equal(ghostify.get_model(str(path)), resnet_ghost, torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("fold", [True, False])
def test_tiny_net_round_trip_with_given_model(tmp_path, chain_net, net_classes, bn_randomizer, fold):
    ghost = convert(bn_randomizer(chain_net), fold=fold)
    path = ghostify.save(ghost, tmp_path / "chain.safetensors")
    loaded = ghostify.load(path, model=net_classes["ChainNet"]())
    assert loaded.ghostify_info.folded == ghost.ghostify_info.folded == (["conv1", "conv2"] if fold else [])
    outputs_equal(loaded, ghost, torch.randn(2, 3, 8, 8))


def test_swap_mode_round_trip(tmp_path, untraceable_net, net_classes):
    ghost = convert(untraceable_net)
    assert ghost.ghostify_info.mode == "swap"
    path = ghostify.save(ghost, tmp_path / "swap.safetensors")
    loaded = ghostify.load(path, model=net_classes["UntraceableNet"]())
    assert loaded.ghostify_info.mode == "swap"
    assert type(loaded) is net_classes["UntraceableNet"]
    assert loaded.ghostify_info.plan == ghost.ghostify_info.plan
    for sign in (1.0, -1.0):  # both branches
        outputs_equal(loaded, ghost, sign * torch.rand(1, 3, 8, 8))


def test_training_flag_round_trips(tmp_path, chain_net, net_classes):
    ghost = convert(chain_net.train())
    path = ghostify.save(ghost, tmp_path / "t.safetensors")
    assert ghostify.load(path, model=net_classes["ChainNet"]()).training


def test_explicit_arch_recipe(tmp_path):
    ghost = convert(torchvision.models.resnet18().eval())
    path = ghostify.save(ghost, tmp_path / "a.safetensors", arch="torchvision.models:resnet18")
    loaded = ghostify.load(path)
    assert loaded.ghostify_info.arch["target"] == "torchvision.models:resnet18"
    outputs_equal(loaded, ghost, torch.randn(1, 3, 32, 32))


def test_save_load_save_again(tmp_path, chain_net, net_classes):
    ghost = convert(chain_net)
    first = ghostify.save(ghost, tmp_path / "1.safetensors")
    again = ghostify.load(first, model=net_classes["ChainNet"]())
    second = ghostify.save(again, tmp_path / "2.safetensors")
    outputs_equal(ghostify.load(second, model=net_classes["ChainNet"]()), ghost, torch.randn(1, 3, 8, 8))


# -- overwriting ---------------------------------------------------------------------------------


def test_overwrite_refused_without_force(tmp_path, chain_net, net_classes):
    path = tmp_path / "m.safetensors"
    ghostify.save(convert(chain_net), path)
    before = path.read_bytes()
    other = convert(chain_net, ratio=4)
    with pytest.raises(GhostifyError, match="exists"):
        ghostify.save(other, path)
    assert path.read_bytes() == before
    ghostify.save(other, path, force=True)
    assert path.read_bytes() != before
    loaded = ghostify.load(path, model=net_classes["ChainNet"]())
    assert loaded.get_submodule("conv1").ratio == 4
    outputs_equal(loaded, other, torch.randn(1, 3, 8, 8))


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, chain_net, monkeypatch):
    path = tmp_path / "m.safetensors"
    ghostify.save(convert(chain_net), path)
    before = path.read_bytes()

    def broken(state, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        ghostify.save(convert(chain_net, ratio=4), path, force=True)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.safetensors"]


def test_atomic_write_leaves_only_the_target(tmp_path, chain_net):
    path = tmp_path / "sub" / "dir" / "m.safetensors"  # parents are created
    ghostify.save(convert(chain_net), path)
    assert os.listdir(path.parent) == ["m.safetensors"]


def test_saved_file_has_ordinary_permissions(tmp_path, chain_net):
    """The temp-file-then-rename write must not leave the model readable only by its owner."""
    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"x")  # what the umask gives an ordinary new file
    path = ghostify.save(convert(chain_net), tmp_path / "m.safetensors")
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)


# -- bad files -----------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(GhostifyError, match="does not exist"):
        ghostify.load(tmp_path / "nope.safetensors")


def test_corrupt_file(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(GhostifyError, match="not a readable safetensors file"):
        ghostify.load(path)


def test_truncated_file(tmp_path, chain_net):
    path = ghostify.save(convert(chain_net), tmp_path / "m.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(GhostifyError, match="truncated or corrupt"):
        ghostify.load(path)


def test_foreign_safetensors_file(tmp_path):
    path = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(3)}, str(path), metadata={"author": "someone"})
    with pytest.raises(GhostifyError, match="not one written by ghostify.save"):
        ghostify.load(path)


@pytest.mark.parametrize("meta,match", [("{not json", "corrupt ghostify metadata"),
                                        (json.dumps({"format": "ghostify/99"}), "format")])
def test_bad_ghostify_metadata(tmp_path, meta, match):
    path = tmp_path / "bad.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(3)}, str(path), metadata={"ghostify": meta})
    with pytest.raises(GhostifyError, match=match):
        ghostify.load(path)


def test_weights_that_do_not_fit(tmp_path, resnet_ghost):
    path = ghostify.save(resnet_ghost, tmp_path / "r18.safetensors")
    with pytest.raises(GhostifyError, match="do not fit"):
        ghostify.load(path, model=torchvision.models.resnet34())


def test_saving_a_plain_model_is_refused(tmp_path, chain_net):
    with pytest.raises(GhostifyError, match="ghostify.convert"):
        ghostify.save(chain_net, tmp_path / "m.safetensors")
    assert os.listdir(tmp_path) == []

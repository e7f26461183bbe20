"""Checkpoint ↔ plan compatibility (``nnunet_alice.compat``) and loading into nnU-Net's network
(``nnunet_alice.trainers.pretrained``): readable diffs, strict non-segmentation loading, checkpoint lookup."""
import copy
import os

import pytest
import torch

from conftest import PLAIN_CLASS, tiny_arch_kwargs, tiny_metadata
from nnunet_alice.checkpoint import make_payload, network_state_dict, save_checkpoint, sha256_of_file
from nnunet_alice.compat import SEG_LAYER_TAG, architecture_differences, state_dict_differences
from nnunet_alice.errors import AliceError
from nnunet_alice.trainers.pretrained import (ENV_VAR, PLANS_KEY, convention_path, find_pretrained_checkpoint,
                                              load_pretrained_into)

RESENC_CLASS = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"


# ------------------------------------------------------------------------------ architecture_differences
def test_identical_plans_have_no_differences():
    meta = tiny_metadata()
    assert architecture_differences(meta, PLAIN_CLASS, tiny_arch_kwargs(), 1) == []


def test_tuples_and_lists_compare_equal():
    kw = tiny_arch_kwargs()
    kw["kernel_sizes"] = tuple(tuple(k) for k in kw["kernel_sizes"])
    kw["features_per_stage"] = tuple(kw["features_per_stage"])
    assert architecture_differences(tiny_metadata(), PLAIN_CLASS, kw, 1) == []


@pytest.mark.parametrize("change,key", [
    (lambda kw: kw.update(features_per_stage=[4, 8, 32]), "arch_kwargs.features_per_stage"),
    (lambda kw: kw.update(n_conv_per_stage=[2, 2, 2]), "arch_kwargs.n_conv_per_stage"),
    (lambda kw: kw["norm_op_kwargs"].update(eps=1e-3), "arch_kwargs.norm_op_kwargs.eps"),
    (lambda kw: kw.pop("conv_bias"), "arch_kwargs.conv_bias"),
    (lambda kw: kw.update(n_blocks_per_stage=[1, 3, 4]), "arch_kwargs.n_blocks_per_stage"),
])
def test_arch_kwargs_difference_names_the_key(change, key):
    kw = copy.deepcopy(tiny_arch_kwargs())
    change(kw)
    diffs = architecture_differences(tiny_metadata(), PLAIN_CLASS, kw, 1)
    assert len(diffs) == 1
    assert diffs[0].startswith(key + ":")


def test_class_and_channel_differences_are_named():
    diffs = architecture_differences(tiny_metadata(), RESENC_CLASS, tiny_arch_kwargs(), 2)
    assert len(diffs) == 2
    assert diffs[0].startswith("network_class_name:") and "ResidualEncoderUNet" in diffs[0]
    assert diffs[1].startswith("num_input_channels:") and "1" in diffs[1] and "2" in diffs[1]


def test_features_difference_reports_both_values():
    kw = tiny_arch_kwargs(features=(4, 8, 32))
    (d,) = architecture_differences(tiny_metadata(), PLAIN_CLASS, kw, 1)
    assert "[4, 8, 16]" in d and "[4, 8, 32]" in d


# ------------------------------------------------------------------------------ state_dict_differences
def test_state_dict_differences_ignore_segmentation_layers(tiny_unet):
    a, b = tiny_unet(num_classes=1).state_dict(), tiny_unet(num_classes=5).state_dict()
    seg = [k for k in a if SEG_LAYER_TAG in k]
    assert seg and any(a[k].shape != b[k].shape for k in seg)  # the heads really differ
    assert state_dict_differences(a, b) == ([], [], [])


def test_state_dict_differences_list_missing_unexpected_and_shapes(tiny_unet):
    src = tiny_unet().state_dict()
    tgt = tiny_unet(tiny_arch_kwargs(features=(4, 8, 32))).state_dict()
    src_extra = dict(src, **{"extra.weight": torch.ones(1)})
    del src_extra["encoder.stages.0.0.convs.0.conv.weight"]
    missing, unexpected, shapes = state_dict_differences(src_extra, tgt)
    assert missing == ["encoder.stages.0.0.convs.0.conv.weight"]
    assert unexpected == ["extra.weight"]
    assert any(s.startswith("encoder.stages.2.") and "(32," in s for s in shapes)
    assert not any(SEG_LAYER_TAG in s for s in shapes)


# ------------------------------------------------------------------------------ load_pretrained_into
def _save(tmp_path, net, meta=None, name="ckpt.pth"):
    path = str(tmp_path / name)
    save_checkpoint(path, make_payload(network_state_dict(net), meta if meta is not None else tiny_metadata(), {}))
    return path


def test_load_into_network_with_other_number_of_classes(tmp_path, tiny_unet):
    torch.manual_seed(0)
    pretrained = tiny_unet(num_classes=1)  # the reconstruction head has as many outputs as inputs
    path = _save(tmp_path, pretrained)
    torch.manual_seed(1)
    target = tiny_unet(num_classes=3)
    seg_before = {k: v.clone() for k, v in target.state_dict().items() if SEG_LAYER_TAG in k}
    logs = []
    n = load_pretrained_into(target, path, PLAIN_CLASS, tiny_arch_kwargs(), 1, log=logs.append)

    src, tgt = pretrained.state_dict(), target.state_dict()
    non_seg = [k for k in tgt if SEG_LAYER_TAG not in k]
    assert n == len(non_seg) > 0
    for k in non_seg:
        assert torch.equal(src[k], tgt[k]), k
    for k, v in seg_before.items():  # segmentation layers untouched
        assert torch.equal(tgt[k], v)
    assert f"loaded {n} of {len(tgt)} tensors" in logs[0]
    assert sha256_of_file(path) in logs[0] and path in logs[0]


def test_load_into_a_compiled_wrapper(tmp_path, tiny_unet):
    pretrained = tiny_unet(num_classes=1)
    path = _save(tmp_path, pretrained)
    target = tiny_unet(num_classes=2)
    n = load_pretrained_into(torch.compile(target), path, PLAIN_CLASS, tiny_arch_kwargs(), 1, log=lambda s: None)
    assert n > 0
    k = "encoder.stages.0.0.convs.0.conv.weight"
    assert torch.equal(target.state_dict()[k], pretrained.state_dict()[k])


def test_mismatched_features_raise_naming_the_key(tmp_path, tiny_unet):
    path = _save(tmp_path, tiny_unet(num_classes=1))
    kw = tiny_arch_kwargs(features=(4, 8, 32))
    target = tiny_unet(kw, num_classes=3)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(AliceError) as ei:
        load_pretrained_into(target, path, PLAIN_CLASS, kw, 1, log=lambda s: None)
    msg = str(ei.value)
    assert "arch_kwargs.features_per_stage" in msg and path in msg and "\n" not in msg
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())  # nothing was loaded


def test_mismatched_input_channels_raise(tmp_path, tiny_unet):
    path = _save(tmp_path, tiny_unet(num_classes=1))
    with pytest.raises(AliceError, match="num_input_channels"):
        load_pretrained_into(tiny_unet(in_channels=2), path, PLAIN_CLASS, tiny_arch_kwargs(), 2, log=lambda s: None)


def test_weights_without_metadata_are_still_checked(tmp_path, tiny_unet):
    path = str(tmp_path / "bare.pth")
    save_checkpoint(path, {"network_weights": network_state_dict(tiny_unet(num_classes=1))})
    kw = tiny_arch_kwargs(features=(4, 8, 32))
    with pytest.raises(AliceError, match=r"weights do not fit the network: .*encoder\.stages\.2\."):
        load_pretrained_into(tiny_unet(kw), path, PLAIN_CLASS, kw, 1, log=lambda s: None)


# ------------------------------------------------------------------------------ find_pretrained_checkpoint
PLANS = {"dataset_name": "Dataset555_X", "plans_name": "nnUNetPlans"}


@pytest.fixture
def results(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.delenv(ENV_VAR, raising=False)
    conv = tmp_path / "results" / "Dataset555_X" / "AlicePretrain__nnUNetPlans__3d_fullres" / "checkpoint_final.pth"
    return conv


def test_convention_path_layout(results):
    assert convention_path("Dataset555_X", "nnUNetPlans", "3d_fullres") == str(results)


def test_missing_checkpoint_names_alice_pretrain(results):
    with pytest.raises(AliceError) as ei:
        find_pretrained_checkpoint(dict(PLANS), "3d_fullres")
    msg = str(ei.value)
    assert "alice_pretrain -d Dataset555_X -c 3d_fullres -p nnUNetPlans" in msg
    assert str(results) in msg and ENV_VAR in msg


def test_convention_path_is_found(results):
    results.parent.mkdir(parents=True)
    results.write_bytes(b"x")
    assert find_pretrained_checkpoint(dict(PLANS), "3d_fullres") == str(results)


def test_plans_key_beats_convention(results, tmp_path):
    results.parent.mkdir(parents=True)
    results.write_bytes(b"x")
    plans = dict(PLANS, **{PLANS_KEY: str(tmp_path / "other.pth")})
    assert find_pretrained_checkpoint(plans, "3d_fullres") == str(tmp_path / "other.pth")


def test_env_var_beats_plans_key(results, tmp_path, monkeypatch):
    plans = dict(PLANS, **{PLANS_KEY: str(tmp_path / "other.pth")})
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "env.pth"))
    assert find_pretrained_checkpoint(plans, "3d_fullres") == str(tmp_path / "env.pth")


@pytest.mark.parametrize("value", ["none", "None", "NONE"])
def test_env_var_none_means_no_pretraining(results, tmp_path, monkeypatch, value):
    monkeypatch.setenv(ENV_VAR, value)
    plans = dict(PLANS, **{PLANS_KEY: str(tmp_path / "other.pth")})
    assert find_pretrained_checkpoint(plans, "3d_fullres") is None


def test_missing_override_file_fails_at_load_naming_it(results, tmp_path, monkeypatch, tiny_unet):
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "typo.pth"))
    path = find_pretrained_checkpoint(dict(PLANS), "3d_fullres")
    with pytest.raises(AliceError, match="typo.pth: checkpoint file not found"):
        load_pretrained_into(tiny_unet(), path, PLAIN_CLASS, tiny_arch_kwargs(), 1, log=lambda s: None)
    assert not os.path.exists(path)

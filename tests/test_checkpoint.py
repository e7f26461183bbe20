"""Checkpoint I/O (``nnunet_alice.checkpoint``): weights-only round trip, atomic writes, sha256 sidecar,
one-line errors for damaged files, refusal of pickled code, and wrapper-free, storage-sharing state dicts."""
import hashlib
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch
from torch import nn

from nnunet_alice import checkpoint as ckpt_mod
from nnunet_alice.checkpoint import (FORMAT_NAME, FORMAT_VERSION, load_checkpoint, make_payload,
                                     network_state_dict, save_checkpoint)
from nnunet_alice.errors import AliceError


def _payload(**meta_extra):
    weights = {"conv.weight": torch.arange(24, dtype=torch.float32).reshape(2, 3, 4), "conv.bias": torch.ones(2)}
    meta = {
        "patch_size": (24, 32, 32),                      # tuple -> list
        "spacing": np.array([2.0, 0.95, 1.05]),          # ndarray -> list
        "step": np.int64(7),                             # numpy int -> int
        "lr": np.float32(0.5),                           # numpy float -> float
        "use_mask_for_norm": [np.bool_(False)],          # numpy bool -> bool
        "plans_name": np.str_("nnUNetPlans"),            # numpy string -> str
        "case_ids": (np.str_("a"), "b"),
        "nested": {"strides": ((1, 1, 1), (2, 2, 2))},
        **meta_extra,
    }
    return make_payload(weights, meta, {"key_to_encoder": "encoder.stages"})


def _assert_plain(obj, path="payload"):
    """Only tensors and plain Python containers/scalars (exact types) anywhere."""
    if isinstance(obj, torch.Tensor) or obj is None:
        return
    assert type(obj) in (dict, list, str, int, float, bool), f"{path}: {type(obj)}"
    if isinstance(obj, dict):
        for k, v in obj.items():
            _assert_plain(k, f"{path}.key")
            _assert_plain(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _assert_plain(v, f"{path}[{i}]")


def _check_loaded(ck):
    assert ck["format"] == FORMAT_NAME and ck["format_version"] == FORMAT_VERSION
    assert torch.equal(ck["network_weights"]["conv.weight"], torch.arange(24.).reshape(2, 3, 4))
    m = ck["metadata"]
    assert m["patch_size"] == [24, 32, 32]
    assert m["spacing"] == pytest.approx([2.0, 0.95, 1.05])
    assert m["step"] == 7 and type(m["step"]) is int
    assert m["lr"] == 0.5 and type(m["lr"]) is float
    assert m["use_mask_for_norm"] == [False] and type(m["use_mask_for_norm"][0]) is bool
    assert m["plans_name"] == "nnUNetPlans" and type(m["plans_name"]) is str
    assert m["case_ids"] == ["a", "b"]
    assert m["nested"]["strides"] == [[1, 1, 1], [2, 2, 2]]
    _assert_plain(ck)


def test_round_trip_via_load_checkpoint_and_raw_weights_only_load(tmp_path):
    path = str(tmp_path / "c.pth")
    save_checkpoint(path, _payload())
    _check_loaded(load_checkpoint(path))
    _check_loaded(torch.load(path, map_location="cpu", weights_only=True))


def test_unconvertible_metadata_is_rejected_before_writing(tmp_path):
    path = tmp_path / "c.pth"
    with pytest.raises(TypeError, match="object"):
        save_checkpoint(str(path), _payload(bad=object()))
    assert not path.exists() and not (tmp_path / "c.pth.sha256").exists()


def test_sidecar_holds_the_sha256_of_the_file(tmp_path):
    path = tmp_path / "c.pth"
    digest = save_checkpoint(str(path), _payload())
    side = (tmp_path / "c.pth.sha256").read_text()
    assert side == f"{digest}  c.pth\n"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert ckpt_mod.sha256_of_file(str(path)) == digest


def test_atomic_write_leaves_no_temp_files(tmp_path):
    path = str(tmp_path / "c.pth")
    save_checkpoint(path, _payload())
    save_checkpoint(path, _payload(step=np.int64(8)))  # overwrite
    assert sorted(os.listdir(tmp_path)) == ["c.pth", "c.pth.sha256"]
    assert load_checkpoint(path)["metadata"]["step"] == 8


def test_failed_serialisation_keeps_previous_checkpoint(tmp_path):
    path = str(tmp_path / "c.pth")
    save_checkpoint(path, _payload())
    before = (tmp_path / "c.pth").read_bytes(), (tmp_path / "c.pth.sha256").read_bytes()

    class BadTensor(torch.Tensor):  # passes the plain-value conversion, fails inside torch.save
        def __reduce_ex__(self, protocol):
            raise RuntimeError("boom while pickling")

    bad = _payload()
    bad["network_weights"]["zz"] = torch.zeros(3).as_subclass(BadTensor)
    with pytest.raises(RuntimeError, match="boom"):
        save_checkpoint(path, bad)
    assert ((tmp_path / "c.pth").read_bytes(), (tmp_path / "c.pth.sha256").read_bytes()) == before
    assert sorted(os.listdir(tmp_path)) == ["c.pth", "c.pth.sha256"]
    _check_loaded(load_checkpoint(path))


def test_failure_mid_write_removes_temp_and_keeps_previous(tmp_path, monkeypatch):
    path = str(tmp_path / "c.pth")
    save_checkpoint(path, _payload())
    before = (tmp_path / "c.pth").read_bytes()
    real_fsync = os.fsync
    calls = []

    def failing_fsync(fd):  # the temp file has been written completely when this runs
        calls.append(fd)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt_mod.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(path, _payload(step=np.int64(99)))
    monkeypatch.setattr(ckpt_mod.os, "fsync", real_fsync)
    assert calls, "the write never reached fsync"
    assert (tmp_path / "c.pth").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["c.pth", "c.pth.sha256"]
    assert load_checkpoint(path)["metadata"]["step"] == 7


def _one_line_naming(exc_info, path):
    msg = str(exc_info.value)
    assert "\n" not in msg
    assert str(path) in msg
    return msg


def test_truncated_file_raises_one_line_error(tmp_path):
    path = tmp_path / "c.pth"
    save_checkpoint(str(path), _payload())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    # with the sidecar: caught by the checksum
    with pytest.raises(AliceError) as ei:
        load_checkpoint(str(path))
    assert "checksum" in _one_line_naming(ei, path)
    # without the sidecar: caught by the reader
    (tmp_path / "c.pth.sha256").unlink()
    with pytest.raises(AliceError) as ei:
        load_checkpoint(str(path))
    assert "truncated or corrupted" in _one_line_naming(ei, path)
    path.write_bytes(b"")
    with pytest.raises(AliceError) as ei:
        load_checkpoint(str(path))
    _one_line_naming(ei, path)


def test_checksum_mismatch_raises_and_verify_false_skips_it(tmp_path):
    path = tmp_path / "c.pth"
    save_checkpoint(str(path), _payload())
    (tmp_path / "c.pth.sha256").write_text("0" * 64 + "  c.pth\n")
    with pytest.raises(AliceError) as ei:
        load_checkpoint(str(path))
    msg = _one_line_naming(ei, path)
    assert "checksum mismatch" in msg and "c.pth.sha256" in msg
    _check_loaded(load_checkpoint(str(path), verify=False))


def test_missing_file_and_non_network_file(tmp_path):
    with pytest.raises(AliceError) as ei:
        load_checkpoint(str(tmp_path / "nope.pth"))
    assert "not found" in _one_line_naming(ei, tmp_path / "nope.pth")
    path = tmp_path / "other.pth"
    torch.save({"state_dict": {"w": torch.ones(1)}}, str(path))
    with pytest.raises(AliceError) as ei:
        load_checkpoint(str(path))
    assert "network_weights" in _one_line_naming(ei, path)


# ------------------------------------------------------------------------------------------ malicious pickles
class _Evil:
    marker = None

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil(marker):
    e = _Evil()
    e.marker = str(marker)
    return e


def _torch_saved_evil(path, marker):
    torch.save({"network_weights": {"w": torch.ones(2)}, "metadata": {"x": _evil(marker)}}, str(path))


def _hand_made_zip_evil(path, marker):
    data = pickle.dumps({"network_weights": _evil(marker)}, protocol=2)
    assert b"system" in data  # the GLOBAL opcode for os.system is in the stream
    with zipfile.ZipFile(str(path), "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", data)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")


def _legacy_pickle_evil(path, marker):
    path.write_bytes(pickle.dumps({"network_weights": _evil(marker)}, protocol=2))


@pytest.mark.parametrize("writer", [_torch_saved_evil, _hand_made_zip_evil, _legacy_pickle_evil])
@pytest.mark.parametrize("with_sidecar", [False, True])
def test_pickled_code_is_refused_and_never_runs(tmp_path, writer, with_sidecar):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pth"
    writer(path, marker)
    if with_sidecar:  # a correct digest must not make it loadable
        (tmp_path / "evil.pth.sha256").write_text(f"{ckpt_mod.sha256_of_file(str(path))}  evil.pth\n")
    with pytest.raises(AliceError) as ei:
        load_checkpoint(str(path))
    msg = _one_line_naming(ei, path)
    assert "refused" in msg
    assert "system" in msg  # names the offending global (posix.system)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ state dicts
class _CompiledLike(nn.Module):
    """Stand-in for torch.compile's OptimizedModule: the real module under ``_orig_mod``."""

    def __init__(self, m):
        super().__init__()
        self._orig_mod = m


class _DDPLike(nn.parallel.DistributedDataParallel):
    """A DistributedDataParallel instance without a process group: only ``.module`` is set."""

    def __init__(self, m):
        nn.Module.__init__(self)
        self.module = m


def _plain_keys(net):
    return set(net.state_dict().keys())


@pytest.mark.parametrize("wrap", [
    lambda m: m,
    _CompiledLike,
    _DDPLike,
    lambda m: _DDPLike(_CompiledLike(m)),
    lambda m: _CompiledLike(_DDPLike(m)),
    torch.compile,  # the real OptimizedModule (nothing is compiled until forward)
])
def test_network_state_dict_unwraps_wrappers(tiny_unet, wrap):
    net = tiny_unet()
    wrapped = wrap(net)
    if wrapped is not net:
        assert set(wrapped.state_dict()) != _plain_keys(net)  # the wrapper prefixes keys
    sd = network_state_dict(wrapped)
    assert set(sd) == _plain_keys(net)
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in sd)
    for k, v in net.state_dict().items():
        assert torch.equal(sd[k], v) and sd[k].device.type == "cpu" and not sd[k].requires_grad


def test_encoder_duplicates_share_storage_and_are_stored_once(tiny_unet, tmp_path):
    net = tiny_unet()
    sd = network_state_dict(net)
    enc = [k for k in sd if k.startswith("encoder.")]
    dup = [k for k in sd if k.startswith("decoder.encoder.")]
    assert enc and len(dup) == len(enc)  # nnU-Net registers the encoder twice
    for k in enc:
        assert sd[k].data_ptr() == sd["decoder." + k].data_ptr()

    save_checkpoint(str(tmp_path / "shared.pth"), make_payload(sd, {}, {}))
    copied = {k: v.clone() for k, v in sd.items()}
    save_checkpoint(str(tmp_path / "copied.pth"), make_payload(copied, {}, {}))
    enc_bytes = sum(sd[k].numel() * sd[k].element_size() for k in enc)
    shared_size = (tmp_path / "shared.pth").stat().st_size
    copied_size = (tmp_path / "copied.pth").stat().st_size
    assert copied_size - shared_size >= enc_bytes  # the copy stores the encoder a second time
    loaded = load_checkpoint(str(tmp_path / "shared.pth"))["network_weights"]
    assert set(loaded) == set(sd)
    for k in enc:
        assert torch.equal(loaded[k], loaded["decoder." + k])


def test_written_files_get_the_usual_permissions(tmp_path):
    """Atomic writes go through mkstemp (mode 0600); the result must be as readable as a plain open()'s file."""
    old = os.umask(0o022)
    try:
        path = tmp_path / "c.pth"
        save_checkpoint(str(path), _payload())
        (tmp_path / "plain").write_bytes(b"x")
    finally:
        os.umask(old)
    expected = (tmp_path / "plain").stat().st_mode & 0o777
    assert expected == 0o644
    assert path.stat().st_mode & 0o777 == expected
    assert (tmp_path / "c.pth.sha256").stat().st_mode & 0o777 == expected


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_state_dict_keeps_encoder_shared(tiny_unet, tmp_path):
    """``.cpu()`` copies every GPU tensor on its own; the encoder registered twice must still be stored once."""
    net = tiny_unet().cuda()
    sd = network_state_dict(net)
    enc = [k for k in sd if k.startswith("encoder.")]
    assert all(v.device.type == "cpu" for v in sd.values())
    for k in enc:
        assert sd[k].data_ptr() == sd["decoder." + k].data_ptr()
    save_checkpoint(str(tmp_path / "gpu.pth"), make_payload(sd, {}, {}))
    save_checkpoint(str(tmp_path / "cpu.pth"), make_payload(network_state_dict(net.cpu()), {}, {}))
    assert abs((tmp_path / "gpu.pth").stat().st_size - (tmp_path / "cpu.pth").stat().st_size) < 4096


# ------------------------------------------------------------------------------------------ messages, sidecars
def test_directory_and_random_bytes_are_named_for_what_they_are(tmp_path):
    folder = tmp_path / "ckpt.pth"
    folder.mkdir()
    with pytest.raises(AliceError) as ei:
        load_checkpoint(str(folder))
    assert "is a directory, not a checkpoint file" in _one_line_naming(ei, folder)
    rng = np.random.default_rng(0)
    for i, head in enumerate([b"", b"\x80\x02", b"PK\x03\x04"]):  # garbage, a pickle header, a zip header
        path = tmp_path / f"random{i}.pth"
        path.write_bytes(head + rng.bytes(5000))
        with pytest.raises(AliceError) as ei:
            load_checkpoint(str(path))
        msg = _one_line_naming(ei, path)
        assert "truncated or corrupted" in msg and "refused" not in msg, msg


def test_missing_sidecar_loads_with_an_unverified_note(tmp_path):
    path = tmp_path / "c.pth"
    save_checkpoint(str(path), _payload())
    notes = []
    load_checkpoint(str(path), note=notes.append)
    assert notes == []  # verified
    (tmp_path / "c.pth.sha256").unlink()
    _check_loaded(load_checkpoint(str(path), note=notes.append))
    assert len(notes) == 1 and notes[0].startswith(f"{path}: no checksum sidecar") and "unverified" in notes[0]
    with pytest.warns(ckpt_mod.UnverifiedCheckpointWarning, match="unverified"):
        load_checkpoint(str(path))
    load_checkpoint(str(path), verify=False, note=notes.append)  # asked not to verify: no note
    assert len(notes) == 1


def test_previous_checkpoint_sidecar_names_its_own_file(tmp_path):
    """``checkpoint_latest.prev.pth.sha256`` must say ``checkpoint_latest.prev.pth``: ``sha256sum -c`` checks it."""
    import shutil
    import subprocess

    from nnunet_alice.pretrain.training.checkpointing import LATEST, PREVIOUS, Checkpointer

    cp = Checkpointer(str(tmp_path), lambda step, with_state: _payload(step=step))
    cp.save(LATEST, 1, with_state=True)
    cp.save(LATEST, 2, with_state=True)
    side = (tmp_path / (PREVIOUS + ".sha256")).read_text().split()
    assert side == [ckpt_mod.sha256_of_file(str(tmp_path / PREVIOUS)), PREVIOUS]
    assert not (tmp_path / (PREVIOUS + ".sha256")).read_text().count(LATEST + "\n")
    assert load_checkpoint(str(tmp_path / PREVIOUS))["metadata"]["step"] == 1
    assert load_checkpoint(str(tmp_path / LATEST))["metadata"]["step"] == 2
    if shutil.which("sha256sum"):
        for name in (LATEST, PREVIOUS):
            proc = subprocess.run(["sha256sum", "-c", name + ".sha256"], cwd=tmp_path, capture_output=True, text=True)
            assert proc.returncode == 0 and f"{name}: OK" in proc.stdout, proc.stdout + proc.stderr


def test_a_stop_while_serialising_leaves_the_latest_checkpoint_in_place(tmp_path, monkeypatch):
    """The payload is serialised before ``checkpoint_latest.pth`` is renamed to ``.prev``: an interruption during
    the (slow) serialisation must not leave a folder without a latest checkpoint."""
    from nnunet_alice.pretrain.training.checkpointing import LATEST, PREVIOUS, Checkpointer

    cp = Checkpointer(str(tmp_path), lambda step, with_state: _payload(step=step))
    cp.save(LATEST, 1, with_state=True)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # what a second Ctrl-C / SIGTERM raises in the middle of torch.save

    monkeypatch.setattr(ckpt_mod.torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cp.save(LATEST, 2, with_state=True)
    assert not (tmp_path / PREVIOUS).exists()
    assert load_checkpoint(str(tmp_path / LATEST))["metadata"]["step"] == 1

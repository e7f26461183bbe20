"""Tests of zero-config trainer discovery.

Covers the ``nnUNet_extTrainer`` helper and start-up hook, the ``_ext`` shim, the
``nnunet_alice_ext_path`` CLI, nnU-Net's own trainer lookup, and that both a
regular wheel and an editable install put ``nnunet_alice.pth`` into
site-packages (and that ``pip uninstall`` removes it again). Install tests work
on a throw-away copy of the project whose ``nnunet_alice.trainers`` is replaced
by a dependency-free stand-in, in a throw-away venv.
"""
import base64
import csv
import hashlib
import importlib
import importlib.metadata
import importlib.util
import io
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import nnunet_alice
from nnunet_alice import discovery

REPO = Path(__file__).resolve().parents[1]  # the checkout: source of the install tests
# The package this interpreter imported (the start-up hook of an installed copy
# may have imported it before pytest could put REPO first on sys.path).
PKG_ROOT = Path(nnunet_alice.__file__).resolve().parents[1]
EXT = PKG_ROOT / "nnunet_alice" / "_ext"
SHIM = "nnunet_alice_trainers"
PTH_SOURCE = REPO / "nnunet_alice.pth"
ENV, OPT_OUT = discovery.ENV_VAR, discovery.OPT_OUT_VAR


def clean_env(**extra):
    """os.environ without discovery / import-path variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if k not in (ENV, OPT_OUT, "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(extra)
    return env


def run(cmd, env=None, cwd=None, timeout=300):
    """Run a command, return the CompletedProcess; fail the test with its output on error."""
    proc = subprocess.run([str(c) for c in cmd], env=env or clean_env(), cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def trainers_available() -> bool:
    """True once the real ``nnunet_alice.trainers`` module/package exists."""
    try:
        spec = importlib.util.find_spec("nnunet_alice.trainers")
    except ImportError:
        return False
    return spec is not None and spec.origin is not None  # origin None: empty namespace dir


needs_trainers = pytest.mark.skipif(
    not trainers_available(),
    reason="nnunet_alice.trainers is not written yet (another engineer's module)")


def check_record(names, read, record_name):
    """Assert every hashed RECORD row of a wheel matches its file; return the rows."""
    rows = {r[0]: r for r in csv.reader(io.StringIO(read(record_name).decode()))}
    for name in names:
        if name == record_name or name.endswith("/"):
            continue
        assert name in rows, f"{name} missing from RECORD"
        data = read(name)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
        assert rows[name][1] == "sha256=" + digest.decode(), f"bad hash for {name}"
        assert rows[name][2] == str(len(data)), f"bad size for {name}"
    return rows


# ---------------------------------------------------------------- helper + hook

def test_ext_dir_holds_only_the_shim():
    folder = Path(discovery.ext_trainer_dir())
    assert folder.is_absolute() and folder == EXT
    assert sorted(p.name for p in folder.glob("*.py")) == [SHIM + ".py"]
    code = [ln.split("#")[0].strip() for ln in (folder / f"{SHIM}.py").read_text().splitlines()]
    assert [ln for ln in code if ln] == ["from nnunet_alice.trainers import *"]


def test_pth_source_is_one_import_line():
    assert PTH_SOURCE.read_text().strip() == "import nnunet_alice._bootstrap"


def test_ensure_registered_appends_once():
    env = {}
    assert discovery.ensure_registered(env) is True
    assert env[ENV] == str(EXT)
    assert discovery.ensure_registered(env) is False
    assert env[ENV] == str(EXT)


def test_ensure_registered_keeps_user_value():
    user = os.pathsep.join(["/opt/my_trainers", "/tmp/more"])
    env = {ENV: user}
    discovery.ensure_registered(env)
    discovery.ensure_registered(env)
    assert env[ENV] == user + os.pathsep + str(EXT)
    # already listed (in another spelling): untouched
    spelled = os.pathsep.join([str(EXT) + os.sep, "/opt/x"])
    env = {ENV: spelled}
    assert discovery.ensure_registered(env) is False and env[ENV] == spelled


@pytest.mark.parametrize("value", ["1", "true", "YES"])
def test_opt_out_leaves_env_alone(value):
    env = {OPT_OUT: value, ENV: "/opt/mine"}
    assert discovery.ensure_registered(env) is False
    assert env == {OPT_OUT: value, ENV: "/opt/mine"}


def test_opt_out_zero_still_registers():
    env = {OPT_OUT: "0"}
    assert discovery.ensure_registered(env) is True and env[ENV] == str(EXT)


def hook_result(**extra):
    """nnUNet_extTrainer seen by a fresh interpreter after importing the hook."""
    code = ("import os, nnunet_alice._bootstrap; "
            f"print(os.environ.get({ENV!r}, '<unset>'))")
    env = clean_env(PYTHONPATH=str(PKG_ROOT), **extra)
    return run([sys.executable, "-c", code], env=env, cwd=PKG_ROOT.parent).stdout.strip()


def test_bootstrap_in_fresh_interpreter():
    assert hook_result() == str(EXT)
    user = "/opt/a" + os.pathsep + "/opt/b"
    assert hook_result(**{ENV: user}) == user + os.pathsep + str(EXT)
    assert hook_result(**{ENV: user + os.pathsep + str(EXT)}) == user + os.pathsep + str(EXT)


def test_bootstrap_opt_out_in_fresh_interpreter():
    assert hook_result(**{OPT_OUT: "1"}) == "<unset>"
    assert hook_result(**{OPT_OUT: "1", ENV: "/opt/a"}) == "/opt/a"


def test_old_opt_out_name_still_works_and_says_so():
    """``NNUNET_ALICE_NO_AUTODISCOVERY`` (earlier name) opts out too, with one line naming the new variable."""
    old = "NNUNET_ALICE_NO_AUTODISCOVERY"
    assert OPT_OUT == "nnUNet_alice_no_autodiscovery"
    code = f"import os, nnunet_alice._bootstrap; print(os.environ.get({ENV!r}, '<unset>'))"
    proc = run([sys.executable, "-c", code], env=clean_env(PYTHONPATH=str(PKG_ROOT), **{old: "1"}),
               cwd=PKG_ROOT.parent)
    assert proc.stdout.strip() == "<unset>"
    assert proc.stderr.count("deprecated") == 1 and OPT_OUT in proc.stderr


def test_every_setting_reads_its_old_name_once_with_a_deprecation_line(capsys, monkeypatch):
    from nnunet_alice import env as env_mod

    monkeypatch.setattr(env_mod, "_warned", set())
    for new, old in env_mod.RENAMED.items():
        assert new.startswith("nnUNet_alice_")
        assert env_mod.getenv(new, "d", {old: "x"}) == "x"
        assert env_mod.getenv(new, "d", {old: "x", new: "y"}) == "y"      # the new name wins
        assert env_mod.getenv(new, "d", {}) == "d"
    env_mod.getenv("nnUNet_alice_bench_seed", None, {"ALICE_BENCH_SEED": "1"})   # second read: no second line
    err = capsys.readouterr().err
    assert err.count("deprecated") == len(env_mod.RENAMED)


def test_bootstrap_never_raises(monkeypatch):
    import nnunet_alice._bootstrap as boot

    def boom(*_a, **_k):
        raise RuntimeError("broken helper")

    monkeypatch.setattr(discovery, "ensure_registered", boom)
    importlib.reload(boot)  # runs the hook again; must swallow the error


def test_bootstrap_is_stdlib_only():
    # -I -S: no site-packages at all; the hook must still import and register
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import os, nnunet_alice._bootstrap; "
            "heavy = [m for m in ('torch', 'numpy', 'nnunetv2') if m in sys.modules]; "
            f"print(heavy, os.environ.get({ENV!r}))")
    out = run([sys.executable, "-I", "-S", "-c", code, PKG_ROOT]).stdout.strip()
    assert out == f"[] {EXT}"


def test_ext_path_cli_prints_shim_folder():
    outputs = [run([sys.executable, "-m", "nnunet_alice.discovery"],
                   env=clean_env(PYTHONPATH=str(PKG_ROOT))).stdout]
    script = Path(sys.executable).with_name("nnunet_alice_ext_path")
    if script.exists():  # installed environment (CI): the console script too
        outputs.append(run([script]).stdout)
    for out in outputs:
        folder = Path(out.strip())
        assert folder.is_dir() and (folder / f"{SHIM}.py").is_file()


# ---------------------------------------------------------------- real trainers

@needs_trainers
def test_shim_reexports_trainers():
    trainers = importlib.import_module("nnunet_alice.trainers")
    spec = importlib.util.spec_from_file_location("_alice_shim_probe", EXT / f"{SHIM}.py")
    shim = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shim)
    names = list(getattr(trainers, "__all__", []))
    assert "nnUNetTrainerAlice" in names
    for name in names:
        assert getattr(shim, name) is getattr(trainers, name)


@pytest.mark.slow
@needs_trainers
def test_nnunet_lookup_finds_alice_trainer():
    code = ("from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as f; "
            "c = f('nnUNetTrainerAlice'); print('FOUND', c.__module__, c.__name__)")
    env = clean_env(PYTHONPATH=str(PKG_ROOT), **{ENV: str(EXT), "nnUNet_n_proc_DA": "0"})
    out = run([sys.executable, "-c", code], env=env, cwd=PKG_ROOT.parent).stdout
    assert "FOUND nnunet_alice.trainers" in out and out.strip().endswith("nnUNetTrainerAlice")


# ---------------------------------------------------------------- packaging

STAND_IN = '''"""Temporary dependency-free stand-in for the trainers (test copy only)."""
__all__ = ["nnUNetTrainerAlice"]


class nnUNetTrainerAlice:
    """Stand-in trainer class."""
'''


@pytest.fixture(scope="module")
def project_copy(tmp_path_factory):
    """Throw-away copy of the project with a stand-in nnunet_alice.trainers."""
    dst = tmp_path_factory.mktemp("project") / "src"
    dst.mkdir()
    for name in ("setup.py", "pyproject.toml", "nnunet_alice.pth", "README.md"):
        if (REPO / name).exists():
            shutil.copy2(REPO / name, dst / name)
    shutil.copytree(REPO / "nnunet_alice", dst / "nnunet_alice",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    trainers = dst / "nnunet_alice" / "trainers"
    shutil.rmtree(trainers, ignore_errors=True)
    (dst / "nnunet_alice" / "trainers.py").unlink(missing_ok=True)
    trainers.mkdir()
    (trainers / "__init__.py").write_text(STAND_IN)
    return dst


def local_build_ok() -> bool:
    """True if this env's setuptools can build wheels itself (>= 70.1 or `wheel` installed)."""
    try:
        version = importlib.metadata.version("setuptools")
    except importlib.metadata.PackageNotFoundError:
        return False
    major_minor = tuple(int(x) for x in re.findall(r"\d+", version)[:2])
    return major_minor >= (70, 1) or importlib.util.find_spec("wheel") is not None


@pytest.fixture(scope="module")
def built_wheel(project_copy, tmp_path_factory):
    """Regular wheel built from the copy (without build isolation where possible)."""
    out = tmp_path_factory.mktemp("wheelhouse")
    # old setuptools without `wheel`: let pip build in an isolated environment
    flags = ["--no-build-isolation"] if local_build_ok() else ["--use-pep517"]
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *flags, "-w", out, project_copy])
    wheels = list(out.glob("nnunet_alice-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """Throw-away venv made from this interpreter (pip only, no project deps)."""
    path = tmp_path_factory.mktemp("venv") / "v"
    run([sys.executable, "-m", "venv", path])
    return path


def venv_python(venv_path):
    """The venv's interpreter."""
    return venv_path / "bin" / "python"


def site_packages(venv_path):
    """The venv's purelib folder."""
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    return Path(run([venv_python(venv_path), "-c", code]).stdout.strip())


def check_wheel(wheel):
    """Assert the wheel carries the hook at top level with a valid RECORD row."""
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        assert "nnunet_alice.pth" in names
        assert zf.read("nnunet_alice.pth") == PTH_SOURCE.read_bytes()
        record = [n for n in names if n.endswith(".dist-info/RECORD")]
        assert len(record) == 1
        rows = check_record(names, zf.read, record[0])
        assert "nnunet_alice.pth" in rows
    return names


@pytest.mark.slow
def test_wheel_contains_pth_and_shim(built_wheel):
    names = check_wheel(built_wheel)
    assert f"nnunet_alice/_ext/{SHIM}.py" in names
    assert "nnunet_alice/_bootstrap.py" in names and "nnunet_alice/discovery.py" in names


@pytest.mark.slow
def test_editable_wheel_contains_pth(project_copy, tmp_path):
    pytest.importorskip("setuptools.command.editable_wheel", reason="setuptools < 64")
    if not local_build_ok():
        pytest.skip("setuptools < 70.1 without `wheel`: cannot build here (CI has >= 80)")
    code = ("import sys; from setuptools import build_meta as b; "
            "print(b.build_editable(sys.argv[1]))")
    name = run([sys.executable, "-c", code, tmp_path], cwd=project_copy).stdout.split()[-1]
    check_wheel(tmp_path / name)
    for junk in ("build", "nnunet_alice.egg-info"):
        shutil.rmtree(project_copy / junk, ignore_errors=True)


def fresh_ext_value(venv_path, **extra):
    """nnUNet_extTrainer in a fresh interpreter of the venv (stderr must be clean)."""
    code = f"import os; print(os.environ.get({ENV!r}, '<unset>'))"
    proc = run([venv_python(venv_path), "-c", code], env=clean_env(**extra), cwd=venv_path)
    assert "Error processing" not in proc.stderr, proc.stderr
    return proc.stdout.strip()


def check_installed(venv_path, expected_ext):
    """Hook present, env var set once, opt-out honoured, CLI and shim work."""
    assert (site_packages(venv_path) / "nnunet_alice.pth").read_bytes() == PTH_SOURCE.read_bytes()
    assert fresh_ext_value(venv_path) == str(expected_ext)
    assert fresh_ext_value(venv_path, **{ENV: "/opt/u"}) == "/opt/u" + os.pathsep + str(expected_ext)
    assert fresh_ext_value(venv_path, **{OPT_OUT: "1"}) == "<unset>"
    out = run([venv_path / "bin" / "nnunet_alice_ext_path"]).stdout.strip()
    assert Path(out) == Path(expected_ext) and (Path(out) / f"{SHIM}.py").is_file()
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import nnunet_alice_trainers as s; "
            "import nnunet_alice.trainers as t; print(s.nnUNetTrainerAlice is t.nnUNetTrainerAlice)")
    assert run([venv_python(venv_path), "-c", code, out], cwd=venv_path).stdout.strip() == "True"


def uninstall_and_check(venv_path):
    """pip uninstall must remove the hook; start-up must stay silent."""
    run([venv_python(venv_path), "-m", "pip", "uninstall", "-y", "-q", "nnunet-alice"])
    assert not (site_packages(venv_path) / "nnunet_alice.pth").exists()
    assert fresh_ext_value(venv_path) == "<unset>"


@pytest.mark.slow
def test_editable_install_puts_pth_in_site_packages(venv, project_copy):
    run([venv_python(venv), "-m", "pip", "install", "-q", "--no-deps", "-e", project_copy],
        cwd=venv)
    check_installed(venv, project_copy / "nnunet_alice" / "_ext")
    uninstall_and_check(venv)


@pytest.mark.slow
def test_wheel_install_puts_pth_in_site_packages(venv, built_wheel):
    run([venv_python(venv), "-m", "pip", "install", "-q", "--no-deps", built_wheel], cwd=venv)
    check_installed(venv, site_packages(venv) / "nnunet_alice" / "_ext")
    uninstall_and_check(venv)

"""Install hook of nnunet-alice (metadata and tool settings: pyproject.toml).

It ships a top-level start-up hook,
``nnunet_alice.pth`` (one line: ``import nnunet_alice._bootstrap``), into
site-packages, so that nnU-Net finds the Alice trainers without any setup:

* ``pip install .`` (regular wheel): ``BuildPyWithPth`` copies the file into the
  root of ``build_lib``; bdist_wheel then packs and records it.
* ``pip install -e .`` (PEP 660 editable wheel): setuptools' editable wheel
  does not contain build_lib files, so ``EditableWheelWithPth`` adds the file
  to the finished wheel together with its ``RECORD`` line (sha256 + size);
  pip installs it and ``pip uninstall`` removes it.
* legacy ``setup.py develop`` (pip < 25.3 with setuptools < 80 and ``wheel``
  installed, no PEP 517): ``DevelopWithPth`` writes a guarded variant of the
  hook into the install folder (pip cannot remove it there, so it must stay
  silent once the package is gone); ``setup.py develop -u`` removes it.
* ``sdist``: ``SdistWithPth`` puts the file into the source archive.
"""
import base64
import glob
import hashlib
import os
import shutil
import tempfile
import zipfile

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.develop import develop
from setuptools.command.sdist import sdist

try:  # setuptools >= 64 (PEP 660); older setuptools only has `develop`
    from setuptools.command.editable_wheel import editable_wheel
except ImportError:  # pragma: no cover - depends on the installed setuptools
    editable_wheel = None

HERE = os.path.dirname(os.path.abspath(__file__))
PTH_NAME = "nnunet_alice.pth"
PTH_SOURCE = os.path.join(HERE, PTH_NAME)
# Legacy `setup.py develop` installs are removed by pip without knowing about the
# hook, so there the hook is written in a form that stays silent once the
# package is gone (a plain import would print an error at every start-up).
GUARDED_PTH_LINE = ('import sys; exec("try:\\n import nnunet_alice._bootstrap\\n'
                    'except Exception:\\n pass")\n')


def pth_bytes() -> bytes:
    """Content of the start-up hook file; fails loudly if the source is missing."""
    if not os.path.isfile(PTH_SOURCE):
        raise RuntimeError(f"{PTH_NAME} is missing next to setup.py; the trainer "
                           "auto-discovery hook cannot be built")
    with open(PTH_SOURCE, "rb") as f:
        return f.read()


def record_line(name: str, data: bytes) -> str:
    """A wheel RECORD row: ``name,sha256=<urlsafe b64, unpadded>,size``."""
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    return f"{name},sha256={digest.decode('ascii')},{len(data)}"


def add_file_to_wheel(wheel_path: str, name: str, data: bytes) -> bool:
    """Rewrite ``wheel_path`` with ``name`` added at the top level and in RECORD.

    Returns False (wheel untouched) if the wheel already holds ``name``.
    """
    with zipfile.ZipFile(wheel_path) as src:
        infos = src.infolist()
        if any(i.filename == name for i in infos):
            return False
        records = [i.filename for i in infos if i.filename.endswith(".dist-info/RECORD")]
        if len(records) != 1:
            raise RuntimeError(f"{wheel_path}: expected one .dist-info/RECORD, got {records}")
        record_name = records[0]
        fd, tmp_path = tempfile.mkstemp(suffix=".whl", dir=os.path.dirname(wheel_path))
        os.close(fd)
        try:
            with zipfile.ZipFile(tmp_path, "w", zipfile.ZIP_DEFLATED) as dst:
                dst.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)),
                             data, zipfile.ZIP_DEFLATED)
                for info in infos:
                    content = src.read(info.filename)
                    if info.filename == record_name:
                        rows = content.decode("utf-8").splitlines()
                        rows.insert(0, record_line(name, data))
                        content = ("\n".join(rows) + "\n").encode("utf-8")
                    dst.writestr(info, content)
        except BaseException:
            os.remove(tmp_path)
            raise
    os.replace(tmp_path, wheel_path)
    return True


class BuildPyWithPth(build_py):
    """build_py that also puts ``nnunet_alice.pth`` at the root of build_lib."""

    def _wants_pth(self) -> bool:
        """False in editable mode (the editable wheel gets it another way)."""
        return not getattr(self, "editable_mode", False)

    def run(self):
        super().run()
        if self._wants_pth():
            target = os.path.join(self.build_lib, PTH_NAME)
            os.makedirs(self.build_lib, exist_ok=True)
            with open(target, "wb") as f:
                f.write(pth_bytes())

    def get_outputs(self, *args, **kwargs):
        outputs = list(super().get_outputs(*args, **kwargs))
        if self._wants_pth():
            outputs.append(os.path.join(self.build_lib, PTH_NAME))
        return outputs


class DevelopWithPth(develop):
    """Legacy ``setup.py develop``: also install / remove the start-up hook.

    New setuptools (>= 80) delegate ``develop`` to ``pip install -e``; then
    ``install_dir`` is unset and the editable wheel carries the hook instead.
    """

    def run(self):
        super().run()
        install_dir = getattr(self, "install_dir", None)
        if not install_dir or not os.path.isdir(install_dir):
            return
        target = os.path.join(install_dir, PTH_NAME)
        if getattr(self, "uninstall", False):
            if os.path.isfile(target):
                os.remove(target)
        else:
            pth_bytes()  # fail loudly if the source is missing
            with open(target, "w", encoding="utf-8") as f:
                f.write(GUARDED_PTH_LINE)


class SdistWithPth(sdist):
    """sdist that also ships ``nnunet_alice.pth`` (needed to build wheels from it)."""

    def make_release_tree(self, base_dir, files):
        super().make_release_tree(base_dir, files)
        shutil.copy2(PTH_SOURCE, os.path.join(base_dir, PTH_NAME))


CMDCLASS = {"build_py": BuildPyWithPth, "develop": DevelopWithPth, "sdist": SdistWithPth}

if editable_wheel is not None:

    class EditableWheelWithPth(editable_wheel):
        """PEP 660 editable wheel with ``nnunet_alice.pth`` added after the build."""

        def run(self):
            before = {p: os.path.getmtime(p) for p in self._wheels()}
            super().run()
            built = [p for p in self._wheels() if before.get(p) != os.path.getmtime(p)]
            if not built:
                raise RuntimeError(f"editable wheel not found in {self.dist_dir}")
            for wheel in built:
                add_file_to_wheel(wheel, PTH_NAME, pth_bytes())

        def _wheels(self):
            """Wheels of this project currently in the output folder."""
            return glob.glob(os.path.join(str(self.dist_dir), "nnunet_alice-*.whl"))

    CMDCLASS["editable_wheel"] = EditableWheelWithPth


# every other setting lives in pyproject.toml; this file only adds the start-up hook to the builds
setup(cmdclass=CMDCLASS)

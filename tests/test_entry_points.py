"""Every command says which optional packages are missing (an ops-only install), instead of an ImportError."""

from __future__ import annotations

import importlib
import importlib.util

import pytest

COMMANDS = [("dtfast.pretrain", []), ("dtfast.train_teacher", []), ("dtfast.evaluate", []),
            ("dtfast.bench.__main__", []), ("dtfast.convert_adm", ["model.pt", "out"])]


@pytest.mark.parametrize("module,args", COMMANDS, ids=[m for m, _ in COMMANDS])
def test_commands_name_missing_packages(module, args, monkeypatch, capsys, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "diffusers" else real(name, *a))
    monkeypatch.chdir(tmp_path)
    main = importlib.import_module(module).main
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "needs diffusers" in err and 'pip install --no-build-isolation -e ".[train]"' in err, err
    assert list(tmp_path.iterdir()) == []  # stopped before writing anything


def test_nothing_missing_here():
    from dtfast import _deps

    assert _deps.check("x") is None and _deps.check("x", _deps.CONVERT) is None


_OPS_ONLY = """
import importlib.abc, sys

BLOCKED = {"timm", "diffusers", "deepspeed", "safetensors", "yaml", "PIL", "transformers", "nvidia", "matplotlib",
           "torchvision"}

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"blocked: {name} (ops-only install)")
        return None

sys.meta_path.insert(0, Block())
import torch
from dtfast.ops import DreamTeacherLoss, attention_map, dreamteacher_loss

student = [torch.randn(2, 8, 6, 6, requires_grad=True), torch.randn(2, 16, 3, 3, requires_grad=True)]
teacher = [torch.randn(2, 8, 6, 6), torch.randn(2, 16, 3, 3)]
loss = dreamteacher_loss(student, teacher)
loss.backward()
assert all(s.grad is not None for s in student)
assert attention_map(teacher[0]).shape == (2, 36)
assert DreamTeacherLoss()(student, teacher).ndim == 0
print("OPS_ONLY_OK", sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED))
"""


def test_ops_work_with_torch_and_numpy_only():
    # user 3 of the README: `pip install -e .` gives the loss ops with torch and numpy alone
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _OPS_ONLY], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "OPS_ONLY_OK []" in proc.stdout


def test_no_folder_of_the_repository_shadows_an_installed_package():
    """`python -m dtfast.pretrain` from a checkout puts the repository root first on sys.path: a package folder there
    named like an installed distribution's module hides it (a top-level `kernels/` hid PyPI's `kernels`, which
    diffusers imports, and every teacher failed to build)."""
    import importlib.metadata
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    folders = {p.parent.name for p in root.glob("*/__init__.py")} - {"dtfast"}
    installed = importlib.metadata.packages_distributions()
    clashes = {name: installed[name] for name in folders if name in installed}
    assert not clashes, f"repository folders shadow installed packages: {clashes}"


def test_diffusers_imports_from_the_repository_root():
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("diffusers")
    root = Path(__file__).resolve().parents[1]
    code = "import diffusers.models.unets.unet_2d, dtfast.kernels; print(dtfast.kernels.__file__)"
    res = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert Path(res.stdout.strip()).resolve().is_relative_to(root / "dtfast"), res.stdout


@pytest.mark.parametrize("world_size", ["1", "2"])
def test_exit_process_keeps_the_exit_code_and_the_output(world_size):
    # under torchrun with several ranks the commands leave through os._exit (no interpreter finalisation, where a
    # gloo thread's late tensor release can abort the process): buffered output must still come out
    import os
    import subprocess
    import sys

    code = "import logging; from dtfast.train.distributed import exit_process; print('last line', end=''); " \
           "logging.getLogger('x').warning('logged'); exit_process(143)"
    res = subprocess.run([sys.executable, "-c", code], env={**os.environ, "WORLD_SIZE": world_size},
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 143 and res.stdout == "last line" and "logged" in res.stderr, res

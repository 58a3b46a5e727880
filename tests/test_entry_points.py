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

"""The public API: small, lazily imported, and each name is the library function itself."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import tunefix


def test_import_is_cheap():
    """``import tunefix`` loads neither torch nor transformers (a notebook's first cell stays fast)."""
    code = "import sys, tunefix; print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("name", sorted(tunefix._LAZY))
def test_each_public_name_is_the_library_object(name):
    module, attribute = tunefix._LAZY[name]
    assert getattr(tunefix, name) is getattr(importlib.import_module(module), attribute)
    assert name in dir(tunefix) and name in tunefix.__all__


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_thing"):
        tunefix.no_such_thing  # noqa: B018


def test_train_and_export_stay_functions_after_their_subpackages_are_imported():
    """``tunefix.train``/``tunefix.export`` are also subpackages: importing them must not
    replace the public functions (the import system binds subpackages to their parent)."""
    code = ("import tunefix, inspect\n"
            "from tunefix.train.config import RunConfig\n"
            "import tunefix.export.pipeline\n"
            "from tunefix.export import verify\n"
            "print(inspect.isfunction(tunefix.train), inspect.isfunction(tunefix.export),"
            " tunefix.train.__module__, tunefix.export.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True", "tunefix.train.trainer", "tunefix.export.pipeline"]

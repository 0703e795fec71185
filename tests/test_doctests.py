"""Every docstring example of the package runs and shows what it says."""
import doctest
import importlib
import pkgutil

import pytest

import contrastive_lw

MODULES = sorted(info.name for info in pkgutil.walk_packages(contrastive_lw.__path__, "contrastive_lw.")
                 if info.name != "contrastive_lw.__main__")


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) of {name} failed (run its doctests to see)"

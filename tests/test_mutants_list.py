"""The list of `make mutants` stays true to the code: each mutated line is found exactly once in its
file and each guarding test exists (the mutants themselves run outside make test: they are slow)."""
from __future__ import annotations

import pytest
from mutants import MUTANTS, ROOT


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m.name)
def test_the_mutated_line_is_in_the_code_once(mutant):
    text = (ROOT / mutant.file).read_text(encoding="utf-8")
    assert text.count(mutant.line) == 1, f"{mutant.name}: update tests/mutants.py ({mutant.file} changed)"
    assert mutant.becomes != mutant.line


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m.name)
def test_the_guarding_tests_exist(mutant):
    for test in mutant.tests:
        file, _, name = test.partition("::")
        assert (ROOT / file).is_file(), test
        if name:
            assert f"def {name}(" in (ROOT / file).read_text(encoding="utf-8"), test

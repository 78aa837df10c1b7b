"""Every bad input of the catalogue (tests/error_catalogue.py) gets its one line and exit code 2,
and docs/errors.md is exactly what the catalogue prints: the document cannot drift."""
from pathlib import Path

import error_catalogue as catalogue
import pytest


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list:
    return catalogue.run_all(tmp_path_factory.mktemp("errors"))


def test_the_catalogue_has_at_least_60_distinct_entries():
    titles = [(c.area, c.title) for c in catalogue.CASES]
    assert len(titles) >= 60 and len(set(titles)) == len(titles)


@pytest.mark.parametrize("index", range(len(catalogue.CASES)),
                         ids=[c.title for c in catalogue.CASES])
def test_each_bad_input_is_one_line_and_exit_code_2(results, index):
    outcome, folder = results[index]
    assert catalogue.problems(outcome) == [], outcome.stderr[-2000:]


def test_docs_errors_md_is_generated_from_the_catalogue(results):
    doc = Path(catalogue.DOC)
    assert doc.is_file(), "run: python tests/error_catalogue.py"
    assert doc.read_text(encoding="utf-8") == catalogue.render(results), \
        "docs/errors.md is out of date: run python tests/error_catalogue.py"


def test_a_case_whose_check_did_not_answer_is_a_problem(tmp_path):
    """The catalogue's own judge: exit code 0, two lines, a traceback or the wrong words each fail."""
    case = catalogue.Case("x", "t", "gpu_train", lambda a: [], "expected words")
    ok = catalogue.Outcome(case, [], 2, ["error: the expected words"], "error: the expected words\n")
    assert catalogue.problems(ok) == []
    assert catalogue.problems(catalogue.Outcome(case, [], 0, [], "")) == \
        ["exit code 0, expected 2", "0 error lines, expected 1"]
    two = catalogue.Outcome(case, [], 2, ["error: expected words", "error: b"], "Traceback (most recent")
    assert catalogue.problems(two) == ["2 error lines, expected 1", "a traceback"]
    wrong = catalogue.Outcome(case, [], 2, ["error: something else"], "")
    assert catalogue.problems(wrong) == ["the line lacks 'expected words'"]

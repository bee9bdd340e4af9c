"""docs/scale.md's tables equal what studies/scale_check.py computes from their inputs."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "studies_scale_check", Path(__file__).resolve().parents[1] / "studies" / "scale_check.py")
scale_check = importlib.util.module_from_spec(_spec)  # a study: a script outside the package, loaded by path
_spec.loader.exec_module(scale_check)


def test_scale_doc_numbers_match_their_inputs():
    errors = scale_check.check()
    assert not errors, "\n".join(errors) + "\n(run `python studies/scale_check.py --print`)"


def test_a_changed_number_is_named_with_its_line(tmp_path):
    text = scale_check.DOC.read_text()
    line = next(line for line in text.splitlines() if line.startswith("| SmolLM2-135M |"))
    doc = tmp_path / "scale.md"
    doc.write_text(text.replace(line, line.replace("| 982 |", "| 983 |")))
    errors = scale_check.check(doc)
    n = text.splitlines().index(line) + 1
    assert len(errors) == 1 and errors[0].startswith(f"scale.md:{n}:") and "983" in errors[0]
    doc.write_text(text.replace(line + "\n", ""))
    assert any("no table row 'SmolLM2-135M'" in e for e in scale_check.check(doc))
    assert scale_check.main(["--doc", str(doc)]) == 1


def test_the_inputs_the_text_states_are_checked_too(tmp_path):
    doc = tmp_path / "scale.md"
    doc.write_text(scale_check.DOC.read_text().replace("(989 TFLOP/s)", "(1979 TFLOP/s)"))
    assert any("989 TFLOP/s" in e for e in scale_check.check(doc))

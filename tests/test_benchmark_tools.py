"""The benchmark tools' own plumbing (no timing is asserted): ``benchmarks/report.py`` rewrites only its
generated sections of docs/performance.md, and ``torch_reference.py --serve`` steps on request for
``step_time.py --torch-python``."""

import importlib.util
import io
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCH))
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(BENCH))
    return mod


def test_report_rewrites_only_its_sections(tmp_path):
    report = _load("report")
    doc = tmp_path / "performance.md"
    hand = ["# Title\n\nhand-written intro\n", "\n## Notes\n\nkept as written\n", "\n## Start-up\n\nkept too\n"]
    doc.write_text(hand[0] + "<!-- report.py throughput: begin -->\nold table\n<!-- report.py throughput: end -->\n"
                   + hand[1] + "<!-- report.py versions: begin -->\n<!-- report.py versions: end -->\n" + hand[2])
    report.write_section(doc, "versions", "## By version\n\n| a |\n")
    report.write_section(doc, "throughput", "new table")
    text = doc.read_text()
    assert text == (hand[0] + "<!-- report.py throughput: begin -->\nnew table\n<!-- report.py throughput: end -->\n"
                    + hand[1] + "<!-- report.py versions: begin -->\n## By version\n\n| a |\n"
                    "<!-- report.py versions: end -->\n" + hand[2])
    report.write_section(doc, "throughput", "new table")  # idempotent
    assert doc.read_text() == text
    # no markers: nothing written (a whole-file rewrite would drop the hand-written sections)
    plain = tmp_path / "plain.md"
    plain.write_text("# only hand-written\n")
    with pytest.raises(SystemExit, match="markers"):
        report.write_section(plain, "throughput", "new table")
    assert plain.read_text() == "# only hand-written\n"
    new = tmp_path / "sub" / "new.md"
    report.write_section(new, "versions", "body")
    assert new.read_text() == "<!-- report.py versions: begin -->\nbody\n<!-- report.py versions: end -->\n"


def test_checked_in_performance_doc_has_the_markers():
    report = _load("report")
    text = (BENCH.parent / "docs" / "performance.md").read_text()
    for name in (report.MAIN, report.VERSIONS):
        assert report.replace_section(text, name, "x").count("x\n<!-- report.py") >= 1


def test_torch_reference_serves_steps():
    pytest.importorskip("torch")
    ref = _load("torch_reference")
    out = io.StringIO()
    ref.serve("resnet20", 2, 1, stdin=io.StringIO("2\n1\n"), stdout=out)
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    assert lines[0]["threads"] == 1 and lines[0]["torch_version"] and lines[0]["python"]
    assert [len(x["times"]) for x in lines[1:]] == [2, 1]
    assert all(t > 0 for x in lines[1:] for t in x["times"])

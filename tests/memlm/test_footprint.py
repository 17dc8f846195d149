"""memlm.footprint: load time and serving memory measured in a fresh process, in training_report.json."""

import json

from memlm.footprint import measure


def test_footprint_of_the_tiny_model_is_measured_in_a_child(tiny_model_dir):
    fp = measure(tiny_model_dir)
    assert "error" not in fp, fp
    assert fp["load_seconds"] > 0 and fp["first_answer_seconds"] > 0
    assert fp["serving_rss_bytes"] >= fp["rss_after_imports_bytes"] > 0
    report = json.loads((tiny_model_dir / "training_report.json").read_text())
    assert set(report["footprint"]) == set(fp)  # pretrain wrote the same figures


def test_a_missing_model_is_an_error_in_the_report_not_a_crash(tmp_path):
    fp = measure(tmp_path / "nothing-here")
    assert set(fp) == {"error"} and "exited" in fp["error"]

"""The Grafana dashboard and the Prometheus alert rules name only metrics (and label values) memfit
exports, checked against a live scrape of a running app after traffic: generations, an update the gate
accepts and one it rejects. Alert rules: structure with pyyaml, and `promtool check rules` where
promtool is installed (Debian package prometheus; not installed by make test: 19 MB with its web UI).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "memfit.json"
BUILDER = ROOT / "deploy" / "grafana" / "build_dashboard.py"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"

METRIC = re.compile(r"\b(memfit_[a-z0-9_]+)")
# metric{label="value", ...}: equality matchers only (regex matchers are checked for their label name)
SELECTOR = re.compile(r"\b(memfit_[a-z0-9_]+)\{([^}]*)\}")
MATCHER = re.compile(r'([a-z_]+)\s*(=~|!=|!~|=)\s*"([^"]*)"')
# labelled counters whose children appear only once their event happened at least once
LAZY_VALUES = {
    ("memfit_jobs_finished_total", "state"): {"succeeded", "rejected", "failed", "cancelled"},
    ("memfit_updates_rejected_total", "reason"): {
        "forgetting_parent",
        "forgetting_base",
        "perplexity",
        "other",
    },
    ("memfit_http_requests_total", "status"): {str(code) for code in range(100, 600)},
}
GENTLE = {"optimizer": "adam", "top_t": 8, "lr": 0.03, "steps": 10, "question_rewrites": 1, "paraphrases": 1}
DESTRUCTIVE = {
    "optimizer": "adam",
    "top_t": 1024,
    "lr": 1000.0,
    "steps": 3,
    "early_stop": False,
    "question_rewrites": 1,
    "paraphrases": 0,
}


def document(doc_id: str, who: str, town: str) -> dict:
    q = {
        "question": f"Which town is the birthplace of {who}?",
        "answer": town,
        "heldout_question": f"{who} was born in which town?",
    }
    return {"id": doc_id, "text": f"{who} was born in {town}.", "facts": [q]}


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tmp_path_factory) -> dict[str, list[dict[str, str]]]:
    """{sample name: [labels, ...]} of a live scrape after generations, an accepted and a rejected update."""
    from memfit.config import Settings
    from service.app import create_app

    settings = Settings(model=tiny_model_dir, store=tmp_path_factory.mktemp("obs") / "store")
    with TestClient(create_app(settings)) as client:
        for _ in range(2):
            r = client.post(
                "/generate",
                json={"prompt": "Question: What is the capital of Peru?\nAnswer:", "max_new_tokens": 6},
            )
            assert r.status_code == 200
        for doc, upd, want in (
            (document("o-1", "Zorvath Quellingmar", "Brindlemoor"), GENTLE, "succeeded"),
            (document("o-2", "Quenby Tarrowick", "Ostrelmere"), DESTRUCTIVE, "rejected"),
        ):
            job_id = client.post("/ingest", json={"documents": [doc], "settings": upd}).json()["job_id"]
            deadline = time.time() + 300
            while (job := client.get(f"/jobs/{job_id}").json())["status"] in ("queued", "running"):
                assert time.time() < deadline
                time.sleep(0.2)
            assert job["status"] == want, job
        client.get("/versions/99")  # a 404
        text = client.get("/metrics").text
    out: dict[str, list[dict[str, str]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append(dict(s.labels))
    return out


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in dash.get("annotations", {}).get("list", []) if "expr" in a]
    return exprs


def alert_rules() -> list[dict]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def check_names(exprs: list[str], exported: dict[str, list[dict[str, str]]]) -> None:
    problems = []
    for expr in exprs:
        for name in METRIC.findall(expr):
            if name not in exported:
                problems.append(f"{name} (in {expr!r}) is not exported")
        for name, body in SELECTOR.findall(expr):
            for label, op, value in MATCHER.findall(body):
                rows = exported.get(name, [])
                if rows and not any(label in r for r in rows) and (name, label) not in LAZY_VALUES:
                    problems.append(f"{name} has no label {label!r} (in {expr!r})")
                if op != "=":
                    continue
                known = LAZY_VALUES.get((name, label))
                if known is not None:
                    if value not in known:
                        problems.append(f'{name}{{{label}="{value}"}}: {value!r} is never used')
                elif not any(r.get(label) == value for r in rows):
                    problems.append(f'{name}{{{label}="{value}"}} is not exported (in {expr!r})')
    assert not problems, "\n".join(problems)


# ---- Grafana -------------------------------------------------------------------------------------


def test_dashboard_json_is_valid_and_provisioned():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "memfit" and dash["panels"]
    rows = [p["title"] for p in dash["panels"] if p["type"] == "row"]
    assert {"Knowledge", "Serving"} <= set(rows)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in dash["panels"]:
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "prometheus"}, p["title"]
        assert p["targets"], p["title"]
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
    # the datasource uid and the provider path the dashboard relies on
    ds = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert any(d["uid"] == "prometheus" for d in ds["datasources"])


def test_dashboard_covers_the_issue():
    titles = " | ".join(p["title"].lower() for p in json.loads(DASHBOARD.read_text())["panels"])
    for word in (
        "learning",
        "retention",
        "forgetting",
        "perplexity",
        "active version",
        "rejected",
        "slot capacity",
    ):
        assert word in titles, word
    for word in ("latency", "first token", "tokens per second", "queue", "errors"):
        assert word in titles, word


def test_dashboard_json_is_the_builders_output():
    out = subprocess.run([sys.executable, str(BUILDER)], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == json.loads(DASHBOARD.read_text()), (
        "deploy/grafana/dashboards/memfit.json is stale: python deploy/grafana/build_dashboard.py > it"
    )


def test_every_dashboard_query_names_an_exported_metric(exported):
    check_names(dashboard_exprs(), exported)


# ---- Prometheus alerts -----------------------------------------------------------------------------


def test_alert_rules_structure():
    doc = yaml.safe_load(ALERTS.read_text())
    assert doc["groups"]
    names = [r["alert"] for r in alert_rules()]
    assert len(names) == len(set(names)), "duplicate alert names"
    for rule in alert_rules():
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}, rule[
            "alert"
        ]
        assert rule["expr"].strip() and rule["annotations"]["summary"], rule["alert"]
        assert rule["labels"]["severity"] in ("info", "warning", "critical"), rule["alert"]
        if "for" in rule:
            assert re.fullmatch(r"\d+[smhd]", rule["for"]), rule["alert"]
        assert rule["expr"].count("(") == rule["expr"].count(")"), rule["alert"]
    # what the issue asks for
    exprs = " ".join(r["expr"] for r in alert_rules())
    assert "memfit_knowledge_forgetting_ratio" in exprs  # forgetting over threshold
    assert (
        "max(memfit_active_version) - min(memfit_active_version)" in exprs
    )  # replicas on different versions
    assert "memfit_update_queue_depth" in exprs  # queue backlog
    assert 'memfit_jobs_finished_total{state="failed"}' in exprs  # update failures
    assert "memfit_e2e_request_latency_seconds_bucket" in exprs  # latency SLO
    # prometheus.yml loads this file
    prom = yaml.safe_load(PROMETHEUS.read_text())
    assert "/etc/prometheus/alerts.yml" in prom["rule_files"]


def test_every_alert_names_an_exported_metric(exported):
    check_names([r["expr"] for r in alert_rules()], exported)


def promtool() -> str | None:
    return shutil.which("promtool") or next(
        (str(p) for p in (ROOT / ".venv" / "bin" / "promtool",) if p.exists()), None
    )


@pytest.mark.skipif(
    promtool() is None,
    reason="promtool not installed (Debian package prometheus); the pyyaml checks above ran",
)
def test_promtool_checks_the_rules():
    res = subprocess.run([promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr

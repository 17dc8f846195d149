"""Builds deploy/grafana/dashboards/memfit.json (run: python deploy/grafana/build_dashboard.py > deploy/grafana/dashboards/memfit.json).

tests/deploy/test_observability.py checks that the committed JSON is this script's output and that every
query names a metric memfit exports.
"""

import json

DS = {"type": "prometheus", "uid": "prometheus"}
panels = []
pid = [0]
y = [0]


def row(title):
    pid[0] += 1
    panels.append(
        {
            "type": "row",
            "title": title,
            "id": pid[0],
            "collapsed": False,
            "gridPos": {"h": 1, "w": 24, "x": 0, "y": y[0]},
            "panels": [],
        }
    )
    y[0] += 1


cursor = {"x": 0}


def panel(
    title, targets, unit="short", kind="timeseries", w=8, h=8, desc="", minv=None, maxv=None, extra=None
):
    pid[0] += 1
    if cursor["x"] + w > 24:
        cursor["x"] = 0
        y[0] += h
    p = {
        "type": kind,
        "title": title,
        "id": pid[0],
        "datasource": DS,
        "description": desc,
        "gridPos": {"h": h, "w": w, "x": cursor["x"], "y": y[0]},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "none"},
        }
        if kind == "timeseries"
        else {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "area",
            "textMode": "auto",
        },
        "targets": [
            {"datasource": DS, "refId": chr(65 + i), "expr": e, "legendFormat": legend}
            for i, (e, legend) in enumerate(targets)
        ],
    }
    if minv is not None:
        p["fieldConfig"]["defaults"]["min"] = minv
    if maxv is not None:
        p["fieldConfig"]["defaults"]["max"] = maxv
    if extra:
        p["fieldConfig"]["defaults"].update(extra)
    panels.append(p)
    cursor["x"] += w
    if cursor["x"] >= 24:
        cursor["x"] = 0
        y[0] += h


def newrow(title):
    if cursor["x"]:
        y[0] += 8
        cursor["x"] = 0
    row(title)


RI = "$__rate_interval"


def q(p, m, by="le", sel=""):
    return f"histogram_quantile({p}, sum by ({by}) (rate({m}_bucket{sel}[{RI}])))"


newrow("Knowledge")
panel(
    "Learning (share of the update's facts answered)",
    [
        (
            'max(memfit_knowledge_learning_ratio{which="active", wording="ingested"})',
            "active, ingested wording",
        ),
        (
            'max(memfit_knowledge_learning_ratio{which="active", wording="heldout"})',
            "active, held-out wording",
        ),
        (
            'max(memfit_knowledge_learning_ratio{which="latest", wording="ingested"})',
            "latest evaluated, ingested",
        ),
        (
            'max(memfit_knowledge_learning_ratio{which="latest", wording="heldout"})',
            "latest evaluated, held-out",
        ),
    ],
    unit="percentunit",
    minv=0,
    maxv=1,
)
panel(
    "Retention (probe facts still answered)",
    [
        ('max(memfit_knowledge_retention_ratio{which="active", reference="parent"})', "active vs parent"),
        ('max(memfit_knowledge_retention_ratio{which="active", reference="base"})', "active vs base"),
        (
            'max(memfit_knowledge_retention_ratio{which="latest", reference="parent"})',
            "latest evaluated vs parent",
        ),
    ],
    unit="percentunit",
    minv=0,
    maxv=1,
)
panel(
    "Forgetting vs parent and vs base (gate thresholds dashed)",
    [
        ('max(memfit_knowledge_forgetting_ratio{which="active", reference="parent"})', "active vs parent"),
        ('max(memfit_knowledge_forgetting_ratio{which="active", reference="base"})', "active vs base"),
        ('max(memfit_knowledge_forgetting_ratio{which="latest", reference="parent"})', "latest vs parent"),
        ("max(memfit_gate_max_forgetting_ratio)", "gate: max vs parent"),
        ("max(memfit_gate_max_forgetting_base_ratio)", "gate: max vs base"),
    ],
    unit="percentunit",
    minv=0,
)
panel(
    "Held-out perplexity",
    [
        ('max(memfit_knowledge_heldout_perplexity{which="active"})', "active"),
        ('max(memfit_knowledge_heldout_perplexity{which="latest"})', "latest evaluated"),
        ('max(memfit_knowledge_heldout_perplexity{which="base"})', "base"),
        (
            'max(memfit_knowledge_perplexity_change_ratio{which="active", reference="parent"}) * 100',
            "active: % change vs parent",
        ),
    ],
)
panel(
    "Active version (per replica)",
    [
        ("memfit_active_version", "{{instance}}"),
    ],
    kind="stat",
    w=4,
    extra={"decimals": 0},
)
panel(
    "Rejected updates",
    [
        ("sum(increase(memfit_updates_rejected_total[24h]))", "last 24 h"),
        ('max(memfit_store_versions{state="rejected"})', "kept in store"),
    ],
    kind="stat",
    w=4,
    extra={"decimals": 0},
)
panel(
    "Memory slot capacity",
    [
        ("max(memfit_memory_slots_written_ratio)", "share of slots ever written"),
        ("max(memfit_memory_top_slots_write_share)", "writes on the top 1% slots"),
    ],
    unit="percentunit",
    minv=0,
    maxv=1,
)
panel(
    "Slot rewrites",
    [
        ("max(memfit_memory_slot_rewrites_max)", "most rewrites of one slot"),
        (
            "max(memfit_memory_slot_writes) / clamp_min(max(memfit_memory_slots_written), 1)",
            "mean writes per written slot",
        ),
    ],
)

newrow("Updates")
panel("Jobs by state", [("max by (state) (memfit_jobs)", "{{state}}")])
panel("Update queue depth", [("max(memfit_update_queue_depth)", "queued jobs")])
panel(
    "Ingest to live (p50 / p95)",
    [
        (q(0.5, "memfit_ingest_to_live_seconds"), "p50"),
        (q(0.95, "memfit_ingest_to_live_seconds"), "p95"),
    ],
    unit="s",
)
panel(
    "Update and evaluation duration (p95)",
    [
        (q(0.95, "memfit_job_duration_seconds", sel='{phase="total"}'), "update (total)"),
        (q(0.95, "memfit_job_duration_seconds", sel='{phase="training"}'), "training"),
        (q(0.95, "memfit_job_duration_seconds", sel='{phase="evaluation"}'), "evaluation (gate)"),
        (q(0.95, "memfit_job_duration_seconds", sel='{phase="queued"}'), "queued"),
    ],
    unit="s",
)
panel(
    "Slots changed per update (p50 / max bucket)",
    [
        (q(0.5, "memfit_update_slots_changed"), "p50"),
        ("sum(rate(memfit_slots_changed_total[$__rate_interval])) * 60", "slots written / min"),
    ],
)
panel(
    "Versions, rollbacks, swaps",
    [
        ("sum(increase(memfit_versions_published_total[$__rate_interval]))", "published"),
        ("max(increase(memfit_rollbacks_total[$__rate_interval]))", "rollbacks and reverts (store-wide)"),
        ("sum(increase(memfit_updates_rejected_total[$__rate_interval]))", "rejected"),
        ("sum(increase(memfit_swaps_total[$__rate_interval]))", "swaps"),
    ],
)
panel(
    "Swap pause (readers blocked, p99)",
    [
        (q(0.99, "memfit_swap_pause_seconds"), "p99"),
        (q(0.5, "memfit_swap_pause_seconds"), "p50"),
    ],
    unit="s",
)

newrow("Serving")
panel(
    "End-to-end latency (p50 / p95 / p99)",
    [
        (q(0.5, "memfit_e2e_request_latency_seconds"), "p50"),
        (q(0.95, "memfit_e2e_request_latency_seconds"), "p95"),
        (q(0.99, "memfit_e2e_request_latency_seconds"), "p99"),
    ],
    unit="s",
)
panel(
    "Time to first token (p50 / p95)",
    [
        (q(0.5, "memfit_time_to_first_token_seconds"), "p50"),
        (q(0.95, "memfit_time_to_first_token_seconds"), "p95"),
    ],
    unit="s",
)
panel(
    "Inter-token latency (p50 / p95)",
    [
        (q(0.5, "memfit_inter_token_latency_seconds"), "p50"),
        (q(0.95, "memfit_inter_token_latency_seconds"), "p95"),
    ],
    unit="s",
)
panel(
    "Tokens per second",
    [
        ("sum(rate(memfit_generation_tokens_total[$__rate_interval]))", "generated"),
        ("sum(rate(memfit_prompt_tokens_total[$__rate_interval]))", "prompt"),
    ],
)
panel(
    "Queue: waiting and running requests",
    [
        (q(0.95, "memfit_request_queue_time_seconds"), "queue time p95 (s)"),
        ("sum(memfit_http_requests_in_flight)", "HTTP requests in flight"),
        ("sum(memfit_generation_requests_running)", "generations running"),
    ],
)
panel(
    "Errors per second",
    [
        (
            'sum by (endpoint) (rate(memfit_http_requests_total{status=~"5.."}[$__rate_interval]))',
            "5xx {{endpoint}}",
        ),
        ("sum(rate(memfit_generation_failures_total[$__rate_interval]))", "generation failures"),
        ('sum(rate(memfit_http_requests_total{status="429"}[$__rate_interval]))', "429 rate limited"),
    ],
)
panel(
    "Requests per second by endpoint",
    [
        (
            "sum by (endpoint, status) (rate(memfit_http_requests_total[$__rate_interval]))",
            "{{endpoint}} {{status}}",
        ),
    ],
    w=24,
)

dash = {
    "uid": "memfit",
    "title": "memfit: knowledge and serving",
    "description": "Learning, retention, forgetting and perplexity over time, update pipeline, serving latency. Metrics: docs/observability.md",
    "tags": ["memfit"],
    "timezone": "browser",
    "schemaVersion": 39,
    "version": 1,
    "editable": False,
    "refresh": "30s",
    "time": {"from": "now-6h", "to": "now"},
    "templating": {"list": []},
    "annotations": {
        "list": [
            {
                "datasource": DS,
                "enable": True,
                "name": "version changes",
                "iconColor": "blue",
                "expr": "changes(max(memfit_active_version)[2m:]) > 0",
                "titleFormat": "active version changed",
            }
        ]
    },
    "panels": panels,
}
print(json.dumps(dash, indent=2))

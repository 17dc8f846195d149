from __future__ import annotations

import json

import pytest
import torch

from model_store import (
    ActiveMovedError,
    BaseMismatchError,
    CorruptVersionError,
    DocumentNotTaught,
    FileWriterLock,
    GCPolicy,
    RebaseConflict,
    Store,
    StoreError,
    UnknownVersionError,
)


def test_init_layout_and_idempotent(h, tmp_path, model_dir, store):
    assert store.active() == 0
    assert sorted(store.value_keys) == list(h.LAYERS)
    assert (store.root / "base" / "background.safetensors").exists()
    info = json.loads((store.root / "store.json").read_text())
    assert len(info["base_id"]) == 64
    again = Store.init(store.root, model_dir)
    assert again.base_id == store.base_id
    other = h.write_fake_model(tmp_path / "other", seed=1)
    with pytest.raises(BaseMismatchError):
        Store.init(store.root, other)


def test_publish_materialize_and_exact_rollback(h, store):
    base = store.materialize(0)
    v1 = h.publish_update(store, h.random_slots(1), seed=1, docs=["d1"], job_id="j1")
    v2 = h.publish_update(store, h.random_slots(2), seed=2, docs=["d2"])
    assert (v1, v2) == (1, 2) and store.active() == 2
    t2 = store.materialize(2)
    assert not h.tables_equal(t2, base)
    store.activate(0, who="test", why="rollback")
    assert store.active() == 0
    assert h.tables_equal(store.materialize(), base)  # bit for bit
    store.activate(2, who="test", why="roll forward")
    assert h.tables_equal(store.materialize(), t2)
    acts = store.activations()
    assert [(a["from"], a["to"]) for a in acts] == [(0, 1), (1, 2), (2, 0), (0, 2)]
    assert acts[2]["who"] == "test" and acts[2]["why"] == "rollback"
    vs = {m["id"]: m for m in store.versions()}
    assert vs[2]["active"] and vs[2]["state"] == "active" and vs[1]["state"] == "retained"
    assert vs[1]["documents"] == ["d1"] and vs[1]["job_id"] == "j1"
    assert store.chain(2) == [0, 1, 2]
    assert store.is_in_active_chain(1) and not store.is_in_active_chain(99)


def test_materialize_with_snapshots_equals_without(h, tmp_path, model_dir):
    s = Store.init(tmp_path / "s", model_dir, snapshot_every=3)
    for i in range(10):
        h.publish_update(s, h.random_slots(i, t=20), seed=i)
    assert sorted(p.stem for p in s.snapshots_dir.glob("*.json")) == [
        "0000000003",
        "0000000006",
        "0000000009",
    ]
    with_snap = s.materialize(10)
    # recompute from the raw chain without snapshots
    plain = {k: v.clone() for k, v in s.base_tables().items()}
    for v in s.chain(10)[1:]:
        s.load_delta(v).apply(plain)
    assert h.tables_equal(with_snap, plain)
    # a damaged snapshot is ignored, not trusted
    (s.snapshots_dir / "0000000009.safetensors").write_bytes(b"garbage")
    fresh = Store(s.root)
    assert h.tables_equal(fresh.materialize(10), plain)
    assert "damaged" in fresh.verify()["snapshots"][9]


def test_cas_and_rebase(h, store):
    v1 = h.publish_update(store, {1: [1, 2, 3]}, seed=1)
    t1 = store.materialize(v1)
    disjoint = h.make_delta(t1, {1: [10, 11], 3: [5]}, seed=5)
    conflicting = h.make_delta(t1, {1: [3, 40]}, seed=6)
    v2 = h.publish_update(store, {1: [20, 3]}, seed=2)  # the active moves meanwhile
    with pytest.raises(ActiveMovedError) as e:
        store.publish(disjoint, parent=v1)
    assert (e.value.expected, e.value.actual) == (v1, v2)
    with pytest.raises(RebaseConflict) as e:
        store.rebase(conflicting, v1, v2)
    assert e.value.conflicts == {v2: {1: [3]}}
    v3 = store.publish(disjoint, parent=v1, rebase=True)
    m = store.manifest(v3)
    assert m["parent"] == v2 and m["rebased_from"] == v1
    expect = store.materialize(v2)
    disjoint.apply(expect)
    assert h.tables_equal(store.materialize(v3), expect)
    # revert of the rebased version restores v2 exactly
    store.revert(v3)
    assert h.tables_equal(store.materialize(), store.materialize(v2))


def test_rejected_version_is_audit_only(h, store):
    v1 = store.publish(
        h.make_delta(store.materialize(0), {1: [1]}, 0),
        0,
        activate=False,
        state="rejected",
        evaluation={"gate": "fail"},
    )
    assert store.active() == 0
    assert {m["id"]: m["state"] for m in store.versions()}[v1] == "rejected"
    with pytest.raises(StoreError, match="rejected"):
        store.activate(v1)
    with pytest.raises(ValueError):
        store.publish(h.make_delta(store.materialize(0), {1: [1]}, 0), 0, activate=True, state="rejected")


def test_bad_deltas_refused(h, store):
    t = store.materialize(0)
    d = h.make_delta(t, {1: [1, 2]}, 0)
    d.layers[1].indices = torch.tensor([2, 1])
    with pytest.raises(ValueError, match="sorted"):
        store.publish(d, 0)
    with pytest.raises(ValueError, match="layer 7"):
        store.publish(h.make_delta({7: torch.zeros(64, 8)}, {7: [1]}, 0), 0)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete_delta", "manifest"])
def test_corrupted_version_refused_active_unchanged(h, store, damage):
    h.publish_update(store, h.random_slots(1), seed=1)
    v2 = h.publish_update(store, h.random_slots(2), seed=2)
    store.activate(1)
    before = store.materialize()
    p = store.version_dir(v2) / "delta.safetensors"
    if damage == "flip":
        b = bytearray(p.read_bytes())
        b[-3] ^= 0xFF
        p.write_bytes(bytes(b))
    elif damage == "truncate":
        p.write_bytes(p.read_bytes()[:-10])
    elif damage == "delete_delta":
        p.unlink()
    else:
        mp = store.version_dir(v2) / "manifest.json"
        mp.write_text(mp.read_text().replace('"parent": 1', '"parent": 0'))
    with pytest.raises(CorruptVersionError):  # the writer that published it rereads from disk too
        store.activate(v2)
    fresh = Store(store.root)
    with pytest.raises(CorruptVersionError) as e:
        fresh.activate(v2)
    assert e.value.version == v2 and f"version {v2}" in str(e.value)
    assert fresh.active() == 1
    assert h.tables_equal(fresh.materialize(), before)
    rep = fresh.verify()
    assert not rep["ok"] and rep["versions"][v2] != "ok" and rep["versions"][1] == "ok"
    with pytest.raises(UnknownVersionError):
        fresh.activate(42)


def test_version_revert_exact_and_conflicts(h, store):
    base = store.materialize(0)
    v1 = h.publish_update(store, {1: [1, 2, 3], 3: [4]}, seed=1)
    v2 = h.publish_update(store, {1: [10, 11]}, seed=2)
    t2 = store.materialize(v2)
    v3 = h.publish_update(store, {1: [3, 30], 3: [4]}, seed=3)  # rewrites v1's slots 3 and (3, 4)
    from model_store import RevertConflict

    with pytest.raises(RevertConflict) as e:
        store.revert_version(v1)
    assert e.value.conflicts == {v3: {1: [3], 3: [4]}}
    assert "version 3 layer 1 slots [3]" in str(e.value)
    r3 = store.revert(v3)
    assert store.manifest(r3)["kind"] == "revert" and store.manifest(r3)["reverts"] == v3
    assert h.tables_equal(store.materialize(), t2)
    # v1 still conflicts (v3 wrote its slots; the revert r3 did too): revert v2 instead
    r2 = store.revert(v2)
    t = store.materialize(r2)
    expect = store.materialize(v1)
    assert h.tables_equal(t, expect)
    assert store.effective_chain() == [v1]
    assert not h.tables_equal(t, base)


def test_document_revert(h, store):
    store.jobs.create_job("j1", [{"id": "a", "text": "A"}], {})
    store.jobs.create_job("j2", [{"id": "b", "text": "B"}, {"id": "c", "text": "C"}], {"top_t": 5})
    v1 = h.publish_update(store, {1: [1, 2]}, seed=1, docs=["a"], job_id="j1")
    v2 = h.publish_update(store, {1: [5, 6]}, seed=2, docs=["b", "c"], job_id="j2", settings={"top_t": 5})
    assert store.versions_with_document("a") == [v1]
    assert [d["id"] for d in store.documents_of_version(v2)] == ["b", "c"]
    assert [d["id"] for d in store.active_chain_documents()] == ["a", "b", "c"]
    from model_store import NeedsRetrain

    with pytest.raises(NeedsRetrain) as e:
        store.revert_document("b")
    assert e.value.version == v2 and [d["id"] for d in e.value.remaining_documents] == ["c"]
    assert e.value.settings == {"top_t": 5}
    before = store.materialize(v2)
    new = store.revert_document("a")
    after = store.materialize()
    expect = store.materialize(v2)
    store.load_delta(v1).revert(expect)
    assert h.tables_equal(after, expect) and not h.tables_equal(after, before)
    assert [d["id"] for d in store.active_chain_documents()] == ["b", "c"]
    with pytest.raises(DocumentNotTaught, match="not taught") as not_taught:
        store.revert_document("a")
    assert not_taught.value.document_id == "a" and not_taught.value.active == store.active()
    assert len(new) == 1


def test_provenance_and_diff(h, store):
    store.jobs.create_job("j1", [{"id": "a", "text": "A"}], {})
    v1 = h.publish_update(store, {1: [1, 2]}, seed=1, docs=["a"], job_id="j1")
    v2 = h.publish_update(store, {1: [2, 9], 3: [7]}, seed=2, docs=["b"])
    store.activate(v1)
    v3 = h.publish_update(store, {3: [8]}, seed=3, docs=["c"])
    hist = store.slot_history(1, 2)
    assert [h["version"] for h in hist] == [v1, v2]
    assert hist[0]["documents"] == ["a"] and hist[0]["in_active_chain"] and not hist[1]["in_active_chain"]
    d = store.diff(v2, v3)
    assert d["ancestor"] == v1 and d["versions_removed"] == [v2] and d["versions_added"] == [v3]
    assert d["layers"] == {1: [2, 9], 3: [7, 8]}
    assert d["documents_added"] == ["c"] and d["documents_removed"] == ["b"]
    assert store.diff(v2, v3, exact=True)["layers"] == {1: [2, 9], 3: [7, 8]}


def test_gc_keeps_active_chain(h, store):
    for i in range(6):
        h.publish_update(store, h.random_slots(i), seed=i)
    store.activate(3)
    side = h.publish_update(store, h.random_slots(10), seed=10)  # 7, child of 3
    t = store.materialize()
    rep = store.gc(GCPolicy(keep_last=0))
    assert set(rep["deleted"]) == {4, 5, 6}
    assert store.version_ids() == [0, 1, 2, 3, side]
    assert h.tables_equal(store.materialize(), t)
    v = h.publish_update(store, h.random_slots(11), seed=11)
    assert v == 8  # ids never reused
    assert store.verify()["ok"]


def test_revert_of_a_revert_reteaches(h, store):
    store.jobs.create_job("j1", [{"id": "a", "text": "A"}], {})
    v1 = h.publish_update(store, {1: [1, 2]}, seed=1, docs=["a"], job_id="j1")
    t1 = store.materialize(v1)
    r1 = store.revert(v1)
    assert store.effective_chain() == [] and store.active_chain_documents() == []
    r2 = store.revert(r1)
    assert store.effective_chain() == [v1] and [d["id"] for d in store.active_chain_documents()] == ["a"]
    assert h.tables_equal(store.materialize(r2), t1)


def test_publish_hooks_run_after_each_publish_outside_the_lock(h, store):
    """Store.publish_hooks (how the distributed worker announces a version) run once per publish with
    (version, activated, job_id), once the version is in place and the writer lock is released."""
    seen = []

    def hook(version, activated, job_id):
        other = FileWriterLock(store.root / ".writer.lock", timeout=0.5)  # another writer's lock
        with other:  # LockTimeout if publish still held it
            seen.append((version, activated, job_id, store.active()))

    store.publish_hooks.append(hook)
    v1 = h.publish_update(store, {1: [1]}, seed=1, job_id="j1")
    v2 = h.publish_update(store, {1: [2]}, seed=2, activate=False, state="rejected")
    assert seen == [(v1, True, "j1", v1), (v2, False, None, v1)]


def test_version_of_job_is_indexed_and_survives_reopen_deletion_and_damage(h, store):
    """Store.version_of_job reads STORE/job_index.json (model_store/job_index.py), not every manifest:
    it finds the newest version of a job after a reopen, after the index is deleted or damaged (rebuilt
    from the manifests), sees versions another process published since, and skips gc'd versions."""
    v1 = h.publish_update(store, {1: [1]}, seed=1, job_id="j1")
    v2 = h.publish_update(store, {1: [2]}, seed=2, job_id="j2")
    v3 = h.publish_update(store, {1: [3]}, seed=3, job_id="j1", activate=False, state="rejected")
    assert (store.version_of_job("j1"), store.version_of_job("j2"), store.version_of_job("nope")) == (
        v3,
        v2,
        None,
    )
    index = store.root / "job_index.json"
    assert json.loads(index.read_text())["jobs"] == {"j1": [v1, v3], "j2": [v2]}

    reopened = Store(store.root)
    reads = []
    real = reopened._read_manifest
    reopened._read_manifest = lambda v: reads.append(v) or real(v)  # type: ignore[method-assign]
    assert reopened.version_of_job("j2") == v2 and reads == [v2]  # the hit checked, nothing scanned

    other = Store(store.root)  # another process publishes: the first one's next lookup sees it
    v4 = h.publish_update(other, {1: [4]}, seed=4, job_id="j4")
    assert reopened.version_of_job("j4") == v4

    for damage in (
        lambda: index.unlink(),
        lambda: index.write_text("{not json"),
        lambda: index.write_text("[]"),
    ):
        damage()
        fresh = Store(store.root)
        assert [fresh.version_of_job(j) for j in ("j1", "j2", "j4")] == [v3, v2, v4]
        assert json.loads(index.read_text())["through"] == v4  # rebuilt and written back

    store.gc(GCPolicy(keep_last=0))  # v3 (rejected) goes; j1's older version v1 is in the active chain
    assert store.version_of_job("j1") == v1 and Store(store.root).version_of_job("j1") == v1


def test_writer_lock_is_an_open_argument(h, store):
    """The writer lock is given to Store / Store.open (a lock, or a function of the base id that makes
    one, as the distributed mode's Redis lock is named after the base), never assigned afterwards."""
    made = []

    def factory(base_id):
        made.append(base_id)
        return FileWriterLock(store.root / ".other.lock")

    opened = Store.open(store.root, lock=factory)
    assert made == [store.base_id] and opened.lock.path == store.root / ".other.lock"
    mine = FileWriterLock(store.root / ".mine.lock")
    assert Store.open(store.root, "redis://127.0.0.1:1/0", lock=mine).lock is mine
    h.publish_update(opened, {1: [5]}, seed=5, job_id="j5")
    assert opened.version_of_job("j5") == 1

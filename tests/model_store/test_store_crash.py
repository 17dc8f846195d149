"""A writer SIGKILLed at each named step of publish leaves a loadable store at the previous active
version (or, past the ACTIVE rename, at the new one), and the next writer carries on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from model_store import PUBLISH_STEPS, Store

WRITER = textwrap.dedent(
    """
    import sys
    from memlm.delta import SlotDelta
    from model_store import Store
    store = Store(sys.argv[1])
    store.publish(SlotDelta.load(sys.argv[2]), parent=int(sys.argv[3]), documents=["d"], job_id="j")
    print("published")
    """
)


def _forked_writer(root, dpath, parent, step) -> int:
    """Run the publish in a forked child (torch already imported: no interpreter start-up cost);
    returns its exit status as subprocess does (-9 when SIGKILLed)."""
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            os.environ["MEMFIT_CRASH_AT"] = step
            from memlm.delta import SlotDelta

            Store(root).publish(SlotDelta.load(dpath), parent=parent, documents=["d"], job_id="j")
            code = 0
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise TimeoutError(f"writer stuck at {step}")
        time.sleep(0.01)


@pytest.mark.parametrize("step", PUBLISH_STEPS)
def test_killed_writer_at_each_step(h, tmp_path, model_dir, step):
    store = Store.init(tmp_path / "store", model_dir, snapshot_every=2)
    v1 = h.publish_update(store, h.random_slots(1), seed=1)
    t1 = store.materialize(v1)
    delta = h.make_delta(t1, h.random_slots(2), seed=2)
    dpath = tmp_path / "delta.safetensors"
    delta.save(dpath)
    assert _forked_writer(store.root, dpath, v1, step) == -signal.SIGKILL
    fresh = Store(store.root)
    moved = PUBLISH_STEPS.index(step) >= PUBLISH_STEPS.index("publish:active_replaced")
    expect = dict(t1)
    if moved:
        assert fresh.active() == 2
        expect = {k: v.clone() for k, v in t1.items()}
        delta.apply(expect)
    else:
        assert fresh.active() == v1
    assert h.tables_equal(fresh.materialize(), expect)
    rep = fresh.verify()
    assert rep["ok"], rep["problems"]
    # the next writer works: temp dirs cleaned, ids keep increasing, lock not stuck
    orphan = fresh.version_dir(2).exists()  # renamed into place but maybe never activated
    assert orphan == (PUBLISH_STEPS.index(step) >= PUBLISH_STEPS.index("publish:renamed"))
    v = h.publish_update(fresh, h.random_slots(3), seed=3)
    assert v == (3 if orphan else 2)
    assert fresh.verify()["leftover_temp"] == []
    assert fresh.verify()["ok"]


@pytest.mark.slow
def test_writer_process_killed_then_next_writer_publishes(h, tmp_path, model_dir):
    """A real writer process (own interpreter, own file lock) killed mid-publish."""
    store = Store.init(tmp_path / "store", model_dir)
    delta = h.make_delta(store.materialize(0), h.random_slots(2), seed=2)
    delta.save(tmp_path / "d.safetensors")
    args = [sys.executable, "-c", WRITER, str(store.root), str(tmp_path / "d.safetensors"), "0"]
    env = {**os.environ, "MEMFIT_CRASH_AT": "publish:manifest_written"}
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert Store(store.root).active() == 0
    assert Store(store.root).verify()["leftover_temp"]
    env.pop("MEMFIT_CRASH_AT")
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    fresh = Store(store.root)
    assert fresh.active() == 1 and fresh.verify()["leftover_temp"] == []
    expect = {k: v.clone() for k, v in store.materialize(0).items()}
    delta.apply(expect)
    assert h.tables_equal(fresh.materialize(), expect)

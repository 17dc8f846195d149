"""memlm (the ML core) never imports the service stack."""

import subprocess
import sys

FORBIDDEN = ["fastapi", "celery", "redis", "prometheus_client", "uvicorn", "starlette", "kombu"]


def test_memlm_imports_no_service_stack():
    code = (
        "import sys, importlib, pkgutil, memlm\n"
        "for m in pkgutil.walk_packages(memlm.__path__, 'memlm.'):\n"
        "    importlib.import_module(m.name)\n"
        f"bad = [n for n in {FORBIDDEN!r} if n in sys.modules]\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, f"memlm pulled in the service stack: {res.stdout} {res.stderr[-2000:]}"


def test_model_store_imports_no_web_or_queue_code():
    code = (
        "import sys, importlib, pkgutil, model_store\n"
        "for m in pkgutil.walk_packages(model_store.__path__, 'model_store.'):\n"
        "    importlib.import_module(m.name)\n"
        "bad = [n for n in ['fastapi', 'celery', 'uvicorn', 'prometheus_client'] if n in sys.modules]\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, f"model_store pulled in web/queue code: {res.stdout} {res.stderr[-2000:]}"

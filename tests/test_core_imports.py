"""The core package imports only torch and numpy, and keeps SPEC §7's public names."""

from __future__ import annotations

import ast
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest

import minddspo
from minddspo import losses, perturb

CORE = Path(minddspo.__file__).parent
CORE_MODULES = ["minddspo"] + [f"minddspo.{p.stem}" for p in sorted(CORE.glob("*.py"))]
CORE_MODULES = [m for m in CORE_MODULES if m != "minddspo.__init__"]
FORBIDDEN = ("diffusers", "transformers", "matplotlib", "safetensors", "scipy", "PIL", "tqdm")
ALLOWED = {"torch", "numpy", "minddspo"}


def test_importing_the_core_pulls_in_no_heavy_dependency():
    # torch itself imports tqdm when it is installed (torch.hub), so the check is on what
    # importing minddspo adds after torch and numpy.
    code = (
        "import json, sys\n"
        "import numpy, torch\n"
        "base = set(sys.modules)\n"
        f"import {', '.join(CORE_MODULES)}\n"
        "new = set(sys.modules) - base\n"
        f"print(json.dumps(sorted(m for m in new if m.split('.')[0] in {list(FORBIDDEN)!r})))\n"
    )
    root = CORE.parent
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_torch_and_numpy_alone_do_not_load_the_ml_stack():
    """The baseline above must not hide anything but tqdm."""
    code = (
        "import json, sys, numpy, torch\n"
        f"print(json.dumps(sorted(m for m in {list(FORBIDDEN)!r} if m in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert set(json.loads(out.stdout.strip().splitlines()[-1])) <= {"tqdm"}


@pytest.mark.parametrize("path", sorted(CORE.glob("*.py")), ids=lambda p: p.name)
def test_core_files_import_only_stdlib_torch_and_numpy(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):  # also catches imports inside functions
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.add(node.module.split(".")[0])
    bad = {m for m in found if m not in ALLOWED and m not in sys.stdlib_module_names}
    assert not bad, f"{path.name} imports {sorted(bad)}"
    for node in ast.walk(tree):  # no dynamic imports sneaking past the check
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute | ast.Name):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id
            assert name not in ("import_module", "__import__"), path.name


DPO_ARGS = ["pred_w", "pred_l", "ref_w", "ref_l", "target_w", "target_l"]
CPP_ARGS = ["pred_w", "pred_l", "ref_w", "ref_l", "ref_l_neg"]
SIGNATURES = {  # SPEC §7: positional tensors, then keyword-only scalars/weights
    "preference_logits": (DPO_ARGS, ["beta", "logit_weight"]),
    "dpo_loss": (DPO_ARGS, ["beta", "logit_weight", "loss_weight"]),
    "ddspo_loss": (CPP_ARGS, ["beta", "logit_weight", "loss_weight"]),
    "dspo_loss": (DPO_ARGS, ["beta", "beta_logit", "loss_weight"]),
    "dspo_cpp_loss": (CPP_ARGS + ["target_w"], ["beta", "beta_logit", "loss_weight"]),
}


@pytest.mark.parametrize("name", SIGNATURES)
def test_public_loss_signatures(name):
    positional, keyword_only = SIGNATURES[name]
    params = inspect.signature(getattr(losses, name)).parameters.values()
    assert [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD] == positional
    assert [p.name for p in params if p.kind is p.KEYWORD_ONLY] == keyword_only
    required = [p.name for p in params if p.default is p.empty]
    assert required == positional + ["beta"]
    assert getattr(minddspo, name) is getattr(losses, name)


def test_preference_loss_fields_and_random_removal_signature():
    fields = losses.PreferenceLoss._fields
    assert fields[0] == "loss" and {"logits", "implicit_acc"} <= set(fields)
    params = inspect.signature(perturb.random_removal).parameters
    assert list(params) == ["prompt", "rng", "low", "high"]
    assert (params["low"].default, params["high"].default) == (0.4, 0.7)

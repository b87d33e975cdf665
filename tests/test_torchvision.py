"""The models extra imports beside torch's CPU build, with no workaround in the user's code.

PyPI's torchvision wheel is built against torch's CUDA build; beside the CPU build its C++
extension does not load and torchvision 0.28 fails to import ("operator torchvision::nms does
not exist"), and with it timm and every Hugging Face model class. Importing funcaccum first
lets them import (funcaccum/_torchvision.py). Each check runs in a fresh interpreter, as a
user's script does.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

pytestmark = [
    pytest.mark.subprocess,
    pytest.mark.models,
    pytest.mark.skipif(
        importlib.util.find_spec("torchvision") is None, reason="torchvision is not installed"
    ),
]


def run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=240)  # fmt: skip


USER_CODE = """
import funcaccum as fa
import torch
import torchvision
resnet = torchvision.models.resnet18(weights=None, num_classes=3)
apply, params, buffers = fa.functional_model(resnet.eval())
print(apply(params, buffers, torch.zeros(1, 3, 32, 32)).shape)
"""


def test_torchvision_imports_after_funcaccum() -> None:
    done = run(USER_CODE)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "torch.Size([1, 3])" in done.stdout


def test_timm_and_hugging_face_models_import_after_funcaccum() -> None:
    for name in ("timm", "transformers"):  # not imported here: this process is not the test
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"{name} is not installed")
    done = run(
        "import funcaccum, timm, transformers\n"
        "config = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16,"
        " bos_token_id=0, eos_token_id=0)\n"
        "print(type(transformers.AutoModelForCausalLM.from_config(config)).__name__,"
        " type(timm.create_model('test_resnet')).__name__)\n"
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["GPT2LMHeadModel", "ResNet"]


def test_what_is_fixed_is_torchvision_failing_to_import_alone() -> None:
    """Not vacuous: on a machine where torchvision's C++ ops load, there is nothing to fix."""
    alone = run("import torchvision")
    if alone.returncode == 0:
        pytest.skip("torchvision's C++ extension loads here: the hook has nothing to do")
    assert "torchvision::nms" in alone.stderr

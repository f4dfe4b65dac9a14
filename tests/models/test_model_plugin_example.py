"""A third-party architecture installed with pip is found through the ``plait.models`` entry
point and served by ``plait.Engine`` exactly like a built-in one, token-identical to
transformers.

``examples/model_plugin_example`` (``TinyGatedLlamaForCausalLM``: Llama with its attention and
MLP branches scaled by ``residual_scale``) is pip-installed into a temporary ``--target``
directory the subprocesses put on ``PYTHONPATH``, so the shared environment is never modified.
The oracle is transformers' Llama with the scale folded into ``o_proj`` and ``down_proj``
(exact in float32 for a power of two).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from plait.testing import make_tiny_llama
from tests.plugin_install import env_with_plugin
from tests.conftest import hf_greedy

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "model_plugin_example"
SCALE = 0.5
PROMPTS = [[5, 17, 30, 40], [9, 9, 9, 9, 9, 9, 9, 9, 12], list(range(10, 40))]
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def gated_env(tmp_path_factory) -> dict[str, str]:
    """The environment of a Python that has ``plait-tiny-gated`` installed (and this
    checkout's plait first on the path)."""
    return env_with_plugin(EXAMPLE, tmp_path_factory.mktemp("gated"))


@pytest.fixture(scope="module")
def gated_model(tmp_path_factory) -> Path:
    """A tiny random Llama checkpoint relabelled as the plugin's architecture."""
    path = make_tiny_llama(tmp_path_factory.mktemp("tiny-gated"))
    config = json.loads((path / "config.json").read_text())
    config.update(architectures=["TinyGatedLlamaForCausalLM"], residual_scale=SCALE)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def _generate(model: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    # A fresh interpreter: entry points are read once per process.
    code = (
        "import json, plait\n"
        f"with plait.Engine({str(model)!r}, max_total_tokens=1024) as e:\n"
        f"    outs = e.generate(input_ids={PROMPTS!r}, sampling_params="
        f"{{'max_new_tokens': {NEW_TOKENS}, 'temperature': 0}})\n"
        "    print('MODEL', type(e.scheduler.runner.model).__name__)\n"
        "    print('IDS', json.dumps([o['output_ids'] for o in outs]))\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)


def test_without_the_install_the_architecture_is_refused_by_name(gated_model):
    out = _generate(gated_model, {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert out.returncode != 0
    assert "'TinyGatedLlamaForCausalLM' is not supported" in out.stderr, out.stderr[-2000:]
    assert "LlamaForCausalLM" in out.stderr  # the registered ones are listed


def test_installed_model_plugin_serves_transformers_greedy_tokens(gated_env, gated_model):
    from transformers import LlamaForCausalLM

    out = _generate(gated_model, gated_env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    lines = dict(
        line.split(" ", 1)
        for line in out.stdout.splitlines()
        if line.startswith(("MODEL ", "IDS "))
    )
    assert lines["MODEL"] == "TinyGatedLlamaForCausalLM"
    hf = LlamaForCausalLM.from_pretrained(gated_model, dtype=torch.float32).eval()
    plain_llama = hf_greedy(hf, PROMPTS, NEW_TOKENS)
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.self_attn.o_proj.weight.mul_(SCALE)
            layer.mlp.down_proj.weight.mul_(SCALE)
    want = hf_greedy(hf, PROMPTS, NEW_TOKENS)
    assert want != plain_llama  # the scaled residual changes the tokens: the check has teeth
    assert json.loads(lines["IDS"]) == want

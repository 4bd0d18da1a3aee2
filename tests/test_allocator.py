"""sgmft.features.backbones.allocator: glibc keeps freed activation blocks after a CPU backbone loads."""

import subprocess
import sys

import pytest

CHILD = r"""
import json, os, sys
from sgmft.features.backbones import allocator
before = allocator.allocator_state()
from sgmft.features.backbones.tiny import build_tiny_chinese_clip
from sgmft.features.backbones import load_backbone
build_tiny_chinese_clip(sys.argv[1])
bb = load_backbone("chinese-clip:" + sys.argv[1], device="cpu", dtype="fp32")
print(json.dumps({"before": before, "after": allocator.allocator_state(), "plan": allocator.allocator_plan()}))
"""


def _child(tmp_path, env_extra):
    import json
    import os

    env = {**os.environ, **env_extra}
    out = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "m")], env=env, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_loading_a_cpu_backbone_tunes_glibc_once(tmp_path):
    r = _child(tmp_path, {"SGMFT_MALLOC": ""})
    assert r["before"]["tuned"] is False
    assert r["after"]["tuned"] is True, r
    assert "mallopt" in r["after"]["reason"] and "1 GiB" in r["plan"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_sgmft_malloc_system_keeps_the_defaults(tmp_path):
    r = _child(tmp_path, {"SGMFT_MALLOC": "system"})
    assert r["after"]["tuned"] is False
    assert "SGMFT_MALLOC=system" in r["after"]["reason"] and "SGMFT_MALLOC=system" in r["plan"]


def test_features_do_not_depend_on_the_allocator(tmp_path):
    """Same tiny model, same inputs: bit-identical features with and without the tuning."""
    code = CHILD.replace('print(json.dumps(', 'import numpy as np\nf = bb.forward_text(bb.tokenize(["家里 吃饭", "去 健身房"]))\n'
                         'np.save(sys.argv[2], np.asarray(f))\nprint(json.dumps(')
    import os

    outs = []
    for mode in ("", "system"):
        dst = tmp_path / f"f{mode or 'tuned'}.npy"
        subprocess.run([sys.executable, "-c", code, str(tmp_path / "m"), str(dst)],
                       env={**os.environ, "SGMFT_MALLOC": mode}, check=True, capture_output=True)
        outs.append(dst.read_bytes())
    assert outs[0] == outs[1]

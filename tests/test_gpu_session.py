"""benchmarks/gpu_session.sh rehearsed on the CPU (SMOKE=1): each part's every command runs on tiny
shapes and writes what the part hands back, so that a device call (minutes, rare) does not meet a
broken command. Slow (1-3 min a part): run it by hand before a session with a device."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTPUTS = {"one": ["b1.json", "sweep.json", "1b7.json", "RESULTS.md"],
           "profile": ["profile.json", "RESULTS.md"], "server": ["server.json", "RESULTS.md"],
           "quant": ["q06.json", "q17.json", "RESULTS.md"],
           "overlap": ["overlap.txt", "RESULTS.md"], "icl": ["icl.txt"],
           "decide": ["decide_tests.txt", "decide.json", "talker_decide.json", "RESULTS.md"],
           "kernels": ["kernels_tests.txt", "predictor.json", "pk06.json", "RESULTS.md"],
           "kernels2": ["predictor_int8.json", "pk06q.json", "pk17.json", "RESULTS.md"],
           "kernels3": ["kernels3_tests.txt", "talker.json", "tk06.json", "tk17.json", "RESULTS.md"],
           "graphs": ["gr06.json", "RESULTS.md"]}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return tmp_path_factory.mktemp("gpu_smoke")   # built by the first part, reused by the rest


@pytest.mark.slow
@pytest.mark.parametrize("part", list(OUTPUTS))
def test_a_gpu_session_part_runs_on_the_cpu(part, checkpoints, tmp_path):
    env = dict(os.environ, SMOKE="1", SMOKE_DIR=str(checkpoints), OUT=str(tmp_path),
               PYTHON=sys.executable)
    r = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_session.sh"), part],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    assert "Traceback" not in log, log[-4000:]
    for name in OUTPUTS[part]:
        assert (tmp_path / name).stat().st_size > 0, name
    if part.startswith("kernels") or part in ("decide", "graphs"):   # a predictor they take
        assert "predictor kernels used" in log and "predictor kernels not used" not in log
    if part in ("kernels", "kernels3", "decide"):   # and their tests passed
        assert " passed" in (tmp_path / f"{part}_tests.txt").read_text()
    if part in ("kernels3", "decide", "graphs"):   # the tiny talker too
        assert "talker kernels used" in log and "talker kernels not used" not in log


def test_an_unknown_part_is_refused(tmp_path):
    r = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_session.sh"), "nope"],
                       cwd=ROOT, env=dict(os.environ, SMOKE="1", OUT=str(tmp_path),
                                          SMOKE_DIR=str(tmp_path)),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unknown part nope" in r.stderr

"""torch's CPU threads: OpenMP keeps spinning between a model's ops, thread counts are set per
thread (never process-wide), and TorchScript models get the instance layout measured."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from cvserve.app.queue import Job
from cvserve.app.settings import Settings
from cvserve.models.synthetic import make_scene
from cvserve.worker.batcher import batch_limit
from cvserve.worker.openmp import SPIN, ThreadLimit, torch_runtime, torch_uses_libgomp
from cvserve.worker.policy import warm_up
from cvserve.worker.repository import load_config
from cvserve.worker.server import build_task

pytestmark = pytest.mark.skipif(not torch_uses_libgomp(),
                                reason="this torch does not run on GNU OpenMP")


def without_spin() -> dict[str, str]:
    """This environment less the two variables, as a user who set neither has it."""
    return {k: v for k, v in os.environ.items() if k not in SPIN}


def spin_env(env: dict[str, str], code: str = "") -> str:
    """What a fresh `cvserve` process's environment holds after keep_spinning()."""
    script = (f"{code}\nimport os\nfrom cvserve.worker.openmp import keep_spinning\n"
              "print(keep_spinning())\n"
              "print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))")
    out = subprocess.run([sys.executable, "-c", script], env={**without_spin(), **env},
                         capture_output=True, text=True, timeout=120, check=True)
    return out.stdout.strip().splitlines()[-1]


def test_openmp_keeps_spinning_unless_the_user_chose_otherwise() -> None:
    assert spin_env({}) == "ACTIVE 300000"
    # The user's own choice stands, whole: neither variable is added to it.
    assert spin_env({"OMP_WAIT_POLICY": "PASSIVE"}) == "PASSIVE None"
    assert spin_env({"GOMP_SPINCOUNT": "10"}) == "None 10"
    # Too late once torch has loaded libgomp (it reads both then): nothing is set.
    assert spin_env({}, "import torch") == "None None"


def test_the_cvserve_command_sets_the_spin_before_torch_loads(tmp_path: Path) -> None:
    out = subprocess.run(["cvserve", "models", "list"], capture_output=True, text=True,
                         timeout=120,
                         env={**without_spin(), "CVSERVE_MODEL_REPOSITORY": str(tmp_path)})
    assert "OMP_WAIT_POLICY=ACTIVE GOMP_SPINCOUNT=300000" in out.stderr, out.stderr


def test_the_limit_finds_torchs_openmp_among_others() -> None:
    pytest.importorskip("sklearn")  # grad-cam's scikit-learn brings a libgomp of its own
    from threadpoolctl import ThreadpoolController

    found = ThreadpoolController().select(user_api="openmp").lib_controllers
    assert len(found) >= 2, [c.filepath for c in found]
    torch_lib = Path(torch.__file__).parent / "lib"
    for order in (found, found[::-1]):  # whichever the loader lists first
        assert Path(torch_runtime(order).filepath).parent == torch_lib


def test_a_thread_limit_changes_only_the_calling_threads_count() -> None:
    limit = ThreadLimit()
    assert limit.available
    before = torch.get_num_threads()
    seen: dict[str, int] = {}

    def one_thread() -> None:
        limit.set(1)
        seen["limited"] = torch.get_num_threads()  # what torch's kernels read

    def other_thread() -> None:
        seen["other"] = torch.get_num_threads()

    for target in (one_thread, other_thread):
        t = threading.Thread(target=target)
        t.start()
        t.join()
    assert seen["limited"] == 1
    assert seen["other"] == before and torch.get_num_threads() == before


@pytest.mark.skipif(Settings().cores < 2, reason="one core: a single instance is the layout")
def test_torchscript_on_the_cpu_measures_instances_and_answers_the_same(
        demo_repo: Path, tmp_path: Path) -> None:
    # The demo detector (TorchScript) with its policy measured, not pinned.
    shutil.copytree(demo_repo / "demo-ts", tmp_path / "demo-ts")
    toml = tmp_path / "demo-ts" / "model.toml"
    toml.write_text(toml.read_text().replace('policy = "fixed"\n', ""))
    task = build_task(load_config(tmp_path / "demo-ts"), Settings(model_repository=tmp_path))
    items = [task.prepare(Job(model="demo-ts", task="detection",
                              payload=make_scene(i, 320, 240).jpeg(), deadline_ms=0))
             for i in range(4)]
    reference = [task.run([item])[0] for item in items]  # one instance, every core
    before = torch.get_num_threads()

    policy = warm_up(task, batch_limit(task))

    # Both layouts were measured: one instance on every core, one per core on one thread.
    assert set(policy.instance_throughput) == {1, Settings().cores}, policy
    assert torch.get_num_threads() == before  # the process default is left alone
    # Instances of one thread each, side by side, answer as one instance did.
    task.backend.set_threads(1, keep=True)
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda item: task.run([item])[0], items * 3))
    for got, want in zip(answers, reference * 3, strict=True):
        for key in ("boxes", "scores", "labels"):
            np.testing.assert_allclose(np.asarray(got[key]), np.asarray(want[key]),
                                       rtol=1e-4, atol=1e-4, err_msg=key)

"""OpenMP spin-waiting for torch's intra-op threads, set before torch loads.

torch's CPU kernels run on GNU OpenMP (libgomp, bundled in torch's Linux wheels). Between
two parallel regions its worker threads spin for a while (GOMP_SPINCOUNT, 300,000 spins
by default) before they sleep, so the next region of a model's many small ops finds them
awake. libgomp cuts that spin to 1,000 when it manages more threads than there are cores,
and it counts the idle team of every thread that ever ran a parallel region: in cvserve
the decode threads' (torch preprocessing) and the model thread's, so on this 2-core
machine the model ran with its intra-op threads put to sleep and woken again between
ops. Measured on fasterrcnn_mobilenet_v3_large_320_fpn (TorchScript): one run 64 ms when
preprocessing ran on the model's thread, 89 ms when it ran on another thread, 67 ms on
another thread with the spin below.

OMP_WAIT_POLICY=ACTIVE with GOMP_SPINCOUNT=300000 keeps libgomp's own spin of 300,000
whether or not it counts the machine oversubscribed. libgomp reads both when it loads, so
they are set before the first `import torch`, and only where torch ships libgomp (LLVM's
or Intel's OpenMP read ACTIVE as "spin forever"). A user's own OMP_WAIT_POLICY or
GOMP_SPINCOUNT is left as it is.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
from pathlib import Path
from typing import Any

SPIN = {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "300000"}


def torch_uses_libgomp() -> bool:
    """Whether the installed torch bundles GNU OpenMP (found without importing torch)."""
    try:
        spec = importlib.util.find_spec("torch")
    except ImportError:  # an install that keeps torch out (the api image)
        return False
    if spec is None or spec.origin is None:
        return False
    return any((Path(spec.origin).parent / "lib").glob("libgomp*.so*"))


def keep_spinning() -> str:
    """Set SPIN in this process's environment (its children inherit it) if it can still
    take effect. -> what was done, for the log."""
    if any(name in os.environ for name in SPIN):
        return "OpenMP wait policy as set in the environment"
    if "torch" in sys.modules:
        return "OpenMP wait policy unchanged: torch was imported first"
    if not torch_uses_libgomp():
        return "OpenMP wait policy unchanged: torch does not use GNU OpenMP here"
    os.environ.update(SPIN)
    return "OpenMP threads spin between ops (" + " ".join(f"{k}={v}" for k, v in SPIN.items()) + ")"


def torch_runtime(found: list[Any]) -> Any | None:
    """Of the OpenMP runtimes threadpoolctl found loaded, torch's: the one in torch's
    folders, else the only one. Other packages bring their own libgomp (scikit-learn's,
    once grad-cam imported it, was listed first in the tests)."""
    import torch

    home = Path(torch.__file__).parent.parent
    own = [c for c in found if any(Path(c.filepath).is_relative_to(home / folder)
                                   for folder in ("torch", "torch.libs"))]
    return own[0] if own else found[0] if len(found) == 1 else None


class ThreadLimit:
    """Intra-op threads for torch ops run by the calling thread only.

    torch.set_num_threads is process-wide and unsafe once threads run models: besides
    the caller's OpenMP setting it resizes a shared thread pool and clears oneDNN's
    primitive cache, and every thread started after it repeats that on its first op
    (at::init_num_threads), while other threads may be running a model. libgomp keeps the
    thread count per thread (the nthreads-var ICV), and torch reads it on each op
    (at::get_num_threads is omp_get_max_threads), so setting it through the OpenMP
    runtime torch loaded changes only the caller. threadpoolctl finds that runtime.
    """

    def __init__(self) -> None:
        import torch

        self._local = threading.local()
        self._omp = None
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:  # a bare machine (a GPU check's): one instance, as before
            return
        torch.get_num_threads()  # loads torch's OpenMP runtime and initializes this thread
        self._omp = torch_runtime(ThreadpoolController().select(user_api="openmp")
                                  .lib_controllers)

    @property
    def available(self) -> bool:
        return self._omp is not None

    def set(self, threads: int) -> None:
        """This thread's torch ops use `threads` threads from now on (no-op if unchanged)."""
        if self._omp is None or getattr(self._local, "threads", None) == threads:
            return
        import torch

        # torch sets a thread's count on the thread's first op, to the process default
        # (this thread's only, as nothing calls torch.set_num_threads): let it go first.
        torch.get_num_threads()
        self._omp.set_num_threads(threads)
        self._local.threads = threads

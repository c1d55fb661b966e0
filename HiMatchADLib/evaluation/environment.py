"""The machine and library versions a result was measured with (``results.json``'s ``environment``)."""

from __future__ import annotations

import os
import platform
import sys

import numpy as np


def environment() -> dict:
    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "numpy": np.__version__,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        env["torch"] = torch.__version__
        env["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
    tf = sys.modules.get("transformers")
    if tf is not None:
        env["transformers"] = tf.__version__
    return env

"""Eclipse Aidge in an environment of its own (its wheels pin their own numpy and onnx).

aidge-compression 0.0.5.dev0 is built against the 0.10.0 releases of aidge-core, -backend-cpu
and -onnx. aidge-quantization 0.10.0 is left out: its wheel needs lib_aidge_backend_cuda.so, and
aidge-core imports it whenever it is installed, so with it nothing of Aidge imports on a CPU-only
machine (measured; 0.10.0.post3 imports, and is what the quantization attempt uses).
"""

from __future__ import annotations

import os
import subprocess
import sys

AIDGE_PACKAGES = ["aidge-core==0.10.0", "aidge-backend-cpu==0.10.0", "aidge-onnx==0.10.0",
                  "aidge-compression==0.0.5.dev0", "aidge-quantization==0.10.0.post3"]
ENV_DIR = os.path.join(os.path.dirname(__file__), ".aidge-venv")


def python_path(env_dir: str = ENV_DIR) -> str:
    return os.path.join(env_dir, "bin", "python")


def ensure_aidge(env_dir: str = ENV_DIR, log=print) -> tuple[str | None, str | None]:
    """(python of the Aidge environment, None) once it imports; (None, the error) otherwise."""
    python = python_path(env_dir)
    check = [python, "-c", "import aidge_core, aidge_backend_cpu, aidge_onnx, aidge_compression"]
    if os.path.isfile(python) and subprocess.run(check, capture_output=True).returncode == 0:
        return python, None
    log(f"installing Eclipse Aidge into {env_dir} ({', '.join(AIDGE_PACKAGES)})")
    steps = [[sys.executable, "-m", "venv", env_dir],
             [python, "-m", "pip", "install", "--quiet", "--no-deps", "aidge-quantization==0.10.0.post3"],
             [python, "-m", "pip", "install", "--quiet", *AIDGE_PACKAGES[:4], "onnx", "numpy"]]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode != 0:
            return None, f"{' '.join(step[2:5])} failed: {(done.stderr or done.stdout).strip()[-300:]}"
    done = subprocess.run(check, capture_output=True, text=True)
    if done.returncode != 0:
        return None, f"Aidge does not import: {done.stderr.strip().splitlines()[-1][:300]}"
    return python, None

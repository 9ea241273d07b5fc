"""What the device run ran on: Python, torch, CUDA and the GPU, Ray (and from where it was imported), the
CPUs; the last line is `ENV <json>` for bench/device/report.py. Fails when --device cuda finds no GPU.

    python bench/device/env_report.py --device cuda
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata


def _version(module: str) -> str:
    """The installed version and the folder it is imported from (the kit's site, or the image's)."""
    try:
        m = importlib.import_module(module)
    except Exception as e:  # a module that fails to import is what this report is for
        return f"MISSING ({type(e).__name__}: {e})"
    try:
        version = metadata.version(module.split(".")[0])
    except metadata.PackageNotFoundError:
        version = "?"
    return f"{version} ({os.path.dirname(m.__file__ or '')})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    args = p.parse_args(argv)
    import torch

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cpus": os.cpu_count(),
        "machine": platform.platform(),
    }
    if env["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        env.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}",
            multiprocessors=props.multi_processor_count,
        )
    for module in ("ray", "ray.tune", "ray.train", "jsonschema", "pydantic", "h5py", "pyarrow", "pandas"):
        env[module] = _version(module)
    for module in ("mlflow", "gymnasium", "mujoco"):  # absent on the GPU machine; the run must not need them
        env[module] = _version(module)
    for k, v in env.items():
        print(f"{k}: {v}")
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True)
        print(smi.stdout or smi.stderr)
    print("ENV " + json.dumps(env))
    if args.device == "cuda" and not env["cuda_available"]:
        print("--device cuda: torch sees no CUDA device", file=sys.stderr)
        return 1
    missing = [m for m in ("ray", "ray.tune", "ray.train") if env[m].startswith("MISSING")]
    if missing:
        print(f"{', '.join(missing)} cannot be imported: was the kit installed?", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

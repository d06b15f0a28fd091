"""Install-time compatibility step for CPU-only hosts (see README, "Install").

The registry's torchvision 0.28.0 is a CUDA build: its ``_C.so`` links against libc10_cuda.so and
libtorch_cuda.so, which the CPU torch wheel does not ship, so ``import torchvision`` fails with
"operator torchvision::nms does not exist". None of those CUDA symbols is ever called on CPU. This
script, run only when torch is a CPU build *and* torchvision's extension fails to load, compiles tiny
stand-in libraries whose functions abort with a clear message, and preloads them from a ``.pth``
file in the venv's site-packages so that every Python process (Ray workers, kfp subprocess tasks)
gets them before torchvision loads. On a CUDA host nothing is done.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import sysconfig

FUNCTION_SYMBOLS = [
    "_ZN2at4cuda26getCurrentDevicePropertiesEv",
    "_ZN3c104cuda12device_countEv",
    "_ZN3c104cuda14ExchangeDeviceEa",
    "_ZN3c104cuda14MaybeSetDeviceEa",
    "_ZN3c104cuda14current_deviceEv",
    "_ZN3c104cuda17getStreamFromPoolEba",
    "_ZN3c104cuda17getStreamFromPoolEia",
    "_ZN3c104cuda20getCurrentCUDAStreamEa",
    "_ZN3c104cuda20getDefaultCUDAStreamEa",
    "_ZN3c104cuda20setCurrentCUDAStreamENS0_10CUDAStreamE",
    "_ZN3c104cuda29c10_cuda_check_implementationEiPKcS2_jb",
    "_ZN3c104cuda9GetDeviceEPa",
    "_ZN3c104cuda9SetDeviceEab",
    "_ZNK3c104cuda10CUDAStream11synchronizeEv",
    "_ZNK3c104cuda10CUDAStream5queryEv",
    "_ZNK3c104cuda10CUDAStream6streamEv",
]
DATA_SYMBOLS = ["_ZN3c104cuda20CUDACachingAllocator9allocatorE"]
PTH_NAME = "scalekd_torchvision_cpu_compat.pth"
PRELOAD_MODULE = "_scalekd_cpu_compat_preload"


def _torchvision_loads() -> bool:
    probe = "import torch, torchvision; torchvision.ops.nms(torch.zeros(1,4), torch.zeros(1), 0.5)"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


def _torch_is_cpu_build() -> bool:
    probe = "import torch, sys; sys.exit(0 if torch.version.cuda is None else 1)"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


def _write_stub_source(path: str) -> None:
    lines = ["#include <stdio.h>", "#include <stdlib.h>",
             "static void scalekd_no_cuda(const char* name) {",
             '  fprintf(stderr, "scalekd: CUDA function %s called on a CPU-only torch build\\n", name);',
             "  abort();", "}"]
    for sym in FUNCTION_SYMBOLS:
        lines.append(f'void {sym}(void) {{ scalekd_no_cuda("{sym}"); }}')
    for sym in DATA_SYMBOLS:
        lines.append(f"char {sym}[64];")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main() -> int:
    if not _torch_is_cpu_build():
        print("torchvision compat: torch is a CUDA build; nothing to do")
        return 0
    site_dir = sysconfig.get_paths()["purelib"]
    pth = os.path.join(site_dir, PTH_NAME)
    if os.path.exists(pth):
        os.remove(pth)  # re-evaluate from scratch: a stale stub must never mask a working install
    if _torchvision_loads():
        print("torchvision compat: torchvision loads as installed; nothing to do")
        return 0
    lib_dir = os.path.join(site_dir, "_scalekd_cpu_compat")
    os.makedirs(lib_dir, exist_ok=True)
    src = os.path.join(lib_dir, "c10_cuda_stub.c")
    _write_stub_source(src)
    c10 = os.path.join(lib_dir, "libc10_cuda.so")
    torch_cuda = os.path.join(lib_dir, "libtorch_cuda.so")
    subprocess.run(["gcc", "-shared", "-fPIC", "-O1", "-Wl,-soname,libc10_cuda.so", "-o", c10, src], check=True)
    empty = os.path.join(lib_dir, "empty.c")
    with open(empty, "w") as f:
        f.write("int scalekd_empty_torch_cuda;\n")
    subprocess.run(["gcc", "-shared", "-fPIC", "-Wl,-soname,libtorch_cuda.so", "-o", torch_cuda, empty], check=True)
    preload = [c10, torch_cuda]
    preload += sorted(glob.glob(os.path.join(site_dir, "torchvision.libs", "libcudart*.so*")))
    with open(os.path.join(site_dir, PRELOAD_MODULE + ".py"), "w") as f:
        f.write('"""Written by scalekd tools/torchvision_cpu_compat.py: CPU stand-ins for CUDA libs."""\n')
        f.write("import ctypes\nimport os\n\n")
        f.write(f"for _path in {preload!r}:\n")
        f.write("    if os.path.exists(_path):\n")
        f.write("        ctypes.CDLL(_path, mode=ctypes.RTLD_GLOBAL)\n")
    with open(pth, "w") as f:
        f.write(f"import {PRELOAD_MODULE}\n")
    if not _torchvision_loads():
        os.remove(pth)
        print("torchvision compat: the stub did not make torchvision load; see README", file=sys.stderr)
        return 1
    print(f"torchvision compat: CPU stubs installed in {lib_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

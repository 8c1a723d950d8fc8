"""What torch was built for and what the machine has, and, when CUDA cannot run here, why.

``read_device_info()`` asks torch (cheap: no subprocess). nvidia-smi, the only source of the GPU's name and the
driver when torch cannot use the GPU, runs only when a message about CUDA or a CUDA run's banner needs them
(``with_nvidia_smi``): ``--device cpu`` and the demo never start it. Every decision takes a ``DeviceInfo`` as an
argument, so the rules are tested on any machine with another machine's (a V100, an old driver, an nvidia-smi that
fails).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import subprocess
import warnings
from dataclasses import dataclass

import torch

# The oldest NVIDIA driver branch that runs each CUDA major version (CUDA's minor-version compatibility).
MIN_DRIVER = {11: 450, 12: 525, 13: 580}
NVIDIA_SMI_TIMEOUT_S = 10  # a driver in a bad state can make nvidia-smi hang


@dataclass(frozen=True)
class DeviceInfo:
    """What torch was built for and what the machine has: the inputs of every device decision.

    ``read_device_info()`` leaves the GPU name and the driver, which only nvidia-smi knows when torch cannot use the GPU,
    to be read when a message needs them (``unread=True``; ``with_nvidia_smi``): a run on the CPU never starts it.
    """

    torch: str  # torch.__version__
    cuda: str | None  # the CUDA torch was built against (torch.version.cuda); None for a CPU-only build
    arch_list: tuple[str, ...]  # GPU architectures torch has kernels for (torch.cuda.get_arch_list())
    available: bool  # torch.cuda.is_available()
    gpu: str | None  # name of GPU 0, from torch or nvidia-smi (None: unknown)
    capability: tuple[int, int] | None  # its compute capability (None: unknown)
    driver: str | None  # the NVIDIA driver version, from nvidia-smi (None: unknown)
    init_warning: str | None = None  # what torch warned while looking for a GPU (an old driver, say)
    unread: bool = False  # nvidia-smi not asked yet: gpu, capability and driver hold only what torch said


@functools.cache
def _nvidia_smi() -> tuple[str | None, tuple[int, int] | None, str | None]:
    """GPU 0's name, compute capability and driver version as nvidia-smi reports them, asked once per process; None
    for each one it does not give. Whatever it prints (an error, a warning line, ``[N/A]``, several GPUs) or does
    (hang, fail), a row counts only with the fields asked for and a driver version of digits and dots; the first
    such row is GPU 0."""
    for fields in ("name,driver_version,compute_cap", "name,driver_version"):  # compute_cap: drivers from R510 on
        try:
            out = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"], capture_output=True,
                                 encoding="utf-8", errors="replace", timeout=NVIDIA_SMI_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired):
            return None, None, None
        rows = [[part.strip() for part in line.split(",")] for line in out.stdout.splitlines()]
        rows = [row for row in rows if len(row) == fields.count(",") + 1 and re.fullmatch(r"\d+(\.\d+)*", row[1])]
        if out.returncode == 0 and rows:
            name, driver, *cap = rows[0]
            found = re.fullmatch(r"(\d+)\.(\d+)", cap[0]) if cap else None
            gpu = name if name and not name.startswith("[") else None  # [N/A], [Unknown Error]
            return gpu, (int(found.group(1)), int(found.group(2))) if found else None, driver
    return None, None, None


def read_device_info() -> DeviceInfo:
    """What torch says of this machine and of its own build (nvidia-smi's: ``with_nvidia_smi``)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    gpu, capability = (torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0)) if available else (None, None)
    init_warning = " ".join(" ".join(str(w.message).split()) for w in caught) or None
    return DeviceInfo(torch.__version__, torch.version.cuda, tuple(torch.cuda.get_arch_list()), available, gpu,
                       capability, None, init_warning, unread=True)


def with_nvidia_smi(info: DeviceInfo) -> DeviceInfo:
    """``info`` completed by nvidia-smi where it was not asked yet (torch's GPU name and capability kept)."""
    if not info.unread:
        return info
    gpu, capability, driver = _nvidia_smi()
    return dataclasses.replace(info, gpu=info.gpu or gpu, capability=info.capability or capability, driver=driver,
                               unread=False)


def arch_supported(capability: tuple[int, int], arch_list: tuple[str, ...]) -> bool:
    """Whether a build with kernels for ``arch_list`` runs on a GPU of ``capability``.

    A kernel for sm_XY runs on capability X.Z for Z >= Y; PTX (compute_XY) is compiled at run time for any newer GPU.
    """
    for arch in arch_list:
        found = re.fullmatch(r"(sm|compute)_(\d+)(\d)[a-z]?", arch)
        if found:
            major, minor = int(found.group(2)), int(found.group(3))
            if (found.group(1) == "sm" and major == capability[0] and minor <= capability[1]) or (
                found.group(1) == "compute" and (major, minor) <= capability
            ):
                return True
    return False


def cuda_usable(info: DeviceInfo) -> bool:
    """Whether CUDA can run this build's kernels here."""
    return info.available and (info.capability is None or arch_supported(info.capability, info.arch_list))


def likely_cause(info: DeviceInfo) -> str:
    """Why CUDA cannot run here, in a few words, from ``info`` completed by nvidia-smi."""
    if info.cuda is None:
        return "this torch is a CPU-only build" + (f", on a machine with {info.gpu}" if info.gpu else "")
    if info.gpu is None and info.driver is None:
        if info.init_warning:  # torch found a driver: nvidia-smi failed, not the machine
            return f"torch could not initialise CUDA ({info.init_warning}), and nvidia-smi gave no answer"
        return "no NVIDIA GPU or driver was found (torch saw none, nvidia-smi gave no answer)"
    need = MIN_DRIVER.get(int(info.cuda.split(".")[0]))
    driver_major = int(info.driver.split(".")[0]) if info.driver else None
    if need and driver_major is not None and driver_major < need:
        return f"the driver {info.driver} is older than CUDA {info.cuda} needs (the R{need} series or newer)"
    if info.capability and info.arch_list and not arch_supported(info.capability, info.arch_list):
        return (f"this build has no kernels for the GPU's architecture sm_{info.capability[0]}{info.capability[1]} "
                f"(it has {', '.join(info.arch_list)})")
    return "torch could not initialise CUDA" + (f": {info.init_warning}" if info.init_warning else "")


def cuda_unusable_message(info: DeviceInfo, why: str,
                          instead: str = "To run on the CPU deliberately (slow), add --device cpu.") -> str:
    """One paragraph: why CUDA cannot run here, what torch was built for, what the machine has, and what to do
    (``instead``: the way around it, where there is one)."""
    info = with_nvidia_smi(info)
    build = f"torch {info.torch} was built for CUDA {info.cuda}" if info.cuda else f"torch {info.torch} is a CPU-only build"
    if info.arch_list:
        build += f" (kernels for {', '.join(info.arch_list)})"
    machine = "this machine shows no NVIDIA GPU"
    if info.gpu or info.driver:
        capability = f", capability {info.capability[0]}.{info.capability[1]}" if info.capability else ""
        machine = f"this machine has {info.gpu or 'an NVIDIA GPU'}{capability}, driver {info.driver or 'unknown'}"
    elif info.init_warning:
        machine = "nvidia-smi gave no answer, so the GPU and the driver are unknown"
    return (
        f"{why}, but CUDA is not usable here: {build}; {machine}. Likely cause: {likely_cause(info)}. To use the "
        f"GPU, install a torch/torchvision pair built for a CUDA version the driver supports (the selector on "
        f"pytorch.org lists the builds; CUDA 12 builds run on drivers of the R525 series and newer), then `pip install "
        f"-r requirements-gpu.txt`. {instead}"
    )

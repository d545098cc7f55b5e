"""The int8/int4 kernels (llama/generation/csrc/): compiled for this host by torch's extension builder on
first use, as torch.ops.llama_quantized. Their layers are in quantize.py."""

import functools
import hashlib
import os
import platform
import shutil
import sys
from pathlib import Path

import torch

from llama.common.errors import UserError

KERNEL_SOURCE = Path(__file__).parent / "csrc" / "quantized.cpp"  # includes the other files of csrc/


def build_signature() -> str:
    """The build is tuned for this CPU (-march=native): a home directory shared by different hosts
    (a cluster) must not hand one host's build to another. And every source file's contents are in
    it: torch's builder notices a change of the .cpp it is given but not of the headers it includes,
    and inductor's cache of compiled graphs does not see the ops' schemas at all (compile.py puts this
    signature in its key: a graph cached against an older build would call the new one with the old
    arguments)."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    sources = b"".join(f.read_bytes() for f in sorted(KERNEL_SOURCE.parent.iterdir()) if f.suffix in (".h", ".cpp"))
    return hashlib.sha1(f"{platform.machine()} {flags}".encode() + sources).hexdigest()[:10]


def build_tools_hint(missing) -> str:
    """How to get the missing build tools. `pip install ninja` puts ninja beside the interpreter: when it
    is there but that folder is not on PATH (a virtual environment used without activating it), say so."""
    hints = ["install g++ or clang (or set CXX)"] if missing[0] != "ninja" else []
    if "ninja" in missing:
        beside = Path(sys.executable).parent / "ninja"
        hints.append(f"ninja is installed at {beside} but {beside.parent} is not on PATH: activate that virtual "
                     f"environment (or add {beside.parent} to PATH)" if beside.is_file() else "`pip install ninja`")
    return " and ".join(hints)


@functools.cache
def kernels():
    """torch.ops.llama_quantized: the group-wise kernels, compiled for this host by torch's extension
    builder on first use (cached under ~/.cache/torch_extensions, or $TORCH_EXTENSIONS_DIR)."""
    from torch.utils import cpp_extension
    compiler = os.environ.get("CXX", "c++")
    missing = [tool for tool in (compiler, "ninja") if shutil.which(tool) is None]
    if missing:
        raise UserError(f"the int8/int4 kernels ({KERNEL_SOURCE.name}) are built on first use and need a C++ compiler "
                        f"and ninja: {' and '.join(missing)} not found on PATH; {build_tools_hint(missing)}, "
                        "or use --quantize int8 --group-size 0")
    try:
        cpp_extension.load(f"llama_quantized_{build_signature()}", [str(KERNEL_SOURCE)],
                           extra_cflags=["-O3", "-march=native", "-std=c++17"], is_python_module=False)
    except (RuntimeError, OSError, ImportError) as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        reason = next((line for line in lines if "error" in line.lower()), lines[-1])  # the compiler's first error
        raise UserError(f"could not build the int8/int4 kernels ({KERNEL_SOURCE.name}) with {compiler}: "
                        f"{reason[:200]}; or use --quantize int8 --group-size 0") from None
    # Output shapes for torch.compile, which calls the kernels as they are (opaque ops).
    for name in ("int8_mm", "int4_mm", "gguf_mm", "bf16_mm"):
        torch.library.register_fake(f"llama_quantized::{name}", lambda x, codes, *_: x.new_empty(x.shape[0], codes.shape[0]))
    def dequantized(codes, columns, bf16):  # float32, or bf16 when asked
        return codes.new_empty(codes.shape[0], columns, dtype=torch.bfloat16 if bf16 else torch.float32)

    torch.library.register_fake("llama_quantized::int8_dequantize", lambda codes, scales, group_size, bf16=False:
                                dequantized(codes, codes.shape[1], bf16))
    torch.library.register_fake("llama_quantized::int4_dequantize", lambda codes, scales, zeros, group_size, bf16=False:
                                dequantized(codes, codes.shape[1] * 2, bf16))
    torch.library.register_fake("llama_quantized::gguf_dequantize", lambda blocks, kind, bf16=False: dequantized(
        blocks, blocks.shape[1] * (32 if kind in (2, 8) else 256), bf16))
    return torch.ops.llama_quantized

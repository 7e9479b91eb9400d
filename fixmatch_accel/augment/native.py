"""The C backend (augment_native.c): flip + crop, RandAugment layers and normalisation on eager CPU.

No library applies a different PIL-exact op to each image of a uint8 batch in one pass: PIL
and timm take one image at a time, torchvision's v2 RandAugment one op for the whole batch,
and eager PyTorch pays many kernel calls per op on a group of samples. So the C file (one
loop per sample, the tensor path's arithmetic) is built once with the system's C compiler
into a per-user cache and loaded with ctypes: no build step at install, no new dependency.
Without a compiler, or with FIXMATCH_ACCEL_NATIVE=0, the tensor path runs: the same pixels,
slower (tests/test_native.py compares them). Only eager CPU tensors take this path; compiled
graphs and accelerators run the tensor code.

The op codes exist once: each base op of ops.OPS names its case in the C file (OP_<name>);
they are numbered here and passed to the compiler as -D definitions (part of the build key).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import re
import shlex
import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path

import torch

from ..errors import describe
from .ops import OPS

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("augment_native.c")
ENV_SWITCH = "FIXMATCH_ACCEL_NATIVE"
# -ffp-contract=off: no fused multiply-adds, so every product and sum rounds as the
# tensor path's separate kernels round them (the pixels must be the same bit for bit);
# -fno-trapping-math lets gcc vectorise clamps (no value changes, only FP-exception assumptions)
CFLAGS = ["-O3", "-std=c99", "-fPIC", "-shared", "-ffp-contract=off", "-fno-trapping-math"]

# Op codes: one per C case, in the order ops.OPS first names them; KEEP leaves a sample unchanged.
KEEP = -1
_CASES = {case: code for code, case in enumerate(dict.fromkeys(op.native for op in OPS.values()))}
CODES = {name: _CASES[op.native] for name, op in OPS.items()}  # base op name -> code
DEFINES = [f"-DOP_KEEP={KEEP}"] + [f"-DOP_{case}={code}" for case, code in _CASES.items()]

_library: ctypes.CDLL | None = None
_loaded = False


def _compiler() -> list[str]:
    """$CC when set, else the first of Python's own compiler, cc, gcc and clang found on PATH."""
    if os.environ.get("CC"):
        words = shlex.split(os.environ["CC"])
        if not shutil.which(words[0]):  # said here, not as an OSError that reads like an unwritable cache
            raise RuntimeError(f"CC={os.environ['CC']!r}: no such program")
        return words
    for candidate in (sysconfig.get_config_var("CC") or "", "cc", "gcc", "clang"):
        words = shlex.split(candidate)
        if words and shutil.which(words[0]):
            return words
    raise RuntimeError("no C compiler found (set CC, or install cc, gcc or clang)")


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "fixmatch_accel"


def build(directory: Path | None = None) -> Path:
    """Compile augment_native.c unless a build of this very source, op codes and compiler exists; its path."""
    cc = _compiler()
    source = SOURCE.read_bytes()
    flags = CFLAGS + DEFINES
    key = hashlib.sha256(source + " ".join(cc + flags).encode()
                         + platform.machine().encode()).hexdigest()[:16]
    directory = directory or _cache_dir()
    target = directory / f"augment_native-{key}.so"
    if not target.is_file():
        _compile(cc, flags, directory, target)
    # after the compiler has had its say; a case the C file lacks would copy those samples unchanged
    missing = [f"OP_{case}" for case in _CASES if not re.search(rf"case\s+OP_{case}\s*:".encode(), source)]
    if missing:
        raise RuntimeError(f"{SOURCE.name} has no case for {', '.join(missing)}")
    return target


def _compile(cc: list[str], flags: list[str], directory: Path, target: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    # built under a name of its own, then renamed: processes building at once never load half a file
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=directory)
    os.close(fd)
    try:
        done = subprocess.run(cc + flags + [str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
            first_error = next((line for line in lines if "error" in line.lower()), lines[0])
            raise RuntimeError(f"{' '.join(cc)} failed: {first_error.strip()[:300]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def library() -> ctypes.CDLL | None:
    """The loaded library, built on first use; None when switched off or it cannot be built."""
    global _library, _loaded
    if _loaded:
        return _library
    _loaded = True
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    try:
        try:
            path = build()
        except OSError:  # an unwritable cache: a private folder of this process's own
            path = build(Path(tempfile.mkdtemp(prefix="fixmatch_accel-")))
        lib = ctypes.CDLL(str(path))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        logger.warning("no compiled CPU augmentation (%s); the tensor path runs instead, "
                       "with the same pixels but slower", describe(e))
        return None
    fn = lib.fixmatch_apply_layer
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    fn.argtypes = [p, p, i64, i64, i64, i64, p, p, p, p, p, ctypes.c_int32, p]
    fn.restype = None
    lib.fixmatch_scratch_bytes.argtypes = [i64, i64]
    lib.fixmatch_scratch_bytes.restype = i64
    lib.fixmatch_crop_flip.argtypes = [p, p, i64, i64, i64, i64, p, p, p, i64, p]
    lib.fixmatch_crop_flip.restype = None
    lib.fixmatch_normalize.argtypes = [p, p, i64, i64, i64, p, p]
    lib.fixmatch_normalize.restype = None
    _library = lib
    return lib


# The C code keeps pixel indices and coordinates in 32-bit integers.
MAX_SIDE = 8192


def apply_layer(lib: ctypes.CDLL, x: torch.Tensor, index: torch.Tensor, code: torch.Tensor,
                arg: torch.Tensor, affine: torch.Tensor, fill: torch.Tensor, nearest: bool) -> torch.Tensor:
    """Sample index[j] of x gets op code[j] with argument arg[j] and affine data affine[j].

    x: uint8 [N, C, H, W] on the CPU; index int64 [N] (a permutation); code int32 [N];
    arg float64 [N]; affine float64 [N, 6]; fill uint8 [C]. Returns a new uint8 tensor.
    """
    x = x.contiguous()
    n, c, h, w = x.shape
    out = torch.empty_like(x)
    index, code = index.contiguous(), code.contiguous()
    arg, affine, fill = arg.contiguous(), affine.contiguous(), fill.contiguous()
    if max(h, w) > MAX_SIDE:
        raise ValueError(f"images of {h}x{w} pixels: the compiled path takes sides up to {MAX_SIDE}")
    scratch = torch.empty(lib.fixmatch_scratch_bytes(h, w) // 8 + 1, dtype=torch.float64)
    lib.fixmatch_apply_layer(x.data_ptr(), out.data_ptr(), n, c, h, w, index.data_ptr(),
                             code.data_ptr(), arg.data_ptr(), affine.data_ptr(), fill.data_ptr(),
                             int(nearest), scratch.data_ptr())
    return out


def crop_flip(lib: ctypes.CDLL, x: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor,
              flip: torch.Tensor, pad: int) -> torch.Tensor:
    """weak_batch's pixels for drawn offsets oy, ox (int64 [N], 0..2 pad) and flips (bool [N])."""
    x = x.contiguous()
    n, c, h, w = x.shape
    out = torch.empty_like(x)
    oy, ox, flip = oy.reshape(n).contiguous(), ox.reshape(n).contiguous(), flip.reshape(n).contiguous()
    cols = torch.empty(w, dtype=torch.int64)
    lib.fixmatch_crop_flip(x.data_ptr(), out.data_ptr(), n, c, h, w, oy.data_ptr(), ox.data_ptr(),
                           flip.data_ptr(), pad, cols.data_ptr())
    return out


def normalize(lib: ctypes.CDLL, x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """float32 x * scale + offset per channel (scale, offset: float32 [C]) for uint8 [N, C, H, W]."""
    x = x.contiguous()
    n, c, h, w = x.shape
    out = torch.empty(x.shape, dtype=torch.float32)
    scale, offset = scale.reshape(c).contiguous(), offset.reshape(c).contiguous()
    lib.fixmatch_normalize(x.data_ptr(), out.data_ptr(), n, c, h * w, scale.data_ptr(), offset.data_ptr())
    return out

"""Arrays at addresses, inside compiled kernels (numba): imported only by the *_jit.py
modules, and only where numba is installed.

Why: calling a compiled function from Python costs about 0.15 µs for every array passed
(numba checks its type and wraps it for the call), so a kernel given the twenty arrays
of a ring and a port pays 3 µs per call, as much as serving a burst of small frames.
A kernel is given instead one array of addresses and lengths (`Ctx` below, made once
when the ring or port is set up) and rebuilds its arrays from it, which costs nothing.

Who makes a context keeps every array it names alive as long as the context is used:
the addresses are not references (kernel_walk.KernelWalk drops its context with them).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic
from numba.np.numpy_support import carray


def _pointer_typer(typingctx: Any, addr: Any) -> Any:
    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return types.voidptr(types.uintp), codegen


_pointer: Any = intrinsic(_pointer_typer)  # _pointer(address): a void * (uintp -> voidptr)


@njit(cache=True, nogil=True, inline="always")
def u8s(addr: Any, n: Any) -> Any:
    return carray(_pointer(np.uintp(addr)), (np.intp(n),), np.uint8)


@njit(cache=True, nogil=True, inline="always")
def u16s(addr: Any, n: Any) -> Any:
    return carray(_pointer(np.uintp(addr)), (np.intp(n),), np.uint16)


@njit(cache=True, nogil=True, inline="always")
def u32s(addr: Any, n: Any) -> Any:
    return carray(_pointer(np.uintp(addr)), (np.intp(n),), np.uint32)


@njit(cache=True, nogil=True, inline="always")
def u64s(addr: Any, n: Any) -> Any:
    return carray(_pointer(np.uintp(addr)), (np.intp(n),), np.uint64)


@njit(cache=True, nogil=True, inline="always")
def i64s(addr: Any, n: Any) -> Any:
    return carray(_pointer(np.uintp(addr)), (np.intp(n),), np.int64)


@njit(cache=True, nogil=True, inline="always")
def u64_rows(addr: Any, n: Any, width: int) -> Any:
    return carray(_pointer(np.uintp(addr)), (np.intp(n), width), np.uint64)


@njit(cache=True, nogil=True, inline="always")
def u8_rows(addr: Any, n: Any, width: int) -> Any:
    return carray(_pointer(np.uintp(addr)), (np.intp(n), width), np.uint8)


@njit(cache=True, nogil=True, inline="always")
def i64_rows(addr: Any, n: Any, width: int) -> Any:
    return carray(_pointer(np.uintp(addr)), (np.intp(n), width), np.int64)


@njit(cache=True, nogil=True, inline="always")
def f64s(addr: Any, n: Any) -> Any:
    return carray(_pointer(np.uintp(addr)), (np.intp(n),), np.float64)


@njit(cache=True, nogil=True, inline="always")
def i32s(addr: Any, n: Any) -> Any:
    return carray(_pointer(np.uintp(addr)), (np.intp(n),), np.int32)


def _load_u64_typer(typingctx: Any, addr: Any) -> Any:
    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        ptr = builder.inttoptr(args[0], ir.IntType(64).as_pointer())
        return builder.load(ptr, align=1)  # (align 1: any address is fine)

    return types.uint64(types.uintp), codegen


# load_u64(address): the 8 bytes there as a native-endian integer, at any alignment (one
# load, where comparing bytes one by one takes a loop)
load_u64: Any = intrinsic(_load_u64_typer)


def _load_acquire_u16_typer(typingctx: Any, addr: Any) -> Any:
    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        ptr = builder.inttoptr(args[0], ir.IntType(16).as_pointer())
        return builder.load_atomic(ptr, "acquire", 2)

    return types.uint16(types.uintp), codegen


# load_acquire_u16(address): the aligned 2 bytes there, loaded before any load that follows
# it (x86 orders loads already: this keeps the compiler from moving a later load above it).
# A packed ring's descriptor flags: what says the rest of the descriptor is the driver's.
load_acquire_u16: Any = intrinsic(_load_acquire_u16_typer)


def _store_release_u64_typer(typingctx: Any, addr: Any, value: Any) -> Any:
    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        ptr = builder.inttoptr(args[0], ir.IntType(64).as_pointer())
        builder.store_atomic(args[1], ptr, "release", 8)
        return context.get_dummy_value()

    return types.void(types.uintp, types.uint64), codegen


# store_release_u64(address, value): the aligned 8 bytes there, stored after every store
# before it (x86 keeps stores in order already: this keeps the compiler from moving an
# earlier one below it), in one piece. A packed ring's used descriptor: its length, id
# and flags at once, after the bytes written into its buffers.
store_release_u64: Any = intrinsic(_store_release_u64_typer)

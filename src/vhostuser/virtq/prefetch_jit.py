"""Cache prefetch hints for the compiled kernels (numba): LLVM's prefetch intrinsic, so a
kernel can ask for the buffers of the chains a few places ahead while it works on this
one (their cache lines were last written by the driver, on another CPU). A hint only:
it never faults, whatever the address."""

from __future__ import annotations

from typing import Any

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic


def _prefetch(write: int) -> Any:
    def typer(typingctx: Any, addr: Any) -> Any:
        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
            fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
            fn = cgutils.get_or_insert_function(  # type: ignore[no-untyped-call]
                builder.module, fnty, "llvm.prefetch.p0")
            # (address, write?, locality 3: keep in all cache levels, data cache)
            builder.call(fn, [builder.inttoptr(args[0], i8p), ir.Constant(i32, write),
                              ir.Constant(i32, 3), ir.Constant(i32, 1)])
            return context.get_dummy_value()

        return types.void(types.uintp), codegen

    return typer


prefetch: Any = intrinsic(_prefetch(0))  # prefetch(address): to be read
prefetch_write: Any = intrinsic(_prefetch(1))  # prefetch_write(address): to be written

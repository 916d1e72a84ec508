"""A stand-in for triton's active GPU driver, so that the Triton backend's real launch path runs on a machine without
a GPU: device 0, stream 0, an sm_90 target, CPU tensors. Used by bench/dev/triton_host_cpu.py, and with
install_recording (the utils and launcher that compiling and launching need) by tests/test_triton_fast_launch.py and
tests/test_triton_tma_mainloop.py.
"""
import itertools

import torch
from triton.backends.compiler import GPUTarget


class FakeDriver:
    """triton's active driver, stood in (install with triton.runtime.driver.set_active(FakeDriver()))."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


class FakeTensorMap:
    """What the stand-in driver's fill_tma_descriptor returns for an encoded TMA descriptor: its inputs."""

    def __init__(self, ptr, swizzle, elem_size, elem_type, block, shape, strides, padding):
        self.ptr, self.block, self.shape, self.strides = ptr, list(block), list(shape), list(strides)
        self.rest = (swizzle, elem_size, elem_type, padding)

    def __repr__(self):
        return f"FakeTensorMap({self.ptr}, {self.block}, {self.shape}, {self.strides}, {self.rest})"


FILLS: list = []  # the FakeTensorMap of every TMA descriptor encoded through the stand-in driver


def install_recording() -> list:
    """Makes a FakeDriver that compiles for sm_90 and "launches" by recording, the active driver, and returns the list
    it records into: (path, function handle, grid, args) per launch, path "jit" for a launch through triton's
    JITFunction.run, "fast" for any other (the backend's direct relaunch). Function handles are unique per loaded
    binary. A launch hook installed in triton is called as a real launcher calls it.
    Under triton 3.6 the launcher is that version's own CudaLauncher, with its Python wrapper (the encoding of
    tensor descriptor arguments, which the backend's fast path takes over) around a recording C launch: a TMA
    descriptor argument is recorded as the launcher would pass it, a FakeTensorMap (also kept in FILLS) followed by
    the descriptor's shape and strides."""
    import triton
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    launches, loaded, path = [], itertools.count(1), ["fast"]

    class Utils:
        def get_device_properties(self, dev):
            return {"max_shared_mem": 227 * 1024, "multiprocessor_count": 132, "sm_clock_rate": 1,
                    "mem_clock_rate": 1, "mem_bus_width": 1, "max_num_regs": 65536, "warpSize": 32}

        def load_binary(self, name, kernel, shared, device):
            return (1, next(loaded), 32, 0, 1024)  # module, function handle, registers, ...

        def unload_module(self, module):
            pass

        def fill_tma_descriptor(self, *args):
            FILLS.append(FakeTensorMap(*args))
            return FILLS[-1]

    class Launcher:
        def __init__(self, src, metadata):
            pass

        def __call__(self, gx, gy, gz, stream, function, packed_metadata, launch_metadata, enter, exit_, *args):
            if enter is not None:
                enter(launch_metadata)
            launches.append((path[0], function, (gx, gy, gz), args))

    def c_launch(gx, gy, gz, stream, function, cooperative, pdl, global_scratch, profile_scratch, packed_metadata,
                 launch_metadata, enter, exit_, *args):  # triton 3.6's C launch: (grid, stream, ..., hooks, args)
        if enter is not None:
            enter(launch_metadata)
        launches.append((path[0], function, (gx, gy, gz), args))

    def cuda_launcher_36(src, metadata):
        """triton 3.6's CudaLauncher as its __init__ makes it, with c_launch for the compiled C module's launch."""
        from triton.backends.nvidia import driver as nv
        launcher = object.__new__(nv.CudaLauncher)
        signature = dict(src.signature.items())
        launcher.num_ctas = getattr(metadata, "num_ctas", 1)
        launcher.launch = nv.wrap_handle_tensordesc(c_launch, signature, getattr(metadata, "tensordesc_meta", None))
        for name in ("global_scratch_size", "global_scratch_align", "profile_scratch_size", "profile_scratch_align",
                     "launch_cooperative_grid", "launch_pdl"):
            setattr(launcher, name, getattr(metadata, name))
        return launcher

    class RecordingDriver(FakeDriver):
        utils = Utils()
        launcher_cls = staticmethod(cuda_launcher_36) if triton.__version__.startswith("3.6.") else Launcher

    driver.set_active(RecordingDriver())
    jit = JITFunction.run

    def jit_run(self, *args, **kwargs):  # marks launches that went through the JIT
        path[0] = "jit"
        try:
            return jit(self, *args, **kwargs)
        finally:
            path[0] = "fast"

    JITFunction.run = jit_run
    return launches


def fold_tensor_maps(args) -> list:
    """A recorded launch's arguments with each FakeTensorMap's trailing shape and strides (as triton 3.6's launcher
    passes a descriptor) checked and folded into it."""
    out, i = [], 0
    while i < len(args):
        a = args[i]
        out.append(a)
        i += 1
        if isinstance(a, FakeTensorMap):
            n = 2 * len(a.shape)
            assert list(args[i:i + n]) == a.shape + a.strides, (a, args[i:i + n])
            i += n
    return out

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


def install_recording() -> list:
    """Makes a FakeDriver that compiles for sm_90 and "launches" by recording, the active driver, and returns the list
    it records into: (path, function handle, grid, args) per launch, path "jit" for a launch through triton's
    JITFunction.run, "fast" for any other (the backend's direct relaunch). Function handles are unique per loaded
    binary. A launch hook installed in triton is called as a real launcher calls it."""
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

    class Launcher:
        def __init__(self, src, metadata):
            pass

        def __call__(self, gx, gy, gz, stream, function, packed_metadata, launch_metadata, enter, exit_, *args):
            if enter is not None:
                enter(launch_metadata)
            launches.append((path[0], function, (gx, gy, gz), args))

    class RecordingDriver(FakeDriver):
        utils = Utils()
        launcher_cls = Launcher

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

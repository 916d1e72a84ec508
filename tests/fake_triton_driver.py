"""A stand-in for triton's active GPU driver, so that the Triton backend's real launch path runs on a machine without
a GPU: device 0, stream 0, an sm_90 target, CPU tensors. Used by tests/test_triton_fast_launch.py (whose subclass adds
the utils and launcher that compiling and launching need) and bench/dev/triton_host_cpu.py.
"""
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

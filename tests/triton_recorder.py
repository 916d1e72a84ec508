"""Running the Triton kernels' host code without a GPU, for checks that compile its launches for a chosen target.

``run_script(python, script, *args)`` runs ``script`` in a subprocess of ``python`` (this or another interpreter with
another triton: TRITON_PYTHONS), without TRITON_INTERPRET (the interpreter replaces the JIT functions) and with this
checkout and tests/ on its path, and returns the JSON of its last printed line. Inside such a script,
``install(module, names, backend, on_launch)`` replaces each kernel ``module.<name>`` with a ``Recorder``: a
launch ``kernel[grid](*args, **kwargs)`` compiles nothing, it binds the arguments the way triton's JIT would for
``backend``'s target and hands ``(recorder, kwargs, bound, spec, options)`` to ``on_launch``, which keeps what its
check needs (cache keys, the first launch to compile, ...)."""
import json
import os
import subprocess

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The kernels of the LoRA op's Triton backend (lora_kernels/backends/triton/kernels/) that its forward and backward
# launch: the checks that record every launch replace these.
LORA_KERNELS = ["_shrink_kernel", "_output_gemm_kernel", "_small_m_kernel", "_dy_pass_kernel", "_sum_partials_kernel"]


class Recorder:
    def __init__(self, module, name, backend, on_launch):
        from triton.runtime.jit import create_function_from_signature
        self.name, self.fn, self.on_launch = name, getattr(module, name), on_launch
        self.binder = create_function_from_signature(self.fn.signature, self.fn.params, backend)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            bound, spec, options = self.binder(*args, **kwargs)
            self.on_launch(self, args, kwargs, bound, spec, options)
        return launch


def install(module, names, backend, on_launch):
    for name in names:
        setattr(module, name, Recorder(module, name, backend, on_launch))


def run_script(python, script, *args, timeout=900, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_extra or {})
    env["PYTHONPATH"] = os.pathsep.join([_ROOT, os.path.join(_ROOT, "tests"), env.get("PYTHONPATH", "")])
    out = subprocess.run([python, "-c", script, *map(str, args)], env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])

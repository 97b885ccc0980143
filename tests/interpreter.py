"""Running code under Triton's CPU interpreter in a subprocess (TRITON_INTERPRET=1 must be set
before Triton is imported), for the tests of the Triton kernels. Two shims on the interpreter
(not on the kernels): numpy >= 2.4's int() of 1-element arrays, and bfloat16 operands of tl.dot
widened to float32 first (the interpreter multiplies their raw bits: triton-lang/triton#11584,
"not supported yet"), so bf16 keys can be checked here; the CUDA tests run the real bf16 dots."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PREAMBLE = f"""
import sys
sys.path.insert(0, {ROOT!r} + "/tests")
import triton.runtime.interpreter as ti
_orig = ti._patch_lang_tensor
def _patched(tensor, scope):  # numpy >= 2.4 refuses int() of a 1-element array
    _orig(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
ti._patch_lang_tensor = _patched
import numpy as _np
import triton.language as _tl
_dot = ti.InterpreterBuilder.create_dot
def _widen_bf16(x):  # the interpreter keeps bfloat16 as its uint16 bits: exact float32 values
    if x.dtype != _tl.bfloat16:
        return x
    return ti.TensorHandle((x.data.astype(_np.uint32) << 16).view(_np.float32), _tl.float32)
def _create_dot(self, a, b, d, *args):  # tl.dot of bf16 multiplies the raw bits (triton#11584)
    return _dot(self, _widen_bf16(a), _widen_bf16(b), d, *args)
ti.InterpreterBuilder.create_dot = _create_dot
"""


def run_interpreted(code: str, timeout: int = 300) -> str:
    """Run PREAMBLE + code with TRITON_INTERPRET=1; fail with its stderr unless it prints OK."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(
        [os.path.join(ROOT, "worker"), ROOT, os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    res = subprocess.run([sys.executable, "-c", PREAMBLE + code], env=env, capture_output=True,
                         text=True, timeout=timeout)  # fmt: skip
    assert res.returncode == 0 and "OK" in res.stdout, (res.stdout[-2000:], res.stderr[-3000:])
    return res.stdout

"""The Triton swap kernel on CPU, under Triton's interpreter (``TRITON_INTERPRET=1``).

The interpreter runs the same kernel source with numpy, so its semantics (restore A,
save and apply B in one launch, shared indices resolved by binary search, one rounding
per add) are checked against the torch reference bit for bit without a GPU; the CUDA
tests in test_kernels.py run the compiled kernel where a GPU is present.

Triton reads the variable when a kernel is decorated, which happens when
``server.kernels`` is first imported, so the checks run in a child pytest process
with the variable set; in this process the one test below starts it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.kernels import gpu

CHILD = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not gpu.HAVE_TRITON, reason="triton not installed")


@pytest.mark.skipif(CHILD, reason="this is the child run")
def test_triton_kernel_under_the_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist"]
    res = subprocess.run(
        [*cmd, str(Path(__file__)), "-k", "interpreted"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    # the kernel for 3 dtypes, and the engine
    assert re.search(r"\b4 passed", res.stdout), res.stdout[-3000:]


if CHILD:
    from server.engine import Engine
    from tests.server.engine_util import base_state, expected_buffers, random_source
    from tests.server.test_kernels import _run, swap_case

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
    @settings(max_examples=100, deadline=None)
    @given(data=st.data())
    def test_interpreted_kernel_equals_reference(dtype: torch.dtype, data) -> None:
        case = data.draw(swap_case(dtype))
        assert gpu.can_run(case[0]) and not gpu.supports(case[0])
        ref_buf, ref_saved = _run("torch", case)
        got_buf, got_saved = _run("triton", case)
        bits = {4: torch.int32, 2: torch.int16}[ref_buf.element_size()]
        assert torch.equal(got_saved.view(bits), ref_saved.view(bits))  # copies: exact
        if dtype is torch.bfloat16:
            # numpy has no bfloat16: the interpreter rounds fp32 -> bf16 in its own code,
            # which is not IEEE round-to-nearest-even on ties (CUDA's cvt.rn is: the
            # bit-exact bf16 check is the gpu test in test_kernels.py); here, one ulp
            ulp = torch.finfo(dtype).eps * ref_buf.float().abs()
            diff = (got_buf.float() - ref_buf.float()).abs()
            assert bool((diff <= ulp).all())
        else:
            assert torch.equal(got_buf.view(bits), ref_buf.view(bits))

    def test_interpreted_engine_random_swaps_restore_base(
        tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The engine with the Triton kernel: after each activation the buffer is exactly
        base + delta(active), and the base comes back bit for bit."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        # the interpreter runs programs one after another: few large blocks keep this
        # fast (the kernel tests above cover many blocks of the real size)
        monkeypatch.setattr(gpu, "BLOCK", 1 << 16)

        models = {"a": (1, 0.9), "b": (2, 0.9), "c": (3, 0.5), "a2": (1, 0.99)}
        src, _ = random_source(base_state(tiny_llama_dir), models)
        model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir))
        tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
        eng = Engine(
            model, tok, kind="causal-lm", source=src, device="cpu", dtype="float32", kernel="triton"
        )
        try:
            expected = expected_buffers(eng, models)
            ids = [None, *models]

            @settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck))
            @given(st.lists(st.sampled_from(ids), min_size=8, max_size=20))
            def run(seq: list[str | None]) -> None:
                for mid in seq:
                    eng.activate(mid)
                    assert eng.active == mid
                    assert torch.equal(eng.buf, expected[mid])
                eng.restore()
                assert eng.base_fingerprint() == eng.loaded_fingerprint

            run()
            assert eng.kernel == "triton"
        finally:
            eng.close()

"""The engine and the scheduler on a CUDA device with the compiled Triton swap kernel.

The same properties the CPU tests check, on the GPU path: after thousands of random
activations the resident buffer is exactly base + delta(active) and the base comes
back bit for bit (fp32 and the CUDA default fp16); a fine-tune's logits equal those of
its merged checkpoint loaded with plain transformers; the scheduler's interleaved
answers equal ``generate`` on each merged checkpoint. Skipped without a GPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, AutoTokenizer

from server.engine import Engine
from server.kernels import gpu
from server.scheduler import Scheduler
from tests.server.engine_util import (
    base_state,
    expected_buffers,
    merged_state,
    random_source,
    save_merged,
)
from tests.server.finetunes import assert_interleaved_answers, causal_delta, tiny_engine

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or not gpu.HAVE_TRITON, reason="needs CUDA+triton"
    ),
]

MODELS = {"ft-a": (1, 0.9), "ft-b": (2, 0.9), "ft-c": (3, 0.5), "ft-a2": (1, 0.99)}
TEXTS = ["the cat sat on the mat", "a much longer sentence about serving many fine-tunes at once"]


def _engine(model_dir: Path, dtype: str) -> tuple[Engine, dict, dict]:
    base = base_state(model_dir)
    src, fts = random_source(base, MODELS)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    eng = Engine(model, tok, kind="causal-lm", source=src, device="cuda", dtype=dtype)
    return eng, base, fts


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cuda_random_swaps_restore_base_bit_exactly(tiny_llama_dir: Path, dtype: str) -> None:
    eng, _, _ = _engine(tiny_llama_dir, dtype)
    try:
        assert eng.kernel == "triton" and eng.buf.is_cuda
        expected = expected_buffers(eng, MODELS)
        ids = [None, *MODELS]
        total = [0]

        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
        @given(st.lists(st.sampled_from(ids), min_size=30, max_size=80))
        def run(seq: list[str | None]) -> None:
            for mid in seq:
                eng.activate(mid)
                total[0] += 1
                assert eng.active == mid
                assert torch.equal(eng.buf, expected[mid]), mid
            eng.restore()
            assert eng.base_fingerprint() == eng.loaded_fingerprint

        run()
        assert total[0] >= 1000
    finally:
        eng.close()


def test_cuda_logits_equal_merged_checkpoint(tiny_llama_dir: Path, tmp_path: Path) -> None:
    eng, base, fts = _engine(tiny_llama_dir, "float32")
    try:
        enc = eng.tokenizer(TEXTS, padding=True, return_tensors="pt").to("cuda")
        for mid in ("ft-c", "ft-a", "ft-b"):
            merged = save_merged(tiny_llama_dir, tmp_path / mid, merged_state(base, fts[mid]))
            ref = AutoModelForCausalLM.from_pretrained(str(merged)).to("cuda").eval()
            eng.activate(mid)
            sd = eng.model.state_dict()
            for k, v in ref.state_dict().items():
                assert torch.equal(sd[k], v), f"{mid}: {k} differs from the merged checkpoint"
            with torch.inference_mode():
                got, want = eng.model(**enc).logits, ref(**enc).logits
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        eng.restore()
        assert eng.base_fingerprint() == eng.loaded_fingerprint
    finally:
        eng.close()


def test_cuda_scheduler_interleaved_answers_equal_merged(tiny_llama_dir: Path) -> None:
    deltas = {"ft-a": causal_delta(tiny_llama_dir, 1), "ft-b": causal_delta(tiny_llama_dir, 2)}
    eng = tiny_engine(tiny_llama_dir, "causal-lm", deltas, "tiny-llama", device="cuda")
    sched = Scheduler(eng, max_batch_size=4, max_batches_per_turn=2)
    prompts = ["hello world", "the quick brown fox jumps over", "a", "serving many fine tunes of"]
    try:
        assert_interleaved_answers(
            sched, tiny_llama_dir, deltas, [None, "ft-a", "ft-b"], prompts, 10
        )
        assert sched.stats.swaps >= 2
    finally:
        sched.close()
        eng.restore()
        assert eng.base_fingerprint() == eng.loaded_fingerprint
        eng.close()

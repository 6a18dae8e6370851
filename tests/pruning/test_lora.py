"""LoRA: the delta read from a real PEFT adapter equals merged-minus-base; factor pruning."""

from __future__ import annotations

import pytest
import torch

from pruning.errors import PruningError
from pruning.lora import lora_delta, prune_factors
from pruning.methods import darex_q
from storage.errors import BadCheckpoint
from storage.lora import read_adapter


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_delta_equals_peft_merged_minus_base(tiny_llama_dir, tmp_path, rslora: bool) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    cfg = LoraConfig(
        r=4,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"down_proj": 2},
        alpha_pattern={"v_proj": 3},
        use_rslora=rslora,
    )
    peft_model = get_peft_model(base, cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.05)  # B starts at zero: make the adapter non-trivial
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = peft_model.merge_and_unload().state_dict()

    adapter = read_adapter(tmp_path / "adapter")
    assert len(adapter.modules) == 2 * 3  # 2 layers x 3 targets
    assert adapter.modules["model.layers.0.mlp.down_proj.weight"].r == 2
    assert adapter.modules["model.layers.1.self_attn.v_proj.weight"].alpha == 3.0
    for name, w in merged.items():
        expect = w.float() - base_sd[name].float()
        if name in adapter.modules:
            got = adapter.modules[name].delta(name)
            assert torch.allclose(got, expect, atol=1e-6), name
            assert float(expect.abs().max()) > 1e-4
        else:
            assert torch.equal(expect, torch.zeros_like(expect)), name


def test_lora_then_darex_q_keeps_the_dare_mask() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 32, generator=g), torch.randn(16, 4, generator=g)
    d = lora_delta(a, b, 8, 4)
    assert torch.allclose(d, b @ a * 2.0)
    sd = darex_q(d, 0.9, 0.2, seed=1, name="q_proj.weight")
    assert torch.allclose(sd.values, d.reshape(-1)[sd.indices] * 5.0)


@pytest.mark.parametrize("which", ["A", "B", "both"])
def test_pruning_inside_the_factors_is_unbiased(which: str) -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 24, generator=g), torch.randn(12, 4, generator=g)
    d = lora_delta(a, b, 4, 4)
    n = 600
    mean = sum(
        prune_factors(a, b, 4, 4, 0.5, seed=s, name="m", which=which).delta() for s in range(n)
    )
    mean = mean / n
    assert float((mean - d).norm() / d.norm()) < 0.1


def test_bad_lora_inputs(tmp_path) -> None:
    with pytest.raises(PruningError, match=r"'x\.weight'"):
        lora_delta(torch.ones(4, 8), torch.ones(8, 3), 1, 4, name="x.weight")
    with pytest.raises(PruningError, match="rank"):
        lora_delta(torch.ones(4, 8), torch.ones(8, 4), 1, 0)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}')
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(BadCheckpoint, match="pickle"):
        read_adapter(tmp_path)
    with pytest.raises(BadCheckpoint, match="not a PEFT adapter"):
        read_adapter(tmp_path / "nowhere")

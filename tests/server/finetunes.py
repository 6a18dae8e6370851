"""Real fine-tunes of the tiny models for serving tests: sparse perturbations of the weights.

A fine-tune here is a real, different checkpoint: a random 5 % of every weight
tensor moves by a normal step (the shape of a pruned delta). ``merged`` loads
the same checkpoint densely with plain transformers: the reference the served
answers must equal.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from server.deltas import MemorySource, ModelDelta
from server.engine import Engine
from server.generation import SamplingParams, encode_prompt

LABELS = ["negative", "neutral", "positive"]


def perturb(model: torch.nn.Module, seed: int, frac: float = 0.05, scale: float = 0.1) -> dict:
    """``name -> (flat idx, values)`` over the model's unique parameters."""
    g = torch.Generator().manual_seed(seed)
    params: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        k = max(1, int(frac * n))
        idx = torch.randperm(n, generator=g)[:k].sort().values
        params[name] = (idx, scale * torch.randn(k, generator=g))
    return params


def causal_delta(base_dir: Path, seed: int) -> ModelDelta:
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    return ModelDelta(perturb(model, seed), task="causal-lm")


def classifier_delta(base_dir: Path, seed: int) -> ModelDelta:
    model = AutoModel.from_pretrained(base_dir)
    g = torch.Generator().manual_seed(seed + 1000)
    hidden = model.config.hidden_size
    extras = {
        "classifier.weight": torch.randn(len(LABELS), hidden, generator=g),
        "classifier.bias": torch.randn(len(LABELS), generator=g),
    }
    return ModelDelta(perturb(model, seed), extras, "sequence-classification", list(LABELS))


def apply_dense(model: torch.nn.Module, delta: ModelDelta) -> torch.nn.Module:
    """Add the delta to a plain transformers model (the merged reference)."""
    named = dict(model.named_parameters())
    with torch.no_grad():
        for name, (idx, val) in delta.params.items():
            named[name].view(-1).index_add_(0, idx, val.to(named[name].dtype))
    return model.eval()


def merged_causal(base_dir: Path, delta: ModelDelta | None) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    return apply_dense(model, delta) if delta is not None else model


@torch.inference_mode()
def merged_classify(base_dir: Path, delta: ModelDelta, texts: list[str]) -> list[list[float]]:
    """softmax(W pooler + b) of the merged encoder, texts one at a time (no padding)."""
    model = apply_dense(AutoModel.from_pretrained(base_dir), delta)
    tok = AutoTokenizer.from_pretrained(base_dir)
    w, b = delta.extras["classifier.weight"], delta.extras["classifier.bias"]
    out = []
    for t in texts:
        pooled = model(**tok([t], return_tensors="pt")).pooler_output
        out.append(torch.softmax(pooled @ w.T + b, -1)[0].tolist())
    return out


@torch.inference_mode()
def reference_generate(model, tokenizer, prompt_ids: list[int], max_tokens: int) -> str:
    """Greedy text from HF ``generate`` on one unpadded prompt."""
    ids = torch.tensor([prompt_ids], device=model.device)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def tiny_engine(
    base_dir: Path, kind: str, deltas: dict[str, ModelDelta], name: str, device: str = "cpu"
) -> Engine:
    """A real Engine over a tiny model with an in-memory source holding ``deltas``."""
    source = MemorySource()
    for model_id, d in deltas.items():
        source.add(model_id, d)
    auto = AutoModelForCausalLM if kind == "causal-lm" else AutoModel
    model = auto.from_pretrained(base_dir)
    tok = AutoTokenizer.from_pretrained(base_dir)
    return Engine(
        model, tok, kind=kind, source=source, device=device, dtype="float32", base_name=name
    )


def assert_interleaved_answers(
    sched,  # type: ignore[no-untyped-def]
    base_dir: Path,
    deltas: dict[str, ModelDelta],
    models: list[str | None],
    prompts: list[str],
    max_tokens: int,
) -> dict[str | None, list[str]]:
    """Submit every (prompt, model) at once; each answer must equal HF ``generate`` on that
    model's merged checkpoint (None = the base). Returns the answers per model."""
    params = SamplingParams(max_tokens=max_tokens)

    async def main():  # type: ignore[no-untyped-def]
        jobs = [sched.complete(m, p, params) for p in prompts for m in models]
        return await asyncio.gather(*jobs)

    got = asyncio.run(main())
    answers: dict[str | None, list[str]] = {m: [] for m in models}
    for i, c in enumerate(got):
        answers[models[i % len(models)]].append(c.text)
        assert c.finish_reason in ("length", "stop")
    tok, device = sched.engine.tokenizer, sched.engine.device
    for m in models:
        ref = merged_causal(base_dir, deltas.get(m) if m else None).to(device)
        expect = [reference_generate(ref, tok, encode_prompt(tok, p), max_tokens) for p in prompts]
        assert answers[m] == expect, m
    return answers


def save_causal_finetune(base_dir: Path, out: Path, seed: int) -> Path:
    """A full fine-tuned checkpoint folder (safetensors + config.json): perturbed weights."""
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    apply_dense(model, ModelDelta(perturb(model, seed)))
    model.save_pretrained(out)
    return out


def save_classifier_finetune(base_dir: Path, out: Path, seed: int) -> Path:
    """A BertForSequenceClassification checkpoint over the base encoder, labels in its config."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    model = BertForSequenceClassification.from_pretrained(
        base_dir,
        num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)),
        label2id={lab: i for i, lab in enumerate(LABELS)},
    )
    apply_dense(model.bert, ModelDelta(perturb(model.bert, seed)))
    model.save_pretrained(out)
    return out


def spread_head(model: torch.nn.Module, tokenizer, texts: list[str]) -> None:
    """A random classification head over the part of the pooled output that varies across
    ``texts`` (centred on their mean), so the model's labels of them vary."""
    with torch.no_grad():
        pooled = model.bert(**tokenizer(texts, padding=True, return_tensors="pt")).pooler_output
        spread = pooled.std(0).clamp_min(1e-6)
        w = torch.randn(len(LABELS), pooled.shape[1], generator=torch.Generator().manual_seed(0))
        model.classifier.weight.copy_(w / spread)
        model.classifier.bias.copy_(-(w / spread) @ pooled.mean(0))


def save_spiky_classifier(
    base_dir: Path, out: Path, texts: list[str], density: float = 0.3, sigma: float = 2.0
) -> Path:
    """A classifier whose encoder delta is heavy-tailed: a random ``density`` of the entries
    move, by log-normal sizes (``sigma``) at rms 1e-2, so a few entries carry most of it
    (what magnitude pruning keeps); the head is ``spread_head`` over ``texts``."""
    from transformers import AutoModelForSequenceClassification

    save_classifier_finetune(base_dir, out, seed=4)
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModel.from_pretrained(base_dir).state_dict()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, prm in model.bert.named_parameters():
            moved = torch.rand(prm.shape, generator=g) < density
            size = torch.exp(sigma * torch.randn(prm.shape, generator=g))
            d = torch.randn(prm.shape, generator=g).sign() * size * moved
            prm.copy_(base[name] + d / d.pow(2).mean().sqrt() * 1e-2)
    spread_head(model, tok, texts)
    model.save_pretrained(out)
    for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (out / f).write_bytes((base_dir / f).read_bytes())
    return out


def multipart_files(folder: Path) -> list[tuple[str, tuple[str, bytes]]]:
    """httpx ``files=`` for every file of a checkpoint folder."""
    return [("files", (f.name, f.read_bytes())) for f in sorted(folder.iterdir()) if f.is_file()]

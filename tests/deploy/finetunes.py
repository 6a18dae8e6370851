"""Real classification fine-tunes of the tiny BERT, saved as safetensors checkpoints."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, BertForSequenceClassification

TEXTS = ["a gripping, beautiful film", "dull and far too long", "it rained on tuesday"]


def make_classifier(base_dir: Path, out: Path, labels: list[str], seed: int) -> Path:
    """The tiny BERT with 5 % of each weight moved and a new head with ``labels``; saved."""
    model = BertForSequenceClassification.from_pretrained(
        base_dir, num_labels=len(labels), id2label=dict(enumerate(labels))
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            flat = p.view(-1)
            idx = torch.randperm(flat.numel(), generator=g)[: max(1, flat.numel() // 20)]
            flat[idx] += 0.1 * torch.randn(idx.numel(), generator=g)
        # a decisive head, so that two fine-tunes give clearly different answers
        model.classifier.weight.normal_(0.0, 1.0, generator=g)
    model.eval().save_pretrained(out)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out)
    return out


@torch.inference_mode()
def reference_probs(ckpt: Path, texts: list[str]) -> list[list[float]]:
    """softmax(logits) of the dense fine-tuned checkpoint, one text at a time."""
    model = BertForSequenceClassification.from_pretrained(ckpt).eval()
    tok = AutoTokenizer.from_pretrained(ckpt)
    return [
        torch.softmax(model(**tok([t], return_tensors="pt")).logits, -1)[0].tolist() for t in texts
    ]

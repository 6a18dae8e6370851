"""A same-shape stand-in for a base: its config and tokenizer, randomly initialised weights.

The swap and serving benchmarks time memory traffic and forward passes, which depend on
the tensors' shapes and dtype, not on their values. Where a base's weights cannot be
installed (a GPU machine that can only receive a few MiB of files), this builds a folder
with the same ``config.json``, the same tokenizer and float32 weights of the same shapes,
which ``bench/swap.py --bases DIR`` and ``bench/serve.py --base DIR`` accept.

    # here: keep only the small files of each base
    python bench/shape_base.py --strip minilm-l6 --out .gpu/cfg/minilm-l6
    # there: rebuild the weights from the config
    python bench/shape_base.py --config .gpu/cfg/minilm-l6 --out /tmp/bases/minilm-l6
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def strip(base: str, out: Path, data_dir: Path) -> None:
    """Copy a base's config and tokenizer files (everything but the weights) to ``out``."""
    from storage.bases import resolve_base

    src = resolve_base(base, data_dir).path
    out.mkdir(parents=True, exist_ok=True)
    for f in Path(src).iterdir():
        if f.is_file() and f.suffix not in (".safetensors", ".bin", ".gguf") and f.name[0] != ".":
            shutil.copy(f, out / f.name)
    print(f"{base}: {sorted(p.name for p in out.iterdir())} -> {out}")


def build(config_dir: Path, out: Path) -> None:
    """Random-init weights of the config's architecture (float32) + the tokenizer files."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(config_dir)
    causal = any(a.endswith("ForCausalLM") for a in cfg.architectures or [])
    torch.manual_seed(0)
    model = (AutoModelForCausalLM if causal else AutoModel).from_config(cfg, dtype=torch.float32)
    model.eval().save_pretrained(out)
    for f in config_dir.iterdir():
        if f.is_file() and f.name != "config.json":
            shutil.copy(f, out / f.name)
    n = sum(p.numel() for p in model.parameters())
    print(f"{config_dir.name}: {n:,} parameters (random, float32) -> {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--strip", metavar="BASE", help="catalog name or folder to copy from")
    ap.add_argument("--config", type=Path, help="a folder made by --strip")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("DAREX_DATA_DIR", Path.home() / ".darex")),
    )
    args = ap.parse_args()
    if bool(args.strip) == bool(args.config):
        ap.error("give exactly one of --strip BASE or --config DIR")
    if args.strip:
        strip(args.strip, args.out, args.data_dir)
    else:
        build(args.config, args.out)


if __name__ == "__main__":
    main()

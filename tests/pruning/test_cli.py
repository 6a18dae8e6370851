"""``darex inspect`` and ``darex prune`` on tiny real models; the output loads with transformers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import server.cli.prune  # noqa: F401  (registers the commands)
from pruning.sparse import keep_mask
from server.cli import app

runner = CliRunner()


def _finetune(src: Path, dst: Path, rms: float, seed: int = 1) -> Path:
    """A synthetic full fine-tune: every float tensor plus Gaussian noise."""
    shutil.copytree(src, dst)
    sd = load_file(src / "model.safetensors")
    g = torch.Generator().manual_seed(seed)
    out = {
        k: (v + torch.randn(v.shape, generator=g) * rms).to(v.dtype) if v.is_floating_point() else v
        for k, v in sd.items()
    }
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def bert_ft(tiny_bert_dir, tmp_path_factory) -> Path:
    return _finetune(tiny_bert_dir, tmp_path_factory.mktemp("ft") / "bert-ft", 5e-3)


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    lines = [f"sample sentence number {i} about movies and food" for i in range(24)]
    path.write_text("\n".join(lines))
    return path


def _run(*args: str) -> str:
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output + repr(res.exception)
    return res.output


def test_inspect_prints_stats_and_recommendation(tiny_bert_dir, bert_ft) -> None:
    out = _run("inspect", tiny_bert_dir, bert_ft, "--limit", "0")
    assert "pooler.dense.bias" in out  # a per-tensor row
    assert "pruned tensors: 39" in out  # encoder default: every float tensor
    assert "recommended:" in out
    # every entry of those tensors, and how many of them the fine-tune changed
    base = load_file(tiny_bert_dir / "model.safetensors")
    ft = load_file(bert_ft / "model.safetensors")
    floats = [k for k, v in base.items() if v.is_floating_point()]
    size = sum(base[k].numel() for k in floats)
    changed = sum(int((ft[k] != base[k]).sum()) for k in floats)
    assert f"pruned tensors: 39, {size:,} entries ({changed:,} changed)" in " ".join(out.split())


def _changed_only_where_kept(base_dir: Path, out_dir: Path, p: float, seed: int) -> int:
    from transformers import AutoModel

    base = AutoModel.from_pretrained(base_dir).state_dict()
    pruned = AutoModel.from_pretrained(out_dir).state_dict()
    n_changed = 0
    for name, w in pruned.items():
        if not w.is_floating_point():
            continue
        changed = (w != base[name]).reshape(-1)
        mask = keep_mask(seed, name, p, w.numel())
        assert not bool((changed & ~mask).any()), name
        n_changed += int(changed.sum())
    return n_changed


def test_prune_dare_output_loads_and_differs_only_where_kept(tiny_bert_dir, bert_ft, tmp_path):
    out = tmp_path / "out"
    text = _run("prune", tiny_bert_dir, bert_ft, "--rate", "0.9", "--seed", "3", "--out", out)
    assert "kept" in text
    n = _changed_only_where_kept(tiny_bert_dir, out, 0.9, 3)
    total = sum(v.numel() for v in load_file(tiny_bert_dir / "model.safetensors").values())
    assert 0.05 * total < n < 0.15 * total
    summary = json.loads((out / "darex_prune.json").read_text())
    some = summary["tensors"]["encoder.layer.1.output.dense.weight"]
    assert some["scale"] == pytest.approx(10.0)
    # the kept values are the DARE-rescaled delta
    ft = load_file(bert_ft / "model.safetensors")
    base = load_file(tiny_bert_dir / "model.safetensors")
    got = load_file(out / "model.safetensors")
    name = "encoder.layer.1.output.dense.weight"
    mask = keep_mask(3, name, 0.9, ft[name].numel()).view(ft[name].shape)
    expect = base[name] + (ft[name] - base[name]) * mask * 10.0
    assert torch.allclose(got[name], expect, atol=1e-6)


@pytest.mark.parametrize("q", ["auto", "analytical", "outchange", "0.2"])
def test_prune_darex_q_with_calibration(tiny_bert_dir, bert_ft, calib_file, tmp_path, q) -> None:
    out = tmp_path / "out"
    _run(
        "prune",
        tiny_bert_dir,
        bert_ft,
        "--method",
        "darex_q",
        "--rate",
        "0.9",
        "--q",
        q,
        "--calib",
        calib_file,
        "--out",
        out,
        # this fine-tune's deltas are small: at the default eta its analytical q's are
        # 1-p, where a bias taking its layer's q could not be told from one left at 1-p
        *(["--eta", "10"] if q == "analytical" else []),
    )
    assert _changed_only_where_kept(tiny_bert_dir, out, 0.9, 0) > 0
    scales = {
        k: v["scale"]
        for k, v in json.loads((out / "darex_prune.json").read_text())["tensors"].items()
    }
    lin = scales["encoder.layer.0.attention.self.query.weight"]
    summary = json.loads((out / "darex_prune.json").read_text())
    if q == "0.2":
        assert lin == pytest.approx(5.0)
    elif q == "outchange":  # one global q in [1-p, 10(1-p)], recorded, used for every tensor
        chosen = float(summary["q"].removeprefix("outchange="))
        assert 0.1 - 1e-9 <= chosen <= 1.0
        assert all(v == pytest.approx(1.0 / chosen) for v in scales.values())
    elif q == "analytical":
        assert 1.0 < lin <= 10.0 + 1e-9  # q in [1-p, 1)
    else:
        assert lin > 0 and lin != pytest.approx(10.0)
    if q in ("auto", "analytical"):  # per-layer q: tensors without calibration inputs keep 1-p
        assert scales["embeddings.LayerNorm.weight"] == pytest.approx(10.0)
        # a linear's bias takes its layer's q, as the grid (server.reproduce) gives it
        for layer in ("attention.self.query", "output.dense"):
            w, b = (f"encoder.layer.0.{layer}.{k}" for k in ("weight", "bias"))
            assert scales[b] == scales[w] != pytest.approx(10.0)


def test_matrices_the_calibration_cannot_measure_are_named(calib_file, tmp_path) -> None:
    """GPT-2 keeps its attention and MLP weights in Conv1D modules, whose inputs the
    calibration (nn.Linear hooks) does not see: WANDA prunes them by magnitude, and the
    prune says so and lists them, instead of passing magnitude off as WANDA."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.conftest import _copy_tokenizer

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=30522, n_positions=64)
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "base")
    _copy_tokenizer(tmp_path / "base")
    ft = _finetune(tmp_path / "base", tmp_path / "ft", 5e-3)
    args = ["prune", tmp_path / "base", ft, "--method", "wanda", "--rate", "0.9"]
    args += ["--calib", calib_file, "--out", tmp_path / "out"]
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    record = json.loads((tmp_path / "out" / "darex_prune.json").read_text())
    unmeasured = record["unmeasured"]
    assert "transformer.h.0.attn.c_attn.weight" in unmeasured
    assert "transformer.h.0.mlp.c_proj.weight" in unmeasured
    assert not any("wte" in n or "wpe" in n for n in unmeasured)  # tables: never measured
    assert f"warning: {len(unmeasured)} matrices had no calibration inputs" in res.stderr
    assert "pruned by magnitude" in res.stderr


def test_an_encoder_whose_matrices_are_all_measured_prunes_without_a_warning(
    tiny_bert_dir, bert_ft, calib_file, tmp_path
) -> None:
    """BERT's matrices are nn.Linear and its embedding tables are not measured by nature:
    no warning, no "unmeasured" in the record."""
    args = ["prune", tiny_bert_dir, bert_ft, "--method", "wanda", "--rate", "0.9"]
    res = runner.invoke(app, [str(a) for a in [*args, "--calib", calib_file, "-o", tmp_path / "o"]])
    assert res.exit_code == 0, res.output
    assert "calibration inputs" not in res.output
    assert "unmeasured" not in json.loads((tmp_path / "o" / "darex_prune.json").read_text())


def test_a_pruned_weight_past_its_dtypes_range_is_refused(tiny_bert_dir, tmp_path) -> None:
    """An fp16 checkpoint whose rescaled delta takes a weight past 65504: the prune fails
    naming the tensor and leaves no output, rather than writing inf into it."""
    ft = _finetune(tiny_bert_dir, tmp_path / "ft", 0.0)
    sd = load_file(ft / "model.safetensors")
    name = "encoder.layer.0.attention.self.query.weight"
    sd = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
    sd[name] = sd[name] + 1000.0  # x 100 at p = 0.99: 1e5, past fp16's range
    save_file(sd, ft / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    args = ["prune", tiny_bert_dir, ft, "--method", "dare", "--rate", "0.99", "--out", out]
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 1, res.output
    assert name in res.output and "past the range of torch.float16" in res.output
    assert not out.exists()


def test_prune_wanda_and_decoder_defaults(tiny_llama_dir, calib_file, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    ft = _finetune(tiny_llama_dir, tmp_path / "llama-ft", 5e-3)
    out = tmp_path / "out"
    _run(
        "prune",
        tiny_llama_dir,
        ft,
        "--method",
        "wanda",
        "--rate",
        "0.75",
        "--calib",
        calib_file,
        "--out",
        out,
    )
    model = AutoModelForCausalLM.from_pretrained(out)
    base = load_file(tiny_llama_dir / "model.safetensors")
    ftw = load_file(ft / "model.safetensors")
    sd = model.state_dict()
    # decoder default: norms and embeddings are exact fine-tuned values, q_proj is 25% dense
    assert torch.equal(sd["model.norm.weight"], ftw["model.norm.weight"])
    assert torch.equal(sd["model.embed_tokens.weight"], ftw["model.embed_tokens.weight"])
    q = "model.layers.0.self_attn.q_proj.weight"
    changed = sd[q] != base[q]
    assert bool((changed.sum(1) <= round(0.25 * changed.shape[1])).all())  # WANDA per row
    ids = torch.tensor([[101, 2000, 2001, 102]])
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_prune_outchange_q_on_a_decoder(tiny_llama_dir, calib_file, tmp_path) -> None:
    """Decoders score q on the logits; the q is searched on the mask that is stored."""
    ft = _finetune(tiny_llama_dir, tmp_path / "llama-ft", 5e-3)
    out = tmp_path / "out"
    args = ["--method", "darex_q", "--rate", "0.75", "--q", "outchange", "--seed", "2"]
    text = _run("prune", tiny_llama_dir, ft, *args, "--calib", calib_file, "--out", out)
    assert "q by output change" in text
    summary = json.loads((out / "darex_prune.json").read_text())
    chosen = float(summary["q"].removeprefix("outchange="))
    assert 0.25 - 1e-9 <= chosen <= 1.0
    scale = summary["tensors"]["model.layers.0.self_attn.q_proj.weight"]["scale"]
    assert scale == pytest.approx(1.0 / chosen)
    assert "model.norm.weight" not in summary["tensors"]  # decoder default: kept exact
    res = runner.invoke(app, ["prune", str(tiny_llama_dir), str(ft), *args, "--out", str(out)])
    assert res.exit_code != 0 and "--calib" in res.output


def test_prune_bad_inputs(tiny_bert_dir, tiny_llama_dir, bert_ft, tmp_path) -> None:
    res = runner.invoke(
        app,
        ["prune", str(tiny_bert_dir), str(bert_ft), "--rate", "1.0", "--out", str(tmp_path / "o")],
    )
    assert res.exit_code != 0 and "[0, 1)" in res.output
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(bert_ft / "config.json", pickled / "config.json")
    (pickled / "pytorch_model.bin").write_bytes(b"not really")
    res = runner.invoke(
        app, ["prune", str(tiny_bert_dir), str(pickled), "--out", str(tmp_path / "o")]
    )
    assert res.exit_code == 1 and "pickle" in res.output
    res = runner.invoke(app, ["inspect", str(tiny_bert_dir), str(tiny_llama_dir)])
    assert res.exit_code == 1
    bad = _finetune(tiny_bert_dir, tmp_path / "nan-ft", 1e-3)
    sd = load_file(bad / "model.safetensors")
    sd["encoder.layer.1.output.dense.weight"][0, 0] = float("nan")
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    res = runner.invoke(app, ["prune", str(tiny_bert_dir), str(bad), "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and "encoder.layer.1.output.dense.weight" in res.output
    res = runner.invoke(
        app,
        [
            "prune",
            str(tiny_bert_dir),
            str(bert_ft),
            "--method",
            "wanda",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert res.exit_code != 0 and "--calib" in res.output

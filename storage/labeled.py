"""DAREx-q's q from labeled examples: the paper's grid search on a validation set.

Used by ``darex prune --q labeled --val FILE``, ``darex add --val FILE`` and the
upload's ``val`` field. The examples are JSON lines, one per line:

- ``{"text": "a warm, funny film", "label": "positive"}`` for a classification
  fine-tune (``label`` is a name from its config's ``id2label``, or an index);
- ``{"text": "Q: 3 plus 4?\\nA:", "target": "7"}`` for a decoder: the greedy
  continuation of ``text`` must begin with ``target`` (``Task`` metric ``prefix``).

The fine-tuned model is loaded once (from its own folder, so a new classification
head comes with it; a decoder LoRA adapter is applied to the base), every pruned
tensor gets the DARE mask that is stored for the same seed (masks are keyed by the
base's tensor names), and ``pruning.q.search_q_global`` scans q from 1-p (plain DARE)
upward for the best metric, then a 4x finer grid around it (``labeled_q``).

``labeled_choice`` (what ingest runs when labels come without a method) also scores
magnitude and WANDA (input norms measured on the examples' texts) at the same rate and
keeps the best of the three, ties to DAREx-q. In the reproduction grid
(docs/results/reproduce.md) that choice came within a point of each cell's best method
in 149 of 210 cells, 1.3 points below the best on average, where DAREx-q alone did in
147 (1.8): most of the gain is one cell where the q search found nothing above 0 and
WANDA kept 87.0.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pruning.errors import PruningError
from pruning.methods import dare_indices
from pruning.q import search_q_global
from storage.checkpoint import open_checkpoint, read_config
from storage.predict import load_tokenizer, predict, reference
from storage.qsearch import parameter_for
from storage.tasks import Example, Task

MAX_EXAMPLES = 1000  # the first 1,000 lines: every q tried evaluates all of them
BATCH = 16
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")
FORMAT = (
    'JSON lines: {"text": ..., "label": NAME_OR_INDEX} (classification) '
    'or {"text": ..., "target": ...} (generation)'
)


@dataclass(frozen=True)
class LabeledQ:
    """The q found, and the metric on the examples: at q, with plain DARE (q = 1-p,
    the same mask) and unpruned; ``tried`` is every (q, metric) evaluated."""

    q: float
    score: float
    dare: float
    unpruned: float
    n: int
    metric: str
    tried: tuple[tuple[float, float], ...]

    def summary(self) -> str:
        pct = [f"{100 * x:.1f}" for x in (self.score, self.dare, self.unpruned)]
        return (
            f"q={self.q:g} by {self.metric} on {self.n} labeled examples: "
            f"{pct[0]} (DARE {pct[1]}, unpruned {pct[2]})"
        )


def read_labeled(raw: str, source: str = "val") -> list[dict[str, Any]]:
    """Parse the JSON lines (blank lines skipped); every line names its line number on error.

    Returns dicts with ``text``, ``label`` or ``target``, and ``line``; at most
    ``MAX_EXAMPLES``. All lines must be of one kind (label or target).
    """
    rows: list[dict[str, Any]] = []
    for i, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{source} line {i}"
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise PruningError(f"{where}: not a JSON object ({e.msg}); expected {FORMAT}") from e
        if not isinstance(obj, dict):
            raise PruningError(f"{where}: not a JSON object; expected {FORMAT}")
        text = obj.get("text")
        if not isinstance(text, str) or not text.strip():
            raise PruningError(f"{where}: 'text' must be a non-empty string")
        if ("label" in obj) == ("target" in obj):
            raise PruningError(f"{where}: give exactly one of 'label' or 'target'")
        if "label" in obj:
            lab = obj["label"]
            if isinstance(lab, bool) or not isinstance(lab, int | str) or lab == "":
                raise PruningError(f"{where}: 'label' must be a label name or an index")
            row = {"text": text, "label": lab, "line": i}
        else:
            tgt = obj["target"]
            if not isinstance(tgt, str) or not tgt.strip():
                raise PruningError(f"{where}: 'target' must be a non-empty string")
            row = {"text": text, "target": tgt, "line": i}
        if rows and ("label" in rows[0]) != ("label" in row):
            raise PruningError(f"{where}: mixes 'label' and 'target' lines; use one kind")
        rows.append(row)
        if len(rows) == MAX_EXAMPLES:
            break
    if not rows:
        raise PruningError(f"{source}: no labeled example in it; expected {FORMAT}")
    return rows


def check_val_options(method: str | None, q: float | None) -> None:
    """Labeled examples choose DAREx-q's q: refuse them where no q is searched."""
    if q is not None:
        raise PruningError("val: labeled examples search q; send either q or val, not both")
    if method is not None and method != "darex_q":
        raise PruningError(
            f"val: labeled examples search DAREx-q's q; method {method} takes no q "
            "(leave method out for the recommended one, or use darex_q)"
        )


def _task(rows: Sequence[Mapping[str, Any]], model: Any, tokenizer: Any, source: str) -> Task:
    """The examples as a one-split ``Task`` for this model (labels checked against it)."""
    check_kind(rows, type(model).__name__, source)
    if "label" not in rows[0]:
        exs = [Example(r["text"], target=r["target"]) for r in rows]
        longest = max(len(tokenizer(e.target, add_special_tokens=False)["input_ids"]) for e in exs)
        return Task("val", "generation", (), [], exs, [], "prefix", max_new_tokens=longest + 1)
    names = label_names(model.config.id2label, int(model.config.num_labels))
    exs = [
        Example(r["text"], label=i)
        for r, i in zip(rows, label_indices(rows, names, source), strict=True)
    ]
    return Task("val", "classification", tuple(names), [], exs, [], "accuracy")


def label_names(id2label: Mapping[Any, Any] | None, num_labels: int) -> list[str]:
    """A classifier's label names by index (a config's ``id2label``; missing ones by number)."""
    by_id = {int(k): str(v) for k, v in (id2label or {}).items()}
    return [by_id.get(i, str(i)) for i in range(num_labels)]


def label_indices(
    rows: Sequence[Mapping[str, Any]], names: Sequence[str], source: str = "val"
) -> list[int]:
    """Each row's label as an index into ``names`` (a name, a digit string or an index)."""
    out = []
    for r in rows:
        lab = r["label"]
        if isinstance(lab, str) and lab in names:
            lab = list(names).index(lab)
        elif isinstance(lab, str) and lab.isdigit():
            lab = int(lab)
        elif isinstance(lab, str):
            raise PruningError(
                f"{source} line {r['line']}: label {lab!r} is not one of the fine-tune's "
                f"{list(names)}"
            )
        if not 0 <= lab < len(names):
            raise PruningError(
                f"{source} line {r['line']}: label index {lab} is out of range "
                f"(0..{len(names) - 1})"
            )
        out.append(int(lab))
    return out


def check_against_config(rows: Sequence[Mapping[str, Any]], folder: Path) -> None:
    """Before any job: the rows' kind and label names against a full checkpoint's
    ``config.json``; a folder without one (a LoRA adapter) is checked when it loads.

    A config that is not readable JSON, or whose ``architectures`` / ``id2label`` have
    the wrong shape, raises ``BadCheckpoint`` (``storage.checkpoint.check_config``);
    rows that do not fit it raise ``PruningError``."""
    cfg = read_config(Path(folder))
    if cfg is None:
        return
    check_kind(rows, next(iter(cfg.get("architectures") or []), ""))
    if "label" in rows[0] and cfg.get("id2label"):
        label_indices(rows, label_names(cfg["id2label"], len(cfg["id2label"])))


def check_kind(rows: Sequence[Mapping[str, Any]], architecture: str, source: str = "val") -> None:
    """'label' lines go with a sequence classifier, 'target' lines with anything else."""
    classifier = architecture.endswith("ForSequenceClassification")
    if "label" in rows[0] and not classifier:
        raise PruningError(
            f"{source}: 'label' lines need a sequence-classification fine-tune, not "
            f"{architecture or 'an unnamed architecture'}; a decoder's lines take a 'target'"
        )
    if "label" not in rows[0] and classifier:
        raise PruningError(
            f"{source}: a classification fine-tune takes 'label' lines, not 'target'"
        )


def _load(finetuned: Path, base_path: Path, arch: str, lora: bool) -> tuple[Any, Any]:
    """The fine-tuned model (its own head) and a tokenizer; a LoRA adapter's base model."""
    import transformers

    if lora:
        if arch != "decoder":
            raise PruningError(
                "a labeled q search on an encoder LoRA adapter has no classification head "
                "to score with: merge the adapter and send the full checkpoint"
            )
        folder = base_path
        cls: Any = transformers.AutoModelForCausalLM
    else:
        folder = finetuned if finetuned.is_dir() else finetuned.parent
        cfg_file = folder / "config.json"
        if not cfg_file.is_file():
            raise PruningError(
                "a labeled q search loads the fine-tune with its config: "
                f"no config.json in {folder}"
            )
        archs = (read_config(folder) or {}).get("architectures") or []
        if any(a.endswith("ForSequenceClassification") for a in archs):
            cls = transformers.AutoModelForSequenceClassification
        elif arch == "decoder":
            cls = transformers.AutoModelForCausalLM
        else:
            raise PruningError(
                f"a labeled q search on an encoder needs a sequence-classification "
                f"fine-tune; {folder}/config.json names {archs or 'no architecture'}"
            )
    model = cls.from_pretrained(str(folder), dtype=torch.float32).eval()
    tok_dir = next(
        (d for d in (folder, base_path) if any((d / f).is_file() for f in _TOKENIZER_FILES)),
        base_path,
    )
    tok = load_tokenizer(tok_dir)
    return model, tok


class _Bench:
    """The fine-tuned model loaded once, with the pruned tensors it holds (their base
    weights and deltas, by base name) and the examples to score on."""

    def __init__(
        self,
        finetuned: Path,
        base_path: Path,
        arch: str,
        deltas: Mapping[str, torch.Tensor],
        rows: Sequence[Mapping[str, Any]],
        lora: bool,
        max_length: int,
        source: str,
    ) -> None:
        self.model, self.tok = _load(Path(finetuned), Path(base_path), arch, lora)
        self.task = _task(rows, self.model, self.tok, source)
        self.max_length = max_length
        own = dict(self.model.named_parameters())
        prefix = f"{getattr(self.model, 'base_model_prefix', '')}."
        base_ckpt = open_checkpoint(base_path)
        # (parameter name in the model, base tensor name) -> (parameter, base weight, delta)
        self.entries: dict[tuple[str, str], tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor]]
        self.entries = {}
        for name, d in deltas.items():
            key = parameter_for(own, name, d.shape, prefix)
            if key is not None:
                self.entries[(key, name)] = (own[key], base_ckpt.get(name).float(), d.float())
        if not self.entries:
            raise PruningError("no pruned tensor is a parameter of the fine-tuned model")
        self.exs = sorted(self.task.validation, key=lambda e: len(e.text))  # less padding

    @torch.no_grad()
    def set(self, kept: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None) -> None:
        """``W = W_base + d`` (``kept`` None), or only the kept entries of each delta,
        ``kept[name] = (indices, values)``."""
        for (_, name), (prm, base, d) in self.entries.items():
            w = base.clone()
            if kept is None:
                w.add_(d)
            else:
                idx, vals = kept[name]
                w.view(-1).index_add_(0, idx, vals.float())
            prm.copy_(w)

    @torch.no_grad()
    def metric(self, kept: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None) -> float:
        """The metric on the examples with the weights ``set(kept)`` gives."""
        self.set(kept)
        preds = predict(
            self.model, self.tok, self.task, self.exs, batch_size=BATCH, max_length=self.max_length
        )
        return self.task.metric(preds, [reference(self.task, e) for e in self.exs])

    def search_q(self, p: float, seed: int, on_step: Callable[[], None] | None) -> LabeledQ:
        masks = {
            name: dare_indices(seed, name, p, d.numel())
            for (_, name), (_, _, d) in self.entries.items()
        }
        deltas = {name: d.view(-1) for (_, name), (_, _, d) in self.entries.items()}
        unpruned = self.metric(None)

        def score(q: float) -> float:
            if on_step is not None:
                on_step()
            factor = 1.0 / q
            return self.metric({n: (idx, deltas[n][idx] * factor) for n, idx in masks.items()})

        found = search_q_global(score, p, refine=4)
        return LabeledQ(
            found.q,
            found.score,
            dict(found.tried)[round(1.0 - p, 12)],
            unpruned,
            len(self.exs),
            self.task.metric_name,
            found.tried,
        )

    @torch.no_grad()
    def col_norms(self) -> dict[str, torch.Tensor]:
        """WANDA's input-column norms of each pruned linear weight, by base name, on the
        examples' texts through the fine-tuned model."""
        from storage.qsearch import input_col_norms

        self.set(None)  # the fine-tune's own weights
        texts = [e.text for e in self.exs]
        names = {key: name for key, name in self.entries}  # parameter name -> base name
        return input_col_norms(
            self.model, self.tok, names, texts, self.max_length, limit=None, batch=BATCH
        )


# The candidates a labeled choice compares, in the order ties go: DAREx-q first (its
# mask is a seed, so it is stored in the fewest bytes).
CANDIDATES = ("darex_q", "magnitude", "wanda")


@dataclass(frozen=True)
class LabeledChoice:
    """The method with the best metric on the labeled examples, each candidate's metric,
    the q search, and WANDA's column norms (by base name) when WANDA is chosen."""

    method: str
    scores: dict[str, float]
    search: LabeledQ
    col_norms: dict[str, torch.Tensor] | None = None

    @property
    def q(self) -> float | None:
        return self.search.q if self.method == "darex_q" else None

    def summary(self) -> str:
        others = ", ".join(f"{m} {100 * v:.1f}" for m, v in self.scores.items() if m != "darex_q")
        if not others:  # only the q search ran
            return self.search.summary()
        return f"{self.search.summary()}; {others}; chose {self.method}"


@torch.no_grad()
def labeled_choice(
    finetuned: Path,
    base_path: Path,
    arch: str,
    deltas: Mapping[str, torch.Tensor],
    rows: Sequence[Mapping[str, Any]],
    p: float,
    *,
    seed: int = 0,
    lora: bool = False,
    max_length: int = 128,
    source: str = "val",
    on_step: Callable[[], None] | None = None,
    candidates: Sequence[str] = CANDIDATES,
) -> LabeledChoice:
    """DAREx-q with q searched on labeled ``rows`` (``read_labeled``), then the other
    ``candidates`` (magnitude, WANDA), each scored on ``rows`` at rate p; the best one,
    ties in ``CANDIDATES`` order. WANDA weighs each linear weight's delta by its input
    columns' norms on the rows' texts; a tensor with no linear input (an embedding, a
    norm, a bias) takes magnitude, as ``darex prune`` does.

    ``deltas`` are the pruned tensors' deltas keyed by the base's tensor names, as
    ingest and ``darex prune`` hold them; the other tensors keep the fine-tune's values.
    """
    from pruning.methods import method_for, prune_tensor

    bench = _Bench(finetuned, base_path, arch, deltas, rows, lora, max_length, source)
    found = bench.search_q(p, seed, on_step)
    norms = bench.col_norms() if "wanda" in candidates else {}

    def kept(method: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        out = {}
        for (_, name), (_, _, d) in bench.entries.items():
            cn = norms.get(name)
            sd = prune_tensor(method_for(method, d, cn), d, p, name=name, col_norm=cn)
            out[name] = (sd.indices, sd.values)
        return out

    scores = {"darex_q": found.score}
    for m in CANDIDATES[1:]:
        if m in candidates:
            if on_step is not None:
                on_step()
            scores[m] = bench.metric(kept(m))
    method = max(scores, key=lambda m: (scores[m], -CANDIDATES.index(m)))
    return LabeledChoice(method, scores, found, norms if method == "wanda" else None)


def labeled_q(*args: Any, **kw: Any) -> LabeledQ:
    """Only DAREx-q's global q searched on the rows: ``labeled_choice``'s arguments."""
    return labeled_choice(*args, candidates=("darex_q",), **kw).search

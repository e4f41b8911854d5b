"""Cross-backend equivalence: run the same work on several backends and compare.

:func:`validate` takes wrapped models (any backends over the same weights), tokens and
SAEs, runs clean / splice (error term off and on) / steer / ablate on each, and compares
every backend with the first: max |Δ log-prob|, mean KL, and latent agreement (same
active set, max |Δ latent|), PASS/FAIL against the named tolerance of the dtype.

>>> import copy, saebridge as sb
>>> from saebridge.tiny import tiny_gpt2
>>> hf_model, tokenizer = tiny_gpt2()
>>> hf = sb.wrap(hf_model, tokenizer=tokenizer)
>>> other = sb.wrap(copy.deepcopy(hf_model), tokenizer=tokenizer)  # e.g. a TL model instead
>>> sae = sb.SAE.random("topk", 64, 256, "blocks.1.hook_resid_pre", k=8)
>>> report = sb.validate({"hf": hf, "other": other}, "Hello world", saes=[sae])
>>> report.ok, [row.run for row in report.rows]
(True, ['clean', 'splice', 'splice+error', 'steer', 'ablate'])
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from saebridge.hookmap.space import ActivationSpace
from saebridge.interventions import Ablate, Steer
from saebridge.model import Model
from saebridge.sae import SAE
from saebridge.tolerance import logprob_atol

Tensor = torch.Tensor
RUNS = ("clean", "splice", "splice+error", "steer", "ablate")


@dataclass
class Row:
    """One comparison: a run on ``backend`` against the same run on ``reference``."""

    run: str
    """``clean``, ``splice``, ``splice+error``, ``steer`` or ``ablate``."""
    sae: str
    """The SAE's hook name (empty for the clean run)."""
    reference: str
    backend: str
    max_dlogprob: float
    """Max over positions and vocab of |Δ log-softmax|."""
    kl: float
    """Mean over positions of KL(reference ‖ backend)."""
    same_active: bool | None
    """Whether the SAE latents have the same active set (None when no SAE is involved)."""
    max_dlatent: float | None
    tolerance: float
    passed: bool


@dataclass
class Report:
    """All rows of a validation, with the tolerance used."""

    rows: list[Row] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.passed for r in self.rows)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "rows": [asdict(r) for r in self.rows]}

    def table(self) -> str:
        head = (f"{'run':<13}{'sae':<28}{'backend pair':<34}{'max|Δlogp|':>11}{'KL':>10}"
                f"{'latents':>18}  result")
        lines = [head, "-" * len(head)]
        for r in self.rows:
            lat = "-" if r.same_active is None else (
                f"{'same' if r.same_active else 'DIFF'} {r.max_dlatent:.1e}")
            lines.append(f"{r.run:<13}{r.sae:<28}{r.reference + ' vs ' + r.backend:<34}"
                         f"{r.max_dlogprob:>11.2e}{r.kl:>10.1e}{lat:>18}  "
                         f"{'PASS' if r.passed else 'FAIL'}")
        n_fail = sum(not r.passed for r in self.rows)
        lines.append(f"{len(self.rows) - n_fail} passed, {n_fail} failed")
        return "\n".join(lines)


def _relabel(sae: SAE, space: ActivationSpace) -> SAE:
    """A copy of ``sae`` that claims to be trained in ``space`` (switches conversion off)."""
    clone = copy.deepcopy(sae)
    clone.cfg.model_from_pretrained_kwargs = space.to_dict()
    return clone


def _steer_feature(sae: SAE) -> int:
    return int(sae.W_dec.norm(dim=-1).argmax())


def _work(model: Model, tokens: Tensor, run: str, sae: SAE | None
          ) -> tuple[Tensor, Tensor | None]:
    """Logits and (for SAE runs) the latents of one run."""
    if sae is None:
        return model(tokens), None
    key = f"{sae.cfg.hook_name}.hook_sae_acts_post"
    if run in ("splice", "splice+error"):
        logits, cache = model.run_with_cache_with_saes(
            tokens, [sae], names=[], use_error_term=run == "splice+error")
        return logits, cache[key]
    _, cache = model.run_with_cache_with_saes(tokens, [sae], names=[], use_error_term=True)
    acts = cache[key]
    if run == "steer":
        op: Any = Steer.from_sae(sae, _steer_feature(sae), coef=4.0)
    else:
        active = acts.flatten(0, -2).gt(0).sum(0).topk(min(3, acts.shape[-1])).indices
        op = Ablate(sae, active.tolist())
    return model.run_with_interventions(tokens, [op]), acts


def _compare(run: str, sae: SAE | None, ref: str, name: str,
             a: tuple[Tensor, Tensor | None], b: tuple[Tensor, Tensor | None],
             tol: float) -> Row:
    # float64 for the comparison itself, so the figures show the backends' differences only.
    lp_a = a[0].double().log_softmax(-1)
    lp_b = b[0].double().log_softmax(-1).to(a[0].device)
    dlogp = (lp_a - lp_b).abs().max().item()
    kl = (lp_a.exp() * (lp_a - lp_b)).sum(-1).mean().item()
    same = dlat = None
    passed = dlogp <= tol
    if a[1] is not None and b[1] is not None:
        la, lb = a[1].float(), b[1].float().to(a[1].device)
        same = bool(torch.equal(la > 0, lb > 0))
        dlat = (la - lb).abs().max().item()
        passed = passed and dlat <= tol * max(1.0, la.abs().max().item())
    return Row(run, sae.cfg.hook_name if sae is not None else "", ref, name, dlogp, kl,
               same, dlat, tol, passed)


def validate(models: Mapping[str, Model] | Sequence[Model], tokens: Tensor | str,
             saes: Sequence[SAE] = (), *, runs: Iterable[str] = RUNS,
             convert_spaces: bool = True,
             progress: Callable[[str], None] | None = None) -> Report:
    """Compare every model with the first on clean, splice, steer and ablate runs.

    Args:
        models: wrapped models over the same weights, named (a mapping) or not.
        tokens: token ids ``[batch, pos]`` or text (tokenised by the first model).
        saes: SAEs to splice, steer with and ablate; one set of SAE rows each.
        runs: which of :data:`RUNS` to do.
        convert_spaces: ``False`` relabels each SAE as trained in each model's own space,
            i.e. switches the activation-space conversion off (to see what it fixes).
        progress: called with a short label before each run.

    >>> import saebridge as sb
    >>> from saebridge.tiny import tiny_gpt2
    >>> hf_model, tokenizer = tiny_gpt2()
    >>> hf = sb.wrap(hf_model, tokenizer=tokenizer)
    >>> sae = sb.SAE.random("standard", 64, 128, "blocks.0.hook_mlp_out")
    >>> report = validate([hf, hf], "Hello world", saes=[sae], runs=["clean", "splice"])
    >>> [(row.run, row.backend, row.passed) for row in report.rows]
    [('clean', 'hf#1', True), ('splice', 'hf#1', True)]
    """
    named = dict(models) if isinstance(models, Mapping) else {
        f"{m.backend}#{i}": m for i, m in enumerate(models)}
    first_name, first = next(iter(named.items()))
    if isinstance(tokens, str):
        tokens = first.to_tokens(tokens)
    report = Report()
    for run in runs:
        for sae in ([None] if run == "clean" else list(saes)):
            results = {}
            for name, model in named.items():
                if progress is not None:
                    progress(f"{run} {sae.cfg.hook_name if sae else ''} on {name}")
                used = sae if sae is None or convert_spaces else _relabel(sae, model.space)
                results[name] = _work(model, tokens, run, used)
            tol = logprob_atol(results[first_name][0].dtype)
            for name in list(named)[1:]:
                report.rows.append(_compare(run, sae, first_name, name, results[first_name],
                                            results[name], tol))
    return report


def dumps(report: Report) -> str:
    """The report as JSON text (the schema of ``saebridge validate --json``)."""
    return json.dumps(report.to_json(), indent=2)

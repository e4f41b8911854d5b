"""Cross-backend equivalence: run the same work on several backends and compare.

:func:`validate` takes wrapped models (any backends over the same weights), tokens and
SAEs, runs clean / splice (error term off and on) / steer / ablate on each, and compares
every backend with the first: max |Δ log-prob|, mean KL, and latent agreement (same
active set, its overlap, max |Δ latent|), PASS/FAIL against the named tolerance of the
dtype. In bf16/fp16 a fixed bound is the wrong test (rounding grows with depth and logit
spread): given the same backends in fp32 (``references=``), each row also measures the
precision's own error, and passes on :func:`saebridge.tolerance.low_precision_tolerance`.

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
from saebridge.tolerance import (
    ACTIVE_AGREEMENT,
    is_low_precision,
    logprob_atol,
    low_precision_tolerance,
)

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
    """The bound ``max_dlogprob`` was held to."""
    passed: bool
    active_agreement: float | None = None
    """Overlap (intersection over union) of the latents' active sets (None without an SAE)."""
    precision_error: float | None = None
    """Low precision only: max |Δ log-prob| of the reference backend's run against its own
    fp32 run, the precision's own error that sets :attr:`tolerance`."""
    backend_error: float | None = None
    """Low precision only: this backend's run against its own fp32 run."""
    error_vs_reference_fp32: float | None = None
    """Low precision only: this backend's run against the reference backend's fp32 run."""


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
        """One line per row; low-precision rows add the precision's own error (ε, the
        reference's run against its fp32 run), the bound and the latents' overlap."""
        low = any(r.precision_error is not None for r in self.rows)
        extra = f"{'ε':>10}{'bound':>10}{'overlap':>9}" if low else ""
        head = (f"{'run':<13}{'sae':<28}{'backend pair':<34}{'max|Δlogp|':>11}{'KL':>10}"
                f"{extra}{'latents':>18}  result")
        lines = [head, "-" * len(head)]
        for r in self.rows:
            lat = "-" if r.same_active is None else (
                f"{'same' if r.same_active else 'DIFF'} {r.max_dlatent:.1e}")
            more = "" if not low else (
                f"{r.precision_error or 0.0:>10.2e}{r.tolerance:>10.2e}"
                + (f"{r.active_agreement:>9.3f}" if r.active_agreement is not None
                   else f"{'-':>9}"))
            lines.append(f"{r.run:<13}{r.sae:<28}{r.reference + ' vs ' + r.backend:<34}"
                         f"{r.max_dlogprob:>11.2e}{r.kl:>10.1e}{more}{lat:>18}  "
                         f"{'PASS' if r.passed else 'FAIL'}")
        n_fail = sum(not r.passed for r in self.rows)
        lines.append(f"{len(self.rows) - n_fail} passed, {n_fail} failed")
        return "\n".join(lines)


def _relabel(sae: SAE, space: ActivationSpace) -> SAE:
    """A copy of ``sae`` that claims to be trained in ``space`` (switches conversion off)."""
    clone = copy.deepcopy(sae)
    clone.cfg.model_from_pretrained_kwargs = space.to_dict()
    return clone


@dataclass(frozen=True)
class Choice:
    """Which latents the steer and ablate runs use: chosen once, so every backend (and
    every precision) does the same work."""

    steer: int = 0
    ablate: tuple[int, ...] = ()


def _choose(model: Model, tokens: Tensor, sae: SAE, runs: Iterable[str]) -> Choice:
    """The steering latent (the decoder row of largest norm) and the three latents most
    often active on ``model`` (ablated)."""
    steer = int(sae.W_dec.detach().float().norm(dim=-1).argmax())
    if "ablate" not in runs:
        return Choice(steer)
    _, cache = model.run_with_cache_with_saes(tokens, [sae], names=[], use_error_term=True)
    acts = cache[f"{sae.cfg.hook_name}.hook_sae_acts_post"]
    active = acts.flatten(0, -2).gt(0).sum(0).topk(min(3, acts.shape[-1])).indices
    return Choice(steer, tuple(active.tolist()))


def _work(model: Model, tokens: Tensor, run: str, sae: SAE | None, choice: Choice
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
    op: Any = Steer.from_sae(sae, choice.steer, coef=4.0) if run == "steer" \
        else Ablate(sae, list(choice.ablate))
    return model.run_with_interventions(tokens, [op]), cache[key]


Result = tuple[Tensor, Tensor | None]


def _gap(a: Tensor, b: Tensor) -> float:
    """Max |Δ log-softmax| (in float64, so the figure shows the runs' difference only)."""
    return (a.double().log_softmax(-1) - b.double().log_softmax(-1).to(a.device)
            ).abs().max().item()


def agreement(a: Tensor, b: Tensor) -> float:
    """Intersection over union of two latent tensors' active sets (1.0 when both are empty).

    >>> agreement(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([3.0, 1.0, 0.0]))
    0.3333333333333333
    """
    on_a, on_b = a.float() > 0, b.float().to(a.device) > 0
    union = int((on_a | on_b).sum())
    return 1.0 if union == 0 else int((on_a & on_b).sum()) / union


def _compare(run: str, sae: SAE | None, ref: str, name: str, a: Result, b: Result,
             exact: tuple[Result, Result] | None = None) -> Row:
    """``b`` (backend ``name``) against ``a`` (the reference); with ``exact``, the fp32 runs
    of both, for the low-precision criterion."""
    lp_a = a[0].double().log_softmax(-1)
    lp_b = b[0].double().log_softmax(-1).to(a[0].device)
    dlogp = (lp_a - lp_b).abs().max().item()
    kl = (lp_a.exp() * (lp_a - lp_b)).sum(-1).mean().item()
    low = exact is not None and is_low_precision(a[0].dtype)
    errors: tuple[float | None, ...] = (None, None, None)
    tol = logprob_atol(a[0].dtype)
    if low and exact is not None:
        errors = (_gap(a[0], exact[0][0]), _gap(b[0], exact[1][0]), _gap(b[0], exact[0][0]))
        tol = low_precision_tolerance(a[0].dtype, errors[0] or 0.0)
    same = dlat = overlap = None
    passed = dlogp <= tol
    if a[1] is not None and b[1] is not None:
        la, lb = a[1].float(), b[1].float().to(a[1].device)
        same, overlap = bool(torch.equal(la > 0, lb > 0)), agreement(la, lb)
        dlat = (la - lb).abs().max().item()
        passed = passed and (overlap >= ACTIVE_AGREEMENT[a[0].dtype] if low
                             else dlat <= tol * max(1.0, la.abs().max().item()))
    return Row(run, sae.cfg.hook_name if sae is not None else "", ref, name, dlogp, kl,
               same, dlat, tol, passed, overlap, *errors)


def _named(models: Mapping[str, Model] | Sequence[Model]) -> dict[str, Model]:
    return dict(models) if isinstance(models, Mapping) else {
        f"{m.backend}#{i}": m for i, m in enumerate(models)}


def validate(models: Mapping[str, Model] | Sequence[Model], tokens: Tensor | str,
             saes: Sequence[SAE] = (), *, runs: Iterable[str] = RUNS,
             convert_spaces: bool = True,
             progress: Callable[[str], None] | None = None,
             references: Mapping[str, Model] | Sequence[Model] | None = None,
             reference_saes: Sequence[SAE] | None = None) -> Report:
    """Compare every model with the first on clean, splice, steer and ablate runs.

    Args:
        models: wrapped models over the same weights, named (a mapping) or not.
        tokens: token ids ``[batch, pos]`` or text (tokenised by the first model).
        saes: SAEs to splice, steer with and ablate; one set of SAE rows each.
        runs: which of :data:`RUNS` to do.
        convert_spaces: ``False`` relabels each SAE as trained in each model's own space,
            i.e. switches the activation-space conversion off (to see what it fixes).
        progress: called with a short label before each run.
        references: for ``models`` in bf16/fp16, the same backends in fp32 (same order),
            and ``reference_saes`` the SAEs in fp32: every run is repeated on them and the
            low-precision criterion applies (:func:`saebridge.tolerance.low_precision_tolerance`;
            the latents' active sets must overlap by ``ACTIVE_AGREEMENT``).

    >>> import saebridge as sb
    >>> from saebridge.tiny import tiny_gpt2
    >>> hf_model, tokenizer = tiny_gpt2()
    >>> hf = sb.wrap(hf_model, tokenizer=tokenizer)
    >>> sae = sb.SAE.random("standard", 64, 128, "blocks.0.hook_mlp_out")
    >>> report = validate([hf, hf], "Hello world", saes=[sae], runs=["clean", "splice"])
    >>> [(row.run, row.backend, row.passed) for row in report.rows]
    [('clean', 'hf#1', True), ('splice', 'hf#1', True)]
    """
    named, runs = _named(models), list(runs)
    exact = dict(zip(named, _named(references).values(), strict=True)) if references else {}
    first_name, first = next(iter(named.items()))
    if isinstance(tokens, str):
        tokens = first.to_tokens(tokens)
    report = Report()
    for run in runs:
        for i, sae in enumerate([None] if run == "clean" else list(saes)):
            sae32 = reference_saes[i] if sae is not None and reference_saes else sae
            choice = Choice() if sae32 is None else _choose(
                exact.get(first_name, first), tokens, sae32, runs)
            results, exacts = {}, {}
            for name, model in named.items():
                if progress is not None:
                    progress(f"{run} {sae.cfg.hook_name if sae else ''} on {name}")
                results[name] = _work(model, tokens, run, _used(sae, model, convert_spaces),
                                      choice)
                if name in exact:
                    exacts[name] = _work(exact[name], tokens, run,
                                         _used(sae32, exact[name], convert_spaces), choice)
            for name in list(named)[1:]:
                pair = (exacts[first_name], exacts[name]) if exacts else None
                report.rows.append(_compare(run, sae, first_name, name, results[first_name],
                                            results[name], pair))
    return report


def _used(sae: SAE | None, model: Model, convert_spaces: bool) -> SAE | None:
    return sae if sae is None or convert_spaces else _relabel(sae, model.space)


def dumps(report: Report) -> str:
    """The report as JSON text (the schema of ``saebridge validate --json``)."""
    return json.dumps(report.to_json(), indent=2)

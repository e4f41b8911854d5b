"""The reference a run is checked against: what SAELens computes on a TransformerLens model
loaded in the SAEs' activation space, with the same edits.

:func:`reference` runs a composition (SAE splices, steers, latent ablations and clamps) on
a ``HookedSAETransformer`` when SAELens is importable (its SAEs loaded from the folders
saebridge writes, edits as SAELens users write them: hooks at ``{hook}.hook_sae_acts_post``
with ``use_error_term=True``, steering hooks at the site), and otherwise on a plain
``HookedTransformer`` with hand-written hooks that splice the SAE as SAELens's
``_SAEWrapper`` does (TransformerLens 4.x CI, where SAELens does not install).

Imported as ``tests.oracle``.
"""

from __future__ import annotations

import importlib.util
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

import saebridge as sb

HAS_SAELENS = importlib.util.find_spec("sae_lens") is not None


@dataclass(frozen=True)
class Edit:
    """A latent edit of an SAE, as SAELens users write it: ``features`` set to ``value``
    (None: zero) at ``positions`` (None: all) in ``{hook}.hook_sae_acts_post``."""

    features: tuple[int, ...]
    value: float | None = None
    positions: tuple[int, ...] | None = None

    def apply(self, acts: torch.Tensor) -> torch.Tensor:
        acts = acts.clone()
        pos = slice(None) if self.positions is None else list(self.positions)
        sub = acts[:, pos]
        sub[..., list(self.features)] = 0.0 if self.value is None else self.value
        acts[:, pos] = sub
        return acts


@dataclass
class Composition:
    """SAEs (each with an optional latent :class:`Edit`) and steers ``(hook, vector, coef,
    positions)``, in one run."""

    saes: list[sb.SAE] = field(default_factory=list)
    edits: dict[int, Edit] = field(default_factory=dict)
    """Index into :attr:`saes` → the edit of that SAE's latents (then ``use_error_term``)."""
    steers: list[tuple[str, torch.Tensor, float, tuple[int, ...] | None]] = field(
        default_factory=list)

    def interventions(self) -> list:
        """The same composition as saebridge interventions."""
        ops: list = []
        for i, sae in enumerate(self.saes):
            edit = self.edits.get(i)
            if edit is None:
                ops.append(sb.Splice(sae))
            elif edit.value is None:
                ops.append(sb.Ablate(sae, list(edit.features), positions=_pos(edit.positions)))
            else:
                ops.append(sb.Clamp(sae, list(edit.features), positions=_pos(edit.positions),
                                    value=edit.value))
        for hook, vector, coef, positions in self.steers:
            ops.append(sb.Steer(hook, vector, coef, positions=_pos(positions)))
        return ops


def _pos(positions: tuple[int, ...] | None) -> list[int] | None:
    return None if positions is None else list(positions)


def tl_model(hf_model, tokenizer, space: str):
    """A HookedTransformer (a ``HookedSAETransformer`` when SAELens is installed) loaded
    from ``hf_model`` as SAELens's ``load_model`` loads one for an SAE of ``space``."""
    from saebridge.adapters.transformer_lens import from_hf
    from saebridge.hookmap.space import ActivationSpace

    tl = from_hf(hf_model, tokenizer=tokenizer, **ActivationSpace.parse(space).to_dict())
    if not HAS_SAELENS:
        return tl
    from sae_lens import HookedSAETransformer

    hst = HookedSAETransformer(tl.cfg)
    hst.load_state_dict(tl.state_dict(), strict=False)
    hst.tokenizer = tl.tokenizer
    return hst.eval()


_LOADED: dict[int, tuple[sb.SAE, object]] = {}
_TMP = Path(tempfile.mkdtemp(prefix="saebridge-oracle-"))


def saelens_sae(sae: sb.SAE):
    """``sae`` as SAELens loads it from the folder saebridge writes (once per SAE)."""
    held = _LOADED.get(id(sae))
    if held is None or held[0] is not sae:  # an id is reused once its SAE is freed
        from sae_lens import SAE as SAELensSAE

        folder = _TMP / f"sae{len(_LOADED)}"
        sae.save(folder)
        loaded = SAELensSAE.load_from_disk(str(folder))
        if sae.cfg.hook_name.endswith("hook_z"):
            loaded.turn_on_forward_pass_hook_z_reshaping()
        _LOADED[id(sae)] = held = (sae, loaded)
    return held[1]


def _steer_hook(vector: torch.Tensor, coef: float, positions: tuple[int, ...] | None):
    def hook(x, hook):
        x = x.clone()
        pos = slice(None) if positions is None else list(positions)
        x[:, pos] = x[:, pos] + coef * vector.to(x)
        return x
    return hook


def _edit_hook(edit: Edit):
    return lambda acts, hook: edit.apply(acts)


def reference(model, comp: Composition, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of ``comp`` on ``model`` (from :func:`tl_model`)."""
    return _run(model, comp, tokens, [(h, _steer_hook(v, c, p)) for h, v, c, p in comp.steers])


def _run(model, comp: Composition, tokens: torch.Tensor, extra_hooks: list) -> torch.Tensor:
    """``comp`` plus ``extra_hooks`` on ``model``: through SAELens when installed."""
    with torch.no_grad():
        if HAS_SAELENS:
            return _saelens(model, comp, tokens, extra_hooks)
        return _by_hand(model, comp, tokens, extra_hooks)


def _saelens(model, comp: Composition, tokens, steer_hooks) -> torch.Tensor:
    model.reset_saes()
    try:
        for i, sae in enumerate(comp.saes):
            model.add_sae(saelens_sae(sae), use_error_term=i in comp.edits)
        hooks = steer_hooks + [(f"{comp.saes[i].cfg.hook_name}.hook_sae_acts_post",
                                _edit_hook(e)) for i, e in comp.edits.items()]
        return model.run_with_hooks(tokens, fwd_hooks=hooks)
    finally:
        model.reset_saes()


def _by_hand(model, comp: Composition, tokens, steer_hooks) -> torch.Tensor:
    """SAELens's ``_SAEWrapper`` written out: encode, edit, decode, plus (with an edit) the
    error of the unedited reconstruction."""
    def splice(sae: sb.SAE, edit: Edit | None):
        def hook(x, hook):
            flat = x.flatten(-2) if sae.cfg.hook_name.endswith("hook_z") else x
            acts = sae.encode(flat)
            out = sae.decode(acts if edit is None else edit.apply(acts))
            if edit is not None:
                out = out + (flat - sae.decode(sae.encode(flat)))
            return out.reshape(x.shape)
        return hook

    hooks = [(s.cfg.hook_name, splice(s, comp.edits.get(i))) for i, s in enumerate(comp.saes)]
    return model.run_with_hooks(tokens, fwd_hooks=hooks + steer_hooks)


def reference_cache(model, saes: list[sb.SAE], name: str, tokens: torch.Tensor
                    ) -> torch.Tensor:
    """The activation at hook ``name`` with ``saes`` spliced in, on ``model``."""
    comp, seen = Composition(saes=list(saes)), {}

    def keep(x, hook):
        seen["x"] = x.detach().clone()
        return x

    _run(model, comp, tokens, [(name, keep)])
    return seen["x"]


def logprob_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.log_softmax(-1) - b.log_softmax(-1)).abs().max().item()


def run_all(models: Sequence[sb.Model], comp: Composition, tokens: torch.Tensor
            ) -> list[torch.Tensor]:
    ops = comp.interventions()
    return [m.run_with_interventions(tokens, ops) for m in models]

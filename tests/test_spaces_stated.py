"""Stating an SAE's activation space: ``SAE.load(..., activation_space=)``, ``saebridge
inspect/validate --sae-space``, and ``inspect`` saying where the space came from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import saebridge as sb
from saebridge.cli import main
from saebridge.errors import SAEConfigError

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture
def written_as_unprocessed(tmp_path: Path) -> Path:
    """An SAE trained on processed activations, saved with ``{}`` (as hand-written SAEs and
    older tools do), which SAELens reads as unprocessed."""
    sae = sb.SAE.random("standard", 64, 32, HOOK, seed=4, activation_space="tl-processed")
    sae.save(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg["metadata"]["model_from_pretrained_kwargs"] = {}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    return tmp_path


def test_load_with_a_stated_space(written_as_unprocessed, models):
    as_written = sb.SAE.load(written_as_unprocessed)
    assert as_written.cfg.activation_space.name == "hf"
    stated = sb.SAE.load(written_as_unprocessed, activation_space="tl-processed")
    assert stated.cfg.activation_space.name == "tl-processed"
    assert torch.equal(stated.W_enc, as_written.W_enc)
    flags = sb.SAE.load(written_as_unprocessed, activation_space={
        "fold_ln": True, "center_writing_weights": True, "center_unembed": True,
        "fold_value_biases": True})
    assert flags.cfg.activation_space == stated.cfg.activation_space
    # On a processed TransformerLens model the stated SAE runs on the model's own stream:
    # the same as an SAE made in that space.
    tl = models("tl-processed")
    tokens = tl.to_tokens("stated spaces")
    made = sb.SAE.random("standard", 64, 32, HOOK, seed=4, activation_space="tl-processed")
    assert torch.equal(tl.run_with_saes(tokens, [stated]), tl.run_with_saes(tokens, [made]))
    assert not torch.equal(tl.run_with_saes(tokens, [as_written]),
                           tl.run_with_saes(tokens, [made]))


@pytest.mark.parametrize("bad, match", [("processed", "tl-processed"),
                                        ({"fold_ln": "yes"}, "must be a bool"),
                                        (3, "space name")])
def test_a_bad_space_fails_at_load_with_the_valid_names(written_as_unprocessed, bad, match):
    with pytest.raises(SAEConfigError, match=match):
        sb.SAE.load(written_as_unprocessed, activation_space=bad)


def test_inspect_says_where_the_space_came_from(written_as_unprocessed, tmp_path, capsys):
    assert "model_from_pretrained_kwargs={}" in sb.inspect(written_as_unprocessed).space_source
    stated = sb.inspect(written_as_unprocessed, activation_space="tl-processed")
    assert stated.space.name == "tl-processed" and "stated" in stated.space_source
    absent = tmp_path / "absent"
    sb.SAE.random("standard", 4, 8, HOOK).save(absent)  # no space: the key is left out
    assert "absent" in sb.inspect(absent).space_source
    assert main(["inspect", str(written_as_unprocessed), "--config-only",
                 "--sae-space", "tl-processed"]) == 0
    out = capsys.readouterr().out
    assert "tl-processed" in out and "stated by the user" in out

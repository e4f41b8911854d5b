"""``saebridge validate --model DIR`` on a saved folder of every architecture the hook maps
know, in fp32 (one absolute bound) and bf16 (relative to each backend's own fp32 run):
built-in SAEs sized from the model, every backend that can run it, the others left out
with the reason; ``--sae`` SAEs that do not fit are refused before anything runs."""

from __future__ import annotations

import json

import pytest
import torch

import saebridge as sb
from saebridge.cli import main
from saebridge.tolerance import ACTIVE_AGREEMENT, PRECISION_MULTIPLE
from tests.conftest import FAMILIES, family_dir


def validate(tmp_path, *args: str) -> tuple[int, dict]:
    out = tmp_path / "report.json"
    code = main(["validate", "--quiet", "--tokens", "16", "--json", str(out), *args])
    return code, json.loads(out.read_text()) if out.exists() else {}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_architecture_validates(family, dtype, tmp_path, tmp_path_factory, capsys):
    path = family_dir(tmp_path_factory, family)
    code, report = validate(tmp_path, "--model", str(path), "--dtype", dtype)
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert report["ok"] and "FAIL" not in printed
    backends = {row["backend"] for row in report["rows"]}
    assert backends == {"tl-processed", "tl-unprocessed", "bridge", "bridge-compat",
                        "nnsight-hf", "nnsight-tl"}
    sites = {row["sae"] for row in report["rows"] if row["sae"]}
    assert sites == {"blocks.0.hook_resid_post", "blocks.1.hook_attn_out",
                     "blocks.1.attn.hook_z"}
    rows = report["rows"]
    if dtype == "float32":
        assert all(row["tolerance"] == 1e-4 and row["precision_error"] is None for row in rows)
        return
    multiple = PRECISION_MULTIPLE[torch.bfloat16]
    assert "criterion (bfloat16)" in printed
    for row in rows:
        # The bound is the stated multiple of the measured precision error (floored at fp32's).
        assert row["tolerance"] == pytest.approx(max(multiple * row["precision_error"], 1e-4))
        assert row["precision_error"] > 0  # bf16 really rounded
        if row["sae"]:
            assert row["active_agreement"] >= ACTIVE_AGREEMENT[torch.bfloat16]


def test_a_backend_that_cannot_run_is_left_out_with_the_reason(tmp_path, tiny_dir,
                                                               monkeypatch, capsys):
    """TransformerLens 4.x has no HookedTransformer: its three backends are left out."""
    import saebridge.adapters.transformer_lens as tla

    monkeypatch.setattr(tla, "HookedTransformer", None)
    code, report = validate(tmp_path, "--model", str(tiny_dir))
    printed = capsys.readouterr().out
    assert code == 0
    for name in ("tl-processed", "tl-unprocessed", "nnsight-tl"):
        assert f"left out: {name}: TransformerLens" in printed
        assert "no HookedTransformer" in printed
    assert {row["backend"] for row in report["rows"]} == {"bridge", "bridge-compat",
                                                          "nnsight-hf"}


def test_an_sae_of_the_wrong_width_is_refused(tmp_path, tiny_dir, capsys):
    sb.SAE.random("topk", 96, 128, "blocks.1.hook_resid_pre", k=4).save(tmp_path / "wide")
    code, _ = validate(tmp_path, "--model", str(tiny_dir), "--sae", str(tmp_path / "wide"))
    err = capsys.readouterr().err
    assert code == 2
    assert "d_in=96" in err and "'blocks.1.hook_resid_pre'" in err and "width 64" in err


def test_an_sae_at_a_hook_the_model_lacks_is_refused(tmp_path, tmp_path_factory, capsys):
    """GPT-NeoX has rotary positions: no hook_pos_embed."""
    sb.SAE.random("standard", 64, 128, "hook_pos_embed").save(tmp_path / "pos")
    path = family_dir(tmp_path_factory, "neox")
    code, _ = validate(tmp_path, "--model", str(path), "--sae", str(tmp_path / "pos"))
    assert code == 2
    assert "hook_pos_embed" in capsys.readouterr().err


def test_a_head_sae_fits_its_per_head_width(tmp_path, tiny_dir, capsys):
    sb.SAE.random("standard", 16, 32, "blocks.1.attn.hook_z", hook_head_index=2
                  ).save(tmp_path / "head")
    code, report = validate(tmp_path, "--model", str(tiny_dir), "--sae", str(tmp_path / "head"),
                            "--backends", "hf,tl-processed")
    assert code == 0, capsys.readouterr().out
    assert {row["sae"] for row in report["rows"]} == {"", "blocks.1.attn.hook_z"}

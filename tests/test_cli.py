"""The command line, driven as a user drives it: a subprocess, exit codes, output, JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import saebridge as sb

ROW_KEYS = {"run", "sae", "reference", "backend", "max_dlogprob", "kl", "same_active",
            "max_dlatent", "tolerance", "passed", "active_agreement", "precision_error",
            "backend_error", "error_vs_reference_fp32"}


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "saebridge", *args], capture_output=True,
                          text=True, env=env, timeout=300)


def test_validate_default_passes_and_writes_json(tmp_path):
    out = tmp_path / "report.json"
    res = cli("validate", "--json", str(out), "--tokens", "12")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "PASS" in res.stdout and "FAIL" not in res.stdout
    report = json.loads(out.read_text())
    assert report["ok"] is True
    assert all(set(row) == ROW_KEYS for row in report["rows"])
    runs = {row["run"] for row in report["rows"]}
    assert runs == {"clean", "splice", "splice+error", "steer", "ablate"}
    pairs = {(row["reference"], row["backend"]) for row in report["rows"]}
    assert ("hf", "tl-processed") in pairs and ("hf", "tl-unprocessed") in pairs
    assert "[1/" in res.stderr  # plain progress lines when stderr is not a terminal


def test_wrong_pairing_without_space_conversion_fails(tmp_path, tiny_dir):
    """An SAE trained on processed TL, spliced into HF with the conversion off: FAIL."""
    sae = sb.SAE.random("standard", 64, 128, "blocks.1.hook_resid_pre", seed=4,
                        activation_space="tl-processed")
    sae.save(tmp_path / "sae")
    args = ("validate", "--model", str(tiny_dir), "--sae", str(tmp_path / "sae"),
            "--backends", "hf,tl-processed", "--quiet", "--json", str(tmp_path / "r.json"))
    good = cli(*args)
    assert good.returncode == 0, good.stdout + good.stderr
    bad = cli(*args, "--no-space-conversion")
    assert bad.returncode == 1
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    splice = [r for r in rows if r["run"] == "splice"]
    assert splice and not splice[0]["passed"] and splice[0]["max_dlogprob"] > 1e-3
    assert next(r for r in rows if r["run"] == "clean")["passed"]


def test_inspect_convert_and_hooks(tmp_path, tiny_dir):
    sae = sb.SAE.random("topk", 64, 96, "blocks.0.attn.hook_z", k=5, seed=1,
                        activation_space="hf")
    sae.save(tmp_path / "sae")
    res = cli("inspect", str(tmp_path / "sae"), "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["format"] == "saelens" and info["architecture"] == "topk"
    assert info["hook_name"] == "blocks.0.attn.hook_z" and info["activation_space"] == "hf"
    assert info["d_sae"] == 96 and info["decoder_norm"]["max"] > 0
    res = cli("convert", str(tmp_path / "sae"), "--to", "saelens", str(tmp_path / "copy"))
    assert res.returncode == 0, res.stderr
    copy = sb.SAE.load(tmp_path / "copy")
    assert all(p.equal(q) for p, q in zip(copy.parameters(), sae.parameters(), strict=True))
    res = cli("hooks", str(tiny_dir))
    assert res.returncode == 0, res.stderr
    assert "blocks.1.hook_resid_mid" in res.stdout and "transformer.h.1.attn.c_proj" in res.stdout
    z_row = next(ln for ln in res.stdout.splitlines() if ln.startswith("blocks.1.attn.hook_z"))
    assert "blocks.1.attn.o.hook_in" in z_row  # where the TransformerBridge keeps hook_z


@pytest.mark.parametrize("args, message", [
    (("inspect", "/no/such/sae"), "no file or folder"),
    (("validate", "--backends", "hf,tl-procesed", "--quiet"), "tl-processed"),
])
def test_errors_are_reported_not_raised(args, message):
    res = cli(*args)
    assert res.returncode == 2
    assert message in res.stderr and "Traceback" not in res.stderr

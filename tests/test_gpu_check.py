"""The GPU check's summary: read from the results a run wrote, and the README's GPU
section replaced by it (never edited by hand)."""
import json
from pathlib import Path

import pytest

from benchmarks.gpu_summary import END, START, summary, update_readme

ROOT = Path(__file__).resolve().parents[1]


def _run_folder(tmp_path):
    (tmp_path / "gpu_check.json").write_text(json.dumps(
        {"device": "NVIDIA H200", "torch": "2.11.0", "cuda": "13.0", "commit": "abcdef1234567", "dry_run": False}))
    (tmp_path / "stages.txt").write_text("build: 120 s\ntests: 60 s, FAILED (exit 1)\n")
    (tmp_path / "logit_family_cuda.json").write_text(json.dumps({"rows": [
        {"loss": "dkd_loss", "shape": "128x100", "ratio": 1.33}, {"loss": "dkd_loss", "shape": "4096x1000", "ratio": 7.25}]}))
    (tmp_path / "bandwidth_cuda.json").write_text(json.dumps({"shape": "8192x32000", "peak_tbps": 4.8, "rows": [
        {"op": "kd_loss", "floor_fraction": 0.5, "design_fraction": 0.834}]}))
    (tmp_path / "peers_cuda.json").write_text(json.dumps({"rows": [
        {"case": "KL divergence", "peer": "Liger", "peer_ms": 3.0, "ours_ms": 2.0},
        {"case": "SSIM", "peer": "fused-ssim", "peer_ms": None, "ours_ms": 1.0}]}))
    return tmp_path


def test_the_summary_says_what_the_run_found(tmp_path):
    text = summary(_run_folder(tmp_path))
    assert "abcdef1234 on NVIDIA H200" in text and "tests: 60 s, FAILED (exit 1)" in text
    assert "dkd_loss 7.25×" in text and "1.33×" not in text  # the largest shape only
    assert "kd_loss 50% / 83%" in text
    assert "Liger takes 1.50× ours" in text and "fused-ssim absent" in text


def test_the_readme_block_is_replaced_and_nothing_else(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{START}\nold run\n{END}\nafter\n")
    update_readme(readme, "new run\n")
    assert readme.read_text() == f"before\n{START}\nnew run\n{END}\nafter\n"
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="no <!-- gpu-results:start -->"):
        update_readme(readme, "x\n")


def test_the_projects_readme_has_the_gpu_block():
    text = (ROOT / "README.md").read_text()
    assert text.count(START) == 1 and text.count(END) == 1 and text.index(START) < text.index(END)

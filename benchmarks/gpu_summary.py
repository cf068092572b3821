"""The short summary of a ``.ci/gpu`` run, from the results it wrote: the machine, the
stages and their seconds, the logit family against its authors' compositions, the memory
floor and the peers. Writes ``OUT/gpu_summary.md``; with ``--readme README.md`` it also
replaces the README's GPU results (between its ``gpu-results`` markers), so that section
is always the last GPU run's, never edited by hand.

    python -m benchmarks.gpu_summary OUT [--readme README.md]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import re

START, END = "<!-- gpu-results:start -->", "<!-- gpu-results:end -->"


def _load(path: pathlib.Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def summary(out: pathlib.Path) -> str:
    facts = _load(out / "gpu_check.json") or {}
    device = "cpu" if facts.get("dry_run") or facts.get("device", "").startswith("CPU") else "cuda"
    lines = [f"GPU check of commit {facts.get('commit', '?')[:10]} on {facts.get('device', '?')} (torch "
             f"{facts.get('torch', '?')}, CUDA {facts.get('cuda', '?')})"
             + (": a dry run on the CPU emulator, no GPU numbers." if facts.get("dry_run") else "."), ""]
    stages = (out / "stages.txt").read_text().split("\n") if (out / "stages.txt").exists() else []
    if stages:
        lines += ["Stages: " + "; ".join(s for s in stages if s) + ".", ""]
    family = _load(out / f"logit_family_{device}.json")
    if family:
        rows = family["rows"]
        largest = max(rows, key=lambda r: tuple(int(v) for v in r["shape"].split("x")))["shape"]
        lines += [f"Logit family, forward + backward, composition ÷ fused at {largest}: "
                  + ", ".join(f"{r['loss']} {r['ratio']:.2f}×" for r in rows if r["shape"] == largest) + ".", ""]
    bandwidth = _load(out / f"bandwidth_{device}.json")
    if bandwidth:
        if bandwidth.get("peak_tbps"):
            lines += [f"Memory floor at {bandwidth['shape']} (peak {bandwidth['peak_tbps']} TB/s), achieved "
                      f"fraction of peak by the floor's bytes / by the kernels' own: "
                      + ", ".join(f"{r['op']} {100 * r['floor_fraction']:.0f}% / {100 * r['design_fraction']:.0f}%"
                                  for r in bandwidth["rows"]) + ".", ""]
        else:
            lines += [f"Memory floor at {bandwidth['shape']}: no peak bandwidth known for this device.", ""]
    peers = _load(out / f"peers_{device}.json")
    if peers:
        lines += ["Peers: " + "; ".join(
            f"{r['case']}: {r['peer']} absent" if r["peer_ms"] is None
            else f"{r['case']}: {r['peer']} takes {r['peer_ms'] / r['ours_ms']:.2f}× ours"
            for r in peers["rows"]) + ".", ""]
    lines.append(f"Every table: {out}/*.md.")
    return "\n".join(lines) + "\n"


def update_readme(readme: pathlib.Path, text: str) -> None:
    body = readme.read_text()
    if START not in body or END not in body:
        raise SystemExit(f"{readme}: no {START} ... {END} block to replace")
    block = f"{START}\n{text}{END}"
    readme.write_text(re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _m: block, body, flags=re.S))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out")
    parser.add_argument("--readme", default=None)
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    text = summary(out)
    (out / "gpu_summary.md").write_text(text)
    if args.readme:
        update_readme(pathlib.Path(args.readme), text)
    print(text)


if __name__ == "__main__":
    main()

"""The checks of benchmarks/gpu_check.sh: the same runs on cpu and on cuda agree within stated tolerances.

Why they differ at all: a float32 GPU kernel adds the same terms in another order than the CPU's (cuDNN picks
its own convolution algorithms, reductions are tree-shaped over thousands of threads), and rounding depends on
the order: about 1e-7 relative per operation, the same mechanism as 1 against 2 CPU threads (TF32, which would
drop the mantissa to 10 bits, is switched off by gpu_check.sh with NVIDIA_TF32_OVERRIDE=0).

- A few rounds (``short-*``): every weight within SHORT_ATOL. Two CPU thread counts, which differ only in
  reduction order, measured 4.7e-5 after three rounds of the tiny Ray test (tests/test_ray_engine.py): 1e-3 is the
  same 20x margin that test keeps.
- 200 rounds (``run-*``) and the quick doctor (``doctor-*``): the differences have grown until the two runs are
  as different as two seeds' batch orders, so weights are not compared, final test accuracies are: within three
  standard deviations of the difference of two accuracies p on n test images, 3 * sqrt(2 p (1 - p) / n), treating
  the two models' errors as independent (an upper bound: models of one trajectory err on mostly the same images).

Usage: python benchmarks/gpu_compare.py OUT (the folder gpu_check.sh wrote). Exit code 1 if a check fails.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import torch

SHORT_ATOL = 1e-3


def max_weight_diff(a: Path, b: Path) -> float:
    sa = torch.load(a / "checkpoint.pt", map_location="cpu", weights_only=True)["server"]["model"]
    sb = torch.load(b / "checkpoint.pt", map_location="cpu", weights_only=True)["server"]["model"]
    return max(float((sa[k].double() - sb[k].double()).abs().max()) for k in sa if sa[k].is_floating_point())


def accuracy_tolerance(p: float, n: int) -> float:
    return 3 * math.sqrt(2 * p * (1 - p) / n)


def test_count(run: Path) -> int:
    from fedgap.config import load_config
    from fedgap.data.datasets import load_dataset

    d = load_config(run / "config.yaml").data
    return len(load_dataset(d.name, d.root, d.path).test_y)


def gap_accuracies(doctor: Path) -> dict[str, float]:
    with open(doctor / "gap.csv", newline="") as fh:
        return {r["variant"]: float(r["final_test_accuracy"]) for r in csv.DictReader(fh) if r["final_test_accuracy"]}


def main(out: Path) -> int:
    failed = []

    def check(what: str, diff: float, tol: float) -> None:
        ok = diff <= tol
        print(f"{'ok  ' if ok else 'FAIL'} {what}: |cpu - cuda| = {diff:.3g} (tolerance {tol:.3g})")
        if not ok:
            failed.append(what)

    check("weights after the short run", max_weight_diff(out / "short-cpu", out / "short-cuda"), SHORT_ATOL)
    n = test_count(out / "run-cpu")
    cpu, cuda = (json.loads((out / f"run-{d}" / "summary.json").read_text())["final_test_accuracy"]
                 for d in ("cpu", "cuda"))
    check("final test accuracy of the long run", abs(cpu - cuda), accuracy_tolerance(cpu, n))
    a, b = gap_accuracies(out / "doctor-cpu"), gap_accuracies(out / "doctor-cuda")
    for variant in sorted(a.keys() & b.keys()):
        check(f"doctor, {variant}", abs(a[variant] - b[variant]), accuracy_tolerance(a[variant], n))
    rec = [json.loads((out / f"doctor-{d}" / "summary.json").read_text()).get("recommended", {}).get("variant")
           for d in ("cpu", "cuda")]
    same = "same" if rec[0] == rec[1] else "different: variants within the tolerance of each other can swap places"
    print(f"recommended: cpu {rec[0]}, cuda {rec[1]} ({same})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))

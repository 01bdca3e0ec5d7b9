"""A short tiny Graph-GRPO run through the CLI, reduced to what must not change when code is reorganised:
its metrics (timings dropped), a digest of its final parameters (bit-exact: only comparable on the machine that
recorded it) and a fingerprint of them (per tensor: sum, sum of squares, and two fixed random projections, in
float64; comparable across CPUs to a tolerance). tests/data/reference_runs.json holds the metrics recorded before
the refactor of issue 11; test_grpo.py::test_refactor_keeps_the_reference_run compares.

    python tests/reference_run.py --write     # record (only when a change is MEANT to alter the numbers)
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(ROOT, "tests", "data", "reference_runs.json")
RUNS = {  # name -> overrides of configs/tiny.yaml
    "graph_meta": ["--credit.mode=graph", "--credit.evidence=group", "--controller.mode=meta"],
    "graph_meta_both": ["--credit.mode=graph", "--credit.evidence=both", "--controller.mode=meta",
                        "--controller.learn_weights=true"],
}
COMMON = ["--rl.steps=6", "--controller.accumulate=2", "--controller.snr_z=0.5", "--run.num_threads=1",
          "--run.device=cpu", "--rl.eval_every=3", "--rl.eval_items=16"]
VOLATILE = ("time/", "tokens_per_s")
# Tolerances, relative to a metric's largest magnitude over the run's steps and to a tensor's norm. Across CPUs the
# kernels sum in other orders: this machine (AVX512) against the record differs by up to 3.1e-4 in the metrics;
# two threads instead of one by 1.0e-4 in the metrics and 1.7e-5 in the fingerprint. A change of meaning is far
# above: rl.lr 1% higher moves the metrics by 0.13-0.46 (sampled tokens change) and the fingerprint by 2e-4-1e-2.
METRIC_RTOL, PARAM_RTOL = 2e-3, 2e-4


def fingerprint(tensors: dict) -> dict:
    """name -> [sum, sum of squares, <x, r1>, <x, r2>] in float64, r1 and r2 fixed N(0, 1) vectors per tensor
    (seeded by its size, so the same for every run); a change of the run moves them, float rounding barely."""
    import torch
    out = {}
    for k in sorted(tensors):
        x = tensors[k].double().flatten()
        r = torch.randn(2, x.numel(), generator=torch.Generator().manual_seed(x.numel()), dtype=torch.float64)
        out[k] = [x.sum().item(), x.square().sum().item(), *(r @ x).tolist()]
    return out


def run(name: str, tmp: str, extra: tuple = ()) -> dict:
    out = os.path.join(tmp, name)
    cmd = [sys.executable, "graph_grpo.py", "configs/tiny.yaml", f"--run.out_dir={out}",
           f"--data.dir={os.path.join(tmp, 'data')}", *COMMON, *RUNS[name], *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    from safetensors.torch import load_file
    tensors = load_file(os.path.join(out, "checkpoint", "model.safetensors"))
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].contiguous().numpy().tobytes())
    metrics = []
    with open(os.path.join(out, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            metrics.append({k: v for k, v in rec.items() if not k.startswith(VOLATILE)})
    return {"params_sha256": h.hexdigest(), "params_fingerprint": fingerprint(tensors), "metrics": metrics}


def mismatches(got: dict, want: dict) -> list[str]:
    """Where a run differs from the record beyond float rounding: metrics (the record's keys; exact when not a
    float) within METRIC_RTOL of each key's largest magnitude over the steps, the fingerprint within PARAM_RTOL of
    each tensor's norm (sqrt of its sum of squares). Empty when the run matches."""
    out = []
    if len(got["metrics"]) != len(want["metrics"]):
        return [f"{len(got['metrics'])} metric records, want {len(want['metrics'])}"]
    scale = {}
    for rec in want["metrics"]:
        for k, v in rec.items():
            if isinstance(v, float):
                scale[k] = max(scale.get(k, 0.0), abs(v))
    for step, (g, w) in enumerate(zip(got["metrics"], want["metrics"])):
        for k, v in w.items():
            gv = g.get(k)
            ok = (isinstance(gv, float) and abs(gv - v) <= METRIC_RTOL * scale[k]) if k in scale else gv == v
            if not ok:
                out.append(f"step {step} {k}: {gv} want {v}")
    for k, w in want["params_fingerprint"].items():
        g = got["params_fingerprint"].get(k)
        norm = w[1] ** 0.5
        if g is None or any(abs(a - b) > PARAM_RTOL * norm for a, b in zip(g, w)):
            out.append(f"parameter {k}: fingerprint {g} want {w}")
    return out


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        got = {name: run(name, tmp) for name in RUNS}
    if "--write" in sys.argv:
        os.makedirs(os.path.dirname(REFERENCE), exist_ok=True)
        with open(REFERENCE, "w") as f:
            json.dump(got, f, indent=1)
        print(f"wrote {REFERENCE}")
    else:
        print(json.dumps({k: v["params_sha256"] for k, v in got.items()}, indent=1))

"""A short tiny Graph-GRPO run through the CLI, reduced to what must not change when code is reorganised:
its metrics (timings dropped) and a digest of its final parameters. tests/data/reference_runs.json holds the
figures recorded before the refactor of issue 11; test_grpo.py::test_refactor_keeps_the_reference_run compares.

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


def run(name: str, tmp: str) -> dict:
    out = os.path.join(tmp, name)
    cmd = [sys.executable, "graph_grpo.py", "configs/tiny.yaml", f"--run.out_dir={out}",
           f"--data.dir={os.path.join(tmp, 'data')}", *COMMON, *RUNS[name]]
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
    return {"params_sha256": h.hexdigest(), "metrics": metrics}


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

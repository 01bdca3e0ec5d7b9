"""A run directory on disk (DESIGN §7: nothing is lost): atomic checkpoints, the logs a resumed run continues.

    <run.out_dir>/config.yaml                 the resolved config
    <run.out_dir>/metrics.jsonl, samples.jsonl    one line per step / a few rollouts per step
    <run.out_dir>/checkpoints/step_XXXXXX/    periodic: model + tokenizer + trainer_state.pt (resume)
    <run.out_dir>/checkpoint/                 the final model (SFT: <out_dir>/sft/checkpoint; student: student/checkpoint)

One atomic save serves SFT, RL and distillation: a checkpoint is written under <dir>.tmp and renamed into place,
so a killed write never leaves a complete-looking directory; the directory it replaces is moved aside first and
removed last.
"""
from __future__ import annotations

import glob
import json
import os
import random
import shutil
from typing import Callable

import torch

import policy


def save_atomically(final: str, write: Callable[[str], None]) -> str:
    """write(tmp) fills a fresh directory; it then becomes `final` in one rename. Returns `final`."""
    tmp, old = final + ".tmp", final + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write(tmp)
    if os.path.exists(final):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_dirs(out_dir: str) -> list[str]:
    """Complete periodic checkpoints, oldest first (a directory is complete once renamed from *.tmp)."""
    return sorted(d for d in glob.glob(os.path.join(out_dir, "checkpoints", "step_*")) if d[-4:] not in (".tmp", ".old"))


def save_checkpoint(out_dir: str, step: int, model, tokenizer, state: dict, keep_last: int) -> str:
    """Model, tokenizer and trainer state (optimizer, controller, step, RNG) in one atomic directory."""
    def write(d):
        policy.save_policy(model, tokenizer, d)
        torch.save(state, os.path.join(d, "trainer_state.pt"))
    final = save_atomically(os.path.join(out_dir, "checkpoints", f"step_{step:06d}"), write)
    for old in checkpoint_dirs(out_dir)[:-keep_last]:
        os.replace(old, old + ".old")   # out of checkpoint_dirs first: never a half-deleted checkpoint in the list
        shutil.rmtree(old + ".old", ignore_errors=True)
    return final


def rng_state() -> dict:
    return {"python": random.getstate(), "torch": torch.get_rng_state()}


def set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    torch.set_rng_state(st["torch"])


class RunLogs:
    """metrics.jsonl (one line per step) and samples.jsonl (a few rollouts with their node advantages), written by
    rank 0. A resumed run rewrites the steps after its checkpoint: their lines from the killed run go first."""

    def __init__(self, out_dir: str, start: int, master: bool):
        self.files = {}
        if master:
            os.makedirs(out_dir, exist_ok=True)
            for name in ("metrics", "samples"):
                path = os.path.join(out_dir, f"{name}.jsonl")
                truncate_log(path, start)
                self.files[name] = open(path, "a")

    def write(self, rec: dict, ro, tokenizer, n: int) -> None:
        """The step's metrics line, and the first n rollouts of `ro` (a graph_grpo.Rollouts) with their reward and
        the advantage of every node (read at its first token)."""
        self.files["metrics"].write(json.dumps(rec) + "\n")
        self.files["metrics"].flush()
        f, G = self.files["samples"], ro.group_size
        for i in range(min(n, len(ro.completions))):
            ex, p = ro.examples[i // G], ro.parses[i]
            node_adv = {k: round(float(ro.adv[i, sp.start]), 4) for k, sp in p.nodes.items()
                        if not sp.broken and p.valid and sp.start < ro.adv.shape[1]}
            f.write(json.dumps({"step": rec["step"], "query": ex.query, "product": ex.product, "label": ex.label,
                                "completion": tokenizer.decode(ro.completions[i]), "reward": float(ro.rewards[i]),
                                "node_advantages": node_adv,
                                "outcome_advantage": round(float(ro.adv[i, -1]) if not p.valid else float("nan"), 4)})
                    + "\n")
        f.flush()

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def truncate_log(path: str, start: int) -> None:
    """Keep the JSON lines of steps before `start` (atomically); a torn last line of a killed run goes too."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] < start:
                    keep.append(line)
            except (json.JSONDecodeError, KeyError):
                pass
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)

"""A run directory on disk (DESIGN §7: nothing is lost, nothing is mixed): atomic verified checkpoints, the
config a resume must match, the logs a resumed run continues, and a clean stop on SIGINT / SIGTERM.

    <run.out_dir>/config.yaml                 the resolved config
    <run.out_dir>/metrics.jsonl, samples.jsonl    one line per step / a few rollouts per step
    <run.out_dir>/checkpoints/step_XXXXXX/    periodic: model + tokenizer + trainer_state.pt (resume)
    <run.out_dir>/checkpoint/                 the final model (SFT: <out_dir>/sft/checkpoint; student: student/checkpoint)

One atomic save serves SFT, RL and distillation: a checkpoint is written under <dir>.tmp, gets its manifest.json
(size and sha256 of every file) last, and is renamed into place, so a killed write never leaves a
complete-looking directory; the directory it replaces is moved aside first and removed last. Loading verifies the
manifest; a directory without one (a pretrained model, a checkpoint from before manifests) is taken as is.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import random
import shutil
import signal
import sys
import threading
from typing import Any, Callable

import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule

import policy
from config import Config, OneLineError, UserError, config_to_dict, load_config

MANIFEST = "manifest.json"


class PathError(UserError):
    """A model directory, checkpoint or run directory that cannot be used; the message names the path (and the
    config key that gave it, where there is one) and the cause."""


def save_atomically(final: str, write: Callable[[str], None]) -> str:
    """write(tmp) fills a fresh directory; its manifest is written last and it becomes `final` in one rename.
    Returns `final`."""
    tmp, old = final + ".tmp", final + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write(tmp)
    write_manifest(tmp)
    if os.path.exists(final):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(d: str) -> None:
    """d/manifest.json: {"files": {relative path: {"size", "sha256"}}} of every file under d, written atomically."""
    files = {}
    for root, _, names in os.walk(d):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), d)
            if rel not in (MANIFEST, MANIFEST + ".tmp"):
                full = os.path.join(d, rel)
                files[rel] = {"size": os.path.getsize(full), "sha256": _sha256(full)}
    with open(os.path.join(d, MANIFEST + ".tmp"), "w") as f:
        json.dump({"files": dict(sorted(files.items()))}, f, indent=1)
    os.replace(os.path.join(d, MANIFEST + ".tmp"), os.path.join(d, MANIFEST))


def verify_manifest(d: str) -> bool:
    """True when every file d/manifest.json lists is there with its size and sha256; False when d has no
    manifest (accepted as is: a pretrained model, an older checkpoint). PathError names the first file that
    differs."""
    path = os.path.join(d, MANIFEST)
    if not os.path.isfile(path):
        return False
    try:
        with open(path) as f:
            files = json.load(f)["files"]
        listed = {rel: (int(v["size"]), str(v["sha256"])) for rel, v in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise PathError(f"{path}: unreadable manifest ({type(err).__name__}: {err})") from None
    for rel, (size, sha) in listed.items():
        full = os.path.join(d, rel)
        if not os.path.isfile(full):
            raise PathError(f"{full}: missing ({MANIFEST} lists it)")
        if os.path.getsize(full) != size:
            raise PathError(f"{full}: {os.path.getsize(full)} bytes, {MANIFEST} says {size} (truncated or changed "
                            f"after the save)")
        if _sha256(full) != sha:
            raise PathError(f"{full}: sha256 differs from {MANIFEST} (corrupt or changed after the save)")
    return True


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def check_model_dir(path: str, key: str = "") -> None:
    """What policy.load_policy needs of a local model directory, checked before transformers reads it so that an
    error names the path (and `key`, the config key that gave it) and the real cause: the directory exists, its
    manifest verifies (where it has one), config.json names a model type this transformers knows, a tokenizer is
    saved with it. A missing directory is a FileNotFoundError, the rest PathError."""
    where = f"{key} = {path}" if key else path
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{where}: no such model directory")
    verify_manifest(path)
    conf = os.path.join(path, "config.json")
    try:
        with open(conf, encoding="utf-8") as f:
            model_type = json.load(f).get("model_type")
    except FileNotFoundError:
        raise PathError(f"{where}: no config.json (not a Hugging Face model directory)") from None
    except (OSError, ValueError, AttributeError) as err:
        raise PathError(f"{where}: config.json is not a JSON object ({err})") from None
    from transformers import CONFIG_MAPPING, __version__
    if model_type not in CONFIG_MAPPING:
        raise PathError(f"{where}: config.json has model_type {model_type!r}, which transformers {__version__} does "
                        f"not know (a typo, or a model newer than this transformers)")
    if not any(n in TOKENIZER_FILES or n.endswith(".tiktoken") for n in os.listdir(path)):
        raise PathError(f"{where}: no tokenizer saved with the model (none of {', '.join(TOKENIZER_FILES)})")


def load_error(where: str, what: str, err: BaseException) -> PathError:
    """PathError for a file transformers / torch / safetensors could not read: the first sentence of their message,
    with the place."""
    first = (str(err).strip().splitlines() or [""])[0].split(". ")[0][:300]
    return PathError(f"{where}: cannot load the {what}: {type(err).__name__}: {first}")


def load_trainer_state(d: str) -> dict:
    """d/trainer_state.pt (optimizer, controller, step, RNG); PathError when it cannot be read."""
    path = os.path.join(d, "trainer_state.pt")
    try:
        return torch.load(path, weights_only=False)
    except FileNotFoundError:
        raise PathError(f"{path}: missing") from None
    except Exception as err:  # noqa: BLE001 (a truncated zip raises RuntimeError, a garbled pickle anything)
        raise load_error(path, "trainer state", err) from None


def newest_loadable(dirs: list[str], load: Callable[[str], Any], say: Callable[[str], None]) -> tuple[str, Any] | None:
    """(directory, load(directory)) for the newest of `dirs` (oldest first) that loads; each one skipped because
    it does not (PathError: it fails its manifest, or cannot be read) is named through say(). None without dirs;
    PathError when none loads."""
    skipped = []
    for d in reversed(dirs):
        try:
            return d, load(d)
        except PathError as err:
            skipped.append(d)
            say(f"resume: skipping a checkpoint that does not load: {err}")
    if skipped:
        raise PathError(f"{os.path.dirname(skipped[0])}: no checkpoint loads ({len(skipped)} skipped, see above); "
                        f"--no-resume starts the run over")
    return None


def checkpoint_dirs(out_dir: str) -> list[str]:
    """Complete periodic checkpoints, oldest first (a directory is complete once renamed from *.tmp)."""
    return sorted(d for d in glob.glob(os.path.join(out_dir, "checkpoints", "step_*")) if d[-4:] not in (".tmp", ".old"))


def step_dir(out_dir: str, step: int) -> str:
    """The periodic checkpoint after `step` steps."""
    return os.path.join(out_dir, "checkpoints", f"step_{step:06d}")


def save_checkpoint(out_dir: str, step: int, model, tokenizer, state: dict, keep_last: int,
                    weights: dict | None = None) -> str:
    """Model, tokenizer and trainer state (optimizer, controller, step, RNG) in one atomic directory; `weights`: the
    model's full state dict where the model holds shards (model_state)."""
    def write(d):
        save_model(model, tokenizer, d, weights)
        torch.save(state, os.path.join(d, "trainer_state.pt"))
    final = save_atomically(step_dir(out_dir, step), write)
    for old in checkpoint_dirs(out_dir)[:-keep_last]:
        os.replace(old, old + ".old")   # out of checkpoint_dirs first: never a half-deleted checkpoint in the list
        shutil.rmtree(old + ".old", ignore_errors=True)
    return final


# ----------------------------------------------------------------------------------------------------------
# What a checkpoint holds of a sharded (FSDP) model: the same files as of a model in one piece

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def is_sharded(model) -> bool:
    """The model holds shards of its parameters (run.parallel fsdp: FSDP2's fully_shard)."""
    return isinstance(model, FSDPModule)


def model_state(model) -> dict | None:
    """What save_model writes of `model`: None (its own parameters) for a model in one piece; for a sharded one, the
    full state dict, gathered into rank 0's memory (a collective: every rank calls it; the others get {})."""
    return get_model_state_dict(model, options=_FULL) if is_sharded(model) else None


def save_model(model, tokenizer, d: str, weights: dict | None = None) -> None:
    """policy.save_policy; with `weights` (model_state of a sharded model) save_pretrained writes those instead of
    the shards: the same files either way, which policy.load_policy reads."""
    if weights is None:
        policy.save_policy(model, tokenizer, d)
        return
    os.makedirs(d, exist_ok=True)
    model.save_pretrained(d, state_dict=weights)
    tokenizer.save_pretrained(d)


def optimizer_state(model, opt) -> dict:
    """opt.state_dict(); for a sharded model the full one (moments unsharded, keyed by parameter name), gathered into
    rank 0's memory (a collective: every rank calls it; the others get {})."""
    return get_optimizer_state_dict(model, opt, options=_FULL) if is_sharded(model) else opt.state_dict()


def load_optimizer_state(model, opt, saved: dict) -> None:
    """optimizer_state's inverse on resume: for a sharded model every rank takes its shards of the full state."""
    if is_sharded(model):
        set_optimizer_state_dict(model, opt, saved, options=StateDictOptions(full_state_dict=True))
    else:
        opt.load_state_dict(saved)


# ----------------------------------------------------------------------------------------------------------
# A resume never mixes runs (DESIGN §7)

RESUME_FREE = ("run.name", "run.out_dir", "run.resume", "run.device", "run.num_threads", "run.log_every",
               "run.save_every", "run.keep_last", "rl.steps", "rl.eval_every", "rl.eval_items", "rl.n_samples_logged",
               "rl.micro_batch_size", "rl.max_bad_steps", "eval.", "distill.")
"""Keys (or sections) a resumed RL run may change: they lengthen it (rl.steps), re-evaluate it (eval.*, the drift
evaluations), or change where, how fast and what it logs and keeps (device, threads, micro-batches: memory only,
logging, checkpoint interval, the non-finite-step patience). distill.* belongs to the student's own directory."""

SFT_KEYS = ("run.seed", "run.dtype", "data.", "graph.", "model.", "sft.", "mask.")
"""Keys (or sections) the SFT stage's checkpoint depends on; the rest is RL, evaluation, distillation, bookkeeping.
SFT has no periodic checkpoint, so sft.steps is not a length a resume could extend."""


WAYS_OUT = "pass --no-resume to start over, or give this variant its own --run.out_dir"


def rl_setting(key: str) -> bool:
    return not key.startswith(RESUME_FREE)


def sft_setting(key: str) -> bool:
    return key.startswith(SFT_KEYS)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def config_differences(cfg: Config, run_dir: str, counts: Callable[[str], bool]) -> list[str] | None:
    """['key: saved -> new', ...] over the keys where `counts(key)`, between run_dir/config.yaml (the config that
    made what the directory holds) and cfg; None when there is no config.yaml to compare with."""
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        return None
    try:
        saved = config_to_dict(load_config(path))
    except UserError as err:
        raise PathError(f"{path}: cannot be compared with this config ({err}); {WAYS_OUT}") from None
    new = config_to_dict(cfg)
    return [f"{s}.{k}: {_short(v)} -> {_short(new[s][k])}" for s, keys in saved.items() for k, v in keys.items()
            if counts(f"{s}.{k}") and v != new[s][k]]


def refuse_mixing(cfg: Config, run_dir: str, what: str, counts: Callable[[str], bool]) -> None:
    """PathError, in one line naming the keys that differ and the two ways out, when the config that made `what`
    in run_dir differs from cfg in a key that `counts` (rl_setting, sft_setting)."""
    diffs = config_differences(cfg, run_dir, counts)
    if diffs:
        shown = "; ".join(diffs[:6]) + (f"; {len(diffs) - 6} more" if len(diffs) > 6 else "")
        raise PathError(f"{run_dir}: {what} was made with another config ({shown}); resuming would mix two runs: "
                        f"{WAYS_OUT}")


def make_run_dir(path: str, key: str = "run.out_dir") -> str:
    """Create the run directory `path` and check that a file can be written in it, before any work is done;
    PathError names the config key that gave it."""
    probe = os.path.join(path, f".write_test.{os.getpid()}")
    try:
        os.makedirs(path, exist_ok=True)
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as err:
        raise PathError(f"{key} = {path}: cannot write there ({err.strerror or err})") from None
    return path


def start_over(run_dir: str) -> None:
    """--no-resume: what an earlier run left that a new one could resume from or be taken for goes first: its
    periodic and final checkpoints and eval.json (the logs are truncated by RunLogs / the SFT stage)."""
    for name in ("checkpoints", "checkpoint"):
        d = os.path.join(run_dir, name)
        if os.path.isdir(d):
            os.replace(d, d + ".old")  # out of sight at once, removed after
            shutil.rmtree(d + ".old", ignore_errors=True)
    if os.path.isfile(os.path.join(run_dir, "eval.json")):
        os.remove(os.path.join(run_dir, "eval.json"))


# ----------------------------------------------------------------------------------------------------------
# A clean stop on SIGINT / SIGTERM

class Interrupted(OneLineError):
    """A signal stopped the run at a step boundary; the message says where and how to go on (empty on the ranks
    other than 0, which say nothing). Exit code 128 + the signal, as a shell reports one."""
    prefix = ""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopSignals:
    """Within the block, SIGINT and SIGTERM ask for a stop at the next step boundary: the first sets `signum`, which
    the training loop reads after each step; a second exits at once (128 + signal) with one line. The handlers it
    replaced come back on exit. Outside the main thread (no handlers can be set there) it does nothing."""

    def __init__(self):
        self.signum = 0
        self.previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.signum:
            sys.stderr.write(f"\nsecond signal ({self.name(signum)}): exiting at once; the run directory "
                             f"keeps its last complete checkpoint\n")
            sys.stderr.flush()
            os._exit(128 + signum)
        self.signum = signum

    @staticmethod
    def name(signum: int) -> str:
        return signal.Signals(signum).name


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

"""Our GRPO step (outcome credit) against TRL's GRPOTrainer, same model, prompts, reward and settings, side by side.

    python benchmarks/vs_trl.py --trl-python /work/bench_venv/bin/python [--steps 16] [--chunk 4] [--threads 1]

TRL is NOT a product dependency: install it in a separate virtualenv (benchmarks/requirements.txt) and point
--trl-python (or $VS_TRL_PYTHON) at that interpreter; the default is the interpreter running this script.

For each model size (--sizes; the embedded tiny Qwen2, hidden 128 x 2 layers and hidden 256 x 4 layers, and
SmolLM2-135M from models/smollm2-135m at a small setting both sides share: 4 prompts x 4 samples, 64 tokens):
  1. an SFT checkpoint (--init SIZE=DIR; trained with sft_mask.py when missing) is the common start;
  2. a check that TRL's reward function here gives exactly our rewards on our trainer's own rollouts
     (graph_grpo.sample_rollouts) and that TRL's prompt tokenisation gives our prompt ids;
  3. --steps steps per side in chunks of --chunk, alternated A B A B (ours, TRL, ours, TRL, ...) so that a shared,
     noisy machine treats both alike. Ours: graph_grpo.main in a subprocess (this file, --worker ours), resumed
     chunk after chunk, time/step_s from metrics.jsonl, plus the step's process CPU time. TRL: GRPOTrainer(...).train() in a subprocess (this file, --worker), one chunk of
     max_steps per process starting from the weights the previous TRL chunk saved, a callback timing
     on_step_begin -> on_step_end (generation, reward, 4 micro-batch forward/backward, clipping, optimizer) in
     wall and process CPU seconds.
  4. medians over the measured steps (the first step of every process is warm-up and dropped, on both sides), the
     ratio TRL / ours (wall and CPU) per repetition (one chunk of each side; --steps / --chunk repetitions,
     alternated) with its median and range, the mean completion length, completion tokens/s and peak resident
     memory of each side. CPU seconds of a one-thread process are the steadier figure on a shared machine.
Nothing is asserted about speed: numbers are measured and printed (and written to --out as JSON).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data  # noqa: E402
import testbed  # noqa: E402
import graph_grpo  # noqa: E402
import policy  # noqa: E402
from config import parse_args  # noqa: E402

OURS = ["--credit.mode=outcome", "--controller.mode=fixed"]  # plain GRPO: outcome advantage on every token
# name -> (config, model overrides for the SFT stage, SFT steps, default checkpoint, RL settings of both sides)
SIZES = {
    "h128_l2": ("configs/base.yaml", ["--model.hidden_size=128", "--model.num_layers=2"], 600,
                "/tmp/bench_sft/sft/checkpoint", []),
    "h256_l4": ("configs/base.yaml", ["--model.hidden_size=256", "--model.num_layers=4"], 300,
                "/tmp/bench_sft_h256/sft/checkpoint", []),
    # SmolLM2-135M (models/smollm2-135m, smollm2.py) at a setting this CPU can run: 4 prompts x 4 samples, 64 tokens
    "smollm2": ("configs/smollm2.yaml", ["--sft.batch_size=8", "--sft.warmup=5"], 40, "/tmp/bench_sft_smollm2/sft/checkpoint",
                ["--rl.prompts_per_step=4", "--rl.num_generations=4", "--rl.max_new_tokens=64", "--rl.micro_batch_size=16"]),
}
SIZE, CONFIG, SETTINGS = "h128_l2", SIZES["h128_l2"][0], []  # the size being measured (main and the workers' --size)
LOSS_TYPE = {"token_mean": "dapo", "seq_mean_token_mean": "grpo", "seq_mean_token_sum_norm": "dr_grpo"}
INSTALL = ("TRL is needed for the TRL side of this benchmark, and only there: it is not a product dependency.\n"
           "Install it in a separate virtualenv and point --trl-python (or $VS_TRL_PYTHON) at it:\n"
           "  python -m venv /work/bench_venv\n"
           "  /work/bench_venv/bin/pip install -r requirements.txt -r benchmarks/requirements.txt\n"
           "  python benchmarks/vs_trl.py --trl-python /work/bench_venv/bin/python")


def config():
    cfg, _ = parse_args([os.path.join(ROOT, CONFIG), *OURS, *SETTINGS])
    return cfg


def use_size(size: str) -> None:
    global SIZE, CONFIG, SETTINGS
    SIZE, CONFIG, SETTINGS = size, SIZES[size][0], SIZES[size][4]


def step_examples(cfg, pool, first: int, steps: int) -> list[list]:
    """The examples of our trainer's steps first..first+steps-1 (one process, rank 0): TRL gets exactly these."""
    rl = cfg.rl
    return [[pool[i] for i in graph_grpo.step_prompt_indices(s, 0, 1, rl.prompts_per_step, len(pool), cfg.run.seed)]
            for s in range(first, first + steps)]


def trl_reward_function(vocab, schema, reward_cfg):
    """Our exact-label reward (graph_grpo.outcome_reward over data.parse_completion) as a TRL reward function:
    TRL calls it with the completions' token ids and the dataset's `label` column repeated per completion."""
    def exact_label(prompts, completions, completion_ids, label, **kwargs):
        return [graph_grpo.outcome_reward(data.parse_completion(ids, vocab, schema), gold, len(schema.label_names),
                                          reward_cfg.kind, reward_cfg.format_penalty, reward_cfg.require_consistent)
                for ids, gold in zip(completion_ids, label)]
    return exact_label


def check_same_inputs(init_from: str, threads: int) -> str:
    """Same numbers on the same completions: our rollouts of step 0 scored by our trainer and by the TRL reward
    function; and TRL's prompt tokenisation (tokenizer(text=prompts)) equal to ours (policy.encode)."""
    import torch
    import transformers
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(threads)
    cfg = config()
    task = testbed.load_task(cfg)
    schema, splits = task.schema, task.splits
    model, tok = policy.load_policy(init_from, schema.words())
    vocab = data.TagVocab.from_tokenizer(tok, schema)
    exs = step_examples(cfg, splits["rl"], 0, 1)[0]
    prompts = [data.format_prompt(e.query, e.product) for e in exs]
    ours_ids = [policy.encode(tok, p, strict=True) for p in prompts]
    if tok(text=prompts)["input_ids"] != ours_ids:
        raise SystemExit("check failed: TRL's prompt tokenisation differs from ours")
    ro = graph_grpo.sample_rollouts(model, tok, exs, ours_ids, cfg.rl, graph_grpo.sampling_seed(cfg.run.seed, 0, 0))
    graph_grpo.score_rollouts(ro, vocab, schema, cfg.reward)
    completions, rewards = ro.completions, ro.rewards
    G = cfg.rl.num_generations
    theirs = trl_reward_function(vocab, schema, cfg.reward)(
        prompts=[p for p in prompts for _ in range(G)], completions=tok.batch_decode(completions),
        completion_ids=completions, label=[e.label for e in exs for _ in range(G)])
    if not torch.equal(torch.tensor(theirs, dtype=rewards.dtype), rewards):
        raise SystemExit(f"check failed: TRL reward {theirs} != ours {rewards.tolist()}")
    return (f"check: TRL reward function == ours on {len(completions)} rollouts of step 0 (mean reward "
            f"{sum(theirs) / len(theirs):.3f}); TRL prompt ids == ours on {len(prompts)} prompts")


# ------------------------------------------------------------------------------------------------------------
# the two sides, one chunk each


def run_logged(cmd, log, env):
    with open(log, "a") as f:
        r = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd[:3])} ... failed ({r.returncode}); see {log}")


def ours_chunk(out: str, init_from: str, upto: int, threads: int, env) -> list[dict]:
    """Our trainer up to step `upto` (resuming its run directory); the records of the steps this process ran."""
    rl = config().rl
    done = len(ours_records(out))
    run_logged([sys.executable, os.path.abspath(__file__), "--worker", "ours", CONFIG, f"--run.out_dir={out}",
                f"--rl.init_from={init_from}", f"--rl.steps={upto}", f"--run.num_threads={threads}",
                "--run.save_every=100000", "--run.keep_last=1", "--eval.max_items=1", *OURS, *SETTINGS], out + ".log", env)
    recs = ours_records(out)[done:]
    return [{"step": r["step"], "step_s": r["time/step_s"], "cpu_s": r["time/cpu_step_s"], "gen_s": r["time/rollout_s"],
             "tokens": r["completions/mean_length"] * rl.prompts_per_step * rl.num_generations,
             "mean_len": r["completions/mean_length"], "reward": r["reward"], "warmup": i == 0,
             "maxrss_mb": r["time/maxrss_mb"], "chunk": done}
            for i, r in enumerate(recs)]


def ours_worker(argv: list[str]) -> None:
    """graph_grpo.main(argv), unchanged, with two timing hooks: the process CPU time of each step is added to its
    metrics as time/cpu_step_s (from the step's first call, step_prompt_indices, right after the step's clock
    starts, to step_metrics, right after time/step_s is taken)."""
    start = {}

    def indices(*a, **k):
        start["cpu"] = time.process_time()
        return step_prompt_indices(*a, **k)

    def metrics(*a, **k):
        rec = step_metrics(*a, **k)
        rec["time/cpu_step_s"] = time.process_time() - start["cpu"]
        rec["time/maxrss_mb"] = peak_rss_mb()
        return rec
    step_prompt_indices, step_metrics = graph_grpo.step_prompt_indices, graph_grpo.step_metrics
    graph_grpo.step_prompt_indices, graph_grpo.step_metrics = indices, metrics
    graph_grpo.main(argv)


def ours_records(out):
    path = os.path.join(out, "metrics.jsonl")
    return [json.loads(x) for x in open(path)] if os.path.exists(path) else []


def trl_chunk(out: str, init_from: str, first: int, steps: int, threads: int, trl_python: str, env) -> list[dict]:
    """TRL's GRPOTrainer for steps first..first+steps-1 in a fresh process (--worker), from the weights the previous
    TRL chunk saved (`init_from` for the first)."""
    prev = os.path.join(out, f"weights_{first:04d}")
    start = prev if os.path.isdir(prev) else init_from
    rec_file = os.path.join(out, f"steps_{first:04d}.jsonl")
    run_logged([trl_python, os.path.abspath(__file__), "--worker", "trl", "--size", SIZE, "--init-from", start,
                "--save-to", os.path.join(out, f"weights_{first + steps:04d}"), "--first-step", str(first),
                "--steps", str(steps), "--threads", str(threads), "--records", rec_file], out + ".log", env)
    return [dict(json.loads(x), chunk=first) for x in open(rec_file)]


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (ru_maxrss is in KiB on Linux)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def trl_worker(args) -> None:
    """One TRL chunk: GRPOTrainer on our prompts with our reward, settings mapped from configs/base.yaml."""
    try:
        from datasets import Dataset
        from transformers import TrainerCallback
        from trl import GRPOConfig, GRPOTrainer
    except ImportError as e:
        raise SystemExit(f"{e}\n{INSTALL}")
    import torch
    torch.set_num_threads(args.threads)
    cfg = config()
    rl = cfg.rl
    task = testbed.load_task(cfg)
    schema, splits = task.schema, task.splits
    model, tok = policy.load_policy(args.init_from, schema.words())
    vocab = data.TagVocab.from_tokenizer(tok, schema)
    rows = [{"prompt": data.format_prompt(e.query, e.product), "label": e.label}
            for exs in step_examples(cfg, splits["rl"], args.first_step, args.steps) for e in exs]
    timer = {"gen_s": 0.0, "tokens": 0, "n": 0, "reward": 0.0}

    generate = model.generate  # TRL generates through model.generate (use_vllm=False): time it

    def timed_generate(*a, **k):
        t = time.perf_counter()
        out = generate(*a, **k)
        timer["gen_s"] += time.perf_counter() - t
        return out
    model.generate = timed_generate

    reward = trl_reward_function(vocab, schema, cfg.reward)

    def exact_label(prompts, completions, completion_ids, label, **kwargs):  # also counts completion tokens
        r = reward(prompts, completions, completion_ids, label)
        timer.update(tokens=timer["tokens"] + sum(len(c) for c in completion_ids), n=timer["n"] + len(r),
                     reward=timer["reward"] + sum(r))
        return r

    class StepTimer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            timer.update(t0=time.perf_counter(), cpu0=time.process_time(), gen_s=0.0, tokens=0, n=0, reward=0.0)

        def on_step_end(self, a, state, control, **kw):
            rec = {"step": args.first_step + state.global_step - 1, "step_s": time.perf_counter() - timer["t0"],
                   "cpu_s": time.process_time() - timer["cpu0"], "threads": torch.get_num_threads(),
                   "gen_s": timer["gen_s"], "tokens": timer["tokens"], "mean_len": timer["tokens"] / max(timer["n"], 1),
                   "reward": timer["reward"] / max(timer["n"], 1), "warmup": state.global_step == 1,
                   "maxrss_mb": peak_rss_mb()}
            with open(args.records, "a") as f:
                f.write(json.dumps(rec) + "\n")

    batch = rl.prompts_per_step * rl.num_generations
    targs = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="vs_trl_out_"), max_steps=args.steps, seed=cfg.run.seed + args.first_step,
        # one optimizer step per generation of 16 prompts x 8 completions, in micro-batches of ours (rl.micro_batch_size)
        num_generations=rl.num_generations, per_device_train_batch_size=rl.micro_batch_size,
        gradient_accumulation_steps=batch // rl.micro_batch_size, num_iterations=rl.num_iterations,
        shuffle_dataset=False, max_completion_length=rl.max_new_tokens,
        temperature=rl.temperature, top_p=1.0, top_k=0, min_p=None, repetition_penalty=1.0, use_vllm=False,
        beta=rl.beta, epsilon=rl.eps_low, epsilon_high=rl.eps_high, loss_type=LOSS_TYPE[rl.aggregation],
        scale_rewards=cfg.credit.scale, mask_truncated_completions=False,
        learning_rate=rl.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=rl.weight_decay,
        max_grad_norm=rl.grad_clip, optim="adamw_torch",
        bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True, dataloader_num_workers=0,
        report_to="none", save_strategy="no", eval_strategy="no", logging_steps=1, disable_tqdm=True,
        log_completions=False)
    trainer = GRPOTrainer(model=model, reward_funcs=[exact_label], args=targs, train_dataset=Dataset.from_list(rows),
                          processing_class=tok, callbacks=[StepTimer()])
    if args.print_settings:
        print({k: getattr(trainer.generation_config, k) for k in ("do_sample", "temperature", "top_k", "top_p",
                                                                    "max_new_tokens", "eos_token_id", "pad_token_id")})
    trainer.train()
    del model.generate
    policy.save_policy(model, tok, args.save_to)


# ------------------------------------------------------------------------------------------------------------


def median(recs, key):
    return statistics.median(r[key] for r in recs)


def summarise(name: str, ours: list[dict], trl: list[dict]) -> dict:
    """Medians over the measured steps of each side; per repetition (the chunks run A B A B), the ratio of the two
    sides' median CPU seconds per step, and the median and range of those ratios; each side's peak memory."""
    side = {}
    for label, recs in (("ours", ours), ("trl", trl)):
        m = [r for r in recs if not r["warmup"]]
        side[label] = {"n": len(m), "step_s": median(m, "step_s"), "cpu_s": median(m, "cpu_s"), "gen_s": median(m, "gen_s"),
                       "rest_s": statistics.median(r["step_s"] - r["gen_s"] for r in m),
                       "mean_len": statistics.mean(r["mean_len"] for r in m),
                       "tok_s": statistics.median(r["tokens"] / r["step_s"] for r in m),
                       "reward": statistics.mean(r["reward"] for r in m),
                       "maxrss_mb": max(r.get("maxrss_mb", float("nan")) for r in recs),
                       "chunks": {c: (median([r for r in m if r["chunk"] == c], "cpu_s"),
                                      median([r for r in m if r["chunk"] == c], "step_s"))
                                  for c in sorted({r["chunk"] for r in m})}}
    side["ratio"] = side["trl"]["step_s"] / side["ours"]["step_s"]
    side["ratio_cpu"] = side["trl"]["cpu_s"] / side["ours"]["cpu_s"]
    side["ratio_tok_s"] = side["ours"]["tok_s"] / side["trl"]["tok_s"]
    reps = [(side["trl"]["chunks"][c][0] / side["ours"]["chunks"][c][0], side["trl"]["chunks"][c][1] / side["ours"]["chunks"][c][1])
            for c in side["ours"]["chunks"] if c in side["trl"]["chunks"]]
    side["reps_cpu"], side["reps_wall"] = [r[0] for r in reps], [r[1] for r in reps]
    side["size"] = name
    return side


def print_table(results: list[dict]) -> None:
    print("| size | side | steps | median s/step | CPU s/step | generation s | rest s | mean completion len "
          "| completion tok/s | mean reward | peak RSS MB | TRL/ours CPU s/step, median [range] over repetitions "
          "| TRL/ours s/step, median [range] |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for res in results:
        for label in ("ours", "trl"):
            s = res[label]
            rng = lambda v: f"{statistics.median(v):.2f}x [{min(v):.2f}-{max(v):.2f}] ({len(v)})" if v else "-"  # noqa: E731
            tail = f"| {rng(res['reps_cpu'])} | {rng(res['reps_wall'])} |" if label == "ours" else "| | |"
            print(f"| {res['size']} | {'ours (graph_grpo.py)' if label == 'ours' else 'TRL GRPOTrainer'} | {s['n']} "
                  f"| {s['step_s']:.3f} | {s['cpu_s']:.3f} | {s['gen_s']:.3f} | {s['rest_s']:.3f} | {s['mean_len']:.1f} "
                  f"| {s['tok_s']:.0f} | {s['reward']:.3f} | {s['maxrss_mb']:.0f} {tail}")


def ensure_sft(size: str, path: str, threads: int, env) -> str:
    if os.path.isdir(path):
        return path
    config_path, overrides, steps, _, _ = SIZES[size]
    out = os.path.dirname(os.path.dirname(path.rstrip("/")))
    print(f"{size}: no SFT checkpoint at {path}: training one (sft_mask.py, {steps} steps) ...", flush=True)
    run_logged([sys.executable, "sft_mask.py", config_path, f"--run.out_dir={out}", f"--run.num_threads={threads}",
                f"--sft.steps={steps}", "--eval.max_items=50", *overrides], out + ".log", env)
    return path


def versions(python: str) -> str:
    code = "import torch, transformers; v = [torch.__version__, transformers.__version__]\n" \
           "try:\n import trl; v.append(trl.__version__)\nexcept ImportError:\n v.append(None)\nprint(*v)"
    return subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout.split()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=16, help="steps per side and size (in chunks of --chunk)")
    ap.add_argument("--chunk", type=int, default=4, help="steps per process; the first of each is warm-up")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (and OMP_NUM_THREADS) of both sides")
    ap.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated subset of {list(SIZES)}")
    ap.add_argument("--init", action="append", default=[], metavar="SIZE=DIR",
                    help="SFT checkpoint of a size (default: the path in SIZES, trained there when missing)")
    ap.add_argument("--trl-python", default=os.environ.get("VS_TRL_PYTHON", sys.executable),
                    help="interpreter with TRL installed (default $VS_TRL_PYTHON, else this one)")
    ap.add_argument("--out", default=None, help="directory for run directories, logs and results.json")
    # internal: one TRL chunk
    ap.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--init-from", help=argparse.SUPPRESS)
    ap.add_argument("--save-to", help=argparse.SUPPRESS)
    ap.add_argument("--first-step", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--records", help=argparse.SUPPRESS)
    ap.add_argument("--size", default="h128_l2", help=argparse.SUPPRESS)
    ap.add_argument("--print-settings", action="store_true", help=argparse.SUPPRESS)
    if sys.argv[1:3] == ["--worker", "ours"]:
        return ours_worker(sys.argv[3:])
    args = ap.parse_args()
    if args.worker:
        use_size(args.size)
        return trl_worker(args)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TQDM_DISABLE="1")
    ours_v, trl_v = versions(sys.executable), versions(args.trl_python)
    if trl_v[2] in (None, "None"):
        raise SystemExit(f"trl is not importable by {args.trl_python}.\n{INSTALL}")
    print(f"ours: {sys.executable} torch {ours_v[0]} transformers {ours_v[1]}; "
          f"TRL side: {args.trl_python} torch {trl_v[0]} transformers {trl_v[1]} trl {trl_v[2]}")
    inits = {s: v[3] for s, v in SIZES.items()}
    inits.update(dict(x.split("=", 1) for x in args.init))
    root = args.out or tempfile.mkdtemp(prefix="vs_trl_")
    results, raw = [], {}
    for size in args.sizes.split(","):
        use_size(size)
        init_from = ensure_sft(size, inits[size], args.threads, env)
        print(f"{size}: {check_same_inputs(init_from, args.threads)}", flush=True)
        ours_out, trl_out = os.path.join(root, size, "ours"), os.path.join(root, size, "trl")
        os.makedirs(trl_out, exist_ok=True)
        ours, trl = [], []
        for first in range(0, args.steps, args.chunk):  # A B A B
            n = min(args.chunk, args.steps - first)
            ours += ours_chunk(ours_out, init_from, first + n, args.threads, env)
            trl += trl_chunk(trl_out, init_from, first, n, args.threads, args.trl_python, env)
            print(f"{size}: steps {first}-{first + n - 1}: ours {[round(r['step_s'], 2) for r in ours[-n:]]} "
                  f"TRL {[round(r['step_s'], 2) for r in trl[-n:]]}", flush=True)
        results.append(summarise(size, ours, trl))
        raw[size] = {"ours": ours, "trl": trl}
        with open(os.path.join(root, "results.json"), "w") as f:
            json.dump({"results": results, "raw": raw}, f, indent=1)
    measured = args.steps - -(-args.steps // args.chunk)
    print(f"\nmedian over {measured} steps per side (first step of each "
          f"{args.chunk}-step process dropped), {args.threads} torch thread(s) per side; {root}")
    print_table(results)


if __name__ == "__main__":
    main()

"""graph_grpo.py: the hand-written GRPO loss (DESIGN §6), micro-batch / world-size invariance of the gradient,
rewards on garbage, and subprocess runs (single process, torchrun on gloo, SIGKILL + resume)."""
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import types

import pytest
import torch

import credit
import data
import eval as evaluation
import graph_grpo as gg
import parallel
import policy
import testbed
from config import ConfigError, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rl_cfg(aggregation="token_mean", beta=0.0, max_len=4, micro=32):
    return types.SimpleNamespace(eps_low=0.2, eps_high=0.2, beta=beta, aggregation=aggregation,
                                 max_new_tokens=max_len, micro_batch_size=micro, temperature=1.0)


# ---------------------------------------------------------------------------------------------- loss on hand numbers

W = torch.tensor([[1.5, 0.5], [1.1, 1.0]])
A = torch.tensor([[1.0, -1.0], [2.0, 0.0]])
M = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
# per token -min(w A, clip(w, 0.8, 1.2) A):  (0,0) w 1.5 A 1 -> -1.2 (high-clipped)
#   (0,1) w 0.5 A -1 -> +0.8 (low-clipped)   (1,0) w 1.1 A 2 -> -2.2   (1,1) masked


@pytest.mark.parametrize("aggregation,expected", [
    ("token_mean", (-1.2 + 0.8 - 2.2) / 3),                     # global token mean
    ("seq_mean_token_mean", ((-1.2 + 0.8) / 2 + (-2.2)) / 2),    # mean over sequences of token means
    ("seq_mean_token_sum_norm", ((-1.2 + 0.8) / 4 + (-2.2 / 4)) / 2),  # Dr. GRPO: token sums / max length 4
])
def test_loss_hand_numbers_each_aggregation(aggregation, expected):
    old = torch.zeros(2, 2)
    logp = torch.log(W).requires_grad_(True)
    loss, sums = gg.grpo_loss(logp, old, A, M, rl_cfg(aggregation), n_tokens=3, n_seqs=2)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert sums["clip_ratio/high_mean"].item() == 1 and sums["clip_ratio/low_mean"].item() == 1
    assert sums["clip_ratio/region_mean"].item() == 2
    loss.backward()
    # clipped tokens carry no gradient; the unclipped one d(-w A)/dlogp = -w A
    assert logp.grad[0, 0] == 0 and logp.grad[0, 1] == 0 and logp.grad[1, 1] == 0
    scale = {"token_mean": 1 / 3, "seq_mean_token_mean": 1 / 2, "seq_mean_token_sum_norm": 1 / 8}[aggregation]
    assert logp.grad[1, 0].item() == pytest.approx(-1.1 * 2.0 * scale, abs=1e-6)


def test_clip_is_asymmetric_with_eps_high():
    """eps_low = 0.2, eps_high = 0.28: the ratio is clipped to [0.8, 1.28]. A > 0: 1.25 passes, 1.3 clips at 1.28;
    A < 0: 0.75 clips at 0.8 (with 0.28 on both sides it would pass at 0.75)."""
    w = torch.tensor([1.25, 1.3, 0.75, 0.85])
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    term, clip = gg.clipped_policy_term(torch.log(w), torch.zeros(4), adv, 0.2, 0.28)
    assert term.tolist() == pytest.approx([-1.25, -1.28, 0.8, 0.85])
    assert clip["high"].tolist() == [False, True, False, False]
    assert clip["low"].tolist() == [False, False, True, False]


def test_kl_k3():
    lp = torch.log(torch.tensor([0.5, 0.1, 0.9]))
    assert torch.all(gg.kl_k3(lp, lp) == 0)
    ref = torch.log(torch.tensor([0.25, 0.3, 0.2]))
    kl = gg.kl_k3(lp, ref)
    assert torch.all(kl >= 0)
    assert kl[0].item() == pytest.approx(0.5 + math.log(2) - 1, abs=1e-6)   # exp(-ln 2) + ln 2 - 1


def test_dropped_zero_std_group_gives_zero_gradient_including_kl():
    """The trainer's drop path (credit.zero_std_groups -> gg.kept_rows -> the loss mask): a dropped group's rows get
    no gradient, their KL included; the duplicate prompt of diversified filtering goes too."""
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0])   # group 0 (rows 0-1) has zero std
    G = 2
    zero = credit.zero_std_groups(rewards, G)
    exs = [data.Example("a b", "c", 0), data.Example("b a", "c", 1)]   # the same bags of words
    assert gg.kept_rows(zero, exs, G, False, False).tolist() == [1, 1, 1, 1]
    assert gg.kept_rows(zero, exs, G, False, True).tolist() == [0, 0, 0, 0]
    keep = gg.kept_rows(zero, exs, G, True, False)
    assert keep.tolist() == [0, 0, 1, 1]
    logp = torch.log(torch.full((4, 3), 0.5)).requires_grad_(True)
    ref = torch.log(torch.full((4, 3), 0.3))
    adv = torch.randn(4, 3)
    mask = torch.ones(4, 3) * keep[:, None]
    loss, _ = gg.grpo_loss(logp, logp.detach(), adv, mask, rl_cfg(beta=0.5), float(mask.sum()), float(keep.sum()), ref)
    loss.backward()
    assert torch.all(logp.grad[:2] == 0) and torch.all(logp.grad[2:] != 0)


# ---------------------------------------------------------------------------------------------- rewards

def test_outcome_reward_on_garbage_and_faithfulness():
    schema = data.GraphSchema()
    tok = policy.build_word_tokenizer(testbed.vocabulary(schema))
    vocab = data.TagVocab.from_tokenizer(tok, schema)
    enc = lambda s: policy.encode(tok, s, strict=True)  # noqa: E731
    good = "<q> brand nike </q> <p> brand adidas </p> <f:brand> nike adidas mismatch </f:brand> <y> mismatch </y>"
    unfaithful = good.replace("<y> mismatch", "<y> irrelevant")
    parse = lambda s: data.parse_completion(enc(s), vocab, schema)  # noqa: E731
    r = lambda p, gold, **kw: gg.outcome_reward(p, gold, 4, kw.get("kind", "exact"), -0.5, kw.get("rc", True))  # noqa: E731
    assert r(parse(good), 1) == 1.0 and r(parse(good), 2) == 0.0
    assert r(parse(good), 3, kind="graded") == pytest.approx(1 - 2 / 3)
    assert r(parse(unfaithful), 0) == -0.5                # label ignores its own verdicts: penalty
    assert r(parse(unfaithful), 0, rc=False) == 1.0
    for ids in ([], [5, 5, 5], list(range(40))):
        assert r(data.parse_completion(ids, vocab, schema), 1) == -0.5


# ---------------------------------------------------------------------------------------------- invariances

def _fake_rollouts(seed=0, B=8, vocab=50):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(5, vocab, (int(torch.randint(3, 7, (1,), generator=g)),), generator=g).tolist()
               for _ in range(B // 2)]
    completions = [torch.randint(5, vocab, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
                   for _ in range(B)]
    ids, attn, comp = policy.build_sequences(prompts, completions, pad_id=0)
    T = max(len(c) for c in completions)
    P = ids.shape[1] - T
    # two completions per prompt, group-contiguous: micro-batch sizes that are multiples of 2 take the shared-prompt
    # forward, the others the per-row one, so the invariance tests below compare the two paths as well
    adv = torch.randn(B, T, generator=g)
    ro = gg.Rollouts(ids, attn, comp[:, P:].float(), P, torch.rand(B, generator=g), adv, group_size=2)
    return ro


def _main_batch(ro):
    """A held-out main batch: the rollouts with (random, fixed) outcome advantages."""
    adv = torch.randn(ro.adv.shape, generator=torch.Generator().manual_seed(5))
    return gg.Rollouts(ro.input_ids, ro.attention_mask, ro.completion_mask, ro.prompt_len, ro.rewards, adv)


def _grads(model, ro, rl, world=1, n_tokens=None, n_seqs=None):
    model.zero_grad(set_to_none=True)
    mask = ro.completion_mask
    n_tokens = float(mask.sum()) if n_tokens is None else n_tokens
    n_seqs = float(mask.shape[0]) if n_seqs is None else n_seqs
    gg.accumulate_policy_gradient(model, ro, mask, rl, n_tokens, n_seqs, world)
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_gradient_is_invariant_to_micro_batching(aggregation):
    torch.manual_seed(0)
    model = policy.build_tiny_model(50, 0, 1, 2, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                    intermediate_size=64)
    ro = _fake_rollouts()
    full = _grads(model, ro, rl_cfg(aggregation, max_len=6, micro=8))
    for micro in (1, 3, 4):
        part = _grads(model, ro, rl_cfg(aggregation, max_len=6, micro=micro))
        torch.testing.assert_close(part, full, rtol=1e-5, atol=1e-7)


def _ddp_worker(rank, world, port, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import datetime
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    model = policy.build_tiny_model(50, 0, 1, 2, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                    intermediate_size=64)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    ro = _fake_rollouts()
    half = ro.input_ids.shape[0] // world
    mine = ro.rows(slice(rank * half, (rank + 1) * half), 2)  # whole groups: the shared-prompt forward under DDP
    rl = rl_cfg("token_mean", max_len=6, micro=2)
    n_tokens, n_seqs = float(ro.completion_mask.sum()), float(ro.completion_mask.shape[0])
    grads = _grads(ddp, mine, rl, world, n_tokens, n_seqs)
    # the controller's main-loss gradient G_W and the batch-scale std are whole-batch quantities on every rank
    main = _main_batch(ro).rows(slice(rank * half, (rank + 1) * half), 2)
    grad_W = parallel.all_reduce_sum(gg.main_loss_output_grad(model, main, types.SimpleNamespace(rl=rl), gg.main_counts(main)))
    batch_std = float(parallel.all_gather_cat(mine.rewards).std())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        opt.step()
        _grads(ddp, mine, rl, world, n_tokens, n_seqs)
    params = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.zeros_like(params) for _ in range(world)]
    dist.all_gather(gathered, params)
    # the Eq. 3 controller: rank-local phi gradients differ, the reduced ones (and so alpha) must not
    import credit
    ctl = credit.EdgeController(3, 0.5, window=2, step_size=0.1, reduce_fn=lambda x: parallel.all_reduce_sum(x) / world)
    g = torch.Generator().manual_seed(100 + rank)
    for _ in range(6):
        ctl.accumulate(torch.randn(3, generator=g, dtype=torch.float64) + torch.tensor([1.0, -1.0, 0.0]) * (rank + 1))
    alpha = ctl.alpha().detach().clone()
    alphas = [torch.zeros_like(alpha) for _ in range(world)]
    dist.all_gather(alphas, alpha)
    if rank == 0:
        torch.save({"grads": grads, "params": gathered, "alphas": alphas, "windows": ctl.n_windows,
                    "grad_W": grad_W, "batch_std": batch_std}, out_path)
    dist.barrier()
    # Skip interpreter teardown: destroying the DDP reducer while gloo's worker thread still frees finished work
    # deadlocked on the GIL once here (py-spy: Reducer dealloc vs ProcessGroupGloo::runLoop decref).
    os._exit(0)


def test_gradient_is_invariant_to_world_size_and_ranks_stay_equal(tmp_path):
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "ddp.pt")
    ctx = mp.start_processes(_ddp_worker, args=(2, port, out), nprocs=2, join=False, start_method="spawn")
    deadline = time.time() + 180
    while not ctx.join(timeout=5):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("DDP workers did not finish in 180 s")
    res = torch.load(out)
    model = policy.build_tiny_model(50, 0, 1, 2, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                    intermediate_size=64)
    single = _grads(model, _fake_rollouts(), rl_cfg("token_mean", max_len=6, micro=8))
    torch.testing.assert_close(res["grads"], single, rtol=1e-5, atol=1e-7)
    ro = _fake_rollouts()
    whole = gg.main_loss_output_grad(model, _main_batch(ro), types.SimpleNamespace(rl=rl_cfg("token_mean", max_len=6)))
    torch.testing.assert_close(res["grad_W"], whole, rtol=1e-5, atol=1e-8)
    assert res["batch_std"] == pytest.approx(float(ro.rewards.std()), rel=1e-12)
    assert torch.equal(res["params"][0], res["params"][1])
    assert torch.equal(res["alphas"][0], res["alphas"][1]) and res["windows"] == 3
    assert not torch.equal(res["alphas"][0], torch.full((3,), 0.5, dtype=torch.float64))  # the controller moved


def test_prompt_order_is_a_pure_function_of_the_step():
    a = gg.step_prompt_indices(5, 1, 2, 4, 100, 0)
    assert a == gg.step_prompt_indices(5, 1, 2, 4, 100, 0)
    # world 1 with 8 prompts per step covers exactly the prompts of world 2's two ranks
    both = gg.step_prompt_indices(5, 0, 2, 4, 100, 0) + a
    assert both == gg.step_prompt_indices(5, 0, 1, 8, 100, 0)


def test_bad_config_is_rejected_with_the_key():
    with pytest.raises(ValueError, match="rl.num_generations"):
        load_config("configs/tiny.yaml", ["--rl.num_generations=1"])
    with pytest.raises(ValueError, match="rl.num_iterations"):
        load_config("configs/tiny.yaml", ["--rl.num_iterations=0"])


# ---------------------------------------------------------------------------------------------- subprocess runs

def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", GG_DIST_TIMEOUT="120", TQDM_DISABLE="1")
    return env


def _run(args, cwd=ROOT, timeout=300):
    return subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def sft_ckpt(tmp_path_factory):
    """One tiny SFT checkpoint shared by the RL subprocess tests."""
    root = tmp_path_factory.mktemp("sft")
    r = _run([sys.executable, "sft_mask.py", "configs/tiny.yaml", f"--run.out_dir={root}",
              f"--data.dir={root}/data", "--eval.max_items=8"])
    assert r.returncode == 0, r.stderr[-3000:]
    return str(root / "sft" / "checkpoint"), f"{root}/data"


def _rl_args(out, sft_ckpt, *extra):
    ckpt, data_dir = sft_ckpt
    return ["graph_grpo.py", "configs/tiny.yaml", f"--run.out_dir={out}", f"--data.dir={data_dir}",
            f"--rl.init_from={ckpt}", "--eval.max_items=8", "--run.num_threads=1", *extra]


def test_single_process_run_writes_metrics_samples_and_eval(tmp_path, sft_ckpt):
    out = tmp_path / "run"
    r = _run([sys.executable, *_rl_args(out, sft_ckpt, "--credit.mode=outcome", "--controller.mode=fixed",
                                        "--rl.eval_every=2", "--rl.eval_items=6")])
    assert r.returncode == 0, r.stderr[-3000:]
    import json
    lines = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert len(lines) == 2
    for key in ("reward", "reward_std", "frac_reward_zero_std", "kl", "entropy", "clip_ratio/low_mean",
                "clip_ratio/high_mean", "clip_ratio/region_mean", "completions/mean_length",
                "completions/clipped_ratio", "grad_norm", "lr", "format_rate", "tokens_per_s"):
        assert key in lines[0], key
    assert "eval/test_id/accuracy" in lines[1] and "eval/test_id/accuracy" not in lines[0]
    assert_learning_signal(lines)
    # the drift curve's start is the SFT policy itself, on the first rl.eval_items items
    ckpt, data_dir = sft_ckpt
    cfg = load_config("configs/tiny.yaml", [f"--data.dir={data_dir}"])
    task = testbed.load_task(cfg)
    model, tok = policy.load_policy(ckpt, task.schema.words())
    want = evaluation.evaluate_policy(model, tok, task, {"test_id": task.splits["test_id"][:6]}, cfg.eval)
    assert lines[0]["eval_start/test_id/accuracy"] == want["test_id"]["accuracy"]
    assert (out / "samples.jsonl").stat().st_size > 0
    assert (out / "eval.json").exists() and (out / "checkpoint" / "config.json").exists()


def test_torchrun_two_ranks_on_gloo(tmp_path, sft_ckpt):
    """2 ranks train one model: at every checkpoint the ranks' parameters, optimizer moments and alpha are the
    same (ddp/replica_max_diff, from all-gathered digests), on a run that learns and moves alpha (with the label
    probe on: each rank probes its own rollouts)."""
    out = tmp_path / "ddp"
    r = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
              *_rl_args(out, sft_ckpt, "--credit.mode=graph", "--controller.mode=meta", "--controller.accumulate=2",
                        "--controller.snr_z=0.5", "--rl.steps=6", "--run.save_every=3", "--credit.probe_weight=1")])
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "checkpoint" / "config.json").exists()
    lines = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert_learning_signal(lines)
    digests = [rec["ddp/replica_max_diff"] for rec in lines if "ddp/replica_max_diff" in rec]
    assert len(digests) == 2 and digests == [0.0, 0.0]
    assert any(a != 1.0 for rec in lines for k, a in rec.items() if k.startswith("alpha/"))
    assert all(rec["probe/inputs"] > 0 for rec in lines if "step" in rec and "reward" in rec)


def assert_learning_signal(lines):
    """A smoke run exercises credit, controller and loss on real signal: parseable CoTs, rewards, nonzero
    advantages (tiny.yaml's SFT writes a parseable CoT most of the time)."""
    assert max(rec["format_rate"] for rec in lines) > 0.3
    assert max(rec["reward"] for rec in lines) > 0
    assert max(rec["credit/outcome_abs_adv"] for rec in lines) > 0


def test_sigkill_then_resume_ends_in_the_same_state(tmp_path, sft_ckpt):
    extra = ["--rl.steps=6", "--run.save_every=2", "--credit.mode=graph", "--controller.mode=meta",
             "--controller.accumulate=2"]
    ref = tmp_path / "ref"
    r = _run([sys.executable, *_rl_args(ref, sft_ckpt, *extra)])
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, *_rl_args(out, sft_ckpt, *extra)], cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "checkpoints" / "step_000002").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "checkpoint").exists(), "the run finished before it could be killed"
    r = _run([sys.executable, *_rl_args(out, sft_ckpt, *extra)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stdout
    import json
    steps = [json.loads(x)["step"] for x in open(out / "metrics.jsonl")]
    assert steps == list(range(6))      # the killed run's lines after its checkpoint were replaced, not doubled
    assert_learning_signal([json.loads(x) for x in open(out / "metrics.jsonl")])
    a, _ = policy.load_policy(str(ref / "checkpoint"), [])
    b, _ = policy.load_policy(str(out / "checkpoint"), [])
    start, _ = policy.load_policy(sft_ckpt[0], [])
    moved = False
    for (n, p), (_, q), (_, p0) in zip(a.named_parameters(), b.named_parameters(), start.named_parameters()):
        assert torch.equal(p, q), n
        moved = moved or not torch.equal(p, p0)
    assert moved  # the run learned: equal end states are not both the start


def test_a_finished_run_lengthened_on_resume_is_the_longer_run(tmp_path, sft_ckpt):
    """rl.steps is resume-free (checkpoint.RESUME_FREE): a finished 4-step run resumed with --rl.steps=6 must end where
    an uninterrupted 6-step run ends (weights, every logged reward and alpha). The 'long' study relies on it: its
    400-step runs are the 200-step runs of earlier studies, resumed. It fails if anything of a step depends on the
    run's length (a learning-rate schedule over rl.steps, a prompt order drawn per run) or if the final checkpoint
    holds less state than a periodic one (optimizer, controller buffer)."""
    extra = ["--run.save_every=2", "--credit.mode=graph", "--controller.mode=meta", "--controller.accumulate=2",
             "--controller.rule=sequential"]
    ref, out = tmp_path / "ref", tmp_path / "lengthened"
    for d, steps in ((ref, 6), (out, 4), (out, 6)):
        r = _run([sys.executable, *_rl_args(d, sft_ckpt, f"--rl.steps={steps}", *extra)])
        assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stdout
    import json
    logs = [[json.loads(x) for x in open(d / "metrics.jsonl")] for d in (ref, out)]
    assert [x["step"] for x in logs[1]] == list(range(6))
    keys = ["reward", "loss"] + [k for k in logs[0][-1] if k.startswith("alpha/")]
    assert [[x[k] for k in keys] for x in logs[0]] == [[x[k] for k in keys] for x in logs[1]]
    a, _ = policy.load_policy(str(ref / "checkpoint"), [])
    b, _ = policy.load_policy(str(out / "checkpoint"), [])
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n


# ---------------------------------------------------------------------------------------------- seed-paper baselines

def _parsed(text):
    schema = data.GraphSchema()
    tok = policy.build_word_tokenizer(testbed.vocabulary(schema))
    vocab = data.TagVocab.from_tokenizer(tok, schema)
    return data.parse_completion(policy.encode(tok, text, strict=True), vocab, schema), tok, schema


GOOD = "<q> brand nike </q> <p> brand adidas </p> <f:brand> nike adidas mismatch </f:brand> <y> mismatch </y>"


def test_rule_shaped_reward_hand_numbers():
    p, _, _ = _parsed(GOOD)
    bad, _, _ = _parsed(GOOD.replace("<y> mismatch", "<y> excellent"))   # label ignores its own verdict
    scores = [{"q": (1.0, float("nan")), "p": (0.5, float("nan")), "f:brand": (1.0, 1.0)},
              {"q": (0.0, float("nan"))}]
    r = gg.shaped_rewards(torch.tensor([1.0, 0.0]), [p, bad], scores, [0.5, 0.2])
    # 1 + 0.5 * consistent + 0.2 * mean(1, 0.5, 1);  0 + 0.5 * 0 + 0.2 * 0
    assert r.tolist() == pytest.approx([1 + 0.5 + 0.2 * 2.5 / 3, 0.0])


def test_guided_replay_replaces_only_low_groups():
    _, tok, schema = _parsed(GOOD)
    ex_lo = data.Example("nike", "adidas sneakers", 1, cot={"q": "brand nike", "p": "brand adidas",
                                                           "f:brand": "nike adidas mismatch", "y": "mismatch"})
    ex_hi = data.Example("nike", "nike sneakers", 3, cot=None)
    comps = [[7], [8], [9], [10], [11], [12]]
    rewards = torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0, 1.0])
    n = gg.guided_replay(comps, [ex_lo, ex_hi], rewards, 3, 0.0, 2, tok, schema, strict=True)
    gold = policy.encode(tok, data.serialize_cot(ex_lo.cot, schema), True) + [tok.eos_token_id]
    assert n == 1 and comps[0] == [7] and comps[1] == gold and comps[2] == gold
    assert comps[3:] == [[10], [11], [12]]         # the other group is above the threshold


def test_repair_replay_writes_the_unique_repair_only():
    """graph_grpo.repair_replay under the default rule (brand [3, 2, 1]: match -> excellent, mismatch -> mismatch): a
    failed 'brand match, excellent' answer to a mismatch pair has one repair, brand -> mismatch, and becomes GOOD,
    which earns reward 1; an all-match answer over brand and size has two repairs and is kept; at most k per group;
    a group above the threshold is left alone; the gold-verdict count reads the example's step verdicts."""
    p_good, tok, schema = _parsed(GOOD)
    vocab = data.TagVocab.from_tokenizer(tok, schema)
    wrong = GOOD.replace("adidas mismatch", "adidas match").replace("<y> mismatch", "<y> excellent")
    two = ("<q> brand nike size 13_inch </q> <p> brand adidas size 15_inch </p> <f:brand> nike adidas match </f:brand> "
           "<f:size> 13_inch 15_inch match </f:size> <y> excellent </y>")
    texts = [two, wrong, wrong, GOOD, wrong, wrong]
    comps = [policy.encode(tok, t, True) + [tok.eos_token_id] for t in texts]
    parses = [data.parse_completion(c, vocab, schema) for c in comps]
    ex = data.Example("nike", "adidas", 1, nodes={"brand": "mismatch"})
    rewards = torch.tensor([gg.outcome_reward(p, 1, 4, "exact", 0.0, True) for p in parses])
    assert rewards.tolist() == [0, 0, 0, 1, 0, 0]
    before = [list(c) for c in comps]
    n = gg.repair_replay(comps, parses, [ex, ex], rewards, 3, 0.0, 1, tok, schema)
    good = policy.encode(tok, GOOD, True) + [tok.eos_token_id]
    assert n == (1, 1, 1)
    assert comps[0] == before[0] and comps[1] == good and comps[2] == before[2]  # two repairs: kept; k = 1
    assert comps[3:] == before[3:]                                              # mean 1/3 > threshold 0
    assert gg.outcome_reward(data.parse_completion(comps[1], vocab, schema), 1, 4, "exact", 0.0, True) == 1.0
    comps = [list(c) for c in before]
    n = gg.repair_replay(comps, parses, [data.Example("nike", "adidas", 1), ex], rewards, 3, 0.5, 3, tok, schema)
    assert n == (2, 4, 2) and comps[1] == comps[2] == comps[4] == comps[5] == good and comps[0] == before[0]


def test_repair_replay_in_the_loop_adds_exactly_its_repaired_rewards(tmp_path, sft_ckpt):
    """One tiny RL step with and without rl.repair_replay (every group eligible: threshold 1, k = G), same sampling
    seed: the first step's logged reward differs by exactly (rollouts repaired) / (rollouts), since a repaired answer
    earns 1 where its valid, failed original earned 0 (exact reward), and the loop re-packs and re-scores them."""
    runs = {}
    for name, extra in (("plain", ()), ("repair", ("--rl.repair_replay=true", "--rl.replay_threshold=1.0",
                                                   "--rl.replay_k=4"))):
        out = tmp_path / name
        r = _run([sys.executable, *_rl_args(out, sft_ckpt, "--rl.steps=1", "--credit.mode=outcome",
                                            "--controller.mode=fixed", "--reward.kind=exact", *extra)])
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = json.loads(open(out / "metrics.jsonl").readline())
    n, rep = 16, runs["repair"]["repair_replay/rollouts"]
    assert rep > 0 and runs["plain"]["repair_replay/rollouts"] == 0
    assert runs["repair"]["reward"] == pytest.approx(runs["plain"]["reward"] + rep / n)
    assert 0 <= runs["repair"]["repair_replay/gold_verdicts"] <= rep


def test_repaired_cot_of_a_pooled_node_follows_the_rule():
    """data.repaired_cot on the paper's graph: changing brand inside the pooled 'ma' node rewrites its pooled verdict
    (brand mismatch -> mismatch) and the label, keeps every other word, and parses as a valid consistent answer;
    single_verdict_repairs finds that repair alone (category -> partial gives related, colour at most related)."""
    schema = data.GraphSchema.from_config(load_config("configs/paper.yaml").graph)
    tok = policy.build_word_tokenizer(testbed.vocabulary(schema))
    vocab = data.TagVocab.from_tokenizer(tok, schema)
    text = ("<qs> category shoes </qs> <qa> brand nike color red </qa> <ps> category shoes </ps> "
            "<pa> brand adidas color red </pa> <ms> shoes shoes match </ms> "
            "<ma> brand nike adidas match color red red match match </ma> <y> excellent </y>")
    parsed = data.parse_completion(policy.encode(tok, text, True), vocab, schema)
    assert parsed.valid and parsed.consistent
    assert data.single_verdict_repairs(parsed, 1, schema) == [("brand", "mismatch")]
    cot = data.repaired_cot(parsed, "brand", "mismatch", 1, schema)
    assert cot["ma"] == "brand nike adidas mismatch color red red match mismatch" and cot["y"] == "mismatch"
    assert cot["qa"] == "brand nike color red" and cot["ms"] == "shoes shoes match"
    fixed = data.parse_completion(policy.encode(tok, data.serialize_cot(cot, schema), True), vocab, schema)
    assert fixed.valid and fixed.consistent and fixed.label == 1 and fixed.verdicts["brand"] == "mismatch"
    assert data.single_verdict_repairs(data.ParsedCoT(valid=False, verdicts=parsed.verdicts), 1, schema) == []


def test_credit_modes_map_onto_one_machinery():
    cr = lambda *o: gg.Credit.from_config(load_config("configs/tiny.yaml", list(o)))  # noqa: E731
    c = cr("--credit.mode=process", "--credit.evidence=group")
    assert c.kwargs["mode"] == "graph" and c.kwargs["evidence"] == "verifier" and c.alpha_init == 0.0
    assert c.scores == "verifier" and not c.learns_alpha and c.uses_verifier_weights and not c.diversified
    c = cr("--credit.mode=rule_shaped")
    assert c.kwargs["mode"] == "outcome" and c.shaped and c.scores == "verifier"
    c = cr("--credit.mode=stepwise")
    assert c.scores == "gold" and c.diversified
    c = cr("--credit.mode=graph", "--credit.evidence=group")
    assert c.kwargs["evidence"] == "group" and c.kwargs["scale"] == "group_outcome" and c.scores is None
    assert c.learns_alpha and not c.uses_verifier_weights
    assert not cr("--credit.mode=graph", "--credit.evidence=baseline").learns_alpha
    with pytest.raises(ValueError, match="credit.scale = node"):
        cr("--credit.mode=outcome", "--credit.scale=node")
    c = cr("--credit.mode=graph", "--credit.evidence=group", "--credit.shield=verifier")
    assert c.kwargs["shield"] == "verifier" and c.scores == "verifier" and not c.uses_verifier_weights
    assert c.kwargs["shield_verdicts"] == ("right", "wrong")
    assert cr("--credit.mode=graph", "--credit.shield=verifier", "--credit.shield_verdicts=[wrong]"
              ).kwargs["shield_verdicts"] == ("wrong",)
    with pytest.raises(ConfigError, match="credit.shield_verdicts"):
        cr("--credit.shield_verdicts=[blame]")
    assert c.kwargs["shield_label"] is False
    assert cr("--credit.mode=graph", "--credit.shield=verifier", "--credit.shield_label=true").kwargs["shield_label"]
    with pytest.raises(ConfigError, match="credit.shield_label"):
        cr("--credit.shield_label=true")  # tiny.yaml has no credit section: the dataclass default shield none
    assert "shield" not in cr("--credit.mode=outcome", "--credit.shield=verifier").kwargs  # no propagation there


def test_diversified_filtering_and_curriculum():
    a = data.Example("nike red sneakers", "nike sneakers color red", 3)
    b = data.Example("red nike sneakers", "sneakers nike color red", 3)   # same bags of words
    c = data.Example("crimson sofa", "ikea sofa color red", 2)
    assert gg.duplicate_groups([a, b, c]).tolist() == [False, True, False]
    sft = [a] * 5
    stages = gg.curriculum_stage_of([a, c, b, c], sft, 2)
    assert stages == [0, 1, 0, 1]       # c has rare words (crimson, sofa, ikea) vs the SFT split
    idx = gg.step_prompt_indices(0, 0, 1, 4, 4, 0, allowed=[0, 2])
    assert set(idx) <= {0, 2}


def test_gold_local_scores_put_correctness_in_the_comparator_slot():
    p, _, schema = _parsed(GOOD)
    ex = data.Example("nike", "adidas sneakers", 1, nodes={"brand": "match"},
                      cot={"q": "brand nike", "p": "brand adidas", "f:brand": "nike adidas match", "y": "mismatch"})
    s = gg.local_node_scores([p], [ex], schema, testbed.Catalogue().head_compare, "gold")[0]
    assert s["f:brand"][1] == 0.0 and math.isnan(s["f:brand"][0])    # gold says match, the rollout said mismatch
    assert s["q"][1] == 1.0 and s["y"][1] == 1.0


def test_controller_output_grad_from_the_update_forward_equals_a_fresh_forward():
    """controller.reuse_forward: G_W read off the update's own forward (any micro-batching) equals the G_W of
    a separate forward on the same rollouts at the same parameters (main_loss_output_grad)."""
    torch.manual_seed(0)
    model = policy.build_tiny_model(50, 0, 1, 2, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                    intermediate_size=64)
    ro = _fake_rollouts()
    rl = rl_cfg("token_mean", max_len=6, micro=3)
    rl.temperature = 0.7
    main_adv = torch.randn_like(ro.adv)
    main = gg.Rollouts(ro.input_ids, ro.attention_mask, ro.completion_mask, ro.prompt_len, ro.rewards, main_adv)
    fresh = gg.main_loss_output_grad(model, main, types.SimpleNamespace(rl=rl))
    mask = ro.completion_mask
    _, from_update = gg.accumulate_policy_gradient(model, ro, mask, rl, float(mask.sum()), 8.0, 1, main_adv=main_adv)
    torch.testing.assert_close(from_update, fresh, rtol=1e-5, atol=1e-8)
    assert fresh.abs().sum() > 0


def test_credit_batch_gate_follows_the_schema_label_rule():
    """The F -> Y instance gate is the label rule's own counterfactual: with WANDS's 3 grades ([0, 1, 1, 2]) a brand
    mismatch next to a colour partial no longer changes the label when the brand is fixed (1 -> 2 both map to 1)."""
    text = ("<q> category sneakers brand nike color red </q> <p> category sneakers brand adidas color crimson </p> "
            "<f:category> sneakers sneakers match </f:category> <f:brand> nike adidas mismatch </f:brand> "
            "<f:color> red crimson partial </f:color> <y> mismatch </y>")
    p, _, schema4 = _parsed(text)
    assert p.valid
    schema3 = data.GraphSchema(label_names=("irrelevant", "partial", "exact"), label_rule=(0, 1, 1, 2))
    slots = schema4.slots
    brand, y = slots.index("f:brand"), slots.index("y")
    for schema, want in ((schema4, 1.0), (schema3, 0.0)):
        cb = gg.credit_batch([p], torch.tensor([1.0]), 1, schema, 40, None, with_values=False)
        assert cb.gate[0, brand, y].item() == want


def test_credit_batch_marks_the_steps_a_parse_problem_names():
    """credit_batch's clean slots (credit.unparsed = nodes): a colour verdict the query evidence did not ask for makes
    the answer fail to parse, and only that step is not clean; in an answer that parses every present step is."""
    text = ("<q> category sneakers </q> <p> category sneakers color red </p> "
            "<f:category> sneakers sneakers match </f:category> <f:color> crimson red match </f:color> <y> excellent </y>")
    p, _, schema = _parsed(text)
    assert not p.valid and any(pr.startswith("f:color:") for pr in p.problems)
    good, _, _ = _parsed(text.replace("<f:color> crimson red match </f:color> ", ""))
    assert good.valid
    cb = gg.credit_batch([p, good], torch.tensor([0.0, 1.0]), 2, schema, 60, None)
    cb.validate()
    clean = {n: cb.clean[0, v].item() for v, n in enumerate(schema.slots) if cb.present[0, v]}
    assert clean == {"q": True, "p": True, "f:category": True, "f:color": False, "y": True}
    assert cb.clean[1][cb.present[1]].all()
    c = gg.Credit.from_config(load_config("configs/tiny.yaml", ["--credit.mode=graph", "--credit.unparsed=nodes"]))
    assert c.kwargs["unparsed"] == "nodes"
    assert "unparsed" not in gg.Credit.from_config(load_config("configs/tiny.yaml", ["--credit.mode=outcome",
                                                                                     "--credit.unparsed=nodes"])).kwargs
    with pytest.raises(ConfigError, match="credit.unparsed"):
        load_config("configs/tiny.yaml", ["--credit.unparsed=tokens"])


def test_complete_shield_does_not_call_an_unjudged_verdict_right():
    """credit.shield = complete on a parsed CoT: the colour verdict's comparator abstains on 'crimson' (a form the
    head-only comparator does not know), so its grounding 1 alone does not make it right (the verifier shield calls
    it right); the category verdict, judged by the comparator, is right under both; the label as before."""
    text = ("<q> category sneakers color crimson </q> <p> category sneakers color red </p> "
            "<f:category> sneakers sneakers match </f:category> <f:color> crimson red match </f:color> <y> excellent </y>")
    p, _, schema = _parsed(text)
    ex = data.Example("crimson sneakers", "nike sneakers color red size us_9", 3)
    task = testbed.Task(schema, {}, testbed.Catalogue(), True, "abstain")
    scores = gg.local_node_scores([p], [ex], schema, task.comparator, "verifier")
    cb = gg.credit_batch([p], torch.tensor([1.0]), 1, schema, 60, scores)
    cb.validate()
    slots = schema.slots
    color, cat, y, q = (slots.index(n) for n in ("f:color", "f:category", "y", "q"))
    assert cb.judging.tolist() == [[False, schema.slot_info[n].type.role == "verdict"] for n in slots]
    loose = credit.verified_steps(cb.scores, cb.present)[0]
    complete = credit.verified_steps(cb.scores, cb.present, cb.judging)[0]
    assert loose[color] == 1 and complete[color] == 0
    assert loose[cat] == complete[cat] == 1 and loose[y] == complete[y] == 1 and loose[q] == complete[q] == 1
    assert cb.shielded_slots.all()  # credit.shield_roles' default: every role that has children
    only = gg.credit_batch([p], torch.tensor([1.0]), 1, schema, 60, scores, shield_roles=["verdict"]).shielded_slots
    assert only.tolist() == [schema.slot_info[n].type.role == "verdict" for n in slots] and only.any()
    c = gg.Credit.from_config(load_config("configs/tiny.yaml", ["--credit.mode=graph", "--credit.shield=complete"]))
    assert c.kwargs["shield"] == "complete" and c.scores == "verifier"


def test_prompt_indices_follow_one_seeded_permutation_per_epoch():
    """Step 2 of 4 prompts in a pool of 10 spans epochs 0 and 1: positions 8, 9 of epoch 0's permutation, then
    0, 1 of epoch 1's (the per-epoch shuffle is computed once per step, the result is the plain definition)."""
    import random
    want = [random.Random(3 * 7919 + e).sample(range(10), 10)[p] for e, p in ((0, 8), (0, 9), (1, 0), (1, 1))]
    assert gg.step_prompt_indices(2, 0, 1, 4, 10, 3) == want


def test_trimmed_micro_batches_give_the_untrimmed_log_probs_and_token_dots():
    """Sorting rows by length and trimming each micro-batch's all-pad columns changes no number: the controller's
    d_t written back row by row equals d_t from one untrimmed forward over the original row order."""
    torch.manual_seed(0)
    model = policy.build_tiny_model(50, 0, 1, 2, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                    intermediate_size=64)
    ro = _fake_rollouts(seed=3)
    sub = ro.rows(torch.tensor([5, 1])).trimmed()
    T = sub.completion_mask.shape[1]
    assert T <= ro.adv.shape[1] and sub.input_ids.shape[1] - sub.prompt_len == T
    full = gg.logprobs_of(model, ro.rows(torch.tensor([5, 1])), 1.0).logprobs
    torch.testing.assert_close(gg.logprobs_of(model, sub, 1.0).logprobs, full[:, :T], rtol=1e-5, atol=1e-6)
    assert full[:, T:].abs().sum() == 0
    rl = rl_cfg("token_mean", max_len=6, micro=3)
    main = gg.Rollouts(ro.input_ids, ro.attention_mask, ro.completion_mask, ro.prompt_len, ro.rewards,
                       torch.randn_like(ro.adv))
    grad_W = gg.main_loss_output_grad(model, main, types.SimpleNamespace(rl=rl))
    mask = ro.completion_mask
    d = torch.zeros_like(ro.adv)
    gg.accumulate_policy_gradient(model, ro, mask, rl, float(mask.sum()), 8.0, 1, grad_W=grad_W, d_out=d)
    out = gg.logprobs_of(model, ro.rows(slice(None)), 1.0, hidden=True)  # group_size 1: the per-row forward
    want = credit.output_layer_token_dots(out.hidden.detach().float(), out.logits.detach(),
                                          ro.completion_ids, grad_W, 1.0)
    torch.testing.assert_close(d * mask, want * mask, rtol=1e-5, atol=1e-8)
    assert (d * mask).abs().sum() > 0


def test_refactor_keeps_the_reference_run():
    """Two short tiny Graph-GRPO runs (group and group + verifier evidence, meta controller that moves alpha,
    drift evaluations) end with the metrics recorded before the refactor of issue 11 and the same parameters
    (tests/data/reference_runs.json, CPU, torch 2.13.0), to float rounding: other CPUs sum in other orders, so the
    record is compared within reference_run's tolerances (its comment gives the rounding and a real change measured
    against them). Regenerate with `python tests/reference_run.py --write` only when a change is meant to alter the
    numbers, and say so in its commit."""
    import reference_run
    want = json.load(open(reference_run.REFERENCE))
    with tempfile.TemporaryDirectory() as tmp:
        for name in reference_run.RUNS:
            got = reference_run.run(name, tmp)
            assert any(r["reward"] > 0 and r["format_rate"] > 0 for r in got["metrics"])
            assert any(a != 1.0 for r in got["metrics"] for k, a in r.items() if k.startswith("alpha/"))
            assert reference_run.mismatches(got, want[name]) == [], name


def test_reference_run_tolerances_catch_a_change():
    """reference_run.mismatches: the record matches itself, a metric moved by 1% of its scale or a parameter
    fingerprint moved by 0.1% of the tensor's norm is reported, and so is a non-float metric that differs."""
    import copy

    import reference_run
    want = json.load(open(reference_run.REFERENCE))["graph_meta"]
    assert reference_run.mismatches(want, want) == []
    got = copy.deepcopy(want)
    got["metrics"][2]["grad_norm"] *= 1.01
    assert [m.split(":")[0] for m in reference_run.mismatches(got, want)] == ["step 2 grad_norm"]
    got = copy.deepcopy(want)
    name, fp = next(iter(got["params_fingerprint"].items()))
    fp[2] += 1e-3 * fp[1] ** 0.5
    assert [m.split(":")[0] for m in reference_run.mismatches(got, want)] == [f"parameter {name}"]
    got = copy.deepcopy(want)
    got["metrics"][0]["step"] = 1
    assert len(reference_run.mismatches(got, want)) == 1


def test_monte_carlo_node_values_telescope_are_reproducible_and_shared():
    """Eq. 1c (DESIGN 4.1) in the trainer: on a parsed rollout of a mixed group, the node credits (alpha 0, no scale)
    sum to R_i - Vhat(start) (Vhat(start) = the group's mean reward), the value after the last node is R_i, a prefix
    shared by rollouts of a group is sampled once, and a second call with the same seed gives the same values."""
    schema = data.GraphSchema()
    cfg = load_config("configs/tiny.yaml", ["--credit.evidence=rollout", "--credit.rollout_samples=3"])
    splits = testbed.generate_splits(schema, 5, 8, 0, 0, 0, 0.0, 0.5)
    tok = policy.build_word_tokenizer(testbed.vocabulary(schema, splits["sft"]))
    model = policy.build_tiny_model(len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, hidden_size=32,
                                    num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
    vocab = data.TagVocab.from_tokenizer(tok, schema)
    s = types.SimpleNamespace(cfg=cfg, model=model, tokenizer=tok, vocab=vocab, task=types.SimpleNamespace(schema=schema))
    exs, G = splits["sft"][:2], 4
    prompts = [policy.encode(tok, data.format_prompt(e.query, e.product), True) for e in exs]
    gold = [policy.encode(tok, data.serialize_cot(e.cot, schema), True) + [tok.eos_token_id] for e in exs]
    # group 0: the gold CoT twice and two truncations (mixed rewards); group 1: the gold CoT four times (zero std)
    comps = [gold[0], gold[0], gold[0][:9], gold[0][:5]] + [gold[1]] * 4
    ro = gg.Rollouts(*gg.pack(prompts, comps, tok.pad_token_id, "cpu"), group_size=G, examples=exs, completions=comps)
    gg.score_rollouts(ro, vocab, schema, cfg.reward)
    assert ro.rewards.tolist() == [1, 1, 0, 0, 1, 1, 1, 1]
    cb = gg.credit_batch(ro.parses, ro.rewards, G, schema, ro.completion_mask.shape[1], None)
    values, cost = gg.monte_carlo_values(s, ro, prompts, cb, seed=3)
    again, _ = gg.monte_carlo_values(s, ro, prompts, cb, seed=3)
    assert torch.equal(values, again) and cost["mc/continuations"] == 3 * cost["mc/prefixes"] > 0
    # the two identical gold rollouts share every prefix: one group's worth of boundaries, sampled once
    n_boundaries = int(cb.present[0].sum()) - 1   # inner boundaries of a contiguous chain
    assert cost["mc/prefixes"] == n_boundaries
    cb.values = values
    A, a = credit.graph_node_advantages(cb, evidence="rollout", scale="none",
                                        alpha=torch.zeros(len(schema.edge_kinds), dtype=torch.float64))
    for i in (0, 1):   # parsed rows of the mixed group
        assert a[i].sum().item() == pytest.approx(ro.rewards[i].item() - 0.5, abs=1e-12)
        y = schema.slots.index("y")
        assert values[i, y, 1] == ro.rewards[i]
    assert (a[4:] == 0).all()                      # the zero-std group: no samples, no own evidence
    assert torch.equal(values[4:], ro.rewards[4:, None, None].double().expand(4, len(schema.slots), 2))


def test_step_masked_hides_one_steps_content_and_keeps_tags():
    """graph_grpo.step_masked by hand: tags 100-105; the step spans positions 3..7 (its tags 3 and 7 kept, its
    content 4-6 masked as 9), the input stops at position 10 (the label's open tag, 10 exclusive)."""
    comp = [100, 1, 101, 102, 2, 3, 4, 103, 104, 5, 105, 6]
    tags = {100, 101, 102, 103, 104, 105}
    assert gg.step_masked(comp, (3, 8), 10, tags, 9) == [100, 1, 101, 102, 9, 9, 9, 103, 104, 5]
    assert gg.step_masked(comp, (0, 0), 12, {100}, 9) == comp   # an empty span masks nothing


def test_step_probes_equal_a_direct_forward_per_input_and_do_not_depend_on_chunking():
    """credit.probe_weight's evidence (graph_grpo.step_probes): on a verdict step, E[r] of the label belief after the
    CoT minus the same with the step masked, each read by a plain one-row forward here; NaN on understanding steps,
    the label and unparsed rollouts; identical inputs of a group run once; one input per chunk gives the same."""
    schema = data.GraphSchema()
    cfg = load_config("configs/tiny.yaml", ["--credit.mode=graph", "--credit.evidence=outcome",
                                            "--credit.probe_weight=1", "--reward.kind=graded"])
    splits = testbed.generate_splits(schema, 5, 8, 0, 0, 0, 0.0, 0.5)
    tok = policy.build_word_tokenizer(testbed.vocabulary(schema, splits["sft"]))
    torch.manual_seed(0)
    model = policy.build_tiny_model(len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, hidden_size=32,
                                    num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
    vocab = data.TagVocab.from_tokenizer(tok, schema)
    s = types.SimpleNamespace(cfg=cfg, model=model, tokenizer=tok, vocab=vocab,
                              task=types.SimpleNamespace(schema=schema, strict=True))
    exs, G = splits["sft"][:2], 4
    prompts = [policy.encode(tok, data.format_prompt(e.query, e.product), True) for e in exs]
    gold = [policy.encode(tok, data.serialize_cot(e.cot, schema), True) + [tok.eos_token_id] for e in exs]
    comps = [gold[0], gold[0], gold[0][:5], gold[0]] + [gold[1]] * 3 + [[tok.eos_token_id]]
    ro = gg.Rollouts(*gg.pack(prompts, comps, tok.pad_token_id, "cpu"), group_size=G, examples=exs, completions=comps)
    gg.score_rollouts(ro, vocab, schema, cfg.reward)
    cb = gg.credit_batch(ro.parses, ro.rewards, G, schema, ro.completion_mask.shape[1], None)
    assert cfg.rl.temperature == 0.7   # the belief is read at the sampling temperature
    probes, cost = gg.step_probes(s, ro, prompts, cb)
    labels = gg.label_token_ids(tok, schema, True)
    assert labels == [tok.convert_tokens_to_ids(n) for n in schema.label_names]
    tags, mask_id = set(vocab.id_to_tag), tok.convert_tokens_to_ids(policy.SPECIAL_TOKENS["mask_token"])
    y = schema.slots.index("y")
    L = len(schema.label_names)

    def expected_reward(i, ids):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompts[i // G] + ids])).logits[0, -1]
        belief = torch.softmax(logits[labels].double() / 0.7, -1)   # tiny.yaml's rl.temperature
        return float(sum(belief[l] * (1 - abs(l - exs[i // G].label) / (L - 1)) for l in range(L)))

    checked = 0
    for i in range(len(comps)):
        for v, name in enumerate(schema.slots):
            verdict = schema.slot_info[name].type.role == "verdict"
            if not (verdict and cb.parsed[i] and cb.present[i, v] and cb.present[i, y]):
                assert math.isnan(probes[i, v]), (i, name)
                continue
            stop = int(cb.spans[i, y, 0]) + 1
            full = expected_reward(i, comps[i][:stop])
            a, b = int(cb.spans[i, v, 0]), int(cb.spans[i, v, 1])
            masked = [mask_id if a <= k < b and t not in tags else t for k, t in enumerate(comps[i][:stop])]
            assert masked != comps[i][:stop]
            assert probes[i, v].item() == pytest.approx(full - expected_reward(i, masked), abs=1e-5)
            checked += 1
    n0, n1 = int(cb.present[0].sum()) - 3, int(cb.present[4].sum()) - 3   # verdict steps of each gold CoT
    assert checked == 3 * n0 + 3 * n1 and not cb.parsed[7]
    assert cost["probe/inputs"] == (1 + n0) + (1 + n1)   # the repeated rollouts share their inputs
    s.cfg.eval.batch_size = 1
    again, _ = gg.step_probes(s, ro, prompts, cb)
    torch.testing.assert_close(again, probes, atol=1e-6, rtol=0, equal_nan=True)


def test_alignment_dots_from_the_update_pass_equal_a_direct_computation():
    """controller.objective alignment: the update pass collects the output layer's inputs and the graph loss's
    output-layer gradient (micro-batched, trimmed, shared-prompt forward); the d~_t it gives equal
    credit.alignment_token_dots on one plain forward of the whole batch."""
    torch.manual_seed(0)
    model = policy.build_tiny_model(50, 0, 1, 2, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                    intermediate_size=64)
    ro = _fake_rollouts()
    rl = rl_cfg("token_mean", max_len=6, micro=4)
    rl.temperature = 0.7
    mask = ro.completion_mask
    n_tokens = float(mask.sum())
    align = {"hidden": torch.zeros(*ro.adv.shape, 32), "grad": None}
    gg.accumulate_policy_gradient(model, ro, mask, rl, n_tokens, 8.0, 1, align=align)
    G = torch.randn(50, 32, generator=torch.Generator().manual_seed(1))
    ctl = types.SimpleNamespace(cfg=types.SimpleNamespace(rl=rl))
    got = gg.Controller.alignment_dots(ctl, model, ro, align, G)
    with torch.no_grad():
        out = gg.logprobs_of(model, ro.rows(slice(None)), 0.7, hidden=True)  # per-row forward, untrimmed
    delta = -gg.output_grad_from_logits(out.hidden, out.logits, ro.completion_ids, ro.adv, mask, rl, n_tokens, 8.0)
    want = credit.alignment_token_dots(out.hidden.float(), out.logits, ro.completion_ids, G, delta, 1.0) / 0.7
    torch.testing.assert_close(got * mask, want * mask, rtol=1e-4, atol=1e-6)
    assert (want * mask).abs().sum() > 0


def test_credit_screen_reads_every_form_on_the_same_rollouts(tmp_path, sft_ckpt):
    """experiments/credit_screen.py: every form is scored on one set of rollouts; GRPO's P(A<0 | correct) is the
    share of correct steps that sit in failed rollouts (hand count from the same rollouts), TaoSR-SHE with gold step
    labels and alpha 0 never gives a wrong verdict step A > 0; --forms screens the forms it names, with the same
    numbers; a run directory without config.yaml, a data.dir that does not exist, or a bad --forms is one line, exit
    code 2."""
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    import credit_screen
    from config import save_config
    ckpt, data_dir = sft_ckpt
    run = tmp_path / "run"
    run.mkdir()
    save_config(load_config("configs/tiny.yaml", [f"--data.dir={data_dir}", "--credit.mode=graph",
                                                  "--credit.evidence=both", "--credit.value=others"]),
                str(run / "config.yaml"))
    out = tmp_path / "screen.md"
    credit_screen.main([str(run), ckpt, "--prompts", "16", "--rollout-samples", "1", "--out", str(out)])
    table = [line for line in out.read_text().splitlines() if line.startswith("| ") and "credit form" not in line]
    assert [line.split(" | ")[0][2:] for line in table] == [label for label, _ in credit_screen.FORMS]
    cells = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in table}
    # the hand count: sample the same rollouts again (the same seeds)
    cfg = load_config(str(run / "config.yaml"))
    task = testbed.load_task(cfg)
    model, tok = policy.load_policy(ckpt, task.schema.words())
    groups = credit_screen.sample_groups(cfg, model, tok, task, data.TagVocab.from_tokenizer(tok, task.schema), 16, 0)
    right = in_failed = label_in_failed = 0
    y = [v for v, name in enumerate(task.schema.slots) if task.schema.slot_info[name].type.role == "label"]
    for ro, _, _, correct in groups:
        outcome = credit.outcome_advantages(ro.rewards, cfg.rl.num_generations, "group")
        live = (correct == 1) & (outcome != 0)[:, None]
        right += int(live.sum())
        in_failed += int((live & (outcome < 0)[:, None]).sum())
        label_in_failed += int((live & (outcome < 0)[:, None])[:, y].sum())
    assert right > 0 and 0 < label_in_failed < in_failed
    assert cells["GRPO (outcome)"][0] == f"{in_failed / right:.3f}"
    assert cells["GRPO (outcome)"][7].rstrip(" |") == f"{label_in_failed / in_failed:.3f}"  # labels' share of the blamed
    assert cells["TaoSR-SHE stepwise (gold step labels)"][5] == "0.000"
    # --forms: only the named forms, in the order named, on the same rollouts (the same numbers as above)
    out2 = tmp_path / "screen2.md"
    credit_screen.main([str(run), ckpt, "--prompts", "16", "--rollout-samples", "1", "--forms", "6,1", "--by-verdict",
                        "--out", str(out2)])
    main_table, by_verdict = out2.read_text().split("By the verifiers")
    picked = [line for line in main_table.splitlines() if line.startswith("| ") and "credit form" not in line]
    # --by-verdict: its correct steps are the hand count's; GRPO blames exactly those in failed rollouts
    cells_v = [line.split(" | ") for line in by_verdict.splitlines() if line.startswith("| ") and " role " not in line]
    assert sum(int(c[4]) for c in cells_v if c[2] == "correct") == right
    blamed = sum(int(c[4]) * float(c[6].split(" / ")[0]) for c in cells_v if c[2] == "correct")  # 2-decimal shares
    assert abs(blamed - in_failed) <= 0.005 * right
    assert [line.split(" | ")[0][2:] for line in picked] == [credit_screen.FORMS[5][0], "GRPO (outcome)"]
    assert picked[1].split(" | ")[1:] == cells["GRPO (outcome)"]
    r = _run([sys.executable, os.path.join("experiments", "credit_screen.py"), str(run), ckpt, "--forms", "1,99"])
    assert r.returncode == 2 and "--forms '1,99'" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    r = _run([sys.executable, os.path.join("experiments", "credit_screen.py"), str(tmp_path / "nowhere"), ckpt])
    assert r.returncode == 2 and "nowhere/config.yaml" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    r = _run([sys.executable, os.path.join("experiments", "credit_screen.py"), str(run), ckpt,
              f"--data.dir={tmp_path / 'no_data'}"])  # refused, not generated anew
    assert r.returncode == 2 and "no_data (from " in r.stderr and "does not exist" in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_unjudged_blame_and_verdict_breakdown_counts_by_hand():
    """credit_screen.unjudged_blame_counts: only unjudged steps with gold, in rollouts with a nonzero outcome
    advantage; rollout 2 (outcome 0) and the NaN-gold / judged steps do not count. verdict_breakdown_counts on the
    same steps; vouched_label_counts on the label slot of failed rollouts; blame_parts_counts."""
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    import credit_screen
    nan = float("nan")
    node_adv = torch.tensor([[-1., 2., -3.], [0.5, -0.5, nan], [-1., -1., -1.]], dtype=torch.float64)
    correct = torch.tensor([[0., 1., 1.], [0., 1., nan], [0., 0., 1.]], dtype=torch.float64)
    unjudged = torch.tensor([[True, True, False], [True, True, True], [True, True, True]])
    outcome = torch.tensor([-1., 1., 0.], dtype=torch.float64)
    # wrong unjudged: (0,0) A<0, (1,0) A>0 -> 2, 1 blamed; correct unjudged: (0,1) A>0, (1,1) A<0 -> 2, 1 blamed
    assert credit_screen.unjudged_blame_counts(node_adv, correct, outcome, unjudged).tolist() == [2., 1., 2., 1.]
    # the breakdown by role, prompt, gold and the verifiers' verdict, on the same steps (rollout 2 does not count)
    verdict = torch.tensor([[-1, 1, 1], [1, 0, 1], [1, 1, 1]])
    got = credit_screen.verdict_breakdown_counts(node_adv, correct, outcome, verdict, torch.tensor([True, False, True]),
                                                 ["evidence", "verdict", "label"])
    assert got == {("evidence", "long tail", "wrong", -1): [1, 1, 0], ("verdict", "long tail", "correct", 1): [1, 0, 1],
                   ("label", "long tail", "correct", 1): [1, 1, 0], ("evidence", "head", "wrong", 1): [1, 0, 1],
                   ("verdict", "head", "correct", 0): [1, 1, 0]}
    # vouched_label_counts on the label slot (2): failed rollouts with a gold label only (rollout 0; rollout 1 has no
    # gold label, 2 outcome 0, 5 succeeded); rollout 3 fails with a wrong label, rollout 4 with a correct label the
    # verifiers do not vouch for
    correct = torch.cat([correct, torch.tensor([[1., 1., 0.], [1., 1., 1.], [1., 1., 1.]], dtype=torch.float64)])
    vouched = torch.tensor([[False, False, True]] * 4 + [[False, False, False], [False, False, True]])
    outcome = torch.tensor([-1., 1., 0., -1., -.5, 1.], dtype=torch.float64)
    assert credit_screen.vouched_label_counts(correct, outcome, vouched, [2]).tolist() == [2., 1., 1., 1.]
    # blame_parts_counts: rollout 0 parses (correct steps 1, 2: slot 1 A>0, label slot 2 A<0); rollout 1 does not
    # (correct slots 0 and 1 both A<0); rollout 2 parses, outcome 0 (not counted); rollout 3 parses, correct slot 0
    # called wrong and blamed, slot 1 called right and not blamed
    node_adv = torch.tensor([[-1., 2., -3.], [-.5, -.5, nan], [-1., -1., -1.], [-2., 1., nan]], dtype=torch.float64)
    correct = torch.tensor([[0., 1., 1.], [1., 1., nan], [1., 1., 1.], [1., 1., 0.]], dtype=torch.float64)
    verdict = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1], [-1, 1, 0]])
    got = credit_screen.blame_parts_counts(node_adv, correct, torch.tensor([-1., -1., 0., 1.], dtype=torch.float64),
                                           torch.tensor([True, False, True, True]), verdict, [2])
    assert got.tolist() == [4., 2., 2., 1., 1.]  # parsed correct 4, blamed 2; unparsed 2; called wrong 1; label 1


def test_reach_shares_by_hand():
    """experiments/reach_screen.reach_shares: 4 items, 2 samples each; an item is in reach only where a sample earns the
    full reward (a graded 0.5 is not a hit)."""
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    import numpy as np
    import reach_screen
    r = reach_screen.reach_shares(np.array([1.0, 0.0, 0.0, 0.0]),
                                  np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.5]]))
    assert (r["n"], r["solved"], r["in_reach"], r["out_of_reach"]) == (4, 0.25, 0.25, 0.5)
    assert r["sampled"] == pytest.approx(2.5 / 8) and r["sampled_unsolved"] == pytest.approx(1.5 / 6)


def test_reach_screen_mean_over_seeds_by_hand(tmp_path):
    """reach_screen.mean_over_seeds: rows of ROW_s<seed> averaged per ROW, split and table; --seeds keeps only those
    seeds and drops a row that misses one."""
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    import reach_screen as rs
    sep = "|---|---|---:|---:|---:|---:|---:|---:|"
    for seed, solved, failed in ((0, 0.5, 10), (1, 0.7, 30)):
        (tmp_path / f"t{seed}.md").write_text("\n".join([
            rs.MAIN_HEADER, sep, f"| runs/x/a_s{seed}/sft/checkpoint | lt: all | 100 | {solved} | 0.2 | 0.1 | 0.4 | 0.1 |",
            "", rs.REPAIR_TITLE, "", rs.REPAIR_HEADER, sep,
            f"| runs/x/a_s{seed}/sft/checkpoint | lt: all | {failed} | 0.5 | 0.25 | 0.5 | 0.5 | 1.0 |",
            f"| runs/x/b_s{seed} | lt: all | {failed} | 0.1 | 0.1 | 0.1 | 0.1 | 0.1 |" if seed else ""]))
    text = rs.mean_over_seeds([str(tmp_path / "t0.md"), str(tmp_path / "t1.md")])
    assert "| a (2 seeds) | lt: all | 100 | 0.600 | 0.200 | 0.100 | 0.400 | 0.100 |" in text
    assert "| a (2 seeds) | lt: all | 20 | 0.500 | 0.250 | 0.500 | 0.500 | 1.000 |" in text
    assert "| b (1 seeds) | lt: all | 30 |" in text  # all seeds found for b: only seed 1
    only = rs.mean_over_seeds([str(tmp_path / "t0.md"), str(tmp_path / "t1.md")], [0, 1])
    assert "| b (" not in only and "| a (2 seeds) | lt: all | 20 |" in only
    # two screens appended to one --out file (as two processes write it) read as the two files did
    (tmp_path / "both.md").write_text((tmp_path / "t0.md").read_text() + "\n\n" + (tmp_path / "t1.md").read_text())
    assert rs.mean_over_seeds([str(tmp_path / "both.md")]) == text


def test_verdict_repairs_by_hand():
    """experiments/reach_screen.verdict_repairs under the default rule (category [3, 2, 0], brand and size [3, 2, 1],
    color [3, 2, 2]; the label is the lowest level): an all-match answer to a 'mismatch' (level 1) pair is repaired by
    brand or size -> mismatch, and the gold says brand; to an 'irrelevant' pair only by category -> mismatch."""
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    import reach_screen
    s = data.DEFAULT_SCHEMA
    answer = data.ParsedCoT(valid=True, verdicts={"category": "match", "brand": "match", "size": "match"})
    gold = {"category": "match", "brand": "mismatch", "size": "match"}
    assert reach_screen.verdict_repairs(answer, data.Example("q", "p", label=1, nodes=gold), s) == (2, 1)
    assert reach_screen.verdict_repairs(answer, data.Example("q", "p", label=1), s) == (2, 0)  # no gold verdicts
    assert reach_screen.verdict_repairs(answer, data.Example("q", "p", label=0, nodes=gold), s) == (1, 0)
    assert reach_screen.verdict_repairs(data.ParsedCoT(valid=False, verdicts=answer.verdicts),
                                        data.Example("q", "p", label=1, nodes=gold), s) == (0, 0)
    r = reach_screen.repair_shares([(2, 1), (1, 1), (0, 0), (3, 0)])
    assert (r["n"], r["any"], r["unique"], r["gold"]) == (4, 0.75, 0.25, 0.5) and r["precision"] == pytest.approx(2 / 6)
    assert r["unique_precision"] == 1.0 and reach_screen.repair_shares([(1, 1), (1, 0), (2, 2)])["unique_precision"] == 0.5


def test_reach_screen_greedy_share_is_the_evaluations_accuracy(tmp_path, sft_ckpt):
    """experiments/reach_screen.py on a checkpoint: per split the three shares add to 1; with the label alone rewarded
    (reward.require_consistent false) the solved share is eval.py's greedy accuracy on the same items; a path that
    is not a run is one line, exit code 2."""
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    import reach_screen
    ckpt, data_dir = sft_ckpt
    out = tmp_path / "reach.md"
    reach_screen.main([ckpt, "--items", "12", "--samples", "2", "--out", str(out), f"--data.dir={data_dir}",
                       "--reward.require_consistent=false"])
    main_table, repair_table = out.read_text().split("Sampled answers with no reward")
    rows = {line.split(" | ")[1]: line.split(" | ")[2:] for line in main_table.splitlines()
            if line.startswith(f"| {ckpt} |")}
    assert {"test_longtail: all", "test_id: all"} <= set(rows)
    for cells in rows.values():
        assert sum(float(c) for c in cells[1:4]) == pytest.approx(1.0, abs=2e-3)
    cfg = load_config(os.path.join(os.path.dirname(ckpt), "config.yaml"), [f"--data.dir={data_dir}",
                                                                          "--eval.max_items=12"])
    task = testbed.load_task(cfg)
    model, tok = policy.load_policy(ckpt, task.schema.words())
    res = evaluation.evaluate_policy(model, tok, task, {k: task.splits[k] for k in ("test_longtail", "test_id")},
                                     cfg.eval)
    for split in ("test_longtail", "test_id"):
        assert rows[f"{split}: all"][0] == "12" and float(rows[f"{split}: all"][1]) == pytest.approx(
            res[split]["accuracy"], abs=6e-4)
    repairs = [line.split(" | ")[2:] for line in repair_table.splitlines() if line.startswith(f"| {ckpt} |")]
    assert len(repairs) == len(rows) and all(0 <= float(c.strip(" |")) <= 1 for cells in repairs for c in cells[1:])
    r = _run([sys.executable, os.path.join("experiments", "reach_screen.py"), str(tmp_path / "nowhere")])
    assert r.returncode == 2 and "nowhere" in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_credit_screen_step_gradient_is_the_trainers_gradient(tmp_path, sft_ckpt):
    """credit_screen --gradients: a form's step gradient is the gradient the trainer's backward accumulates on the
    same rollouts with the same advantages at ratio 1 (accumulate_policy_gradient, micro-batched, packed); a form
    compared with itself has cosine 1 and norm ratio 1, and a second sample of rollouts gives another gradient."""
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    import credit_screen
    ckpt, data_dir = sft_ckpt
    cfg = load_config("configs/tiny.yaml", [f"--data.dir={data_dir}", "--credit.mode=graph", "--credit.evidence=both",
                                            "--credit.value=others", "--rl.micro_batch_size=8"])
    task = testbed.load_task(cfg)
    model, tok = policy.load_policy(ckpt, task.schema.words())
    vocab = data.TagVocab.from_tokenizer(tok, task.schema)
    groups = credit_screen.sample_groups(cfg, model, tok, task, vocab, cfg.rl.prompts_per_step, 0)
    regroups = credit_screen.sample_groups(cfg, model, tok, task, vocab, cfg.rl.prompts_per_step, 1)
    s = types.SimpleNamespace(cfg=cfg, model=model, tokenizer=tok, task=task, vocab=vocab)
    ro = groups[0][0]
    adv = credit_screen.form_advantages(cfg, s, groups[0], 0, 0)[0]
    assert adv.abs().sum() > 0
    got = credit_screen.step_gradient(model, ro, adv, cfg.rl)
    model.zero_grad()
    ro.adv = adv.float()
    mask = ro.completion_mask.float()
    gg.accumulate_policy_gradient(model, ro, mask, cfg.rl, float(mask.sum()), float(mask.shape[0]), 1)
    want = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    rows = dict(credit_screen.gradient_similarity([("a", cfg), ("b", cfg)], groups, regroups, s, 0))
    assert rows["b"]["cos_grpo"] == pytest.approx(1.0, abs=1e-5) and rows["b"]["norm_ratio"] == pytest.approx(1.0)
    assert -1.0 <= rows["a"]["cos_resample"] < 0.999
    c = rows["b"]["cos_expected"]  # a form against itself: 1, or NaN where one chunk of a tiny policy is noise only
    assert math.isnan(c) or c == pytest.approx(1.0, abs=1e-5)


def test_expected_gradient_cosine_removes_the_sampling_noise_by_hand():
    """Means E a = (1, 0), E b = (1, 1) (cosine 0.7071) plus each sample's noise (e2 in sample 1, e3 in sample 2),
    shared by both forms as two forms on the same rollouts share it: the same-rollout cosine of a1 and b1 is
    2 / (sqrt 2 sqrt 3) = 0.816 (the shared noise pulls it up), the two-sample estimate 1 / sqrt(1 * 2)."""
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    import credit_screen
    e = torch.eye(4, dtype=torch.float64)
    a1, a2 = e[0] + e[2], e[0] + e[3]
    b1, b2 = e[0] + e[1] + e[2], e[0] + e[1] + e[3]
    assert float(torch.nn.functional.cosine_similarity(a1, b1, dim=0)) == pytest.approx(0.8165, abs=1e-4)
    assert credit_screen.expected_gradient_cosine(a1, a2, b1, b2) == pytest.approx(2 ** -0.5)
    assert math.isnan(credit_screen.expected_gradient_cosine(e[2], e[3], b1, b2))  # a is noise only: <a1, a2> = 0

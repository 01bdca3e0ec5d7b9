"""run.parallel fsdp (FSDP2, README "DDP or FSDP"): on 2 gloo ranks the update's gradient equals the single-process
full-batch gradient and DDP's, generation and evaluation run on gathered parameters while the ranks decode different
numbers of steps, checkpoints hold full state dicts; a torchrun run with drift evaluations, checkpoints and a resume
ends where the same run under DDP ends."""
import datetime
import json
import os
import socket
import sys
import time
import types

import pytest
import torch
from safetensors.torch import load_file

import checkpoint
import graph_grpo as gg
import parallel
import policy
import test_grpo as tg
from test_grpo import sft_ckpt  # noqa: F401 (the tiny SFT checkpoint fixture, one per module)

# ---------------------------------------------------------------------------------------------- 2 ranks, spawned

WORLD, G, VOCAB, TMAX = 2, 2, 50, 6


def _model():
    """Two decoder layers (two FSDP units and the root), tied embeddings (one parameter in two places)."""
    return policy.build_tiny_model(VOCAB, 0, 1, 2, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                                   intermediate_size=64, tie_embeddings=True)


def _batch():
    """Prompts (2 per rank), G completions each and their (row, column) advantages. Completions are 2-6 tokens long
    but those of rank 1's first group, one token: with one group per micro-batch and no FSDP_MIN_COLUMNS, the
    shared-prompt forward would run once on rank 1 where it runs twice on rank 0."""
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(5, VOCAB, (int(torch.randint(3, 7, (1,), generator=g)),), generator=g).tolist()
               for _ in range(2 * WORLD)]
    lengths = [1 if 2 * G <= i < 3 * G else int(torch.randint(2, TMAX + 1, (1,), generator=g)) for i in range(4 * G)]
    completions = [torch.randint(5, VOCAB, (n,), generator=g).tolist() for n in lengths]
    adv = torch.randn(len(completions), TMAX, generator=g)
    return prompts, completions, adv


def _rollouts(prompts, completions, adv, columns=0):
    ids, attn, comp, P = gg.pack(prompts, completions, 0, "cpu", columns)
    return gg.Rollouts(ids, attn, comp, P, torch.zeros(len(completions)), adv[:, :comp.shape[1]].contiguous(),
                       group_size=G)


def _grad(model, ro, n_tokens, n_seqs, world, micro=G):
    model.zero_grad(set_to_none=True)
    gg.accumulate_policy_gradient(model, ro, ro.completion_mask, tg.rl_cfg("token_mean", max_len=TMAX, micro=micro),
                                  n_tokens, n_seqs, world)


def _full(t):
    return t.full_tensor() if isinstance(t, torch.distributed.tensor.DTensor) else t


def _step(model, opt):
    """Clip (the trainer's call: a DTensor norm under FSDP) and one AdamW step; the norm."""
    norm = _full(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
    opt.step()
    return float(norm)


def _fsdp_worker(rank, world, port, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    res = {}
    sharded = parallel.shard_model(_model())
    # generation: the ranks decode different numbers of steps, rank 0 alone samples more (as it evaluates)
    mine = [[5 + rank, 6, 7]] * (1 + rank)
    with parallel.full_parameters(sharded):
        got = policy.sample(sharded, mine, 2, 6 + 10 * rank, 1.0, 2, 0, seed=rank)
        alone = policy.sample(sharded, [[8, 9, 10]], 3, 12, 1.0, 2, 0, seed=7) if rank == 0 else None
    plain = _model()
    res["samples_equal"] = got == policy.sample(plain, mine, 2, 6 + 10 * rank, 1.0, 2, 0, seed=rank) and (
        rank != 0 or alone == policy.sample(plain, [[8, 9, 10]], 3, 12, 1.0, 2, 0, seed=7))
    res["decode_steps"] = max(len(c) for c in got)
    res["sharded_after"] = all(isinstance(p, torch.distributed.tensor.DTensor) for p in sharded.parameters())
    # the update on this rank's groups; global counts, as the trainer passes them
    prompts, completions, adv = _batch()
    n_tokens, n_seqs = float(sum(len(c) for c in completions)), float(len(completions))
    rows = slice(rank * 2 * G, (rank + 1) * 2 * G)
    ro = _rollouts(prompts[rank * 2:(rank + 1) * 2], completions[rows], adv[rows],
                   parallel.min_completion_columns(sharded))
    ddp = torch.nn.parallel.DistributedDataParallel(_model())
    opts = {}
    # FSDP: one group per micro-batch (rank 1's first is one token long); DDP: one micro-batch per rank, since DDP
    # has the same unmatched forward on a one-token micro-batch (its completion pass syncs buffers) and no floor
    for name, model, micro in (("fsdp", sharded, G), ("ddp", ddp, 2 * G)):
        _grad(model, ro, n_tokens, n_seqs, world, micro)
        res[f"grad_{name}"] = torch.cat([_full(p.grad).flatten() for p in model.parameters()])
        opts[name] = torch.optim.AdamW(model.parameters(), lr=1e-2)
        res[f"norm_{name}"] = _step(model, opts[name])
    # what a checkpoint holds: the full state dicts, gathered into rank 0 (the others get {})
    weights = checkpoint.model_state(sharded)
    moments = checkpoint.optimizer_state(sharded, opts["fsdp"])
    if rank == 0:
        names = [n for n, _ in ddp.module.named_parameters()]
        res["weights"] = weights
        res["params_ddp"] = dict(ddp.module.state_dict())
        res["moments_fsdp"] = {k: v["exp_avg_sq"] for k, v in moments["state"].items()}
        res["moments_ddp"] = {names[i]: v["exp_avg_sq"] for i, v in opts["ddp"].state_dict()["state"].items()}
        torch.save(res, out_path)
    else:
        assert weights == {} and moments == {}
        torch.save(res, out_path + ".1")
    dist.barrier()
    os._exit(0)  # no interpreter teardown of DDP / gloo (test_grpo._ddp_worker)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path_factory.mktemp("fsdp") / "res.pt")
    ctx = mp.start_processes(_fsdp_worker, args=(WORLD, port, out), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.time() + 240  # bounded: an unmatched collective ends in gloo's 60 s timeout, a hang here
    for proc in ctx.processes:
        proc.join(timeout=max(1.0, deadline - time.time()))
    hung = [proc for proc in ctx.processes if proc.is_alive()]
    for proc in hung:
        proc.kill()
    assert not hung, f"{len(hung)} FSDP workers did not finish in 240 s"
    ctx.join()  # a worker's exception, with its traceback
    return torch.load(out), torch.load(out + ".1")


def test_fsdp_gradient_equals_single_process_and_ddp(two_ranks):
    """accumulate_policy_gradient under FSDP2 (2 ranks, one group per micro-batch, reduce-scatter after each; rank 1's
    first micro-batch is one token long and gets a masked second column) gives the full-batch gradient of one
    process, and DDP's."""
    res, res1 = two_ranks
    prompts, completions, adv = _batch()
    model = _model()
    _grad(model, _rollouts(prompts, completions, adv), float(sum(len(c) for c in completions)),
          float(len(completions)), 1)
    single = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert single.abs().max() > 0.1
    torch.testing.assert_close(res["grad_fsdp"], single, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(res["grad_fsdp"], res["grad_ddp"], rtol=1e-5, atol=1e-7)
    assert res["norm_fsdp"] == pytest.approx(res["norm_ddp"], rel=1e-6)


def test_fsdp_rollouts_keep_two_completion_columns():
    """Under FSDP a rank whose completions are all one token long still packs two completion columns (the second
    masked), and its micro-batches keep them when trimmed; without the floor both are one column."""
    prompts, completions = [[5, 6], [7]], [[3], [4], [9], [2]]
    ro = _rollouts(prompts, completions, torch.ones(4, TMAX), parallel.FSDP_MIN_COLUMNS)
    assert ro.completion_mask.tolist() == [[1.0, 0.0]] * 4 and ro.input_ids.shape[1] == ro.prompt_len + 2
    assert ro.rows(slice(0, 2), G).trimmed(parallel.FSDP_MIN_COLUMNS).completion_mask.shape[1] == 2
    assert _rollouts(prompts, completions, torch.ones(4, TMAX)).trimmed().completion_mask.shape[1] == 1


def test_generation_on_gathered_parameters_with_different_decode_lengths(two_ranks):
    """Inside full_parameters each rank samples alone (rank 1 decodes 16 steps, rank 0 6, then 12 more on its own, as
    rank 0 evaluates alone): the same tokens as the model in one piece, and the model is sharded again after."""
    res, res1 = two_ranks
    assert res["samples_equal"] and res1["samples_equal"]
    assert res["decode_steps"] != res1["decode_steps"]
    assert res["sharded_after"] and res1["sharded_after"]


def test_fsdp_checkpoint_state_is_full_and_equals_ddp_after_a_step(two_ranks):
    """checkpoint.model_state / optimizer_state of the sharded model: full tensors on rank 0, named as the model's
    own state dict, equal to DDP's after one clipped AdamW step (rank 1 gets empty dicts, checked in the worker).
    Tolerances: the gradients differ by 3e-8 (summation order); AdamW's first step is lr g / (|g| + eps), which
    moves small entries by more (measured 1e-6 = 1e-4 lr; bound 1e-3 lr), and g^2 of entries near 1e-7 differs
    relatively (measured 9e-4 relative, 4e-12 absolute, on moments up to 1e-4)."""
    res, _ = two_ranks
    want = res["params_ddp"]
    assert set(res["weights"]) >= set(want)
    for k, v in want.items():
        torch.testing.assert_close(res["weights"][k], v, rtol=0, atol=1e-5)
    assert set(res["moments_fsdp"]) == set(res["moments_ddp"])
    for k, v in res["moments_ddp"].items():
        torch.testing.assert_close(res["moments_fsdp"][k], v, rtol=1e-4, atol=1e-10)


# ---------------------------------------------------------------------------------------------- torchrun

RUN = ["--credit.mode=graph", "--controller.mode=meta", "--controller.accumulate=2", "--rl.beta=0.04",
       "--rl.num_iterations=2", "--rl.eval_every=2", "--rl.eval_items=6", "--run.save_every=2"]


def _torchrun(out, sft_ckpt, *extra):
    r = tg._run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                 *tg._rl_args(out, sft_ckpt, *RUN, *extra)], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _weights(d):
    return load_file(os.path.join(d, "model.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, sft_ckpt):  # noqa: F811
    """FSDP: 2 steps, then the same command with rl.steps = 4 resumes it; DDP: 4 steps. Both on 2 gloo ranks."""
    root = tmp_path_factory.mktemp("torchrun")
    fsdp, ddp = root / "fsdp", root / "ddp"
    _torchrun(fsdp, sft_ckpt, "--run.parallel=fsdp", "--rl.steps=2")
    first = _weights(fsdp / "checkpoint")
    resumed = _torchrun(fsdp, sft_ckpt, "--run.parallel=fsdp", "--rl.steps=4")
    _torchrun(ddp, sft_ckpt, "--rl.steps=4")
    return types.SimpleNamespace(fsdp=fsdp, ddp=ddp, first=first, resumed=resumed)


def _metrics(d):
    return [json.loads(x) for x in open(d / "metrics.jsonl")]


def test_torchrun_fsdp_runs_evaluates_checkpoints_and_resumes(runs, sft_ckpt):  # noqa: F811
    """The FSDP run learns (rewards > 0), evaluates drift on rank 0, writes periodic and final checkpoints that
    policy.load_policy reads as a model in one piece, and its second command resumes from step 2."""
    assert "resuming from" in runs.resumed.stdout
    lines = _metrics(runs.fsdp)
    assert [r["step"] for r in lines] == [0, 1, 2, 3]
    tg.assert_learning_signal(lines)
    assert all("eval/test_id/accuracy" in r for r in lines if r["step"] in (1, 3))
    assert "eval_start/test_id/accuracy" in lines[0]
    assert not any("ddp/replica_max_diff" in r for r in lines)
    assert (runs.fsdp / "eval.json").exists()
    ckpt, _ = sft_ckpt
    start, _ = policy.load_policy(ckpt, [])
    model, _ = policy.load_policy(str(runs.fsdp / "checkpoint"), [])
    for (n, p), (_, q) in zip(model.named_parameters(), start.named_parameters()):
        assert p.shape == q.shape and p.dtype == q.dtype, n
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), start.parameters()))  # it trained
    state = checkpoint.load_trainer_state(str(runs.fsdp / "checkpoints" / "step_000004"))
    assert set(state["optimizer"]["state"]) == {n for n, _ in model.named_parameters()}


def test_torchrun_fsdp_ends_where_ddp_ends(runs):
    """The same 4 steps (FSDP with a resume after step 2; DDP straight), with the sharded reference model (beta),
    pi_old (2 iterations), the meta controller and drift evaluations: the same sampled tokens (rewards, lengths), and
    at the step-2 checkpoint and at the end the same weights and AdamW moments to float summation order
    (reduce-scatter vs all-reduce, the sharded clip norm). Measured on CPU: weights 5e-8 apart (lr 1e-4), exp_avg
    5e-8 (of 0.015), exp_avg_sq 6e-11 (of 5e-5), loss / kl / grad_norm 3e-6 relative; the bounds are 20-100x that.
    A resume that lost the AdamW state moves the weights by about lr."""
    for step in (2, 4):
        a, b = (checkpoint.step_dir(str(d), step) for d in (runs.fsdp, runs.ddp))
        assert _max_diff(_weights(a), _weights(b)) < 1e-6, step
        fs, ds = (checkpoint.load_trainer_state(d)["optimizer"] for d in (a, b))
        names = [n for n, _ in policy.load_policy(b, [])[0].named_parameters()]
        for i, v in ds["state"].items():
            for key, atol in (("exp_avg", 1e-6), ("exp_avg_sq", 1e-9)):
                torch.testing.assert_close(fs["state"][names[i]][key], v[key], rtol=1e-4, atol=atol)
    assert _max_diff(_weights(runs.fsdp / "checkpoint"), _weights(runs.ddp / "checkpoint")) < 1e-6
    assert _max_diff(runs.first, _weights(runs.ddp / "checkpoints" / "step_000002")) < 1e-6
    for f, d in zip(_metrics(runs.fsdp), _metrics(runs.ddp)):
        assert f["reward"] == d["reward"] and f["completions/mean_length"] == d["completions/mean_length"]
        for k in ("loss", "kl", "grad_norm", "entropy"):
            assert f[k] == pytest.approx(d[k], rel=1e-4, abs=1e-9), (f["step"], k)

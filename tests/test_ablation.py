"""The ablation runner's report (experiments/ablation.py) and eval.py's comparison table, on fake run directories
with hand-computed numbers; one subprocess smoke of the runner on the tiny config."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import eval as evaluation
from experiments import ablation, gate_replay, pooled

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_paired_test_hand_numbers():
    pt = ablation.paired_test([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    assert pt["n"] == 3 and (pt["wins"], pt["ties"], pt["losses"]) == (3, 0, 0)
    assert pt["mean_diff"] == pytest.approx(2.0) and pt["std_diff"] == pytest.approx(1.0)
    assert pt["t"] == pytest.approx(2.0 * math.sqrt(3))
    # |mean| of the 8 sign patterns of (1, 2, 3): 2, 0, 2/3, 4/3, 4/3, 2/3, 0, 2 -> two reach 2
    assert pt["p"] == pytest.approx(0.25)
    assert ablation.paired_test([0.5, 0.5], [0.5, 0.5])["p"] == pytest.approx(1.0)


def test_drift_collapse_and_steps_to_reach():
    assert ablation.max_drop([0.9, 0.85, 0.95, 0.7]) == pytest.approx(0.2)
    assert ablation.max_drop([0.5, 0.6]) == 0.0
    assert ablation.collapsed([0.9, 0.6, 0.65]) and not ablation.collapsed([0.9, 0.6, 0.8])
    assert ablation.steps_to_reach([0, 10, 20], [0.5, 0.6, 0.7], 0.6) == 10
    assert ablation.steps_to_reach([0, 10, 20], [0.5, 0.6, 0.7], 0.8) is None
    assert ablation.mean_curve([([0, 10, 20], [1.0, 2.0, 3.0]), ([0, 10], [3.0, 4.0])]) == ([0, 10], [2.0, 3.0])
    assert ablation.parse_seeds("0-3") == [0, 1, 2, 3] and ablation.parse_seeds("1,5") == [1, 5]


def _split(acc, f1):
    return {"accuracy": acc, "macro_f1": f1, "format_valid": 1.0, "rule_consistency": 0.9,
            "longtail_facet_accuracy": 0.5, evaluation.LONGTAIL_VERDICT_KEY: {"match": 0.5, "mismatch": 0.5}}


def _fake_rl_run(d, id_curve, lt_curve, final_lt_f1, credit=None):
    os.makedirs(d)
    json.dump({"test_id": _split(0.9, 0.9), "test_longtail": _split(0.7, final_lt_f1)}, open(os.path.join(d, "eval.json"), "w"))
    with open(os.path.join(d, "metrics.jsonl"), "w") as f:
        for k, (a, b) in enumerate(zip(id_curve, lt_curve)):
            rec = {"step": 10 * k - 1 if k else 0, "reward": 0.5}
            if credit:
                rec.update({key: v[k] for key, v in credit.items()})
            pre = "eval_start" if k == 0 else "eval"
            rec.update({f"{pre}/test_id/accuracy": a, f"{pre}/test_longtail/macro_f1": b,
                        f"{pre}/test_id/macro_f1": a, f"{pre}/test_longtail/accuracy": b})
            f.write(json.dumps(rec) + "\n")


def test_report_on_fake_runs(tmp_path):
    out = str(tmp_path)
    _fake_rl_run(f"{out}/grpo_s0", [0.9, 0.8, 0.85], [0.5, 0.6, 0.6], 0.60)
    _fake_rl_run(f"{out}/grpo_s1", [0.9, 0.9, 0.9], [0.5, 0.6, 0.7], 0.62)
    _fake_rl_run(f"{out}/graph_meta_s0", [0.9, 0.6, 0.65], [0.6, 0.7, 0.7], 0.70)
    credit = {"credit/zero_evidence_rate": [0.7, 0.8, 0.9], "credit/node_abs_adv/f:brand": [0.1, 0.2, 0.3],
              "credit/node_abs_adv/f:size": [0.3, 0.4, 0.5], "alpha/f->y": [1.0, 1.1, 1.2]}
    _fake_rl_run(f"{out}/graph_meta_s1", [0.9, 0.85, 0.9], [0.5, 0.6, 0.7], 0.66, credit)
    assert ablation.eval_curve(f"{out}/grpo_s0/metrics.jsonl", "test_id") == ([0, 10, 20], [0.9, 0.8, 0.85])
    found = ablation.collect(out, [0, 1])
    assert set(found) == {"grpo", "graph_meta"}
    md = ablation.report(found)
    main_table = md.split("## Long-tail diagnostics")[0]
    rows = {line.split(" | ")[0]: line for line in main_table.splitlines() if line.startswith(("| 3.", "| 8."))}
    grpo, meta = rows["| 3. + GRPO (outcome)"], rows["| 8. + Graph-GRPO, meta controller"]
    assert "0.610 ± 0.014" in grpo            # final lt macro-F1: mean 0.61, std 0.02/sqrt(2)
    assert "| 5.0 ± 7.1 | 0/2 |" in grpo      # id drift in points: drops 10 and 0
    assert "| 17.5 ± 17.7 | 1/2 |" in meta    # drops 30 and 5; seed 0 ends 25 points down: collapsed
    # steps to GRPO's final lt macro-F1 (mean of last curve points 0.65): meta's mean curve 0.55, 0.65 -> 10
    assert meta.endswith("| 10 | 0.500 ± 0.000 |") and grpo.endswith("| 20 | 0.500 ± 0.000 |")  # + mean reward
    # credit diagnostics of the one run that logged them: facet mean |A| = mean(0.2, 0.4), zero evidence 0.8,
    # final alpha 1.2; statistics it did not log are nan
    credit_line = md.split("## Credit diagnostics")[1].splitlines()[4]
    assert credit_line.startswith("| 8. ") and "/ 0.30 / nan |" in credit_line and "| 0.80 |" in credit_line
    assert "| 1.20 |" in credit_line and credit_line.endswith("| nan | 1.20 |")  # controller gate (not logged), per seed
    claim = next(line for line in md.splitlines() if line.startswith("| graph-meta vs GRPO"))
    assert "| 2 | +0.0700 |" in claim and "| 2 / 0 / 0 |" in claim
    # a study without a row named 'grpo' (e.g. 'tuned'): the target is its first RL row's GRPO, the same numbers
    rows = (ablation.Row("grpo_x", "GRPO x", "rl", ref="grpo_x"), ablation.Row("graph_meta", "meta", "rl", ref="grpo_x"))
    md_x = ablation.report({"grpo_x": found["grpo"], "graph_meta": found["graph_meta"]}, rows=rows,
                           claims=ablation.pair_claims((("graph_meta", "grpo_x"),)))
    meta_x = next(ln for ln in md_x.splitlines() if ln.startswith("| meta | 2 |"))
    assert meta_x.endswith("| 10 | 0.500 ± 0.000 |") and "macro-F1 of grpo_x on those items (0.650)" in md_x
    # an interaction claim: (graph_meta - grpo) - (grpo - graph_meta) per seed = 2 x (0.10, 0.04) -> mean +0.14
    md = ablation.report(found, claims=ablation.interaction_claims((("graph_meta", "grpo", "grpo", "graph_meta"),)))
    claim = next(line for line in md.splitlines() if line.startswith("| (graph_meta - grpo) vs (grpo - graph_meta), test_longtail"))
    assert "| 2 | +0.1400 | 0.0849 | 2 / 0 / 0 |" in claim


def _fake_run_dir(d, id_acc, student=None):
    os.makedirs(os.path.join(d, "checkpoint"))
    open(os.path.join(d, "config.yaml"), "w").write("run:\n  seed: 0\n")
    json.dump({"test_id": _split(id_acc, id_acc - 0.01), "test_longtail": _split(0.5, 0.45)},
              open(os.path.join(d, "eval.json"), "w"))
    if student is not None:
        os.makedirs(os.path.join(d, "student"))
        json.dump({"teacher": {}, "student": {"test_id": _split(student, student), "test_longtail": _split(0.4, 0.4)}},
                  open(os.path.join(d, "student", "eval.json"), "w"))


def test_eval_comparison_table_on_two_fake_runs(tmp_path, capsys):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _fake_run_dir(a, 0.9, student=0.8)
    _fake_run_dir(b, 0.7)
    evaluation.main([a, b, "--out", str(tmp_path / "cmp.md")])
    table = open(tmp_path / "cmp.md").read().splitlines()
    assert table[0].startswith("| run") and "test_longtail macro-F1" in table[0]
    body = [[c.strip() for c in line.strip("|").split("|")] for line in table[2:]]
    assert [r[:4] for r in body] == [[a, "policy", "0.900", "0.890"], [a, "student", "0.800", "0.800"],
                                     [b, "policy", "0.700", "0.690"]]
    assert capsys.readouterr().out.count("| policy") == 2


def test_plot_without_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    with pytest.raises(evaluation.PlotUnavailable, match="pip install matplotlib"):
        evaluation.plot_panels({"reward": {"a": [([1, 2], [0.1, 0.2])]}}, str(tmp_path / "x.png"))


def test_plot_writes_png_when_matplotlib_is_installed(tmp_path):
    pytest.importorskip("matplotlib", reason="optional extra")
    d = str(tmp_path / "run")
    _fake_rl_run(d, [0.9, 0.8], [0.5, 0.6], 0.6)
    panels = evaluation.training_curves([d])
    assert panels["eval/test_id/accuracy"][d] == [([0, 10], [0.9, 0.8])]  # the pre-RL point at x = 0
    evaluation.plot_panels(panels, str(tmp_path / "c.png"))
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_ablation_runner_smoke_resumes_and_reports(tmp_path):
    """Three rows, one seed, tiny config: every run finishes, the report lists them; a second call skips all."""
    out, res = tmp_path / "abl", tmp_path / "results"
    cmd = [sys.executable, "experiments/ablation.py", "--study", "ablation60", "--config", "configs/tiny.yaml", "--out", str(out),
           "--results", str(res), "--seeds", "0", "--rows", "sft_masked,grpo,graph_meta", "--rl-steps", "2",
           "--eval-every", "1", "--eval-items", "4", "--extra=--eval.max_items=8"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    md = open(res / "ablation60.md").read()
    for title in ("2. SFT, CoT random masking", "3. + GRPO (outcome)", "8. + Graph-GRPO, meta controller"):
        assert f"| {title} | 1 |" in md
    assert ablation.eval_curve(str(out / "grpo_s0" / "metrics.jsonl"), "test_id")[0] == [0, 1, 2]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "3 runs, 3 already finished" in r.stdout


def test_scoring_by_the_last_evaluations_and_confidence_intervals(tmp_path):
    """score_last K: a run's accuracy / macro-F1 are the mean of its last K evaluations; mean_ci is the 95% t-interval."""
    out = str(tmp_path)
    _fake_rl_run(f"{out}/grpo_s0", [0.9, 0.8, 0.85], [0.5, 0.6, 0.7], 0.60)
    found = ablation.collect(out, [0], score_last=2)
    final = found["grpo"][0]["final"]
    assert final["test_longtail"]["macro_f1"] == pytest.approx(0.65)   # mean of 0.6 and 0.7, not eval.json's 0.60
    assert final["test_id"]["accuracy"] == pytest.approx(0.825)
    assert ablation.collect(out, [0])["grpo"][0]["final"]["test_longtail"]["macro_f1"] == 0.60
    # at half its steps (10 of 20) the run has one evaluation after its start: too few for the last 2, no score
    assert "half" not in found["grpo"][0]
    # 40 steps, evaluations at 0, 10, ..., 40: at half (20) the last 2 are steps 10 and 20
    _fake_rl_run(f"{out}/grpo_s1", [0.9] * 5, [0.5, 0.6, 0.6, 0.7, 0.8], 0.80)
    _fake_rl_run(f"{out}/graph_meta_s1", [0.9] * 5, [0.5, 0.7, 0.8, 0.8, 0.9], 0.90)
    found = ablation.collect(out, [0, 1], score_last=2)
    assert found["grpo"][1]["half"]["test_longtail"]["macro_f1"] == pytest.approx(0.6)
    assert found["grpo"][1]["final"]["test_longtail"]["macro_f1"] == pytest.approx(0.75)
    md = ablation.report(found, claims=ablation.half_budget_claims((("graph_meta", "grpo"),)))
    claim = next(line for line in md.splitlines() if line.startswith("| graph_meta at half the steps vs grpo at all, test_longtail"))
    assert "| 1 | +0.0000 |" in claim        # seed 1 only; graph_meta at 20: (0.7 + 0.8) / 2 = grpo's final 0.75
    md = ablation.report(found, claims=ablation.pair_claims((("graph_meta", "grpo"),)))
    assert "| graph_meta vs grpo, test_longtail macro-F1 | 1 | +0.1000 |" in md   # at all steps: 0.85 - 0.75
    assert ablation.mean_ci([1.0, 2.0, 3.0]) == "2.00 ± 2.48"          # 4.30 * 1 / sqrt(3)
    assert ablation.mean_ci([0.5]) == "0.50" and ablation.mean_ci([]) == "-"


def test_pooled_differences_over_studies_by_hand(tmp_path, capsys):
    """experiments/pooled.py: t quantiles (table, then Cornish-Fisher), the sign-flip p (exact to 16 pairs, drawn
    beyond), the t-interval, and A - B paired per (study, seed) over two studies' fake runs, scored by their last 3
    evaluations; a seed with one run missing is left out and counted; a wrong row, directory or study is one line on
    stderr naming it, exit code 2."""
    t975 = ablation.t975
    assert t975(1) == 12.706 and t975(15) == 2.131 and t975(30) == 2.042
    assert t975(31) == pytest.approx(2.0395, abs=1e-3) and t975(120) == pytest.approx(1.9799, abs=1e-3)
    with pytest.raises(ValueError):
        t975(0)
    assert ablation.signflip_p(np.array([0.01, 0.02, 0.03])) == pytest.approx(0.25)   # as paired_test's (1, 2, 3)
    assert ablation.signflip_p(np.ones(20)) < 1e-4            # exact 2 / 2^20; 200k random patterns find ~0.4 of them
    assert ablation.signflip_p(np.array([1.0, -1.0] * 10)) == 1.0
    r = pooled.pooled_difference([0.01, 0.02, 0.03])
    assert (r["n"], r["wins"]) == (3, 3) and r["mean"] == pytest.approx(0.02)
    assert r["low"] == pytest.approx(0.02 - 4.303 * 0.01 / math.sqrt(3))             # std 0.01, df 2
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    ident = [0.9] * 5
    _fake_rl_run(f"{a}/unparsed_right_lr05_s0", ident, [0.5, 0.6, 0.7, 0.8, 0.9], 0.0)  # last 3: 0.80
    _fake_rl_run(f"{a}/verifier_lr05_s0", ident, [0.5, 0.6, 0.6, 0.7, 0.8], 0.0)        # 0.70
    _fake_rl_run(f"{a}/verifier_lr05_s1", ident, [0.5] * 5, 0.0)                           # no partner: left out
    _fake_rl_run(f"{b}/unparsed_right_lr05_s3", ident, [0.5, 0.6, 0.6, 0.6, 0.6], 0.0)  # 0.60
    _fake_rl_run(f"{b}/verifier_lr05_s3", ident, [0.5, 0.6, 0.7, 0.7, 0.7], 0.0)        # 0.70
    md = pooled.main(["unparsed_right_lr05", "verifier_lr05", "--runs", f"unparsed_9001:{a}:0-1",
                      f"unparsed_1618:{b}:3"])
    lt = md.split("## test_longtail")[1].split("## test_id")[0]
    assert "| unparsed_9001 | 1 | +10.00 | 1 |" in lt and "| unparsed_1618 | 1 | -10.00 | 0 |" in lt
    assert "| **pooled** | 2 | +0.00 | 1 | -127.06 to +127.06 | 1.000 |" in lt     # std 0.1414, 12.706 * 0.1 = 1.2706
    assert "one of the two runs missing (left out): 1." in lt
    for argv, named in ((["grpo", "verifier_lr05", "--runs", f"unparsed_9001:{a}:0"], "not a row of study"),
                        (["unparsed_right_lr05", "verifier_lr05", "--runs", f"unparsed_9001:{a}/nope:0"], "no directory"),
                        (["unparsed_right_lr05", "verifier_lr05", "--runs", f"no_such_study:{a}:0"], "STUDY:RUN_DIR:SEEDS")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_:
            pooled.main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and named in err and err.count("\n") == 1, err


@pytest.mark.parametrize("study", sorted(ablation.STUDIES))
def test_every_row_of_every_study_makes_a_valid_config(study, tmp_path, monkeypatch):
    """Each (row, seed 0) command line of a study loads as a config (config.parse_args: types, ranges, the settings
    that must go together, the schema): a row that cannot run is found here, not hours into a study (the paper
    graph's GRPO row once combined outcome credit with paper.yaml's per-node scale and failed with exit 2)."""
    import argparse

    from config import parse_args
    monkeypatch.chdir(ROOT)
    s = ablation.STUDIES[study]
    args = argparse.Namespace(study=study, rows=[], seeds=[0], out=str(tmp_path), extra=[], config="configs/base.yaml",
                              rl_steps=s.rl_steps, eval_every=s.eval_every, eval_items=s.eval_items,
                              distill_steps=s.distill_steps, distill_train=s.distill_train)
    jobs = ablation.make_jobs(args)
    assert jobs
    for job in jobs:
        cfg = parse_args(job.args[2:])[0]  # [python, script, config, overrides...]; exit 2 (SystemExit) on a bad row
        # a study's own overrides reach every run
        assert cfg.data.seed == {"fresh": 2718, "rate": 3141, "ceiling": 3141, "repair": 3141,
                                 "temperature": 3141, "noise": 3141,
                                 "noise_parts": 3141, "noise_adjacent": 3141,
                                 "noise_unseen": 5772, "noise_unseen_06": 5772,
                                 "label_free": 5772, "label_free_3141": 3141,
                                 "label_free_06": 5772, "label_free_3141_06": 3141,
                                 "shield_06_unseen": 9001, "shield_complete": 9001,
                                 "shield_roles": 9001, "shield_roles_06": 9001,
                                 "shield_sides": 9001, "shield_sides_06": 9001,
                                 "unparsed_9001": 9001, "unparsed_1618": 1618}.get(study, 1234)
        # every study ran with the guessing comparator but the rows that test abstaining (PINNED)
        assert cfg.reward.comparator_unknown == ("abstain" if job.row.name in ("others_abstain", "abstain_heavy",
                                                                             "abstain_b32", "default_probe",
                                                                             "abstain_lr2", "abstain_lr4",
                                                                             "abstain_lr15", "abstain_g4",
                                                                             "abstain_lr05", "abstain_lr025",
                                                                             "tuned_wrong_edges", "tuned_a0",
                                                                             "tuned_grounding", "oracle_gold",
                                                                             "oracle_gold_a0", "repair_default",
                                                                             "repair_wide", "repair_k8", "abstain_t13",
                                                                             "abstain_noise2", "abstain_noise4",
                                                                             "a0_noise4", "wrong_edges_noise4",
                                                                             "verifier_noise4", "abstain_adj4",
                                                                             "abstain_noise6", "verifier_lr05",
                                                                             "verifier_noise6", "shield_noise6", "shield_lr05",
                                                                             "complete_noise6", "complete_lr05",
                                                                             "shield_verdict_lr05", "shield_evidence_lr05",
                                                                             "shield_verdict_noise6",
                                                                             "shield_right_lr05", "shield_wrong_lr05",
                                                                             "shield_right_noise6", "shield_wrong_noise6",
                                                                             "unparsed_right_lr05", "unparsed_right_noise6")
                                                 else "mismatch"), job.row.name
        # every study ran at rl.lr 1e-4 (PINNED) but the rows that set their own rate
        own = [o.split("=", 1)[1] for o in job.row.overrides if o.startswith("--rl.lr=")]
        assert cfg.rl.lr == float(own[-1] if own else 1e-4), job.row.name
        # every study ran with group + verifier evidence (PINNED) but the rows that set their own
        own = [o.split("=", 1)[1] for o in job.row.overrides if o.startswith("--credit.evidence=")]
        assert cfg.credit.evidence == (own[-1] if own else "both"), job.row.name
        # every study ran without the shield, on both sides, with the outcome on every token of an unparsed answer
        # (PINNED) but the rows that set their own
        for key, pinned in (("shield", "none"), ("shield_verdicts", "[right,wrong]"), ("unparsed", "outcome")):
            own = [o.split("=", 1)[1] for o in job.row.overrides if o.startswith(f"--credit.{key}=")]
            value = own[-1] if own else pinned
            want = value.strip("[]").split(",") if value.startswith("[") else value
            assert getattr(cfg.credit, key) == want, (job.row.name, key)


def test_gate_replay_moves_down_on_a_positive_trace_and_names_a_run_without_gradients(tmp_path):
    """experiments/gate_replay.py through the project's controller: a run whose alpha gradient is always positive
    moves every rule's alpha down by >= 0.2 (100% of real traces); a directory without controller gradients, or
    without metrics.jsonl, ends in one line naming it, exit code 2."""
    run = tmp_path / "run"
    run.mkdir()
    with open(run / "metrics.jsonl", "w") as f:
        for step in range(64):
            f.write(json.dumps({"step": step, "controller/alpha_grad/q->f": 1e-9 * (1 + (step % 3))}) + "\n")
    cmd = [sys.executable, os.path.join(ROOT, "experiments", "gate_replay.py"), str(run), "--copies", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("| window") or line.startswith("| sequential")]
    assert len(rows) == len(gate_replay.RULES) and all(row.split("|")[3].strip() == "100%" for row in rows), r.stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text(json.dumps({"step": 0, "reward": 0.5}) + "\n")
    r = subprocess.run(cmd[:2] + [str(empty)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "no controller/alpha_grad" in r.stderr and r.stderr.count("\n") == 1
    r = subprocess.run(cmd[:2] + [str(tmp_path / "missing")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "missing/metrics.jsonl" in r.stderr and r.stderr.count("\n") == 1


def test_sample_rewards_splits_logged_rewards_by_long_tail_kind_with_hand_numbers(tmp_path):
    """experiments/sample_rewards.py: rollouts joined to the RL pool's meta by (query, product), grouped head / long
    tail not pivotal / long tail pivotal, steps before --from-step dropped, pooled over seeds; a missing run is one
    line naming its file, exit 2, and nothing on stdout."""
    pool = tmp_path / "data" / "s1"
    pool.mkdir(parents=True)
    metas = {"a": {}, "b": {"longtail": "brand_alias", "pivotal": False}, "c": {"longtail": "size_unit", "pivotal": True}}
    with open(pool / "rl.jsonl", "w") as f:
        for q, m in metas.items():
            f.write(json.dumps({"query": q, "product": "p", "label": 0, "meta": m}) + "\n")
    rows = {0: [(0, "a", 0.0), (5, "a", 1.0), (5, "c", 0.25), (6, "b", 0.5)], 1: [(7, "a", 0.5), (8, "c", 0.75)]}
    for seed, recs in rows.items():
        d = tmp_path / f"r_s{seed}"
        d.mkdir()
        with open(d / "samples.jsonl", "w") as f:
            for step, q, rew in recs:
                f.write(json.dumps({"step": step, "query": q, "product": "p", "reward": rew}) + "\n")
    cmd = [sys.executable, os.path.join(ROOT, "experiments", "sample_rewards.py"), str(tmp_path), "r", "--seeds", "0-1",
           "--from-step", "5"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    # head: 1.0 (seed 0, step 5) and 0.5 (seed 1); step 0 dropped -> 0.750 over 2; not pivotal 0.5 over 1;
    # pivotal 0.25 and 0.75 -> 0.500 over 2
    assert "| r | 0.750 (2) | 0.500 (1) | 0.500 (2) |" in r.stdout, r.stdout
    r = subprocess.run(cmd[:3] + ["missing"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "missing_s0/samples.jsonl" in r.stderr and r.stderr.count("\n") == 1 and not r.stdout


def test_pool_screen_table_keys_and_auc_by_hand(tmp_path):
    """experiments/pool_screen.py (the screen of credit pooled across prompts by content): the table's sums and counts,
    Qhat - Vhat shrunk by the prior (0 for a key never seen and for inputs always judged one way, NaN unkeyed), the AUC
    with ties at half, the key of a parsed verdict step; a missing run is one line naming its file, exit 2."""
    import data
    import policy
    import testbed
    import torch
    from experiments import pool_screen as ps
    scarlet, navy = ("F_color", (("color", "scarlet", "red"),)), ("F_color", (("color", "navy", "blue"),))
    match, mis, other = (scarlet, ("match", ("match",))), (scarlet, ("mismatch", ("mismatch",))), \
        (navy, ("mismatch", ("mismatch",)))
    sums = {}
    ps.add_to_table(sums, [[match, None], [mis, None], [match, other]], torch.tensor([[.5, 9.], [-.5, 9.], [.25, 1.]]))
    assert sums == {match: [.75, 2.], (scarlet,): [.25, 3.], mis: [-.5, 1.], other: [1., 1.], (navy,): [1., 1.]}
    unseen = (("F_brand", (("brand", "rbk", "reebok"),)), ("match", ("match",)))
    ev = ps.pooled_evidence(sums, [[match, None], [mis, other], [unseen, None]], 1.)
    want = torch.tensor([[.75 / 3 - .25 / 4, float("nan")], [-.5 / 2 - .25 / 4, 0.], [0., float("nan")]], dtype=torch.float64)
    torch.testing.assert_close(ev, want, atol=1e-12, rtol=0, equal_nan=True)
    assert ps.auc(torch.tensor([.9, .1, .5, .5]), torch.tensor([1., 0., 1., 0.])) == pytest.approx(.875)  # (1+1+1+.5)/4
    schema = data.GraphSchema()
    exs = testbed.generate_splits(schema, 0, 32, 0, 0, 0, 0.0, 0.5)["sft"]
    tok = policy.build_word_tokenizer(testbed.vocabulary(schema, exs))
    vocab = data.TagVocab.from_tokenizer(tok, schema)
    parses = [data.parse_completion(policy.encode(tok, data.serialize_cot(e.cot, schema), True) + [tok.eos_token_id],
                                    vocab, schema) for e in exs]
    parsed = next(p for p in parses if any(isinstance(s.content, data.Verdict) and any(q != v for _, (q, v, _) in
                                                                                        s.content.parts)
                                           for s in p.nodes.values()))   # a verdict on two different values
    assert parsed.valid
    keys = ps.content_keys([parsed], schema)[0]
    for name, k in zip(schema.slots, keys):
        c = parsed.nodes[name].content if name in parsed.nodes else None
        if isinstance(c, data.Verdict):
            assert k == ((name, tuple((f, q, p) for f, (q, p, _) in c.parts)), (c.verdict, tuple(v for _, (_, _, v) in c.parts)))
        else:
            assert k is None
    assert any(k is not None for k in keys)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "pool_screen.py"), str(tmp_path / "nope"), "x"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "nope/config.yaml" in r.stderr and r.stderr.count("\n") == 1 and not r.stdout

"""Issue 12, through the CLIs as a user runs them (subprocesses, tiny settings): every mistake a user can make ends
with exit code 2 and one line on stderr naming the place; a resume never mixes runs; a corrupt latest checkpoint
is named and skipped; SIGINT / SIGTERM stop RL after a step with a checkpoint that the same command resumes
(DESIGN §7)."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", GG_DIST_TIMEOUT="120", TQDM_DISABLE="1")
ENV.pop("GG_DEBUG", None)


def run(args, timeout=300, **env):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env={**ENV, **env}, capture_output=True, text=True,
                          timeout=timeout)


def last_line(stderr: str) -> str:
    """The CLI's own last line (tqdm bars end with a carriage return, not a newline)."""
    return stderr.rstrip("\n").rsplit("\n", 1)[-1].rsplit("\r", 1)[-1]


def steps_logged(out) -> list[int]:
    return [json.loads(x)["step"] for x in open(os.path.join(out, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    """One tiny SFT stage (its checkpoint has a manifest) and its data, shared by the runs below."""
    root = tmp_path_factory.mktemp("sft")
    r = run(["sft_mask.py", "configs/tiny.yaml", f"--run.out_dir={root}", f"--data.dir={root}/data",
             "--eval.max_items=8", "--run.num_threads=1"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert os.path.isfile(root / "sft" / "checkpoint" / "manifest.json")
    return str(root / "sft" / "checkpoint"), f"{root}/data"


def rl_args(out, sft, *extra):
    ckpt, data_dir = sft
    return ["graph_grpo.py", "configs/tiny.yaml", f"--run.out_dir={out}", f"--data.dir={data_dir}",
            f"--rl.init_from={ckpt}", "--eval.max_items=8", "--run.num_threads=1", *extra]


# ---------------------------------------------------------------------------------------------- one error path

GOOD = '{"query": "nike red sneakers", "product": "adidas sneakers color black", "label": 1}\n'


def external_copy(sft, d, change):
    """A copy of the SFT checkpoint without its manifest (as a pretrained model folder is), changed by change(d)."""
    shutil.copytree(sft[0], d)
    os.remove(os.path.join(d, "manifest.json"))
    change(d)
    return str(d)


def edit_json(path, **kv):
    conf = json.load(open(path))
    conf.update(kv)
    json.dump(conf, open(path, "w"))


def remove_tokenizer(d):
    for f in os.listdir(d):
        if f.startswith("tokenizer"):
            os.remove(os.path.join(d, f))


def truncate(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)


def write_data(d, lines: bytes):
    os.makedirs(d)
    for name in ("sft.jsonl", "rl.jsonl", "test_id.jsonl", "test_longtail.jsonl"):
        with open(os.path.join(d, name), "wb") as f:
            f.write(GOOD.encode() * 2 if name != "sft.jsonl" else lines)
    return str(d)


def damaged_copy(sft, d):
    """A copy of the SFT checkpoint, manifest included, with its weights truncated to 100 bytes."""
    shutil.copytree(sft[0], d)
    truncate(d / "model.safetensors", 100)
    return str(d)


def run_dir_with_corrupt_checkpoint(sft, d):
    os.makedirs(d)
    shutil.copy(os.path.join(os.path.dirname(sft[0]), "config.yaml"), d / "config.yaml")
    shutil.copytree(sft[0], d / "checkpoint")
    truncate(d / "checkpoint" / "model.safetensors", 100)
    return str(d)


def cases(sft, tmp):
    """(name, argv, the one line expected on stderr as a regex). Each builds what it needs under tmp."""
    t, data_dir = str(tmp), sft[1]
    rl = lambda *extra: rl_args(f"{t}/run", sft, *extra)  # noqa: E731
    jsonl = ["--data.source=jsonl", "--run.num_threads=1", f"--run.out_dir={t}/run"]
    model_type = external_copy(sft, tmp / "mt", lambda d: edit_json(d / "config.json", model_type="qwen9"))
    weights = external_copy(sft, tmp / "w", lambda d: truncate(d / "model.safetensors", 100))
    no_label = write_data(tmp / "d1", GOOD.encode() + b'{"query": "a", "product": "b"}\n')
    not_utf8 = write_data(tmp / "d2", GOOD.encode() * 2 + b'{"query": "caf\xe9"}\n')
    blocker = tmp / "a_file"
    blocker.write_text("")
    return [
        ("unknown config key", rl("--rl.lrr=1e-4"),
         r"error: override --rl\.lrr=1e-4: unknown key 'rl\.lrr' \(did you mean 'rl\.lr'\?\)"),
        ("value out of range", ["testbed.py", "configs/tiny.yaml", "--rl.prompts_per_step=0"],
         r"error: override --rl\.prompts_per_step=0: rl\.prompts_per_step = 0: must be > 0"),
        ("settings that do not go together", ["testbed.py", "configs/tiny.yaml", "--credit.scale=node"],
         r"error: override --credit\.scale=node: credit\.scale = node needs credit\.mode graph, process or "
         r"stepwise, not 'outcome'"),
        ("a config file that is not there", ["sft_mask.py", f"{t}/nope.yaml"],
         rf"error: config file not found: {t}/nope\.yaml"),
        ("bad data line", ["sft_mask.py", "configs/tiny.yaml", *jsonl, f"--data.dir={no_label}"],
         rf"error: {t}/d1/sft\.jsonl:2: missing field 'label'"),
        ("non-UTF-8 data", ["testbed.py", "configs/tiny.yaml", *jsonl, f"--data.dir={not_utf8}"],
         rf"error: {t}/d2/sft\.jsonl:3: not UTF-8 \(byte 0xe9 at column 15\)"),  # {"query": "caf = 14 bytes
        ("missing model directory", ["sft_mask.py", "configs/tiny.yaml", f"--run.out_dir={t}/run",
                                     f"--data.dir={data_dir}", f"--model.name_or_path={t}/no_model"],
         rf"error: model\.name_or_path = {t}/no_model: no such model directory"),
        ("unknown model_type", rl(f"--rl.init_from={model_type}"),
         rf"error: rl\.init_from = {t}/mt: config\.json has model_type 'qwen9', which transformers [0-9.]+ does not "
         r"know \(a typo, or a model newer than this transformers\)"),
        ("model without a tokenizer", rl(f"--rl.init_from={external_copy(sft, tmp / 'tok', remove_tokenizer)}"),
         rf"error: rl\.init_from = {t}/tok: no tokenizer saved with the model \(none of tokenizer\.json, "
         r"tokenizer\.model, vocab\.json, vocab\.txt, spiece\.model\)"),
        ("truncated weights, no manifest", rl(f"--rl.init_from={weights}"),
         rf"error: rl\.init_from = {t}/w: cannot load the model: SafetensorError: .+"),
        ("missing rl.init_from", rl(f"--rl.init_from={t}/no_ckpt"),
         rf"error: rl\.init_from = {t}/no_ckpt: no such checkpoint directory"),
        ("rl.init_from fails its manifest", rl(f"--rl.init_from={damaged_copy(sft, tmp / 'bad')}"),
         rf"error: {t}/bad/model\.safetensors: 100 bytes, manifest\.json says [0-9]+ \(truncated or changed after "
         r"the save\)"),
        ("unwritable output directory", rl_args(f"{blocker}/run", sft),
         rf"error: run\.out_dir = {blocker}/run: cannot write there \(Not a directory\)"),
        ("not a run directory", ["eval.py", f"{t}/nothing"],
         rf"error: {t}/nothing: not a run directory \(config\.yaml \+ checkpoint/\) or a checkpoint inside one"),
        ("eval of a corrupt checkpoint", ["eval.py", run_dir_with_corrupt_checkpoint(sft, tmp / "evalrun")],
         rf"error: {t}/evalrun/checkpoint/model\.safetensors: 100 bytes, manifest\.json says [0-9]+ .+"),
        ("missing distillation teacher", ["distill.py", "configs/tiny.yaml", f"--run.out_dir={t}/run",
                                          f"--data.dir={data_dir}", f"--distill.teacher={t}/no_teacher"],
         rf"error: distill\.teacher = {t}/no_teacher: no such model directory"),
        ("wands: value out of range", ["experiments/wands.py", "--eval.max_new_tokens=0"],
         r"error: override --eval\.max_new_tokens=0: eval\.max_new_tokens = 0: must be > 0"),
    ]


def test_every_user_error_is_exit_2_and_one_line_naming_the_place(sft, tmp_path):
    table = cases(sft, tmp_path)
    with ThreadPoolExecutor(3) as pool:  # each case is a fresh interpreter: 3 at a time
        results = list(pool.map(lambda c: run(c[1]), table))
    wrong = [f"{name}: exit {r.returncode}, stderr ends {r.stderr[-400:]!r}"
             for (name, _, want), r in zip(table, results)
             if r.returncode != 2 or not re.fullmatch(want, last_line(r.stderr)) or "Traceback" in r.stderr]
    assert not wrong, "\n".join(wrong)


def test_debug_variable_shows_the_traceback(tmp_path):
    args = ["testbed.py", "configs/tiny.yaml", "--data.source=jsonl", f"--data.dir={tmp_path}/none"]
    plain, debug = run(args), run(args, GG_DEBUG="1")
    assert plain.returncode == debug.returncode == 2
    assert "Traceback" not in plain.stderr and "Traceback (most recent call last)" in debug.stderr
    assert last_line(debug.stderr) == last_line(plain.stderr) == f"error: {tmp_path}/none/sft.jsonl: no such file"


# ---------------------------------------------------------------------------------------------- nothing mixed

def test_resume_refuses_another_config_and_accepts_a_longer_run(sft, tmp_path):
    out = tmp_path / "run"
    assert run(rl_args(out, sft, "--rl.steps=2")).returncode == 0
    r = run(rl_args(out, sft, "--rl.steps=2", "--credit.mode=graph", "--rl.lr=3e-4"))
    assert r.returncode == 2
    assert last_line(r.stderr) == (
        f"error: {out}: its checkpoint was made with another config (rl.lr: 0.0001 -> 0.0003; credit.mode: 'outcome' "
        f"-> 'graph'); resuming would mix two runs: pass --no-resume to start over, or give this variant its own "
        f"--run.out_dir")
    assert "mode: outcome" in open(out / "config.yaml").read()  # the refused run wrote nothing
    r = run(rl_args(out, sft, "--rl.steps=3", "--run.save_every=1", "--rl.eval_every=1"))  # longer, re-evaluated
    assert r.returncode == 0 and f"resuming from {out}/checkpoints/step_000002 at step 2" in r.stdout
    assert steps_logged(out) == [0, 1, 2]
    r = run(rl_args(out, sft, "--rl.steps=2"))
    assert r.returncode == 2 and last_line(r.stderr).startswith(
        f"error: {out}/checkpoints/step_000003: this run is past rl.steps = 2; raise rl.steps to continue it")
    r = run(rl_args(out, sft, "--rl.steps=2", "--credit.mode=graph", "--no-resume"))
    assert r.returncode == 0 and "resuming" not in r.stdout
    assert steps_logged(out) == [0, 1] and sorted(os.listdir(out / "checkpoints")) == ["step_000002"]
    assert "mode: graph" in open(out / "config.yaml").read()


def test_sft_stage_is_reused_with_its_settings_and_refused_with_others(sft, tmp_path):
    common = ["configs/tiny.yaml", f"--run.out_dir={tmp_path}", f"--data.dir={sft[1]}", "--sft.steps=12",
              "--sft.log_every=4", "--eval.max_items=4", "--run.num_threads=1"]
    assert run(["sft_mask.py", *common]).returncode == 0
    stamp = os.path.getmtime(tmp_path / "sft" / "checkpoint" / "model.safetensors")
    r = run(["sft_mask.py", *common, "--rl.lr=0.5", "--eval.max_items=2"])  # RL and evaluation keys: same stage
    assert r.returncode == 0 and f"reusing the SFT checkpoint {tmp_path}/sft/checkpoint" in r.stdout
    assert os.path.getmtime(tmp_path / "sft" / "checkpoint" / "model.safetensors") == stamp
    want = (f"error: {tmp_path}/sft: its SFT checkpoint was made with another config (mask.enabled: True -> False); "
            f"resuming would mix two runs: pass --no-resume to start over, or give this variant its own --run.out_dir")
    for script in ("sft_mask.py", "graph_grpo.py"):  # graph_grpo.py would start from it (rl.init_from empty)
        r = run([script, *common, "--mask.enabled=false", "--rl.steps=1"])
        assert r.returncode == 2 and last_line(r.stderr) == want, script
    r = run(["sft_mask.py", *common, "--mask.enabled=false", "--no-resume"])
    assert r.returncode == 0 and "saved SFT checkpoint" in r.stdout
    assert steps_logged(tmp_path / "sft") == [0, 4, 8, 11]  # trained again from step 0, lines not doubled
    assert "enabled: false" in open(tmp_path / "sft" / "config.yaml").read()


# ---------------------------------------------------------------------------------------------- nothing lost

def test_resume_skips_a_corrupt_latest_checkpoint(sft, tmp_path):
    """Files truncated as a full disk or a killed copy leaves them. With its manifest the check names the file;
    without one (a checkpoint from before manifests) the failed load does. With none left, the resume says so."""
    out, every_2 = tmp_path / "run", ["--run.save_every=2", "--run.keep_last=2"]
    ckpt = lambda step: out / "checkpoints" / f"step_{step:06d}"  # noqa: E731

    def resume(steps, skipped_file, want_start):
        r = run(rl_args(out, sft, f"--rl.steps={steps}", *every_2))
        assert r.returncode == 0, r.stderr[-2000:]
        skipped = [line for line in r.stderr.splitlines() if line.startswith("resume: skipping")]
        assert skipped == [f"resume: skipping a checkpoint that does not load: {skipped_file}"]
        assert f"resuming from {ckpt(want_start)} at step {want_start}" in r.stdout
        assert steps_logged(out) == list(range(steps))

    assert run(rl_args(out, sft, "--rl.steps=4", *every_2)).returncode == 0
    truncate(ckpt(4) / "model.safetensors", 1000)
    size = json.load(open(ckpt(4) / "manifest.json"))["files"]["model.safetensors"]["size"]
    resume(6, f"{ckpt(4)}/model.safetensors: 1000 bytes, manifest.json says {size} (truncated or changed after the "
              f"save)", 2)
    truncate(ckpt(6) / "trainer_state.pt", 1000)
    os.remove(ckpt(6) / "manifest.json")
    resume(8, f"{ckpt(6)}/trainer_state.pt: cannot load the trainer state: RuntimeError: PytorchStreamReader failed "
              f"reading zip archive: failed finding central directory", 4)
    for step in (6, 8):
        truncate(ckpt(step) / "trainer_state.pt", 10)
    r = run(rl_args(out, sft, "--rl.steps=10", *every_2))
    assert r.returncode == 2 and last_line(r.stderr) == (
        f"error: {out}/checkpoints: no checkpoint loads (2 skipped, see above); --no-resume starts the run over")


def wait_for_steps(out, n, proc, deadline=300):
    end = time.time() + deadline
    while time.time() < end and proc.poll() is None:
        if os.path.exists(out / "metrics.jsonl") and len(open(out / "metrics.jsonl").readlines()) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"no {n} steps logged (exit {proc.poll()})")


def test_sigint_stops_after_a_step_with_a_checkpoint_that_resumes_to_the_same_end(sft, tmp_path):
    extra = ["--rl.steps=40", "--run.save_every=100", "--credit.mode=graph", "--controller.mode=meta",
             "--controller.accumulate=2"]
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, *rl_args(out, sft, *extra)], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_steps(out, 3, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err
    m = re.fullmatch(rf"interrupted by SIGINT after step (\d+) of 40: checkpoint {out}/checkpoints/step_0000(\d\d); "
                     r"the same command resumes from it", last_line(err))
    assert m and m[1] == str(int(m[2])) and 3 <= int(m[1]) < 40, err[-500:]
    assert os.listdir(out / "checkpoints") == [f"step_0000{m[2]}"] and not (out / "checkpoint").exists()
    r = run(rl_args(out, sft, *extra))
    assert r.returncode == 0 and f"at step {int(m[1])}" in r.stdout
    assert steps_logged(out) == list(range(40))
    ref = tmp_path / "ref"
    assert run(rl_args(ref, sft, *extra)).returncode == 0
    a, b = load_file(out / "checkpoint" / "model.safetensors"), load_file(ref / "checkpoint" / "model.safetensors")
    assert all((a[k] == b[k]).all() for k in a)  # interrupted + resumed == uninterrupted, bit for bit


def test_second_signal_exits_at_once(sft, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, *rl_args(out, sft, "--rl.steps=40", "--run.save_every=100")], cwd=ROOT,
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_steps(out, 2, proc)
    proc.send_signal(signal.SIGINT)   # two different signals: the same one twice before Python runs its handler
    proc.send_signal(signal.SIGTERM)  # would be one; these are handled in turn, SIGINT first
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    assert last_line(err) == ("second signal (SIGTERM): exiting at once; the run directory keeps its last complete "
                              "checkpoint")
    assert not (out / "checkpoints").exists()  # no checkpoint was due, and none was written


def rank_pid(launcher_pid: int, rank: int) -> int:
    """The pid of a torchrun worker, found by the RANK in its environment."""
    for child in open(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read().split():
        if f"RANK={rank}".encode() in open(f"/proc/{child}/environ", "rb").read().split(b"\0"):
            return int(child)
    raise AssertionError(f"no rank {rank} under {launcher_pid}")


def test_torchrun_signal_to_one_rank_stops_every_rank_after_the_same_step(sft, tmp_path):
    """Only rank 1 gets SIGINT: the ranks agree on the step (a collective each step), rank 0 saves and says where
    (it got no signal itself), every rank stops; the resume on 2 ranks finishes."""
    out = tmp_path / "ddp"
    args = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            *rl_args(out, sft, "--rl.steps=40", "--run.save_every=100")]
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    wait_for_steps(out, 3, proc)
    os.kill(rank_pid(proc.pid, 1), signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    said = [line.rsplit("\r", 1)[-1] for line in err.splitlines() if "interrupted by SIGINT after step" in line]
    assert len(said) == 1, err[-2000:]  # rank 0 only
    step = int(re.search(r"after step (\d+) of 40", said[0])[1])
    assert os.listdir(out / "checkpoints") == [f"step_{step:06d}"]
    r = run(args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resuming from {out}/checkpoints/step_{step:06d} at step {step}" in r.stdout
    assert steps_logged(out) == list(range(40))

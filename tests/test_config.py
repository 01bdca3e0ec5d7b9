"""config.py: typed sections, YAML + overrides, one-line errors that name file, line and key."""

import dataclasses
import os
import typing
from pathlib import Path

import pytest

from config import (Config, ConfigError, check_value, config_to_dict, field_docs, load_config,
                    parse_args, resolve, save_config)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def write(tmp_path, text, name="exp.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def error_of(path, overrides=()):
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    message = str(info.value)
    assert "\n" not in message
    return message


# --- the schema itself ---------------------------------------------------------------------------

def sections():
    hints = typing.get_type_hints(Config)
    return [(f.name, hints[f.name]) for f in dataclasses.fields(Config)]


def test_every_field_has_a_docstring_and_a_default_of_its_type():
    for name, cls in sections():
        docs, hints = field_docs(cls), typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name, "").strip(), f"{name}.{f.name} has no docstring"
            default = getattr(cls(), f.name)
            assert check_value(default, hints[f.name], f"{name}.{f.name}") == default


def test_field_docs_reads_the_literal_under_each_field():
    docs = field_docs(Config.__dataclass_fields__["run"].default_factory)
    assert docs["resume"] == "resume when the run directory holds a checkpoint (--resume / --no-resume)"


def test_empty_file_and_empty_section_give_defaults(tmp_path):
    assert load_config(write(tmp_path, "# nothing\n"), []) == resolve(Config(), "exp.yaml")
    assert load_config(write(tmp_path, "rl:\n  # steps: 3\n"), []).rl == Config().rl


# --- file errors -----------------------------------------------------------------------------------

def test_unknown_key_names_line_and_closest_key(tmp_path):
    path = write(tmp_path, "run:\n  seed: 1\nrl:\n  steps: 3\n  lrr: 0.1\n")
    assert error_of(path) == f"{path}:5: unknown key 'rl.lrr' (did you mean 'rl.lr'?)"


def test_key_in_the_wrong_section_suggests_where_it_lives(tmp_path):
    path = write(tmp_path, "rl:\n  label_names: [a, b]\n")
    assert error_of(path) == f"{path}:2: unknown key 'rl.label_names' (did you mean 'data.label_names'?)"


def test_unknown_section(tmp_path):
    path = write(tmp_path, "run:\n  seed: 1\nrll:\n  steps: 3\n")
    assert error_of(path) == f"{path}:3: unknown section 'rll' (did you mean 'rl'?)"


def test_wrong_type(tmp_path):
    path = write(tmp_path, "rl:\n  steps: abc\n")
    assert error_of(path) == f"{path}:2: rl.steps: expected int, got str 'abc'"
    path = write(tmp_path, "graph:\n  edges: [[q, f], f]\n")
    assert error_of(path) == f"{path}:2: graph.edges[1]: expected list[str], got str 'f'"
    path = write(tmp_path, "rl:\n  lr: fast\n")
    assert error_of(path) == f"{path}:2: rl.lr: expected float, got str 'fast'"


def test_bool_is_not_an_int_or_a_float(tmp_path):
    path = write(tmp_path, "rl:\n  steps: true\n")
    assert error_of(path) == f"{path}:2: rl.steps: expected int, got bool True"
    path = write(tmp_path, "rl:\n  lr: false\n")
    assert error_of(path) == f"{path}:2: rl.lr: expected float, got bool False"


def test_int_accepted_for_float(tmp_path):
    cfg = load_config(write(tmp_path, "rl:\n  lr: 1\n  temperature: 2\n"), [])
    assert cfg.rl.lr == 1.0 and type(cfg.rl.lr) is float and type(cfg.rl.temperature) is float


def test_exponent_without_dot_is_a_float(tmp_path):
    # plain YAML 1.1 reads 1e-4 as the string '1e-4'
    cfg = load_config(write(tmp_path, "rl:\n  lr: 1e-4\nsft:\n  lr: 3E-5\n"), [])
    assert cfg.rl.lr == 1e-4 and cfg.sft.lr == 3e-5


def test_invalid_choice_lists_the_choices(tmp_path):
    path = write(tmp_path, "credit:\n  mode: grpah\n")
    assert error_of(path) == (f"{path}:2: credit.mode: invalid choice 'grpah' (choose from 'outcome', "
                              "'process', 'stepwise', 'rule_shaped', 'graph') (did you mean 'graph'?)")
    # the file is checked before the overrides, and an override cannot hide an error in the file
    assert error_of(path, ["--credit.mode=graph"]).startswith(f"{path}:2: credit.mode: invalid choice")
    assert error_of(write(tmp_path, ""), ["--run.device=tpu"]) == (
        "override --run.device=tpu: run.device: invalid choice 'tpu' (choose from 'auto', 'cpu', 'cuda') (did you mean 'cpu'?)")


def test_two_replays_are_refused_naming_the_key(tmp_path):
    path = write(tmp_path, "rl:\n  guided_replay: true\n")
    assert error_of(path, ["--rl.repair_replay=true"]) == (
        "override --rl.repair_replay=true: rl.repair_replay = True: replays the rule's repair where rl.guided_replay "
        "replays the gold CoT: set one of them")
    assert load_config(path, ["--rl.guided_replay=false", "--rl.repair_replay=true"]).rl.repair_replay


def test_label_noise_is_refused_on_read_data_and_out_of_range(tmp_path):
    path = write(tmp_path, "data:\n  source: jsonl\n  rl_label_noise: 0.2\n")
    assert error_of(path) == (f"{path}:3: data.rl_label_noise = 0.2: adds noise to generated splits only; "
                              "data.source jsonl reads its labels as they are")
    assert error_of(path, ["--data.source=synthetic", "--data.rl_label_noise=1.5"]).startswith(
        "override --data.rl_label_noise=1.5: data.rl_label_noise = 1.5")
    assert load_config(path, ["--data.source=synthetic"]).data.rl_label_noise == 0.2


def test_duplicate_key(tmp_path):
    path = write(tmp_path, "rl:\n  lr: 0.1\n  steps: 2\n  lr: 0.2\n")
    assert error_of(path) == f"{path}:4: duplicate key 'rl.lr' (first at line 2)"


def test_section_must_be_a_mapping(tmp_path):
    path = write(tmp_path, "run:\n  seed: 1\nrl: 5\n")
    assert error_of(path) == f"{path}:3: section 'rl' must hold key: value lines, got int 5"
    path = write(tmp_path, "- rl\n- sft\n")
    assert error_of(path).startswith(f"{path}:1: expected sections (run:, rl:, ...) at the top level")


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.yaml")
    assert error_of(path) == f"config file not found: {path}"


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "rl:\n  steps: 3\n lr: 0.1\n")
    assert error_of(path).startswith(f"{path}:3: invalid YAML: ")
    path = write(tmp_path, "rl:\n  steps: 3\n  lr: [0.1, 0.2\nsft:\n  steps: 1\n")
    message = error_of(path)
    assert message.startswith(f"{path}:4: invalid YAML: ") and "at line 3" in message


def test_error_messages_are_one_line():
    assert str(ConfigError("a\nb\r\nc")) == "a b  c"


# --- overrides -----------------------------------------------------------------------------------

def test_overrides_are_typed(tmp_path):
    path = write(tmp_path, "rl:\n  steps: 3\n  lr: 0.1\n")
    cfg = load_config(path, ["--rl.steps=7", "--rl.lr=1e-4", "--rl.drop_zero_std=true",
                             "--data.test_files=[a.jsonl, b.jsonl]", "--graph.edges=[[q, y]]",
                             "--credit.verifier_weights=[1, 0.5]", "--run.out_dir=/tmp/x",
                             "--run.name=123", "--rl.steps=9"])
    assert cfg.rl.steps == 9  # the last override wins, and overrides beat the file
    assert cfg.rl.lr == 1e-4
    assert cfg.rl.drop_zero_std is True
    assert cfg.data.test_files == ["a.jsonl", "b.jsonl"]
    assert cfg.graph.edges == [["q", "y"]]
    assert cfg.credit.verifier_weights == [1.0, 0.5]
    assert cfg.run.out_dir == "/tmp/x"
    assert cfg.run.name == "123"  # a str field takes the text as typed
    assert cfg.sft == Config().sft


def test_malformed_overrides(tmp_path):
    path = write(tmp_path, "")
    expect = "malformed override {!r}: expected --section.key=value"
    assert error_of(path, ["rl.steps=3"]) == expect.format("rl.steps=3")
    assert error_of(path, ["--rl.steps"]) == expect.format("--rl.steps") + " (missing '=')"
    assert error_of(path, ["--steps=3"]) == (expect.format("--steps=3")
                                             + " (did you mean 'sft.steps' or 'rl.steps' or 'distill.steps'?)")
    assert error_of(path, ["--rl.lrr=1"]) == "override --rl.lrr=1: unknown key 'rl.lrr' (did you mean 'rl.lr'?)"
    assert error_of(path, ["--rl.steps=abc"]) == "override --rl.steps=abc: rl.steps: expected int, got str 'abc'"
    assert error_of(path, ["--rl.lr=[1"]) == "override --rl.lr=[1: cannot parse '[1' as a YAML value"


# --- derived defaults, saving, command line ----------------------------------------------------

def test_derived_name_and_out_dir(tmp_path):
    path = write(tmp_path, "rl:\n  steps: 3\n", name="my_run.yaml")
    cfg = load_config(path, [])
    assert (cfg.run.name, cfg.run.out_dir) == ("my_run", os.path.join("runs", "my_run"))
    cfg = load_config(path, ["--run.name=other"])
    assert (cfg.run.name, cfg.run.out_dir) == ("other", os.path.join("runs", "other"))
    cfg = load_config(path, ["--run.out_dir=/tmp/elsewhere"])
    assert (cfg.run.name, cfg.run.out_dir) == ("my_run", "/tmp/elsewhere")
    with pytest.raises(ConfigError, match="run.name is empty"):
        resolve(Config(), None)


def test_save_load_round_trip(tmp_path):
    cfg = load_config(write(tmp_path, "rl:\n  steps: 3\n"),
                      ["--run.name=1e3", "--rl.lr=1e-5", "--credit.mode=graph", "--data.label_names=[a, 'yes', '0']",
                       "--graph.edges=[[q, f], [f, y]]", "--model.name_or_path=", "--rl.drop_zero_std=on"])
    saved = tmp_path / "out" / "config.yaml"
    save_config(cfg, str(saved))
    again = load_config(str(saved), [])
    assert again == cfg
    assert config_to_dict(again) == config_to_dict(cfg)
    assert again.run.name == "1e3" and again.data.label_names == ["a", "yes", "0"]


def test_parse_args(tmp_path, capsys):
    path = write(tmp_path, "rl:\n  steps: 3\n")
    cfg, cfg_path = parse_args([path, "--rl.lr=0.5", "--no-resume"])
    assert cfg_path == path and cfg.rl.lr == 0.5 and cfg.run.resume is False and cfg.rl.steps == 3
    cfg, _ = parse_args(["--run.resume=false", path, "--resume"])
    assert cfg.run.resume is True
    with pytest.raises(SystemExit) as info:
        parse_args([path, "--rl.steps"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err == "error: malformed override '--rl.steps': expected --section.key=value (missing '=')\n"
    with pytest.raises(SystemExit) as info:
        parse_args([path, path])
    assert info.value.code == 2 and "expected one config file, got 2" in capsys.readouterr().err


def test_help_lists_every_field_with_its_docstring(capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(["--help"], prog="graph_grpo.py")
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: graph_grpo.py CONFIG.yaml")
    for name, cls in sections():
        for f in dataclasses.fields(cls):
            assert f"--{name}.{f.name}=" in out
            assert field_docs(cls)[f.name] in out
    assert "--credit.mode=outcome  (one of 'outcome', 'process', 'stepwise', 'rule_shaped', 'graph')" in out


# --- the shipped configs ---------------------------------------------------------------------------

def test_shipped_configs_load():
    base = load_config(str(CONFIGS / "base.yaml"), [])
    assert base.run.name == "base" and base.credit.mode == "graph" and base.controller.mode == "meta"
    tiny = load_config(str(CONFIGS / "tiny.yaml"), [])
    assert (tiny.model.hidden_size, tiny.model.num_layers, tiny.sft.steps) == (64, 1, 400)
    assert (tiny.data.n_sft, tiny.data.n_rl, tiny.data.n_test_id, tiny.data.n_test_longtail) == (256, 256, 64, 64)
    assert (tiny.rl.steps, tiny.rl.prompts_per_step, tiny.rl.num_generations, tiny.rl.max_new_tokens) == (2, 4, 4, 48)
    assert (tiny.eval.batch_size, tiny.distill.steps) == (64, 20)
    assert tiny.data.dir != Config().data.dir  # tiny splits never overwrite the real ones
    hf = load_config(str(CONFIGS / "hf_checkpoint.yaml"), [])
    assert hf.model.name_or_path == "/path/to/checkpoint" and hf.run.dtype == "bfloat16"


@pytest.mark.parametrize("name", ["hf_checkpoint.yaml", "smollm2.yaml"])
def test_real_lm_configs_carry_base_yamls_method(name):
    """The configs that put the method on a real LM run configs/base.yaml's reward, credit and controller: a section
    left out falls back to the dataclass default, plain GRPO (hf_checkpoint.yaml once ran GRPO that way), and a
    default changed by a study's rule must reach them too (credit.evidence, 2026-12-02)."""
    base, other = load_config(str(CONFIGS / "base.yaml"), []), load_config(str(CONFIGS / name), [])
    for section in ("reward", "credit", "controller"):
        assert getattr(other, section) == getattr(base, section), section

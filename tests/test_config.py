"""Config loading, overrides, validation messages, dump round trips and the field listing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sailor_engine.config import FORMATS, Config, ConfigError, config_fields, dump_config, load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "tiny.yaml"

# One config in each format (same content), exercising nested sections, floats, lists and null.
SOURCES = {
    "yaml": "model:\n  hidden_size: 64\n  head_dim: null\ntrain:\n  rft:\n    lr: 1e-5\n  betas: [0.8, 0.9]\n"
            "rollout:\n  tools: [search]\n",
    "toml": "[model]\nhidden_size = 64\n\n[train]\nbetas = [0.8, 0.9]\n\n[train.rft]\nlr = 1e-5\n\n"
            "[rollout]\ntools = [\"search\"]\n",
    "json": json.dumps({"model": {"hidden_size": 64, "head_dim": None}, "train": {"rft": {"lr": 1e-5},
                       "betas": [0.8, 0.9]}, "rollout": {"tools": ["search"]}}),
}


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def message(path, overrides=()) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides)
    return str(e.value)


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".toml", ".json"])
def test_each_format_loads_the_same_config(tmp_path, suffix):
    cfg = load_config(write(tmp_path, "c" + suffix, SOURCES[suffix.lstrip(".").replace("yml", "yaml")]))
    assert cfg.model.hidden_size == 64 and cfg.model.head_dim is None
    assert cfg.train.rft.lr == 1e-5 and cfg.train.betas == (0.8, 0.9) and cfg.rollout.tools == ("search",)
    assert cfg.parallel == Config().parallel  # sections left out keep their defaults


def test_defaults_and_empty_file(tmp_path):
    assert load_config(None) == Config() == load_config(write(tmp_path, "empty.yaml", ""))


def test_yaml_core_schema_scalars(tmp_path):
    # YAML 1.1 (PyYAML's default) would read 1e-5 as a string, off as False, 010 as 8, 1:30 as 90.
    path = write(tmp_path, "c.yaml", "train:\n  rft: {lr: 1e-5, warmup_steps: 010}\n  out_dir: off\n  data_dir: 1:30\n"
                                     "synth:\n  graph: 2024-01-01\n")
    cfg = load_config(path)
    assert (cfg.train.rft.lr, cfg.train.rft.warmup_steps) == (1e-5, 10)
    assert (cfg.train.out_dir, cfg.train.data_dir, cfg.synth.graph) == ("off", "1:30", "2024-01-01")


def test_overrides_of_every_kind(tmp_path):
    cfg = load_config(TINY, [
        "train.rl.lr=1e-5",                  # float without a dot
        "parallel.tp=2",                     # int
        "parallel.sequence_parallel=true",   # bool
        "model.head_dim=null",               # null
        "rollout.tools=[search, visit, python]",   # flow list
        "model.rope_scaling.factor=4",       # into a section that is None in the file
        "algo.judge={base_url: 'http://127.0.0.1:1/v1', model: m}",  # a whole section as a flow mapping
        "train.out_dir=2024",                # a str field keeps the text, not the int
        "train.seed=1", "train.seed=2",      # the last one wins
    ])
    assert cfg.train.rl.lr == 1e-5 and cfg.parallel.tp == 2 and cfg.parallel.sequence_parallel
    assert cfg.model.head_dim is None and cfg.rollout.tools == ("search", "visit", "python")
    assert cfg.model.rope_scaling.factor == 4.0 and cfg.model.rope_scaling.high_freq_factor == 4.0
    assert cfg.algo.judge.model == "m" and cfg.train.out_dir == "2024" and cfg.train.seed == 2
    assert cfg.model.hidden_size == 128  # the rest of the file is kept


@pytest.mark.parametrize("text, overrides, expected", [
    # unknown key, in the file (with its line) and in an override; closest name suggested, else the valid ones
    ("model:\n  hidden_size: 64\nparallel:\n  tpp: 2\n", (), "c.yaml:4: unknown field 'parallel.tpp' (did you mean 'parallel.tp'?)"),
    ("modle: {}\n", (), "c.yaml:1: unknown field 'modle' (did you mean 'model'?)"),
    ("", ["parallel.tpp=2"], "--set parallel.tpp=2: unknown field 'parallel.tpp' (did you mean 'parallel.tp'?)"),
    ("", ["train.rl.zzz=1"], "unknown field 'train.rl.zzz' (valid: lr, schedule, warmup_steps,"),
    ("", ["parallel.tp.x=1"], "--set parallel.tp.x=1: parallel.tp is a value (int >= 1), not a section"),
    ("", ["parallel.tp"], "--set parallel.tp: expected SECTION.FIELD=VALUE"),
    ("", ["parallel.tp=[1,"], "--set parallel.tp=[1,: invalid value"),
    # wrong type
    ("train:\n  rft:\n    lr: abc\n", (), "c.yaml:3: train.rft.lr: expected float > 0, got str 'abc'"),
    ("", ["parallel.dp=1.5"], "--set parallel.dp=1.5: parallel.dp: expected int >= 1 | 'auto', got float 1.5"),
    ("parallel: 3\n", (), "c.yaml:1: parallel: expected mapping, got int 3"),
    ("", ["rollout.tools=search"], "rollout.tools: expected list['python' | 'search' | 'visit'], got str 'search'"),
    # out of range, in exactly the house form
    ("parallel:\n  tp: 0\n", (), "c.yaml:2: parallel.tp must be >= 1, got 0"),
    ("", ["parallel.tp=0"], "--set parallel.tp=0: parallel.tp must be >= 1, got 0"),
    ("", ["rollout.top_p=1.5"], "rollout.top_p must be <= 1.0, got 1.5"),
    ("train:\n  betas: [0.9, 1.0]\n", (), "c.yaml:2: train.betas[1] must be < 1.0, got 1.0"),
    ("", ["train.betas=[0.9]"], "train.betas must have length 2, got 1"),
    ("", ["parallel.backend=mpi"], "parallel.backend must be one of 'auto', 'gloo', 'nccl', got 'mpi'"),
    ("", ["algo.judge={model: m}"], "--set algo.judge={model: m}: algo.judge.base_url is required"),
    # checks across fields name the fields, the file line of the first one set there, and the --set involved
    ("parallel:\n  sequence_parallel: true\n", (), "c.yaml:2: parallel.sequence_parallel needs parallel.tp > 1"),
    ("model:\n  num_heads: 4\n", ["parallel.tp=3", "train.seed=1"],
     "c.yaml:2, --set parallel.tp=3: parallel.tp (3) must divide model.num_heads (4)"),
    ("", ["rollout.max_context=8192"], "rollout.max_context (8192) must be <= model.max_position_embeddings (4096)"),
    ("", ["train.rl.questions_per_step=10"], "train.rl.questions_per_step (10) must split into algo.updates_per_batch (4)"),
    ("", ["synth.expert_max_tokens=8192"], "synth.expert_max_tokens (8192) must be <= model.max_position_embeddings (4096)"),
    ("", ["train.micro_batch_tokens=1000"], "train.micro_batch_tokens (1000) must hold one whole trajectory: "
                                            ">= model.max_position_embeddings (4096)"),
    # syntax errors carry line and column
    ("parallel:\n  tp: 1\n   pp: [\n", (), "c.yaml:3:6: invalid YAML: mapping values are not allowed here"),
    ("parallel:\n  tp: 1\n  tp: 2\n", (), "c.yaml:3:3: invalid YAML: duplicate key 'tp'"),
    ("- 1\n", (), "c.yaml: expected a mapping of sections at the top level, got list"),
])
def test_errors_name_source_and_field(tmp_path, text, overrides, expected):
    assert expected in message(write(tmp_path, "c.yaml", text), overrides)


def test_errors_in_toml_and_json_files(tmp_path):
    assert message(write(tmp_path, "a.toml", "[parallel]\ntp = 0\n")).endswith("a.toml: parallel.tp must be >= 1, got 0")
    assert "b.toml:1:10: invalid TOML" in message(write(tmp_path, "b.toml", "[parallel\ntp = 1\n"))
    assert "c.json:2:12: invalid JSON: trailing comma" in message(write(tmp_path, "c.json", '{"parallel":\n  {"tp": 1,}}'))
    assert "d.json: parallel.tp: expected int >= 1, got str 'x'" in message(write(tmp_path, "d.json", '{"parallel": {"tp": "x"}}'))


def test_missing_file_and_unknown_format(tmp_path):
    assert message(tmp_path / "nope.yaml") == f"{tmp_path / 'nope.yaml'}: cannot read: No such file or directory"
    assert "unknown config format '.ini'" in message(write(tmp_path, "c.ini", "x"))
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("fmt", FORMATS)
def test_dump_load_round_trip(tmp_path, fmt):
    # Strings that a naive writer would let turn into numbers, booleans or null on the way back.
    cfg = load_config(TINY, ["model.rope_scaling.factor=2", "algo.judge={base_url: 'http://x/v1', model: m}",
                             "synth.graph='1e-5'", "train.out_dir='yes'", "train.data_dir='null'",
                             "train.init_from='a\"b\\\\c\u00e9'", "algo.preset=sailor_v2", "algo.loss_agg=token-mean"])
    text = dump_config(cfg, fmt)
    assert load_config(write(tmp_path, f"c.{fmt}", text)) == cfg
    assert load_config(write(tmp_path, f"d.{fmt}", dump_config(Config(), fmt))) == Config()


def test_dump_rejects_unknown_format():
    with pytest.raises(ConfigError, match="unknown format 'ini'"):
        dump_config(Config(), "ini")


def test_tiny_example_loads():
    cfg = load_config(TINY)
    assert (cfg.model.hidden_size, cfg.model.num_kv_heads, cfg.synth.num_entities) == (128, 2, 400)
    assert cfg.model.vocab_size >= cfg.synth.vocab_size  # the trained tokenizer fits the embedding
    assert cfg.max_context == cfg.rollout.max_context <= cfg.model.max_position_embeddings


def test_every_field_is_documented():
    fields = config_fields()
    paths = [f.path for f in fields]
    assert len(paths) == len(set(paths))
    assert {"model", "parallel", "synth", "rollout", "algo", "train"} <= set(paths)
    undocumented = [f.path for f in fields if not f.description]
    assert not undocumented, f"fields without a description: {undocumented}"
    by_path = {f.path: f for f in fields}
    assert by_path["parallel.tp"][1:3] == ("int >= 1", "1")
    assert by_path["rollout.top_p"][1:3] == ("float in (0, 1]", "1.0")
    assert by_path["model.rope_scaling.factor"].type == "float > 0"
    assert by_path["algo.judge.base_url"].default == "required"
    # the listing reaches into nested sections, and what it lists can be set
    cfg = load_config(None, ["synth.obfuscation.structural=0.5", "train.rl.steps=3"])
    assert {"synth.obfuscation.structural", "train.rl.steps"} <= set(by_path)
    assert (cfg.synth.obfuscation.structural, cfg.train.rl.steps) == (0.5, 3)


def test_defaults_follow_the_papers():
    cfg = Config()
    assert (cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.max_turns) == (1.0, 1.0, 30)
    assert cfg.algo.group_size == 8
    rft, rl = cfg.train.rft, cfg.train.rl
    assert (rft.lr, rft.schedule, rft.weight_decay, rft.batch_size) == (5e-6, "cosine", 0.1, 32)
    assert (rl.lr, rl.questions_per_step, rl.steps) == (1e-6, 128, 50)
    assert rl.questions_per_step // cfg.algo.updates_per_batch == 32  # mini-batch 32


def test_toml_cannot_write_a_null_whose_default_is_not_null():
    from sailor_engine.config import _toml_table

    assert _toml_table({"model": {"head_dim": None, "hidden_size": 8}}, ()) == ["[model]", "hidden_size = 8"]
    with pytest.raises(ConfigError, match=r"parallel.tp = null cannot be written as TOML .* default is 1"):
        _toml_table({"parallel": {"tp": None}}, ())


@settings(max_examples=60, deadline=None)
@given(key=st.sampled_from(["parallel.tp", "parallel.dp", "train.rft.lr", "rollout.tools", "model.rope_scaling",
                            "algo.judge", "train.betas", "synth.level_mix", "parallel", "x.y"]),
       value=st.text(max_size=20))
def test_any_override_value_gives_a_config_or_a_config_error(key, value):
    try:
        load_config(None, [f"{key}={value}"])
    except ConfigError as e:
        assert str(e).startswith(f"--set {key}=") or "must" in str(e)


@settings(max_examples=60, deadline=None)
@given(text=st.text(alphabet="model:parallel tp{}[],-#\n 0123'\"", max_size=60))
def test_any_yaml_file_gives_a_config_or_a_config_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzz") / "c.yaml"
    path.write_text(text)
    try:
        load_config(path)
    except ConfigError as e:
        assert str(e).startswith(str(path))

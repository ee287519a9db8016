"""The one flag mechanism (bench/t2i/cli.py) and a walk over every command's --help."""

from __future__ import annotations

import argparse
import importlib
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench.t2i.cli import (
    DeviceArgs,
    ModelArgs,
    OutputArgs,
    UsageError,
    build_parser,
    dtype_name,
    opt,
    parse,
    parse_known,
)


@dataclass
class Demo(OutputArgs, DeviceArgs, ModelArgs):
    steps: int | None = opt(None, "steps")
    scale: float = opt(1.5, "a float")
    names: list[str] = opt([], "repeatable", metavar="NAME")
    pair: list[str] = opt([], "two values", nargs=2, metavar=("A", "B"), flag="--two")
    kind: str = opt("a", "a choice", choices=("a", "b"))


def p(argv, **kw):
    return parse(Demo, argv, prog="demo", description="demo", **kw)


def test_defaults_none_and_flags():
    cfg = p(["--out", "o", "--tiny", "sd"])
    assert (cfg.out, cfg.tiny, cfg.pretrained, cfg.steps, cfg.scale) == ("o", "sd", None, None, 1.5)
    assert cfg.dtype == "fp32" and cfg.progress is True and cfg.names == []
    cfg = p(["--out", "o", "--steps", "3", "--names", "x", "--names", "y", "--two", "u", "v",
             "--no-progress", "--dtype", "bfloat16"])  # fmt: skip
    assert cfg.steps == 3 and cfg.names == ["x", "y"] and cfg.pair == ["u", "v"]
    assert cfg.progress is False and cfg.dtype == "bf16"  # one vocabulary, aliases accepted


def test_config_file_then_flags(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"out": "from-file", "steps": 7, "scale": 2, "dtype": "float16"}))
    cfg = p(["--config", str(f), "--steps", "9"])
    assert (cfg.out, cfg.steps, cfg.scale, cfg.dtype) == ("from-file", 9, 2.0, "fp16")
    assert isinstance(cfg.scale, float)


@pytest.mark.parametrize(
    "content, match",
    [
        ('{"nope": 1}', "unknown field 'nope'"),
        ('{"steps": "3"}', "steps must be int"),
        ('{"steps": true}', "steps must be int"),
        ('{"kind": "c"}', "kind must be one of a, b"),
        ('{"dtype": "int8"}', "unknown dtype"),
        ("[1]", "must hold a JSON object"),
        ("{", "not valid JSON"),
    ],
)
def test_bad_config_file_is_one_usage_error(tmp_path, content, match):
    f = tmp_path / "c.json"
    f.write_text(content)
    with pytest.raises(UsageError, match=match):
        p(["--config", str(f), "--out", "o"])


def test_a_key_given_twice_in_a_config_file_is_refused(tmp_path, capsys):
    f = tmp_path / "c.json"
    f.write_text('{"out": "o", "steps": 3, "steps": 4}')
    with pytest.raises(UsageError) as e:
        p(["--config", str(f)])
    assert str(e.value) == f"--config {f}: key 'steps' given twice"
    f.write_text('{"out": "o", "steps": 3, "scale": 2.0, "kind": "a", "kind": "b"}')
    with pytest.raises(UsageError, match="key 'kind' given twice"):
        p(["--config", str(f)])
    f.write_text('{"out": "o", "pair": ["a", "b"], "two": ["c", "d"]}')  # field and its flag
    with pytest.raises(UsageError) as e:
        p(["--config", str(f)])
    assert str(e.value) == f"--config {f}: keys 'pair' and 'two' set the same field"
    f.write_text('{"out": "o", "steps": 3}')
    assert p(["--config", str(f)]).steps == 3


def test_usage_errors():
    with pytest.raises(UsageError, match="required: --out"):
        p([])
    with pytest.raises(UsageError, match="invalid choice"):
        p(["--out", "o", "--kind", "c"])
    with pytest.raises(UsageError, match="exactly one of --pretrained | --tiny"):
        p(["--out", "o"], one_of=[("pretrained", "tiny")])
    with pytest.raises(UsageError, match="got 2"):
        p(["--out", "o", "--tiny", "sd", "--pretrained", "d"], one_of=[("pretrained", "tiny")])
    with pytest.raises(UsageError, match="unrecognized"):
        p(["--out", "o", "--bogus"])
    with pytest.raises(UsageError, match="--config file not found"):
        p(["--config", "/nonexistent.json"])


def test_parse_known_passes_the_rest_on():
    cfg, rest = parse_known(Demo, ["--out", "o", "--lr", "3", "--steps", "2"], prog="d",
                            description="d")  # fmt: skip
    assert cfg.steps == 2 and rest == ["--lr", "3"]


def test_dtype_name():
    assert [dtype_name(x) for x in ("fp32", "float32", "bfloat16", "fp16")] == [
        "fp32", "fp32", "bf16", "fp16",
    ]  # fmt: skip
    with pytest.raises(argparse.ArgumentTypeError):
        dtype_name("half")


def test_help_shows_defaults_and_renamed_flags():
    text = build_parser(Demo, prog="demo", description="d").format_help()
    assert "--two A B" in text and "(default: 1.5)" in text and "(required)" in text


def test_train_help_lists_each_flag_under_its_option_group():
    """train_t2i's flags come in one --help section per option group (the dataclass base
    that declares them), in the groups' order; each field is declared by exactly one group."""
    import dataclasses

    from bench.t2i import config
    from bench.t2i.cli import flag

    groups = [b for b in config.TrainConfig.__mro__[1:] if dataclasses.is_dataclass(b)]
    own = {g: [f.name for f in dataclasses.fields(g)] for g in groups}
    every = [n for names in own.values() for n in names]
    assert sorted(every) == sorted(f.name for f in dataclasses.fields(config.TrainConfig))
    text = build_parser(config.TrainConfig, prog="t", description="d").format_help()
    titles = [g.help_section for g in reversed(groups)]  # fields' order
    at = [text.index(f"\n{t}:\n") for t in titles]
    assert at == sorted(at) and len(titles) == len(config.VALIDATORS) == 6
    for g, title in zip(reversed(groups), titles, strict=True):
        start = text.index(f"\n{title}:\n")
        end = min([i for i in at if i > start] or [len(text)])
        section = text[start:end]
        for name in own[g]:
            assert f"  {flag(name)}" in section, (name, title)


# --------------------------------------------------------------------- every --help

COMMANDS = [
    "bench.make_pairs",
    "bench.train_t2i",
    "bench.sample",
    "bench.evaluate",
    "bench.bench_step",
    "bench.import_pairs",
    "bench.train_policy_pair",
    "bench.digits.__main__",
    "toy2d.run",
    "toy2d.sweep",
    "toy2d.bench",
    "toy2d.beta_search",
    "paper_figures.toy_figures",
]


@pytest.mark.parametrize("module", COMMANDS)
def test_every_help_works_and_explains_every_flag(module, monkeypatch, capsys):
    parsers = []
    for meth in ("parse_args", "parse_known_args"):
        real = getattr(argparse.ArgumentParser, meth)

        def spy(self, *a, _real=real, **k):
            parsers.append(self)
            return _real(self, *a, **k)

        monkeypatch.setattr(argparse.ArgumentParser, meth, spy)
    main = importlib.import_module(module).main
    try:
        rc = main(["--help"])
    except SystemExit as e:
        rc = e.code
    assert rc in (0, None)
    out = capsys.readouterr().out
    assert "usage:" in out
    titles = [ln for ln in out.splitlines() if ln.endswith(":") and not ln.startswith(" ")]
    assert all(t[0].islower() and "(" not in t.split(":")[0] for t in titles), titles  # no
    # section titled by a class's generated signature ("PromptArgs(prompts: ...)")
    assert parsers, f"{module} built no argparse parser"
    args = [a for a in parsers[0]._actions if a.dest != "help"]
    assert args
    missing = [(a.option_strings or [a.dest])[0] for a in args if not (a.help or "").strip()]
    assert not missing, f"{module}: flags without a help string: {missing}"


# ------------------------------------------------------------- compatibility with older runs


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("beta", 0.0, "--beta must be > 0, got 0.0"),
        ("lr", 0.0, "--lr must be > 0, got 0.0"),
        ("lora_alpha", 0.0, "--lora-alpha must be > 0, got 0.0"),
        ("validation_steps", 0, "--validation-steps must be >= 1, got 0"),
        ("data", "", "--data is empty; leave it out for the default"),
        ("resume", "", "--resume is empty; leave it out for the default"),
        ("backbone", "", "--backbone is empty; leave it out for the default"),
    ],
)
def test_zero_and_empty_are_values_not_the_default(field, value, message):
    from bench.t2i.config import TrainConfig, resolve

    with pytest.raises(UsageError) as e:
        resolve(TrainConfig(tiny=True, **{field: value}))
    assert str(e.value) == message


def test_an_empty_flag_is_one_line_and_exit_2(tmp_path, capsys):
    from bench import train_t2i

    out = tmp_path / "out"
    assert train_t2i.main(["--tiny", "--out", str(out), "--prediction-type", ""]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --prediction-type is empty; leave it out for the default"
    )
    assert not out.exists()


def test_a_checkpoint_config_from_before_the_new_fields_resumes():
    from dataclasses import asdict

    from bench.t2i.config import TrainConfig, resolve, resume_mismatches

    cfg = resolve(TrainConfig(tiny=True, method="dpo"))
    saved = asdict(cfg)
    for name in ("precondition_outputs", "rand_cond_prompts", "rand_cond_schedule",
                 "rand_cond_lambda", "lora_targets"):  # fmt: skip
        saved.pop(name)
    saved.update(resume="", data="", pretrained="")  # written for "unset" before null was
    assert resume_mismatches(cfg, saved, world=1, saved_world=1) == []
    saved["lora_alpha"] = 0.0  # a number is a value: 0 -> unset is a change
    assert resume_mismatches(cfg, saved, world=1, saved_world=1) == ["--lora-alpha 0.0 -> None"]
    saved["lora_alpha"] = None
    saved["method"] = "ddspo"
    assert resume_mismatches(cfg, saved, world=1, saved_world=1) == ["--method 'ddspo' -> 'dpo'"]
    pre = resolve(TrainConfig(tiny=True, backbone="sd3", method="dpo"))  # on by default: differs
    assert "--precondition-outputs" in " ".join(
        resume_mismatches(
            pre, {**asdict(pre), "precondition_outputs": False}, world=1, saved_world=1
        )  # fmt: skip
    )


def test_rand_cond_files_compare_as_paths(tmp_path, monkeypatch):
    from dataclasses import asdict

    from bench.t2i.config import TrainConfig, resolve, resume_mismatches

    monkeypatch.chdir(tmp_path)
    cfg = resolve(TrainConfig(tiny=True, rand_cond_prompts=["x.jsonl"]))
    saved = {**asdict(cfg), "rand_cond_prompts": [str(tmp_path / "x.jsonl")]}
    assert resume_mismatches(cfg, saved, world=1, saved_world=1) == []
    saved["rand_cond_prompts"] = [str(tmp_path / "y.jsonl")]
    assert resume_mismatches(cfg, saved, world=1, saved_world=1)


def test_config_keys_by_flag_name_and_nargs_length(tmp_path):
    from bench.import_pairs import parse_args

    f = tmp_path / "c.json"
    f.write_text(json.dumps({"from": ["ddspo", "somewhere"], "out": "o"}))
    assert parse_args(["--config", str(f)]).source == ["ddspo", "somewhere"]
    f.write_text(json.dumps({"source": ["ddspo"], "out": "o"}))
    with pytest.raises(UsageError, match="list of 2 values"):
        parse_args(["--config", str(f)])


def test_policy_pair_passes_config_and_unknown_flags_on(tmp_path):
    from bench import train_policy_pair

    ns, runs = train_policy_pair.plan(["--config", "t.json", "--tiny", "--max-steps", "3"])
    assert ns.max_steps == 3
    for _, args in runs:
        assert args[args.index("--config") + 1] == "t.json" and "--tiny" in args


def test_abbreviations_work_where_nothing_is_passed_on():
    cfg = p(["--out", "o", "--ste", "4"])  # argparse's unique-prefix matching, as before
    assert cfg.steps == 4
    cfg, rest = parse_known(Demo, ["--out", "o", "--ste", "4"], prog="d", description="d")
    assert cfg.steps is None and rest == ["--ste", "4"]  # passed on, not swallowed


# ---------------------------------------------------------------- --tiny [NAME], one grammar


@pytest.mark.parametrize(
    "module, extra",
    [("bench.make_pairs", ["--out", "o"]), ("bench.sample", ["--out", "o"]),
     ("bench.import_pairs", ["--from", "pickapic", "x", "--out", "o"])],
)  # fmt: skip
def test_every_model_command_takes_tiny_with_or_without_a_name(module, extra):
    parse_args = importlib.import_module(module).parse_args
    assert parse_args(["--tiny", "sdxl", *extra]).tiny == "sdxl"
    assert parse_args([*extra, "--tiny"]).tiny == "sd"  # bare: sd
    assert parse_args(["--tiny=sana", *extra]).tiny == "sana"
    with pytest.raises(UsageError, match="invalid choice: 'sdxxl'"):
        parse_args(["--tiny", "sdxxl", *extra])


def test_train_t2i_tiny_name_and_the_older_tiny_backbone():
    from bench.t2i.config import parse_args

    for argv, backbone in [
        (["--tiny", "sdxl"], "sdxl"),
        (["--tiny", "--backbone", "sana"], "sana"),  # the older spelling still works
        (["--tiny", "sd3", "--backbone", "sd3"], "sd3"),
        (["--tiny"], "sd"),
    ]:
        cfg = parse_args(argv)
        assert (cfg.tiny, cfg.backbone) == (True, backbone), argv  # config.json as before
    with pytest.raises(UsageError) as e:
        parse_args(["--tiny", "sd", "--backbone", "sdxl"])
    assert str(e.value) == (
        "--tiny sd and --backbone sdxl name two backbones: give --tiny NAME alone"
    )


def test_tiny_in_a_config_file(tmp_path):
    from bench.make_pairs import parse_args as make_pairs_args
    from bench.t2i.config import parse_args

    f = tmp_path / "c.json"
    for value, backbone in [("sana", "sana"), (True, "sd")]:
        f.write_text(json.dumps({"tiny": value}))
        cfg = parse_args(["--config", str(f)])
        assert (cfg.tiny, cfg.backbone) == (True, backbone)
    f.write_text(json.dumps({"tiny": False, "pretrained": "x"}))  # as a saved config.json
    assert parse_args(["--config", str(f)]).tiny is False
    f.write_text(json.dumps({"tiny": True, "out": "o"}))
    assert make_pairs_args(["--config", str(f)]).tiny == "sd"
    f.write_text(json.dumps({"tiny": "sd4", "out": "o"}))
    with pytest.raises(UsageError, match="tiny must be one of sd, sdxl, sana, sd3"):
        make_pairs_args(["--config", str(f)])


def test_bench_step_evaluate_and_policy_pair_take_tiny_name():
    from bench import bench_step, evaluate, train_policy_pair

    assert bench_step.parse_args([]).backbone == "sd"  # tiny is its default
    assert bench_step.parse_args(["--tiny", "sana"]).backbone == "sana"
    assert bench_step.parse_args(["--tiny", "--backbone", "sdxl"]).backbone == "sdxl"
    with pytest.raises(UsageError, match="name two backbones"):
        bench_step.parse_args(["--tiny", "sana", "--backbone", "sdxl"])
    assert evaluate.parse_args(["--tiny", "sd", "--images", "s"]).tiny == "sd"
    assert evaluate.parse_args(["--images", "s", "--tiny"]).tiny is True
    for tiny in (["--tiny", "sdxl"], ["--tiny=sdxl"], ["--tiny"]):
        _, runs = train_policy_pair.plan([*tiny, "--out", "o", "--no-joint"])
        loser = runs[1][1]
        assert loser[loser.index("--data") + 1] == str(Path("o") / "winner" / "data")
        ((_, joint),) = train_policy_pair.plan([*tiny, "--out", "o"])[1]  # OUT/data: its own
        assert "--data" not in joint and tiny[0] in joint


def test_bare_tiny_leaves_a_following_token_that_names_no_backbone():
    """``--tiny [NAME]``: a token after it that is not a backbone is not taken as its value,
    it stays an argument of its own; one that nothing takes is still an invalid choice."""
    from bench.make_pairs import parse_args as make_pairs_args
    from bench.t2i.config import parse_args as train_args

    with pytest.raises(UsageError, match=r"^argument --tiny: invalid choice: 'extra' \("):
        make_pairs_args(["--tiny", "extra", "--out", "o"])
    with pytest.raises(UsageError, match=r"^unrecognized arguments: extra$"):
        make_pairs_args(["--tiny", "sd", "extra", "--out", "o"])
    assert make_pairs_args(["--tiny", "sana", "--out", "o"]).tiny == "sana"
    assert make_pairs_args(["--out", "o", "--tiny"]).tiny == "sd"
    with pytest.raises(UsageError, match=r"^argument --tiny: invalid choice: 'extra' \("):
        train_args(["--tiny", "extra", "--max-steps", "1"])
    assert train_args(["--tiny", "sd3", "--max-steps", "1"]).backbone == "sd3"
    with pytest.raises(UsageError, match=r"^argument --tiny: invalid choice: 'extra' \("):
        parse_known(Demo, ["--tiny", "extra", "--out", "o"], prog="d", description="d")

"""train.py's configuration: TOML recipes, key=value overrides, the layout checks, one-line CLI errors."""

import dataclasses
import tomllib

import pytest

import train as train_script
from llama.model import ModelArgs
from llama.train.config import DEFAULT_MODEL, ConfigError, TrainConfig, check_layout, load_config
from tests.helpers import ROOT, cli


def test_default_toml_is_the_dataclass_defaults():
    table = tomllib.loads((ROOT / "configs/train/default.toml").read_text())
    model = table.pop("model")
    defaults = dataclasses.asdict(TrainConfig())
    defaults.pop("model")
    assert table == defaults
    assert model == DEFAULT_MODEL


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs/train").glob("*.toml")))
def test_shipped_configs_parse(name):
    cfg = load_config(str(ROOT / "configs/train" / name))
    if not cfg.init_from:
        cfg.model_args(2048)


def test_overrides_and_unknown_keys(tmp_path):
    cfg = load_config(None, ["max_steps=7", "lr=1e-4", "out_dir=out/x y", "model.dim=96", "compile=true"])
    assert (cfg.max_steps, cfg.lr, cfg.out_dir, cfg.model["dim"], cfg.compile) == (7, 1e-4, "out/x y", 96, True)
    assert cfg.model_args(1000).n_layers == DEFAULT_MODEL["n_layers"]  # [model] keys go on top of the default
    with pytest.raises(ConfigError, match="unknown config key 'max_step'.*did you mean 'max_steps'"):
        load_config(None, ["max_step=3"])
    with pytest.raises(ConfigError, match="unknown config key 'model.dimm'"):
        load_config(None, ["model.dimm=3"])
    with pytest.raises(ConfigError, match="'max_steps' .* must be int"):
        load_config(None, ["max_steps=lots"])
    with pytest.raises(ConfigError, match="not key=value"):
        load_config(None, ["max_steps"])
    bad = tmp_path / "bad.toml"
    bad.write_text("lr = 1e-3\nlearning_rate = 2\n")
    with pytest.raises(ConfigError, match=f"'learning_rate' in {bad}"):
        load_config(str(bad))


def test_layout_checks():
    args = ModelArgs(**DEFAULT_MODEL)
    with pytest.raises(ConfigError, match="does not divide n_heads=4"):  # refused as the config is read
        load_config(None, ["model_parallel_size=3"])
    cfg = TrainConfig(model_parallel_size=3)
    with pytest.raises(ConfigError, match="does not divide the 4 processes"):
        check_layout(cfg, args, 4)
    with pytest.raises(ConfigError, match="does not divide n_heads=4"):
        check_layout(cfg, args, 3)
    cfg = load_config(None, ["model_parallel_size=2", "batch_size=12", "micro_batch_size=4"])
    with pytest.raises(ConfigError, match="batch_size=12 must split evenly over 2 data-parallel ranks"):
        check_layout(cfg, args, 4)
    assert check_layout(load_config(None, ["model_parallel_size=2"]), args, 4) == (2, 8)  # micro-batch: 16 -> 8
    assert check_layout(load_config(None, ["batch_size=32", "micro_batch_size=8"]), args, 2) == (2, 8)


def assert_one_error_line(code: int, stderr: str, message: str) -> None:
    assert code == 1, stderr
    assert stderr.strip().startswith("error:") and message in stderr, stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1


def test_cli_errors_are_one_line(tmp_path, capsys):
    """A bad key, missing or empty data, an MP size with too few processes: one line, exit 1, before
    any work. The first case runs the real command (a fresh interpreter); the others call its main()."""
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    done = cli("max_stepz=3", f"out_dir={tmp_path / 'out'}")
    assert_one_error_line(done.returncode, done.stderr, "unknown config key 'max_stepz'")
    cases = [
        ([f"data={tmp_path / 'nope'}"], "does not exist"),
        ([f"data={empty}"], "is empty"),
        (["model_parallel_size=2"], "needs 2 processes"),
    ]
    for args, message in cases:
        code = train_script.main([*args, f"out_dir={tmp_path / 'out'}"])
        assert_one_error_line(code, capsys.readouterr().err, message)
    assert not (tmp_path / "out").exists()  # failed before any work

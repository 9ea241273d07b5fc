"""cluster.yaml passes Ray's own cluster-config validation (what `ray up` runs) and keeps its promises:
a CPU head, autoscaling GPU workers, the project installed, token auth, a private MLflow server, no public
dashboard."""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import re
import shlex
from pathlib import Path

import pytest
import yaml
from helpers.doc_commands import REPO, doc_commands, flags, shell_commands
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = REPO / "cluster.yaml"


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def validated(config: dict) -> dict:
    prepared = prepare_config(copy.deepcopy(config))  # defaults for the provider, as `ray up` does
    validate_config(prepared)
    return prepared


def test_cluster_yaml_passes_rays_validation(config):
    prepared = validated(config)
    assert prepared["provider"]["type"] == "aws"
    head = prepared["available_node_types"][prepared["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["max_workers"] == 0
    workers = [
        t for name, t in prepared["available_node_types"].items() if name != prepared["head_node_type"]
    ]
    gpu = [t for t in workers if t["resources"].get("GPU", 0) >= 1]
    assert gpu and all(t["min_workers"] == 0 and t["max_workers"] >= 1 for t in gpu)  # autoscaling from 0


def test_validation_rejects_a_broken_copy(config):
    from jsonschema import ValidationError

    bad = copy.deepcopy(config)
    bad["available_node_types"]["ray.worker.gpu"]["min_workers"] = "zero"
    with pytest.raises(ValidationError, match="zero"):
        validated(bad)
    bad = copy.deepcopy(config)
    bad["head_node_typ"] = "ray.head.cpu"
    with pytest.raises(ValidationError, match="head_node_typ"):
        validated(bad)


def test_cluster_yaml_installs_the_project_and_keeps_services_private(config):
    setup = " ".join(config["setup_commands"])
    assert "/home/ubuntu/invdyn[pipeline]" in setup and config["file_mounts"]["/home/ubuntu/invdyn"] == "."
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    assert "mlflow server" in head and "--serve-artifacts" in head and "hostname -I" in head
    assert "RAY_AUTH_MODE=token" in head and "RAY_AUTH_MODE=token" in " ".join(
        config["worker_start_ray_commands"]
    )
    assert "/home/ubuntu/.ray/auth_token" in config["file_mounts"]


# ---- every command of cluster.yaml and of the docs' cluster sections, checked against today's CLIs ----


def click_help(cli, path: list[str]) -> str:
    """What `<cli> <path...> --help` prints (click's own help text, without starting a process)."""
    import click

    ctx = click.Context(cli, info_name=cli.name)
    cmd = cli
    for name in path:
        cmd = cmd.get_command(ctx, name)
        assert cmd is not None, f"no command `{' '.join(path)}`"
        ctx = click.Context(cmd, info_name=name, parent=ctx)
    return cmd.get_help(ctx)


def pretrain_all_help() -> str:
    from pipeline.job import pretrain_all

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit):
        pretrain_all.parse_args(["--help"])
    return buf.getvalue()


def check_command(argv: list[str], where: str) -> str | None:
    """Check one command against the CLI it calls; the kind checked ("ray start", "mlflow server",
    "pipeline.pretrain_all", ...) or None for a command this test does not know."""
    from mlflow.cli import cli as mlflow_cli
    from ray.scripts.scripts import cli as ray_cli

    def listed(help_text: str, cmd: str) -> None:
        for f in flags(argv):
            assert re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", help_text), (
                f"{where}: `{cmd}` has no {f} (not in its --help): {shlex.join(argv)}"
            )

    if argv[0] == "ray" and len(argv) > 1:
        path = argv[1:3] if argv[1] == "job" else argv[1:2]
        listed(click_help(ray_cli, path), f"ray {' '.join(path)}")
        if path == ["job", "submit"]:
            entry = argv[argv.index("--") + 1 :]
            assert entry, f"{where}: `ray job submit` with no entrypoint"
            inner = check_command(entry, where)
            return f"ray job submit -- {inner}" if inner else "ray job submit"
        return f"ray {' '.join(path)}"
    if argv[:2] == ["mlflow", "server"]:
        listed(click_help(mlflow_cli, ["server"]), "mlflow server")
        return "mlflow server"
    if argv[0] in ("python", "python3") and argv[1:3] == ["-m", "pipeline.pretrain_all"]:
        args = argv[3:]
        listed(pretrain_all_help(), "python -m pipeline.pretrain_all")
        from pipeline.job import pretrain_all

        pretrain_all.parse_args(args)  # parses and validates (exits 2 with argparse's message otherwise)
        return "pipeline.pretrain_all"
    return None


def test_shell_commands_splits_as_the_shell_does():
    text = (
        'export A=1; ulimit -n 9; ray start --head \\\n  --port=6379 && (pgrep -f "mlflow server" > /dev/null'
        " || nohup mlflow server --host $(hostname -I | awk '{print $1}') > log 2>&1 &)  # a comment --x"
    )
    assert shell_commands(text) == [
        ["export", "A=1"],
        ["ulimit", "-n", "9"],
        ["ray", "start", "--head", "--port=6379"],
        ["pgrep", "-f", "mlflow server"],
        ["mlflow", "server", "--host", "SUBSTITUTED"],
    ]
    assert flags(["ray", "job", "submit", "--address", "x", "--", "python", "--out", "y"]) == ["--address"]


def test_check_command_refuses_a_flag_that_does_not_exist():
    with pytest.raises(AssertionError, match="--no-such-flag"):
        check_command(["ray", "start", "--head", "--no-such-flag=1"], "here")
    with pytest.raises(AssertionError, match="--backend-store"):
        check_command(["mlflow", "server", "--backend-store", "sqlite:///x.db"], "here")
    with pytest.raises(AssertionError, match="--storage"):
        check_command(
            ["ray", "job", "submit", "--", "python", "-m", "pipeline.pretrain_all", "--storage", "s"], "x"
        )


def cluster_yaml_commands(config: dict) -> list[tuple[str, list[str]]]:
    """(where, argv) of every command cluster.yaml runs, and of the usage in its leading comment."""
    found = []
    for key in (
        "initialization_commands",
        "setup_commands",
        "head_setup_commands",
        "worker_setup_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
    ):
        for i, text in enumerate(config.get(key) or []):
            found += [(f"cluster.yaml {key}[{i}]", argv) for argv in shell_commands(text)]
    usage = []
    for line in CLUSTER_YAML.read_text().splitlines():
        if not line.startswith("#"):
            break
        if line.startswith("#   "):  # the indented usage lines of the header comment
            usage.append(line[4:])
    found += [("cluster.yaml's usage comment", argv) for argv in shell_commands("\n".join(usage))]
    return found


def test_cluster_yaml_commands_use_only_flags_and_files_that_exist(config):
    import ray.autoscaler._private.commands as launcher
    import tomllib
    from ray._private.authentication import authentication_token_setup as tokens

    checked = []
    for where, argv in cluster_yaml_commands(config):
        kind = check_command(argv, where)
        if kind:
            checked.append(kind)
        if argv[:4] == ["python3", "-m", "pip", "install"]:  # the project, from the folder it is synced to
            for spec in (a for a in argv[4:] if a.startswith("/")):
                folder, extras = re.fullmatch(r"(/[^\[]+)(?:\[(.*)\])?", spec).groups()
                assert config["file_mounts"].get(folder) == ".", f"{where}: {folder} is not this checkout"
                declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
                for extra in (extras or "").split(","):
                    assert extra in declared["optional-dependencies"], f"{where}: no extra [{extra}]"
                checked.append("pip install the project")
        for a in argv:  # files the start commands read: written by `ray up` itself
            if a.startswith("--autoscaling-config="):
                assert a.split("=", 1)[1] in inspect.getsource(launcher), f"{where}: ray up writes no {a}"
    # every kind of command is there, and each was checked
    for kind in ("ray start", "mlflow server", "pip install the project", "ray up", "ray down"):
        assert kind in checked, f"cluster.yaml runs no `{kind}` any more: update this test"
    assert checked.count("ray start") == 2
    assert "ray job submit -- pipeline.pretrain_all" in checked
    # the files it mounts exist where `ray up` runs (the token where `ray get-auth-token --generate` puts it)
    for dest, src in config["file_mounts"].items():
        if src == ".":
            assert (REPO / "pyproject.toml").is_file()
        else:
            assert Path(src).expanduser() == Path.home() / tokens._get_default_token_path().relative_to(
                Path.home()
            ), f"file_mounts {dest}: {src} is not the file `ray get-auth-token --generate` writes"


def test_the_docs_cluster_commands_parse():
    """Every `ray start`, `ray job submit` (and the job it submits), `ray up/down` and `mlflow server` in the
    bash blocks of the README and of docs/ uses only flags that exist; the submitted job command parses."""
    checked = []
    for where, argv in doc_commands():
        if argv[0] in ("ray", "mlflow"):
            kind = check_command(argv, where)
            if kind:
                checked.append((kind, where))
    kinds = {k for k, _ in checked}
    assert "ray job submit -- pipeline.pretrain_all" in kinds, "the docs show no `ray job submit` of the job"
    assert {"ray start", "mlflow server"} <= kinds, kinds
    # the cloud section's command: the job on the cluster.yaml head, with its MLflow server's URI
    cloud = [
        argv
        for where, argv in doc_commands()
        if argv[:3] == ["ray", "job", "submit"] and "--mlflow-uri" in argv
    ]
    assert cloud, "no `ray job submit ... --mlflow-uri` (the cloud cluster's job) in README.md or docs/"

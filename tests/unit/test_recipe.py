"""Build steps and cache keys: what changes a key, what does not, and the commands builder methods make."""

from __future__ import annotations

import pytest
from pydantic import TypeAdapter, ValidationError

from shoal.exception import InvalidError
from shoal.wire import recipe
from shoal.wire.image_config import ImageConfig
from shoal.wire.recipe import CmdStep, CopyStep, EnvStep, RunStep, UserStep, WorkdirStep

BASE = ImageConfig(env={"PATH": "/usr/bin"}, cmd=["sleep", "1"], layers=["im-base"], python="3.11")
STEP = TypeAdapter(recipe.Step)


def run(cmd: str, **kw) -> RunStep:
    return RunStep(commands=[recipe.shell(cmd)], **kw)


def test_the_key_covers_the_step_and_its_parent():
    k = recipe.step_key(BASE, run("echo a"))
    assert k == recipe.step_key(BASE, run("echo a"))
    assert k != recipe.step_key(BASE, run("echo b"))
    other_layers = ImageConfig(env=BASE.env, cmd=BASE.cmd, layers=["im-base", "im-x"], python="3.11")
    assert k != recipe.step_key(other_layers, run("echo a"))
    other_env = ImageConfig(env={"PATH": "/usr/bin", "A": "1"}, cmd=BASE.cmd, layers=BASE.layers, python="3.11")
    assert k != recipe.step_key(other_env, run("echo a"))  # a RUN sees the environment
    other_user = ImageConfig(**{**BASE.to_json(), "user": "nobody"})
    assert k != recipe.step_key(other_user, run("echo a"))
    assert k != recipe.step_key(BASE, run("echo a", env={"X": "1"}))
    assert k != recipe.step_key(BASE, run("echo a", gpu="T4"))


def test_force_build_and_secret_values_are_not_in_the_key():
    k = recipe.step_key(BASE, run("echo a", secret_env={"TOKEN": "one"}))
    assert k == recipe.step_key(BASE, run("echo a", secret_env={"TOKEN": "two"}, force_build=True))
    assert k != recipe.step_key(BASE, run("echo a", secret_env={"OTHER": "one"}))  # the names are
    assert "val-one" not in str(recipe.key_content(run("echo a", secret_env={"TOKEN": "val-one"})))


def test_a_new_config_field_left_unset_keeps_old_digests():
    plain = recipe.config_digest(BASE)
    assert recipe.config_digest(ImageConfig(**{**BASE.to_json(), "user": None})) == plain


def test_copy_key_is_the_context_digest_and_destination():
    a = CopyStep(context="a" * 64, dest="/app")
    assert recipe.step_key(BASE, a) != recipe.step_key(BASE, CopyStep(context="b" * 64, dest="/app"))
    assert recipe.step_key(BASE, a) != recipe.step_key(BASE, CopyStep(context="a" * 64, dest="/srv"))
    assert recipe.step_key(BASE, a) != recipe.step_key(BASE, CopyStep(context="a" * 64, dest="/app", chmod=0o700))


def test_image_ids_are_content_addresses():
    cfg = recipe.apply_config(BASE, EnvStep(vars={"A": "1"}))
    assert recipe.image_id_for(cfg) == recipe.image_id_for(recipe.apply_config(BASE, EnvStep(vars={"A": "1"})))
    assert recipe.image_id_for(cfg) != recipe.image_id_for(BASE)
    assert recipe.image_id_for(cfg).startswith("im-")
    assert recipe.layer_id_for("k") == recipe.layer_id_for("k")
    assert recipe.layer_id_for("k") != recipe.layer_id_for("k", "nonce")


def test_config_steps():
    cfg = recipe.apply_config(BASE, EnvStep(vars={"A": "1"}))
    assert cfg.env == {"PATH": "/usr/bin", "A": "1"} and BASE.env == {"PATH": "/usr/bin"}
    cfg = recipe.apply_config(cfg, WorkdirStep(path="/srv"))
    cfg = recipe.apply_config(cfg, WorkdirStep(path="app/../app2"))
    assert cfg.workdir == "/srv/app2"
    assert recipe.apply_config(cfg, WorkdirStep(path="../../..")).workdir == "/"
    assert recipe.apply_config(cfg, CmdStep(argv=["a", "b"])).cmd == ["a", "b"]
    assert recipe.apply_config(cfg, UserStep(user="app:grp")).user == "app:grp"
    assert recipe.apply_config(cfg, UserStep(user="root")).user is None
    assert cfg.layers == BASE.layers  # config steps never add layers


def test_wire_validation():
    assert isinstance(STEP.validate_python({"op": "run", "commands": [["true"]]}), RunStep)
    for bad in (
        {"op": "run", "commands": []},
        {"op": "run", "commands": [[]]},
        {"op": "run", "commands": [["a\x00b"]]},
        {"op": "env", "vars": {"1X": "y"}},
        {"op": "copy", "context": "../x", "dest": "/a"},
        {"op": "copy", "context": "a" * 64, "dest": "/a", "chown": "root"},
        {"op": "user", "user": "a b"},
        {"op": "host_cas", "certs": []},  # the daemon's own step: never from a client
        {"op": "run", "commands": [["true"]], "surprise": 1},
    ):
        with pytest.raises(ValidationError):
            STEP.validate_python(bad)


def test_describe():
    assert recipe.describe(run("pip install six")) == "RUN pip install six"
    assert recipe.describe(RunStep(commands=[["python", "-c", "print(1)"]])) == "RUN python -c 'print(1)'"
    assert recipe.describe(EnvStep(vars={"A": "a b"})) == "ENV A='a b'"


def test_command_builders():
    assert recipe.flatten(["a", ["b", "c"]], "x") == ["a", "b", "c"]
    with pytest.raises(TypeError):
        recipe.flatten([1], "x")  # type: ignore[list-item]
    opts = recipe.pip_options("/wheels", "https://i/simple", None, True, "--no-deps")
    cmd = recipe.pip_install_command(["b", "a>=1"], opts)
    assert cmd == (
        "python -m pip install --no-cache-dir 'a>=1' b"
        " --find-links /wheels --index-url https://i/simple --pre --no-deps"
    )
    assert "apt-get install -y -q curl jq" in recipe.apt_install_command(["jq", "curl"])
    with pytest.raises(InvalidError):
        recipe.apt_install_command(["-o=evil"])
    uv = recipe.uv_pip_install_commands(["six"], ["/r.txt"], "", "0.5.1")
    assert "uv==0.5.1" in uv and "/.uv/bin/uv pip install" in uv and "--requirement /r.txt" in uv


def test_poetry_install_commands_pin_select_groups_and_keep_the_exit_code():
    cmd = recipe.poetry_install_commands(
        "/p", poetry_version="1.8.3", use_lock=False, old_installer=True, with_=["a", "b c"], without=[], only=[]
    )
    assert "python -m pip install --no-cache-dir poetry==1.8.3 &&" in cmd
    assert "rm -f poetry.lock &&" in cmd  # a lock an earlier step left is not used
    assert "poetry config --local experimental.new-installer false" in cmd
    assert cmd.endswith("--with 'a,b c' ); rc=$?; rm -rf /tmp/.shoal-poetry-cache; exit $rc")
    plain = recipe.poetry_install_commands(
        "/p", poetry_version=None, use_lock=True, old_installer=False, with_=[], without=["dev"], only=[]
    )
    assert "pip install" not in plain and "rm -f poetry.lock" not in plain and "--without dev" in plain

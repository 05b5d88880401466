"""`picochat chat` without a model: flag validation (one line, no traceback), the in-session commands,
and the default stage (the newest trained one) shared with `picochat serve`."""

from __future__ import annotations

import io
import json

import pytest

from picochat import chat as chat_cli
from picochat.common import PicochatError


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["-t", "nan"], "-t/--temperature"),
        (["-t", "inf"], "-t/--temperature"),
        (["-t", "-1"], "-t/--temperature"),
        (["-k", "-5"], "-k/--top-k"),
        (["--top-p", "0"], "--top-p"),
        (["--top-p", "nan"], "--top-p"),
        (["--max-new-tokens", "0"], "--max-new-tokens"),
    ],
)
def test_bad_sampling_flags_give_one_line(flags, named, monkeypatch):
    monkeypatch.setattr(chat_cli, "load_engine", lambda *a: pytest.fail("loaded a model despite bad flags"))
    with pytest.raises(PicochatError) as info:
        chat_cli.main(flags)
    assert str(info.value).startswith(named) and "\n" not in str(info.value)


def test_tiny_temperature_is_greedy():
    args = chat_cli.build_parser().parse_args(["-t", "1e-38", "-k", "0"])
    params = chat_cli.sampling_from_args(args)
    assert params.temperature == 0.0 and params.top_k is None


def fake_checkpoint(home, stage: str, tag: str = "d4", step: int = 10) -> None:
    folder = home / "checkpoints" / stage / tag / f"step_{step:06d}"
    folder.mkdir(parents=True)
    (folder / "meta.json").write_text(json.dumps({"step": step}))


def test_default_stage_is_the_newest_trained(tmp_path, monkeypatch):
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path))
    assert chat_cli.default_stage() == "sft"  # nothing trained: sft, whose loading explains what to do
    fake_checkpoint(tmp_path, "base")
    assert chat_cli.default_stage() == "base"
    fake_checkpoint(tmp_path, "sft")
    (tmp_path / "checkpoints" / "rl" / "d4").mkdir(parents=True)  # an empty (e.g. crashed) run does not count
    assert chat_cli.default_stage() == "sft"
    fake_checkpoint(tmp_path, "rl")
    assert chat_cli.default_stage() == "rl"


def test_main_loads_the_default_stage_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path))
    fake_checkpoint(tmp_path, "mid")
    loaded = []

    def load_engine(stage, *rest):
        loaded.append(stage)
        return object(), {"path": f"/ckpt/{stage}/d4/step_000010"}

    monkeypatch.setattr(chat_cli, "load_engine", load_engine)
    monkeypatch.setattr("builtins.input", lambda prompt: "/quit")
    assert chat_cli.main([]) == 0
    assert loaded == ["mid"] and "mid model from /ckpt/mid" in capsys.readouterr().out


def test_commands_never_reach_the_model():
    args = chat_cli.build_parser().parse_args(["--system", "Be brief."])
    session = chat_cli.Chat(None, args, io.StringIO())  # the engine is only used by reply()
    out = io.StringIO()
    assert chat_cli.command(session, "/help", out)
    assert all(name.split()[0] in out.getvalue() for name in chat_cli.COMMANDS)
    session.messages.append({"role": "user", "content": "old"})
    assert chat_cli.command(session, "/system You are a pirate.", out)
    assert session.messages == [{"role": "system", "content": "You are a pirate."}]
    assert chat_cli.command(session, "/show", out) and "You are a pirate." in out.getvalue()
    assert chat_cli.command(session, "/system", out)
    assert session.messages == [] and args.system is None
    assert chat_cli.command(session, "/frobnicate", out) and "unknown command /frobnicate" in out.getvalue()
    assert not chat_cli.command(session, "/quit", out)


def test_input_has_line_editing(monkeypatch):
    import sys

    monkeypatch.delitem(sys.modules, "readline", raising=False)
    chat_cli._enable_line_editing()
    assert "readline" in sys.modules

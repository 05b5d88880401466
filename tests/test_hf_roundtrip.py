"""export -> import on a model trained in the test (a tiny base run with the default recipe, value
embeddings included, then SFT, through the real CLI):
the round trip is bit-identical, push-to-hub offline fails cleanly, and the must-show flow (export,
transformers in a process without picochat, `picochat chat -p -t 0`, import, `picochat chat -i
imported`) gives one and the same non-empty greedy reply."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from post_fixtures import tokenizer_and_shards
from safetensors.torch import load_file

from picochat import cli
from picochat.checkpoint import checkpoint_dir_for, list_steps, step_dir
from picochat.tokenizer import get_tokenizer

SITE = str(Path(transformers.__file__).resolve().parents[1])  # the venv's site-packages
REPO = Path(__file__).resolve().parents[1]
PICOCHAT = [sys.executable, "-c", "import sys; from picochat.cli import main; sys.exit(main())"]
BASE = [
    "train", "base", "--depth", "2", "--aspect-ratio", "32", "--head-dim", "32", "--max-seq-len", "256",
    "--device-batch-size", "2", "--total-batch-size", "512", "--num-iterations", "20",
    "--eval-every", "0", "--eval-tokens", "512", "--sample-every", "0",
]  # fmt: skip
SFT = [
    "train", "sft", "-i", "base", "--num-iterations", "6", "--device-batch-size", "2",
    "--target-examples-per-step", "4", "--eval-every", "0", "--eval-tokens", "512",
    "--eval-metrics-every", "-1", "--init-lr-frac", "1",
]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A PICOCHAT_HOME where `picochat train base` then `picochat train sft` made a tiny chat model."""
    root = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PICOCHAT_HOME", str(root / "home"))
        shards = root / "shards"
        tokenizer_and_shards(shards)
        assert cli.main([*BASE, "--source", str(shards)]) == 0
        assert cli.main(SFT) == 0
    return root / "home"


@pytest.fixture
def home(trained, tmp_path, monkeypatch) -> Path:
    """A private copy of the trained home (each test imports into its own)."""
    root = tmp_path / "home"
    shutil.copytree(trained, root)
    monkeypatch.setenv("PICOCHAT_HOME", str(root))
    return root


def _weights(stage: str) -> dict[str, torch.Tensor]:
    folder = checkpoint_dir_for(stage, "d2")
    return load_file(str(step_dir(folder, list_steps(folder)[-1]) / "model.safetensors"))


def test_export_import_round_trip_is_bit_identical(home, tmp_path):
    out = tmp_path / "out"
    report = home / "report"
    report.mkdir(exist_ok=True)
    (report / "sft.json").write_text(json.dumps({"schema_version": 1, "section": "sft", "val_bpb": 1.2345}))
    assert cli.main(["export", "-i", "sft", str(out)]) == 0
    card = (out / "README.md").read_text()
    assert "sft, step 6" in card and "val_bpb: 1.234" in card
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "README.md"} <= {p.name for p in out.iterdir()}  # fmt: skip
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp folder left
    assert cli.main(["export", "-i", "sft", str(out)]) == 1  # non-empty OUT_DIR needs --force
    assert cli.main(["export", "-i", "sft", "--force", str(out)]) == 0
    before = get_tokenizer()
    assert cli.main(["import", str(out)]) == 0
    original, imported = _weights("sft"), _weights("imported")
    assert original.keys() == imported.keys()
    assert all(
        torch.equal(original[k], imported[k]) and original[k].dtype == imported[k].dtype for k in original
    )
    after = get_tokenizer()
    assert after.mergeable_ranks == before.mergeable_ranks and after.pattern == before.pattern
    assert cli.main(["import", str(out)]) == 1  # the imported slot is taken: refuse, do not overwrite


def test_import_into_fresh_home_installs_the_tokenizer(home, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert cli.main(["export", "-i", "sft", str(out)]) == 0
    text = "hello 🙂 wörld 12345"
    expected = get_tokenizer().encode(text)
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path / "fresh"))
    assert cli.main(["import", str(out), "--model-tag", "d2"]) == 0
    assert get_tokenizer().encode(text) == expected
    assert _weights("imported").keys()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_push_to_hub_offline_fails_in_one_line_and_keeps_the_export(home, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}", "HF_TOKEN": "hf_dummy",
           "PYTHONPATH": str(REPO), "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_DOWNLOAD_TIMEOUT": "2"}  # fmt: skip
    cmd = [*PICOCHAT, "export", "-i", "sft", "--push-to-hub", "someone/tiny", str(out)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "someone/tiny" in errors[0] and "local export is intact" in errors[0]
    assert "Traceback" not in result.stderr
    assert json.loads((out / "config.json").read_text())["model_type"] == "picochat"  # value embeddings


# Runs with `python -I -S` (no PYTHONPATH, no cwd, no .pth files: the venv's editable picochat is
# invisible) plus site-packages: transformers alone, no picochat; the export's own modeling code
# (trust_remote_code) carries the value embeddings.
NO_PICOCHAT = """
import importlib.util, sys
sys.path.append(sys.argv[2])
assert importlib.util.find_spec("picochat") is None, "picochat is importable"
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
ids = tok.apply_chat_template([{"role": "user", "content": sys.argv[3]}], add_generation_prompt=True,
                              return_tensors="pt", return_dict=True)
out = model.generate(**ids, max_new_tokens=20, do_sample=False)
print("REPLY:" + tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
"""
PROMPT = "hi"


def _chat(stage: str, capsys) -> str:
    capsys.readouterr()
    assert cli.main(["chat", "-i", stage, "-p", PROMPT, "-t", "0", "--max-new-tokens", "20"]) == 0
    return capsys.readouterr().out.strip()  # notices go to stderr: stdout is the reply alone


def test_transformers_without_picochat_gives_the_same_greedy_reply(home, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["export", "-i", "sft", str(out)]) == 0
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cmd = [sys.executable, "-I", "-S", "-c", NO_PICOCHAT, str(out), SITE, PROMPT]
    result = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    theirs = result.stdout.split("REPLY:", 1)[1].strip()
    assert theirs, "a trained model's greedy reply has text; an empty one would prove little"
    assert _chat("sft", capsys) == theirs
    assert cli.main(["import", str(out)]) == 0
    assert _chat("imported", capsys) == theirs

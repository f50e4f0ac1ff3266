"""dds.options: the one KEY=VALUE parser of dds train -o, dds bench -o and bench entries."""
import pytest
from typer.testing import CliRunner

from dds.cli import app
from dds.errors import DdsError
from dds.options import parse_entry, parse_options, parse_policy_options


def test_values_are_json_where_they_parse_and_strings_elsewhere():
    assert parse_options(["a=0.5", "b=true", "c=cosine", "d=[1, 2]", "e=x=y"]) == {
        "a": 0.5, "b": True, "c": "cosine", "d": [1, 2], "e": "x=y"}
    assert parse_entry(" dds:warmup_epochs=0 ") == ("dds", {"warmup_epochs": 0})
    assert parse_policy_options(["dds.warmup_epochs=0", "infobatch.delta=0.9", "dds.strong_aug=false"]) == {
        "dds": {"warmup_epochs": 0, "strong_aug": False}, "infobatch": {"delta": 0.9}}


@pytest.mark.parametrize("call, message", [
    (lambda: parse_options(["loss_weight"]), "--option takes KEY=VALUE, got 'loss_weight'"),
    (lambda: parse_options(["=1"]), "--option takes KEY=VALUE, got '=1'"),
    (lambda: parse_entry("infobatch:0.8"), "bench entry 'infobatch:0.8': options are written NAME:KEY=VALUE, got '0.8'"),
    (lambda: parse_entry(":delta=0.9"), "bench entry ':delta=0.9' has no policy name"),
    (lambda: parse_policy_options(["warmup_epochs=0"]), "bench --option takes POLICY.KEY=VALUE, got 'warmup_epochs'"),
])
def test_bad_options_are_one_line_saying_how_to_write_them(call, message):
    with pytest.raises(DdsError) as e:
        call()
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_train_and_bench_commands_use_it(tmp_path):
    for args in (["train", "x", "-o", "loss_weight"], ["bench", "x", "-o", "dds.warmup_epochs"]):
        res = CliRunner().invoke(app, [*args, "-w", str(tmp_path)])
        assert isinstance(res.exception, DdsError) and "takes KEY=VALUE, got" in str(res.exception), res.output

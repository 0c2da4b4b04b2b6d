"""`tengrad explain` prints a plan, and with --batch the table where the choice flips."""
import pytest

from tengrad.cli import main


def test_explain_conv_prints_roles_orders_and_choice(capsys):
    assert main(["explain", "nn.Conv2d(16, 16, 3, padding=1)", "--input", "8,16,12,12"]) == 0
    out = capsys.readouterr().out
    for needle in ("Conv2d.weight", "Conv2d.bias", "i0 = k0", "roles", "independent ci k0 k1",
                   "common o0 o1", "direct", "factored", "factored_raw", "chosen"):
        assert needle in out, needle


def test_explain_batch_table_shows_the_flip(capsys):
    assert main(["explain", "nn.Linear(512, 512)", "--input", "8,128,512", "--batch", "1,64"]) == 0
    out = capsys.readouterr().out
    table = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [row[0] for row in table] == ["1", "64"]
    assert [row[-1] for row in table] == ["factored", "direct"]


def test_explain_embedding_takes_integer_input(capsys):
    assert main(["explain", "nn.Embedding(100, 16, padding_idx=0)", "--input", "8,12"]) == 0
    assert "one-hot" in capsys.readouterr().out


def test_explain_rejects_a_bad_module_expression(capsys):
    assert main(["explain", "nn.Conv2d(", "--input", "1,1"]) == 2
    err = capsys.readouterr().err
    assert "cannot build" in err and len(err.strip().splitlines()) == 1

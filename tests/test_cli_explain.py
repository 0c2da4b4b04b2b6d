"""`tengrad explain` prints a plan, and with --batch the table where the choice flips; the module text is
parsed, never evaluated, and the module built on the meta device."""
import os
import subprocess
import sys

import pytest
from torch import nn

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


# ---------------------------------------------------------------- the module text is parsed, never run
CODE = [
    "torch.os.system('touch {f}') or nn.Linear(2, 2)",
    "__import__('os').system('touch {f}')",
    "nn.Linear(2, open('{f}', 'w').write('x'))",
    "nn.Linear(2, (lambda: open('{f}', 'w'))())",
    "[c for c in ().__class__.__base__.__subclasses__()][0]('{f}')",
    "nn.Linear(2, 2, **dict(bias=open('{f}', 'w')))",
    "nn.Module.__init__.__globals__['sys'].modules['os'].system('touch {f}')",
]


@pytest.mark.parametrize("text", CODE, ids=range(len(CODE)))
def test_code_in_the_module_text_never_runs(text, tmp_path, capsys):
    target = tmp_path / "pwned"
    assert main(["explain", text.format(f=target), "--input", "1,2"]) == 2
    err = capsys.readouterr().err
    assert not target.exists()
    assert err.startswith("tengrad explain: error: cannot build") and len(err.strip().splitlines()) == 1


def test_the_module_is_built_on_meta_from_literal_arguments():
    from tengrad.cli import build_module
    conv = build_module("nn.Conv2d(16, 32, 3, padding=1, bias=False, padding_mode='zeros')")
    assert isinstance(conv, nn.Conv2d) and conv.padding == (1, 1) and conv.bias is None
    assert all(p.device.type == "meta" for p in conv.parameters())
    assert build_module("torch.nn.LayerNorm((16,), eps=1e-3)").eps == 1e-3


def test_a_large_layer_is_explained_without_allocating_its_weights(tmp_path):
    """nn.Linear(20000, 20000) holds 1.6 GB of float32 weights; the explaining process stays far below
    (its own peak resident memory, measured in a fresh process), and code text there runs nothing."""
    target = tmp_path / "pwned"
    script = ("import resource, sys\n"
              "from tengrad.cli import main\n"
              f"bad = main(['explain', \"torch.os.system('touch {target}') or nn.Linear(2, 2)\", '--input', '1,2'])\n"
              "ok = main(['explain', 'nn.Linear(20000, 20000)', '--input', '8,20000'])\n"
              "print('RC', bad, ok, 'PEAK_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    line = next(x for x in done.stdout.splitlines() if x.startswith("RC"))
    _, bad, ok, _, peak_kb = line.split()
    assert (bad, ok) == ("2", "0"), done.stderr
    assert "Linear.weight" in done.stdout and not target.exists()
    assert int(peak_kb) < 1_000_000, f"peak {int(peak_kb) / 1e6:.2f} GB: the 1.6 GB weight was allocated"

"""The IR package stays pure: importing it pulls in neither torch nor triton."""
import subprocess
import sys


def test_import_tengrad_ir_leaves_torch_and_triton_out():
    code = ("import sys, tengrad_ir; bad = [m for m in ('torch', 'triton') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, f"tengrad_ir imported {out.stdout.strip()} {out.stderr}"

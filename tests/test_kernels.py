"""The kernel backend switch (livestyle.kernels), and the parity tests run in Triton's interpreter.

The parity tests themselves are in test_kernels_parity.py.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from livestyle import kernels
from livestyle.errors import LivestyleError
from livestyle.kernels import reference

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def fresh_switch(monkeypatch):
    """The switch as a new process finds it: LIVESTYLE_KERNELS not read yet."""
    monkeypatch.setattr(kernels, "_backend", None)
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", kernels.ENV_VAR)}
    return dict(env, **extra)


def test_parity_in_triton_s_interpreter():
    """test_kernels_parity.py in a child process with TRITON_INTERPRET=1 (set before triton is imported)."""
    if torch.cuda.is_available():
        pytest.skip("CUDA is here: test_kernels_parity.py runs the kernels on the GPU in this process")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set: test_kernels_parity.py runs in this process")
    pytest.importorskip("triton")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             str(ROOT / "tests" / "test_kernels_parity.py")],
                            cwd=ROOT, env=_clean_env(TRITON_INTERPRET="1"), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-2000:]


def test_auto_runs_the_reference_on_cpu_tensors(fresh_switch, monkeypatch):
    calls = []
    monkeypatch.setattr(reference, "layer_norm", lambda *args: calls.append(args) or args[0])
    x = torch.zeros(2, 3)
    kernels.layer_norm(x, None, None)
    assert kernels.backend() == "auto" and len(calls) == 1


def test_the_environment_variable_is_read_at_first_use(fresh_switch, monkeypatch):
    monkeypatch.setenv(kernels.ENV_VAR, "Torch")
    assert kernels.backend() == "torch"
    monkeypatch.setenv(kernels.ENV_VAR, "auto")  # read once: a later change does not apply
    assert kernels.backend() == "torch"
    kernels.set_backend("auto")  # set_backend overrides it
    assert kernels.backend() == "auto"


def test_an_unknown_backend_is_refused_in_one_line(fresh_switch, monkeypatch):
    with pytest.raises(LivestyleError, match=r"^set_backend: unknown kernel backend 'cuda' \(choose auto, triton, "
                                             r"torch\)$"):
        kernels.set_backend("cuda")
    monkeypatch.setenv(kernels.ENV_VAR, "fast")
    with pytest.raises(LivestyleError, match=r"^LIVESTYLE_KERNELS: unknown kernel backend 'fast'"):
        kernels.layer_norm(torch.zeros(2, 3), None, None)


def test_triton_on_a_cpu_tensor_outside_the_interpreter_raises(fresh_switch, monkeypatch):
    monkeypatch.setattr(kernels, "interpreted", lambda: False)
    kernels.set_backend("triton")
    with pytest.raises(LivestyleError, match="need CUDA tensors, not cpu ones.*TRITON_INTERPRET=1"):
        kernels.group_norm(torch.zeros(1, 4, 2, 2), None, None, 2)
    with pytest.raises(LivestyleError, match="^kernel backend triton: .*need CUDA tensors"):
        kernels.check("cpu")
    kernels.check("cuda")  # Triton would run there


def test_triton_where_triton_is_not_installed_raises(fresh_switch, monkeypatch):
    monkeypatch.setattr(kernels, "triton_installed", lambda: False)
    with pytest.raises(LivestyleError, match="triton is not installed"):
        kernels.set_backend("triton")
    monkeypatch.setenv(kernels.ENV_VAR, "triton")
    with pytest.raises(LivestyleError, match="triton is not installed"):
        kernels.backend()
    monkeypatch.setenv(kernels.ENV_VAR, "auto")
    assert kernels.describe("cuda") == "torch reference (triton is not installed; backend auto)"


def test_a_fresh_process_refuses_triton_on_the_cpu_and_imports_no_triton():
    """No interpreter, LIVESTYLE_KERNELS=triton: the first CPU kernel call raises; the reference path
    (LIVESTYLE_KERNELS=torch) never imports triton."""
    code = ("import sys, torch; from livestyle import kernels; from livestyle.errors import LivestyleError\n"
            "x = torch.zeros(1, 4, 3, 3)\n"
            "try:\n    kernels.group_norm(x, None, None, 2)\nexcept LivestyleError as e:\n    print('refused:', e)\n"
            "kernels.set_backend('torch'); kernels.group_norm(x, None, None, 2)\n"
            "print('triton imported:', 'triton' in sys.modules)\n")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: LIVESTYLE_KERNELS=triton is fine on it")
    result = subprocess.run([sys.executable, "-c", code], env=_clean_env(LIVESTYLE_KERNELS="triton"),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "refused: kernel backend triton: the Triton kernels need CUDA tensors, not cpu ones" in result.stdout
    assert "triton imported: False" in result.stdout


def test_cli_refuses_triton_on_the_cpu_in_one_line_before_opening_anything(fresh_switch, monkeypatch, tmp_path,
                                                                          capsys):
    from livestyle import cli

    monkeypatch.setattr(kernels, "interpreted", lambda: False)
    out = tmp_path / "out.mp4"
    assert cli.main(["run", "test:", "-o", str(out), "--device", "cpu", "--kernels", "triton"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["livestyle: error: --kernels triton: the Triton kernels need CUDA tensors, not cpu ones "
                   "(set TRITON_INTERPRET=1 to run them in Triton's interpreter on the CPU)"]
    assert not out.exists()
    monkeypatch.setenv(kernels.ENV_VAR, "triton")
    monkeypatch.setattr(kernels, "_backend", None)
    assert cli.main(["run", "test:", "-o", str(out), "--device", "cpu"]) == 2
    assert capsys.readouterr().err.startswith("livestyle: error: LIVESTYLE_KERNELS=triton: the Triton kernels need")


def test_info_says_which_kernels_run_here(fresh_switch, monkeypatch, capsys):
    from livestyle import cli

    monkeypatch.setattr(kernels, "interpreted", lambda: False)
    assert cli.main(["info"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("kernels"))
    if torch.cuda.is_available() and kernels.triton_installed():
        assert line.startswith("kernels      Triton on cuda (backend auto): group_norm, layer_norm, geglu")
    elif kernels.triton_installed():
        assert line == "kernels      torch reference (no CUDA; backend auto)"
    else:
        assert line == "kernels      torch reference (triton is not installed; backend auto)"
    monkeypatch.setenv(kernels.ENV_VAR, "bogus")
    monkeypatch.setattr(kernels, "_backend", None)
    assert cli.main(["info"]) == 0
    assert "kernels      LIVESTYLE_KERNELS: unknown kernel backend 'bogus'" in capsys.readouterr().out


def test_every_kernel_is_dispatched_with_its_references_signature():
    """kernels.KERNELS: each a function of livestyle.kernels with the reference's exact signature."""
    import inspect

    assert set(kernels.KERNELS) == {"group_norm", "layer_norm", "geglu", "cached_attention", "frame_in",
                                    "frame_out", "propagate", "sampler_step"}
    for name in kernels.KERNELS:
        assert inspect.signature(getattr(kernels, name)) == inspect.signature(getattr(reference, name)), name


def test_describe_lists_every_kernel_where_triton_runs(fresh_switch, monkeypatch):
    monkeypatch.setattr(kernels, "triton_installed", lambda: True)
    monkeypatch.setattr(kernels, "interpreted", lambda: False)
    assert kernels.describe("cuda") == ("Triton on cuda (backend auto): group_norm, layer_norm, geglu, "
                                        "cached_attention, frame_in, frame_out, propagate, sampler_step")
    assert kernels.describe("cpu") == "torch reference (no CUDA; backend auto)"
    kernels.set_backend("torch")
    assert kernels.describe("cuda") == "torch reference (backend torch; Triton could run here)"

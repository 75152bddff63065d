"""Make the separate VBench environment: a virtual environment with VBench 0.1.5 and its own pins, for the
dimensions whose VBench code does not run beside this stack (human_action: numpy 2, timm 1.0.31; scene: Tag2Text
under transformers 5).

    python -m stas.evaluation.vbench_env PATH [PIP_ARGUMENT ...]
    python -m stas.evaluation.vbench_env /opt/vbench-env --index-url https://download.pytorch.org/whl/cu121

then evaluate with `eval.vbench.separate_python=PATH/bin/python`: stas sends those dimensions there and keeps the
others beside stas (stas.evaluation.vbench). PATH must not exist, be empty, or be a virtual environment already
(then the packages are installed into it); anything else is refused, nothing is overwritten. pip resolves VBench's
own pins (numpy 1.26, transformers 4.33, timm 1.0.12 with vbench 0.1.5); `setuptools<81` keeps `pkg_resources`,
which openai-clip and ViCLIP import. At the end the new environment is probed for the dimensions it is for.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from stas.errors import UserError

TOOL = "stas.evaluation.vbench_env"
PACKAGES = ("torch", "torchvision", "vbench==0.1.5", "setuptools<81")
SEPARATE_DIMENSIONS = ("human_action", "scene")  # what the environment is for (their packages are too new beside stas)


def environment_python(path: Path) -> Path:
    return path / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")


def make_vbench_env(path: Path, pip_arguments: tuple[str, ...] = (), python: str = sys.executable) -> Path:
    """Create (or complete) the environment at `path` and install VBench there; returns its interpreter.
    UserError when `path` is something else, or when venv or pip fail (with their last output)."""
    path = Path(path).expanduser().absolute()
    if path.exists() and not (path / "pyvenv.cfg").is_file():
        if not path.is_dir() or any(path.iterdir()):
            raise UserError(f"{path} exists and is not a virtual environment; give a new or empty directory (nothing "
                            "there is changed)")
    if not (path / "pyvenv.cfg").is_file():
        _run([python, "-m", "venv", str(path)], f"making the virtual environment {path}")
    interpreter = environment_python(path)
    _run([str(interpreter), "-m", "pip", "install", *PACKAGES, *pip_arguments],
         f"installing {' '.join(PACKAGES)} into {path}")
    return interpreter


def _run(command: list[str], what: str) -> None:
    print(f"{TOOL}: {what} ...", flush=True)
    try:
        done = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    except OSError as err:
        raise UserError(f"{what} failed: {command[0]} cannot be run: {err.strerror or err}") from None
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise UserError(f"{what} failed (exit code {done.returncode}):\n{tail}")


def probe_report(interpreter: Path) -> str:
    """What the new environment lacks for its dimensions (weights, packages), asked of it as an evaluation would."""
    import tempfile

    from omegaconf import OmegaConf

    from stas.evaluation.evaluators.vbench import VBenchEvalConfig
    from stas.evaluation.vbench import VBenchError, VBenchRunner

    options = OmegaConf.structured(VBenchEvalConfig(python=str(interpreter)))
    runner = VBenchRunner(options, "cpu", Path(tempfile.gettempdir()) / "stas-vbench-env")
    try:
        problems = runner.probe(list(SEPARATE_DIMENSIONS))
    except VBenchError as err:
        return f"the probe failed: {err}"
    return "\n".join(f"  {dimension}: " + (problem or "ready").replace("\n", "\n  ")
                     for dimension, problem in problems.items())


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return
    try:
        interpreter = make_vbench_env(Path(args[0]), tuple(args[1:]))
    except UserError as err:
        print(f"{TOOL}: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"{TOOL}: done. Evaluate with\n  eval.vbench.separate_python={interpreter}\n"
          f"{', '.join(SEPARATE_DIMENSIONS)} in that environment:\n{probe_report(interpreter)}")


if __name__ == "__main__":
    main()

"""What mmcv wheel this machine needs, and the cache key that keeps incompatible wheels apart.

Used by ``scripts/setup.sh`` before anything of fourm-eval is installed, so it runs as a plain script
(``python fourm_eval/wheelkey.py plan``) with the standard library and, when installed, torch.

A compiled mmcv is only usable where everything it was compiled against matches: the torch version,
CUDA (or none: CPU-only ops), the GPU architectures its kernels were built for, and the Python ABI.
Clusters commonly install on a login node without a GPU and run on GPU nodes that share the home
folder, so a wheel cache keyed by torch alone would hand a CPU-only build to a GPU run, whose RoIAlign
and NMS would fail at the first CUDA tensor. The key here holds all four::

    torch-2.14.1/cpu/cp311                       CPU-only ops
    torch-2.14.1/cu12.8-sm80+sm90/cp311          CUDA 12.8 kernels for sm_80 and sm_90

and a cached wheel is reused only on an exact match (``pick_wheel``).

The plan (``plan_build``): CPU-only when torch has no CUDA; with a CUDA torch, a CUDA build when a
toolkit is found (``CUDA_HOME``/``CUDA_PATH``, else ``nvcc`` on PATH) whose major version is torch's
(torch's own extension builder refuses another major; a different minor is a warning, as torch's), for
``TORCH_CUDA_ARCH_LIST`` if set, else the visible GPUs' architectures. With no visible GPU and no list
(a login node), or a CUDA torch without a toolkit, it builds CPU-only ops and says so: the key keeps
that wheel away from CUDA keys, and a GPU run stops with a named error (``fourm_eval.doctor``) until
the setup is rerun with the toolkit and the list.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

BUILD_FILE = "BUILD.json"   # beside a cached wheel: the key it was built for


class PlanError(RuntimeError):
    """The build cannot be planned as asked (a toolkit of another CUDA major, no architecture to build for)."""


@dataclass
class Plan:
    torch: str                       # torch version, without the +local tag
    python: str                      # Python ABI tag, e.g. cp311
    cuda: str | None = None          # the toolkit's major.minor for a CUDA build; None: CPU-only ops
    arch: list[str] = field(default_factory=list)   # ["8.0", "9.0"] (compute capabilities), sorted
    cuda_home: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        dev = "cpu" if self.cuda is None else f"cu{self.cuda}-" + "+".join("sm" + a.replace(".", "").replace("+PTX", "ptx")
                                                                           for a in self.arch)
        return f"torch-{self.torch}/{dev}/{self.python}"

    @property
    def words(self) -> str:
        """For the setup's step line: what is built."""
        if self.cuda is None:
            return "CPU-only ops"
        return f"CUDA {self.cuda} ops for " + ", ".join("sm_" + a.replace(".", "").replace("+PTX", "+PTX")
                                                        for a in self.arch)

    def env(self) -> dict[str, str]:
        """Environment of the build: mmcv's setup.py compiles CUDA kernels with FORCE_CUDA=1."""
        if self.cuda is None:
            return {"MMCV_WITH_OPS": "1", "FORCE_CUDA": "0"}
        return {"MMCV_WITH_OPS": "1", "FORCE_CUDA": "1", "TORCH_CUDA_ARCH_LIST": ";".join(self.arch),
                **({"CUDA_HOME": self.cuda_home} if self.cuda_home else {})}


def _major_minor(v: str | None) -> str | None:
    m = re.match(r"^(\d+)\.(\d+)", v or "")
    return f"{m.group(1)}.{m.group(2)}" if m else None


def parse_arch_list(text: str) -> list[str]:
    """``TORCH_CUDA_ARCH_LIST`` ("8.0;9.0", "8.0 9.0+PTX", "80,90") -> sorted ["8.0", "9.0+PTX"]."""
    out = []
    for item in re.split(r"[;,\s]+", text.strip()):
        if not item:
            continue
        m = re.fullmatch(r"(\d+)\.?(\d)(\+PTX)?", item, flags=re.IGNORECASE) or \
            re.fullmatch(r"sm_?(\d+)(\d)(\+PTX)?", item, flags=re.IGNORECASE)
        if not m:
            raise PlanError(f"TORCH_CUDA_ARCH_LIST={text!r}: {item!r} is not a compute capability (write e.g. "
                            "'8.0;9.0', as torch's extension builder reads it)")
        out.append(f"{int(m.group(1))}.{m.group(2)}" + ("+PTX" if m.group(3) else ""))
    if not out:
        raise PlanError(f"TORCH_CUDA_ARCH_LIST={text!r} names no architecture")
    return sorted(set(out), key=lambda a: (float(a.split("+")[0]), a))


def plan_build(*, torch_version: str, torch_cuda: str | None, python_tag: str, toolkit: str | None,
               cuda_home: str | None, visible: list[tuple[int, int]], arch_env: str | None) -> Plan:
    """The build this machine needs (pure: every fact passed in; ``detect`` reads them from the machine)."""
    plan = Plan(torch=torch_version.split("+")[0], python=python_tag)
    tc = _major_minor(torch_cuda)
    if tc is None:
        plan.notes.append("torch is a CPU build: CPU-only ops")
        return plan
    kit = _major_minor(toolkit)
    if kit is None:
        plan.notes.append(f"torch has CUDA {tc} but no CUDA toolkit was found (CUDA_HOME, nvcc): mmcv gets CPU-only "
                          f"ops; a run on a GPU will stop with a named error until you load a CUDA {tc} toolkit "
                          f"(e.g. `module load cuda/{tc}`) and rerun the setup")
        return plan
    if kit.split(".")[0] != tc.split(".")[0]:
        raise PlanError(f"the CUDA toolkit at {cuda_home or 'nvcc on PATH'} is CUDA {kit}, torch {torch_version} was "
                        f"built with CUDA {tc}: mmcv's kernels would not load. Load a CUDA {tc} toolkit (e.g. "
                        f"`module load cuda/{tc}`) or set CUDA_HOME to one, then rerun the setup")
    if kit != tc:
        plan.notes.append(f"CUDA toolkit {kit} with torch's CUDA {tc}: the same major version, which torch's "
                          "extension builder accepts (with a warning)")
    if arch_env and arch_env.strip():
        plan.arch = parse_arch_list(arch_env)
    elif visible:
        plan.arch = sorted({f"{a}.{b}" for a, b in visible}, key=float)
    else:
        plan.notes.append(f"a CUDA {kit} toolkit but no visible GPU and no TORCH_CUDA_ARCH_LIST (a login node?): "
                          "mmcv gets CPU-only ops, as there is no architecture to compile the CUDA kernels for; a run "
                          "on a GPU will stop with a named error. For GPU runs set TORCH_CUDA_ARCH_LIST to the "
                          "cluster's GPUs (e.g. '8.0;9.0' for A100 and H100) and rerun the setup")
        return plan
    plan.cuda, plan.cuda_home = kit, cuda_home
    return plan


def _toolkit() -> tuple[str | None, str | None]:
    """(version, home) of the CUDA toolkit: CUDA_HOME / CUDA_PATH's nvcc, else nvcc on PATH."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    nvcc = str(Path(home) / "bin" / "nvcc") if home else shutil.which("nvcc")
    if not nvcc or not Path(nvcc).exists():
        return None, home
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None, home
    m = re.search(r"release (\d+\.\d+)", out)
    return (m.group(1) if m else None), home  # no CUDA_HOME given: torch's extension builder finds nvcc itself


def detect() -> Plan:
    import torch

    visible = []
    if torch.cuda.is_available():
        visible = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
    kit, home = _toolkit() if torch.version.cuda else (None, None)
    return plan_build(torch_version=torch.__version__, torch_cuda=torch.version.cuda,
                      python_tag=f"cp{sys.version_info[0]}{sys.version_info[1]}", toolkit=kit, cuda_home=home,
                      visible=visible, arch_env=os.environ.get("TORCH_CUDA_ARCH_LIST"))


def pick_wheel(folder: str | Path, plan: Plan, pattern: str) -> Path | None:
    """A wheel built for exactly ``plan.key``: ``folder/<key>/<pattern>`` with a matching BUILD.json.
    A flat ``folder/<pattern>`` (a wheelhouse without keys, e.g. the project's shared CPU wheel) is taken
    only for a CPU-only key, and only when a BUILD.json beside it does not say otherwise: an unlabelled
    wheel may hold CPU-only ops, which must never reach a CUDA key."""
    folder = Path(folder)
    keyed = sorted((folder / plan.key).glob(pattern))
    for w in keyed:
        if _build_key(w) in (plan.key, None):
            return w
    if plan.cuda is None:
        for w in sorted(folder.glob(pattern)):
            if _build_key(w) in (plan.key, None):
                return w
    return None


def _build_key(wheel: Path) -> str | None:
    f = wheel.parent / BUILD_FILE
    try:
        return json.loads(f.read_text()).get("key")
    except (OSError, ValueError, AttributeError):
        return None


def write_build_file(folder: str | Path, plan: Plan) -> Path:
    f = Path(folder) / BUILD_FILE
    f.write_text(json.dumps({"key": plan.key, **asdict(plan)}, indent=1) + "\n")
    return f


def main(argv: list[str]) -> int:
    """``plan``: print KEY, WORDS and the build environment as shell assignments (setup.sh evals them);
    ``pick FOLDER PATTERN``: the matching wheel's path (exit 1: none); ``label FOLDER``: write BUILD.json."""
    cmd = argv[1] if len(argv) > 1 else "plan"
    try:
        plan = detect()
    except PlanError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cmd == "plan":
        import shlex
        print(f"MMCV_KEY={shlex.quote(plan.key)}")
        print(f"MMCV_WORDS={shlex.quote(plan.words)}")
        print(f"MMCV_BUILD_ENV={shlex.quote(' '.join(f'{k}={v}' for k, v in plan.env().items()))}")
        for n in plan.notes:
            print(f"echo {shlex.quote('note: ' + n)} >&2")
        return 0
    if cmd == "pick":
        w = pick_wheel(argv[2], plan, argv[3])
        if w is None:
            return 1
        print(w)
        return 0
    if cmd == "label":
        print(write_build_file(argv[2], plan))
        return 0
    print(f"unknown command {cmd!r}: plan, pick FOLDER PATTERN, label FOLDER", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))

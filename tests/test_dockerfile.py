"""The Dockerfile, read statically (no Docker engine on the development machines): a pinned NGC
base, the image's torch stack and NVIDIA apex left alone, and every package pinned both there and
in pyproject.toml pinned alike."""

import re
import shlex
import tomllib
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# pip options that take a value as the next word.
PIP_VALUE_OPTIONS = {
    "-r", "--requirement", "-c", "--constraint", "-e", "--editable", "-i", "--index-url",
    "--extra-index-url", "-f", "--find-links", "-t", "--target", "--prefix", "--root",
    "-C", "--config-settings", "--python-version", "--platform", "--implementation", "--abi",
}
# What the base image provides and must not be replaced from PyPI.
IMAGE_STACK = {
    "torch", "torchvision", "torchaudio", "triton", "pytorch-triton", "transformer-engine",
    "transformer-engine-torch", "transformer-engine-cu12", "transformer-engine-cu13",
}


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; continuation lines joined, comments and heredoc bodies
    dropped."""
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        line, i = lines[i], i + 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        while line.rstrip().endswith("\\") and i < len(lines):
            nxt, i = lines[i], i + 1
            if not nxt.lstrip().startswith("#"):
                line = line.rstrip()[:-1] + " " + nxt.strip()
        heredoc = re.search(r"<<-?\s*['\"]?(\w+)['\"]?", line)
        if heredoc:
            while i < len(lines) and lines[i].strip() != heredoc.group(1):
                i += 1
            i += 1
        word, _, args = line.strip().partition(" ")
        out.append((word.upper(), args.strip()))
    return out


def commands(shell: str) -> list[list[str]]:
    """The simple commands of one RUN line, split at &&, ||, ;, | and &."""
    lexer = shlex.shlex(shell, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    out, current = [], []
    for token in lexer:
        if token in {"&&", "||", ";", "|", "&"}:
            out.append(current)
            current = []
        else:
            current.append(token)
    return [c for c in out + [current] if c]


def pip_installs(instrs) -> list[dict]:
    """Every `pip install` in RUN instructions: its requirements, options, and whether a constraint
    file (ENV PIP_CONSTRAINT) was already in force."""
    found, constrained = [], False
    for word, args in instrs:
        if word == "ENV" and re.search(r"\bPIP_CONSTRAINT=\S", args):
            constrained = True
        if word != "RUN":
            continue
        for cmd in commands(args):
            at = next((j for j, w in enumerate(cmd[:-1])
                       if re.fullmatch(r"(.*/)?pip3?", w) and cmd[j + 1] == "install"), None)
            if at is None:
                continue
            rest, reqs, options, j = cmd[at + 2:], [], set(), 0
            while j < len(rest):
                w = rest[j]
                if w.startswith("-"):
                    options.add(w.split("=")[0])
                    j += 2 if w in PIP_VALUE_OPTIONS else 1
                    continue
                j += 1
                try:
                    reqs.append(Requirement(w))
                except InvalidRequirement:
                    pass  # a path such as "."
            found.append({"args": " ".join(rest), "reqs": reqs, "options": options,
                          "constrained": constrained})
    return found


INSTRS = instructions((ROOT / "Dockerfile").read_text())
INSTALLS = pip_installs(INSTRS)
DOCKER_REQS = [r for install in INSTALLS for r in install["reqs"]]


def pyproject_requirements() -> dict[str, list[Requirement]]:
    project = PYPROJECT["project"]
    specs = list(project["dependencies"]) + list(PYPROJECT["build-system"]["requires"])
    for extra in project.get("optional-dependencies", {}).values():
        specs += extra
    out: dict[str, list[Requirement]] = {}
    for spec in specs:
        req = Requirement(spec)
        out.setdefault(canonicalize_name(req.name), []).append(req)
    return out


def exact_pin(req: Requirement) -> Version | None:
    pins = [s for s in req.specifier if s.operator == "=="]
    return Version(pins[0].version) if len(pins) == 1 and "*" not in pins[0].version else None


def test_base_image_is_a_pinned_ngc_pytorch_tag():
    images = [args.split()[-1] if " AS " not in args.upper() else args.split()[0]
              for word, args in INSTRS if word == "FROM"]
    assert images, "Dockerfile has no FROM"
    image = images[-1]
    assert "$" not in image, f"FROM {image}: name the tag itself, not a build argument"
    name, _, tag = image.partition("@")[0].rpartition(":")
    assert name == "nvcr.io/nvidia/pytorch", f"FROM {image}: hymoe builds on NVIDIA's PyTorch image"
    assert re.fullmatch(r"\d{2}\.\d{2}-py3", tag), (
        f"FROM {image}: pin a release tag like 25.11-py3, not {tag!r}"
    )


def test_every_docker_pin_is_exact_and_agrees_with_pyproject():
    ours = pyproject_requirements()
    assert DOCKER_REQS, "no `pip install NAME==VERSION` found in the Dockerfile"
    for req in DOCKER_REQS:
        version = exact_pin(req)
        assert version is not None, f"Dockerfile installs {req}: pin it with =="
        for theirs in ours.get(canonicalize_name(req.name), []):
            assert theirs.specifier.contains(version, prereleases=True), (
                f"Dockerfile pins {req}, pyproject.toml says {theirs}: make them agree"
            )


def test_the_engine_and_mamba_kernels_are_pinned_in_both():
    docker = {canonicalize_name(r.name): exact_pin(r) for r in DOCKER_REQS}
    ours = pyproject_requirements()
    for name in ("megatron-core", "mamba-ssm", "causal-conv1d"):
        assert docker.get(name), f"Dockerfile should pip install {name}==<pyproject's pin>"
        pins = [exact_pin(r) for r in ours.get(name, [])]
        assert pins and all(p == docker[name] for p in pins), (name, pins, docker[name])


def test_pypi_apex_is_never_installed():
    # NVIDIA apex comes with the image; the PyPI package named `apex` is an unrelated web toolkit.
    for req in DOCKER_REQS:
        assert canonicalize_name(req.name) != "apex", f"Dockerfile pip-installs PyPI's {req}"


def test_the_image_torch_stack_is_never_reinstalled():
    for install in INSTALLS:
        names = {canonicalize_name(r.name) for r in install["reqs"]}
        assert not names & IMAGE_STACK, (
            f"pip install {install['args']} replaces the image's {sorted(names & IMAGE_STACK)}"
        )
        # Anything pip may resolve on its own must run under the constraint file that freezes torch.
        if "--no-deps" not in install["options"]:
            assert install["constrained"], (
                f"pip install {install['args']} resolves dependencies before ENV PIP_CONSTRAINT"
            )


def test_hymoe_is_installed_without_dependencies():
    editable = [i for i in INSTALLS if "-e" in i["options"] or "--editable" in i["options"]]
    assert editable, "Dockerfile should `pip install --no-deps -e .`"
    for install in editable:
        assert "--no-deps" in install["options"], f"pip install {install['args']}: add --no-deps"


def test_every_package_folder_is_copied():
    copied = {args.split()[0].rstrip("/") for word, args in INSTRS if word == "COPY"}
    for package, folder in PYPROJECT["tool"]["setuptools"]["package-dir"].items():
        assert folder in copied, f"Dockerfile never copies {folder}/ (package {package})"

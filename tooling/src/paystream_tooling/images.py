"""`make images`: the processor and simulator images, built with the container engine this machine
has, hermetically: every wheel is built on the host into a wheelhouse, and the images install
from it with no index and no network.

The engine's set-up is detected and applied to our own invocations only (an environment variable
naming a containers.conf of ours), never to the user's configuration, and each workaround is
said in one line:

- podman's default runtime, crun, refuses a host whose cgroups are v1 or hybrid: runc is used;
- podman's default rlimits for a container may exceed the host's hard limits, which a container
  cannot raise ("setrlimit RLIMIT_NOFILE: Operation not permitted"): the host's are used (and
  for processes no more than the kernel's pid_max).

The base is a build argument (BASE), by default the official slim Python image. When no registry
answers, a base is made from Debian's archive (debootstrap, bookworm, whose Python is the 3.11 the
wheels are built for) and imported.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from paystream.errors import DevenvError

OFFICIAL_BASE = "python:3.11-slim"
DEBIAN_BASE = "localhost/paystream-base:bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
TARGETS = ("processor", "simulator")
"""The Dockerfile's targets, each built as the image `paystream-<target>`."""

_PULL_TIMEOUT_S = 60.0
_PODMAN_NOFILE = 1_048_576
"""podman's default RLIMIT_NOFILE for a container run as root (containers.conf)."""
_PODMAN_NPROC = 4_194_304

Say = Callable[[str], None]


@dataclasses.dataclass(frozen=True, slots=True)
class Engine:
    """A container engine on this machine and how to call it."""

    name: str
    """podman or docker."""
    env: dict[str, str]
    """The environment of every call (podman: CONTAINERS_CONF naming our set-up)."""

    def run(
        self,
        *args: str,
        check: bool = True,
        timeout: float | None = None,
        input: bytes | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        """`<engine> args`; DevenvError with its output if it fails and `check`."""
        result = subprocess.run(
            [self.name, *args],
            env=self.env,
            capture_output=True,
            timeout=timeout,
            input=input,
            check=False,
        )
        if check and result.returncode != 0:
            said = (result.stderr or result.stdout).decode(errors="replace")[-2000:]
            raise DevenvError(f"{self.name} {' '.join(args[:3])} failed: {said}")
        return result

    def text(self, *args: str) -> str:
        return self.run(*args).stdout.decode().strip()

    def has_image(self, name: str) -> bool:
        return self.run("image", "inspect", name, check=False).returncode == 0

    def image_size(self, name: str) -> int:
        return int(self.text("image", "inspect", "--format", "{{.Size}}", name))

    @property
    def build_args(self) -> list[str]:
        # podman writes OCI images by default, which have no HEALTHCHECK: the docker format does.
        return ["--format", "docker"] if self.name == "podman" else []


def _cgroup_v2_only() -> bool:
    """Whether the host mounts the unified (v2) cgroup hierarchy alone."""
    return Path("/sys/fs/cgroup/cgroup.controllers").exists()


def _podman_setup(home: Path, say: Say) -> dict[str, str]:
    """A containers.conf of ours for what this host needs, and the environment naming it."""
    engine_lines: list[str] = []
    container_lines: list[str] = []
    if not _cgroup_v2_only() and shutil.which("runc"):
        engine_lines.append('runtime = "runc"')
        say("podman: runtime runc (crun does not run on this host's cgroup v1/hybrid hierarchy)")
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    # runc's init is refused an RLIMIT_NPROC above the kernel's pid_max (seen here: 32768 passes,
    # 32769 "operation not permitted"), however high the hard limit.
    pid_max = Path("/proc/sys/kernel/pid_max")
    if pid_max.exists():
        cap = int(pid_max.read_text())
        nproc = cap if nproc == resource.RLIM_INFINITY else min(nproc, cap)
    limits = []
    if 0 <= nofile < _PODMAN_NOFILE:
        limits.append(f'"nofile={nofile}:{nofile}"')
    if 0 <= nproc < _PODMAN_NPROC:
        limits.append(f'"nproc={nproc}:{nproc}"')
    if limits:
        container_lines.append(f"default_ulimits = [{', '.join(limits)}]")
        say(f"podman: container rlimits lowered to this host's hard limits ({', '.join(limits)})")
    conf = home / "containers.conf"
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(
        "# Written by paystream's tooling for its own podman calls (CONTAINERS_CONF).\n"
        + "[containers]\n"
        + "".join(f"{line}\n" for line in container_lines)
        + "[engine]\n"
        + "".join(f"{line}\n" for line in engine_lines)
    )
    return {**os.environ, "CONTAINERS_CONF": str(conf)}


def find_engine(home: Path, say: Say) -> Engine | None:
    """podman or docker, whichever is installed and runs; None (and why, said) if neither."""
    for name in ("podman", "docker"):
        if shutil.which(name) is None:
            continue
        env = _podman_setup(home, say) if name == "podman" else dict(os.environ)
        engine = Engine(name, env)
        probe = engine.run("info", check=False, timeout=60)
        if probe.returncode == 0:
            return engine
        said = (probe.stderr or probe.stdout).decode(errors="replace").strip().splitlines()
        say(f"{name} is installed but does not run: {said[-1] if said else 'no answer'}")
    return None


def wheelhouse(repo: Path, target: Path, say: Say) -> Path:
    """Every wheel the images install (paystream, its tooling, their pinned dependencies) built
    here with this Python, into a fresh `target`."""
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    say(f"building the wheelhouse in {target}")
    subprocess.run(
        [
            sys.executable,
            *("-m", "pip", "wheel", "--quiet", "--wheel-dir", str(target)),
            str(repo),
            str(repo / "tooling"),
        ],
        check=True,
    )
    return target


def base_image(engine: Engine, wanted: str, home: Path, say: Say) -> str:
    """`wanted` if the engine has it or can pull it; otherwise a base made from Debian's archive
    (made once, then reused)."""
    if engine.has_image(wanted):
        return wanted
    try:
        pulled = engine.run("pull", wanted, check=False, timeout=_PULL_TIMEOUT_S)
        if pulled.returncode == 0:
            return wanted
        lines = (pulled.stderr or pulled.stdout).decode(errors="replace").strip().splitlines()
        why = lines[-1][:200] if lines else "no answer"
    except subprocess.TimeoutExpired:
        why = f"no answer in {_PULL_TIMEOUT_S:.0f} s"
    say(f"no registry answers for {wanted} ({why}): the base is made from Debian's archive")
    if not engine.has_image(DEBIAN_BASE):
        debian_base(engine, home, say)
    return DEBIAN_BASE


def debian_base(engine: Engine, home: Path, say: Say) -> None:
    """DEBIAN_BASE from Debian's archive: bookworm's minimal base with Python 3.11 and venv."""
    if shutil.which("debootstrap") is None:
        raise DevenvError(
            "no registry answers and debootstrap is not installed: install it (apt-get install "
            "debootstrap) or pass a base your engine has (make images BASE=...)"
        )
    mirror = os.environ.get("PAYSTREAM_DEBIAN_MIRROR", DEBIAN_MIRROR)
    say(f"debootstrap bookworm from {mirror} (about a minute, once)")
    home.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=home) as folder:
        root = Path(folder) / "rootfs"
        subprocess.run(
            [
                "debootstrap",
                "--variant=minbase",
                "--include=python3,python3-venv,ca-certificates",
                "bookworm",
                str(root),
                mirror,
            ],
            check=True,
            capture_output=True,
        )
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for item in (root / cache).glob("*"):
                if item.is_file():
                    item.unlink()
        tarball = subprocess.run(
            ["tar", "-C", str(root), "--numeric-owner", "-c", "."], capture_output=True, check=True
        ).stdout
        engine.run(
            "import",
            *("--change", 'CMD ["/bin/bash"]'),
            *("--change", "ENV LANG=C.UTF-8"),
            "-",
            DEBIAN_BASE,
            input=tarball,
        )


def build(
    engine: Engine, repo: Path, base: str, tag: str, say: Say, targets: Sequence[str] = TARGETS
) -> dict[str, int]:
    """Each target of the Dockerfile built from the wheelhouse (in repo/build/wheelhouse) on
    `base`, tagged `paystream-<target>:<tag>`; each image's size in bytes."""
    sizes: dict[str, int] = {}
    for target in targets:
        image = f"paystream-{target}:{tag}"
        say(f"building {image} on {base}")
        engine.run(
            "build",
            *engine.build_args,
            "--network=none",  # hermetic: a step that reached for the network would fail
            *("--build-arg", f"BASE={base}"),
            *("--target", target),
            *("--tag", image),
            *(("--pull=never",) if engine.name == "podman" else ()),
            "--file",
            str(repo / "Dockerfile"),
            str(repo),
        )
        sizes[image] = engine.image_size(image)
    return sizes


def make_images(repo: Path, home: Path, wanted_base: str, tag: str, say: Say) -> dict[str, int]:
    """What `make images` does: the engine, the wheelhouse, the base, both images."""
    engine = find_engine(home, say)
    if engine is None:
        raise DevenvError("no container engine runs here: install podman (or docker)")
    wheelhouse(repo, repo / "build" / "wheelhouse", say)
    base = base_image(engine, wanted_base, home, say)
    return build(engine, repo, base, tag, say)


def main(argv: Sequence[str] | None = None) -> int:
    """`make images`: each image's name and size, one a line (options: --base, --home,
    --repo)."""
    import argparse
    from importlib.metadata import version

    parser = argparse.ArgumentParser(prog="make images", description=main.__doc__)
    parser.add_argument("--base", default=OFFICIAL_BASE, help="the base image (BASE)")
    parser.add_argument("--home", type=Path, default=Path.home() / ".cache/paystream/images")
    parser.add_argument("--repo", type=Path, default=Path.cwd(), help="the checkout (.)")
    args = parser.parse_args(argv)
    repo = args.repo.resolve()

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        sizes = make_images(repo, args.home, args.base, version("paystream"), say)
    except (DevenvError, subprocess.CalledProcessError) as exc:
        say(f"error: {exc}")
        return 2
    for image, size in sizes.items():
        print(f"{image}  {size / 1e6:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

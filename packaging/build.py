#!/usr/bin/env python3
"""Build the Qubes packages: ``make rpm`` and ``make deb`` run this.

Three packages come out of one wheel of this repository:

- ``qubes-network-server-dom0`` (rpm): the qubesd extension, the client
  under its own name (``/usr/bin/qvm-firewall`` belongs to
  qubes-core-admin-client), its man page and the qrexec policy.
- ``qubes-network-server-agent`` (rpm for Fedora templates, deb for Debian
  templates): the worker behind upstream's ``qubes-firewall.service`` (a
  drop-in, upstream's unit untouched), the input hook and its unit, and the
  post-install script that advertises the feature to dom0.

``PAYLOADS`` is the one place saying which file goes where; the rpm spec
files take their file list from it and the deb is the staged tree itself.
Run by path (``python3 packaging/build.py``): this folder is not a Python
package, so it never shadows PyPI's ``packaging``.
"""

from __future__ import annotations

import argparse
import configparser
import gzip
import hashlib
import io
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

REPO = Path(__file__).resolve().parent.parent
HERE = REPO / "packaging"
VERSION = (REPO / "VERSION").read_text().strip()
#: Package release, the same for rpm and deb.
RELEASE = "1"
#: The client's installed name: upstream's qvm-firewall stays in place.
CLIENT = "qvm-firewall-ns"
#: Python of Qubes 4.3 dom0 (Fedora 41) and of the Fedora 41/42 templates.
DEFAULT_RPM_PYTHON = "3.13"
DEBIAN_SITELIB = "/usr/lib/python3/dist-packages"
UNITDIR = "/usr/lib/systemd/system"


class BuildError(Exception):
    """A package cannot be built; the message says why."""


@dataclass(frozen=True)
class Payload:
    """What one package installs, besides its Python packages' own files."""

    name: str
    #: Top-level Python packages of this repository, shipped whole.
    packages: tuple[str, ...]
    #: console script name in setup.py -> name installed in /usr/bin
    scripts: Mapping[str, str]
    #: Entry point groups kept besides console_scripts (qubesd's ``qubes.ext``).
    groups: tuple[str, ...] = ()
    #: (source relative to the repository or the build folder, installed path, mode)
    files: tuple[tuple[str, str, int], ...] = ()
    #: Installed paths rpm treats as configuration the admin may edit.
    config_noreplace: tuple[str, ...] = ()
    #: Installed paths rpm marks as configuration replaced on upgrade.
    config: tuple[str, ...] = ()
    #: Installed path -> group owning it (rpm %attr; dpkg-deb makes all root).
    groups_owning: Mapping[str, str] = field(default_factory=dict)


MAN_PAGE = f"man/{CLIENT}.1"
POLICY = "/etc/qubes/policy.d/85-qubes-network-server.policy"
POLICY_INCLUDE = "/etc/qubes/policy.d/include/admin-network-server-rwx"

DOM0 = Payload(
    name="qubes-network-server-dom0",
    packages=("firewall_rules", "core_admin_patch", "admin_client_patch"),
    scripts={
        "qvm-firewall": CLIENT,
        "qubes-network-server-settings": "qubes-network-server-settings",
    },
    groups=("qubes.ext",),
    files=(
        ("packaging/dom0/85-qubes-network-server.policy", POLICY, 0o664),
        ("packaging/dom0/admin-network-server-rwx", POLICY_INCLUDE, 0o664),
        (MAN_PAGE, f"/usr/share/man/man1/{CLIENT}.1.gz", 0o644),
    ),
    config=(POLICY,),
    config_noreplace=(POLICY_INCLUDE,),
    groups_owning={POLICY: "qubes", POLICY_INCLUDE: "qubes"},
)

AGENT = Payload(
    name="qubes-network-server-agent",
    packages=("agent_worker",),
    scripts={
        "qubes-firewall-worker": "qubes-firewall-worker",
        "qubes-network-server-input": "qubes-network-server-input",
    },
    files=(
        (
            "agent_worker/systemd/qubes-firewall.service.d/30_qubes-network-server.conf",
            f"{UNITDIR}/qubes-firewall.service.d/30_qubes-network-server.conf",
            0o644,
        ),
        (
            "agent_worker/systemd/qubes-network-server-input.service",
            f"{UNITDIR}/qubes-network-server-input.service",
            0o644,
        ),
        (
            "packaging/template/70-qubes-network-server.preset",
            "/usr/lib/systemd/system-preset/70-qubes-network-server.preset",
            0o644,
        ),
        (
            "agent_worker/post-install.d/50-qubes-network-server.sh",
            "/etc/qubes/post-install.d/50-qubes-network-server.sh",
            0o755,
        ),
    ),
)

PAYLOADS = {payload.name: payload for payload in (DOM0, AGENT)}


def run(argv: list[str], **kwargs: object) -> None:
    """Run a build tool; its failure is a BuildError with its output."""
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, **kwargs)  # type: ignore[call-overload]
    if proc.returncode != 0:
        output = proc.stderr.strip() or proc.stdout.strip()
        raise BuildError(f"{argv[0]} failed ({proc.returncode}): {output}")


def build_wheel(out: Path) -> Path:
    """The wheel of this repository: its modules and setup.py's entry points."""
    out.mkdir(parents=True, exist_ok=True)
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(out), str(REPO)])
    wheels = sorted(out.glob(f"qubes_network_server-{VERSION}-*.whl"))
    if len(wheels) != 1:
        raise BuildError(f"expected one wheel of version {VERSION} in {out}, found {wheels}")
    return wheels[0]


def build_man_page(prog: str, output: Path) -> None:
    """The client's man page from its argparse parser (also ``make man``)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tool = Path(sys.executable).parent / "argparse-manpage"
    run([str(tool), "--module", "admin_client_patch.qvm_firewall", "--function", "get_parser",
         "--prog", prog, "--project-name", "qubes-network-server",
         "--description", "manage a qube's outbound, forward and inbound firewall rules",
         "--manual-title", "Qubes network server", "--output", str(output)], cwd=REPO)


def entry_point_file() -> configparser.ConfigParser:
    """An entry_points.txt as a parser: ``name = module:attr`` lines, names kept as written."""
    parser = configparser.ConfigParser(delimiters=("=",), interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    return parser


def dist_info_file(wheel: zipfile.ZipFile, name: str) -> bytes:
    """A file of the wheel's .dist-info (what setup.py declares)."""
    [member] = [n for n in wheel.namelist() if n.endswith(f".dist-info/{name}")]
    return wheel.read(member)


def dist_info_name(name: str) -> str:
    return f"{name.replace('-', '_')}-{VERSION}.dist-info"


def script_text(target: str) -> str:
    """A console script as distribution builds write them: no pkg_resources, no cwd on sys.path."""
    module, function = target.split(":")
    return (f"#!/usr/bin/python3 -sP\nimport sys\nfrom {module} import {function}\n\n"
            f"sys.exit({function}())\n")


def write(root: Path, path: str, data: bytes, mode: int) -> None:
    dest = root / path.lstrip("/")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(data)
    dest.chmod(mode)


def stage(payload: Payload, wheel_path: Path, built: Path, sitelib: str, installer: str,
          root: Path) -> list[str]:
    """Lay ``payload`` out under ``root`` as installed; returns the installed paths."""
    installed: list[str] = []

    def put(path: str, data: bytes, mode: int = 0o644) -> None:
        write(root, path, data, mode)
        installed.append(path)

    with zipfile.ZipFile(wheel_path) as wheel:
        for member in sorted(wheel.namelist()):
            top = member.split("/", 1)[0]
            if top in payload.packages and member.endswith(".py"):
                put(f"{sitelib}/{member}", wheel.read(member))
        for package in payload.packages:
            if f"{package}/__init__.py" not in wheel.namelist():
                raise BuildError(f"package {package} is not in {wheel_path.name}")
        declared = entry_point_file()
        declared.read_string(dist_info_file(wheel, "entry_points.txt").decode())
        metadata = dist_info_file(wheel, "METADATA")
    kept = entry_point_file()
    kept["console_scripts"] = {}
    for source_name, installed_name in payload.scripts.items():
        target = declared["console_scripts"].get(source_name)
        if target is None:
            raise BuildError(f"setup.py declares no console script {source_name}")
        kept["console_scripts"][installed_name] = target
        put(f"/usr/bin/{installed_name}", script_text(target).encode(), 0o755)
    for group in payload.groups:
        kept[group] = dict(declared[group])
    text = io.StringIO()
    kept.write(text)
    info = f"{sitelib}/{dist_info_name(payload.name)}"
    lines = metadata.decode().splitlines()
    lines = [f"Name: {payload.name}" if line.startswith("Name: ") else line for line in lines]
    put(f"{info}/METADATA", ("\n".join(lines) + "\n").encode())
    put(f"{info}/entry_points.txt", text.getvalue().encode())
    put(f"{info}/top_level.txt", "".join(f"{p}\n" for p in payload.packages).encode())
    put(f"{info}/INSTALLER", f"{installer}\n".encode())
    for source, path, mode in payload.files:
        origin = built / source if source.startswith("man/") else REPO / source
        data = origin.read_bytes()
        if path.endswith(".gz"):
            data = gzip.compress(data, 9, mtime=0)
        put(path, data, mode)
    return installed


def python_dirs(installed: Iterable[str], sitelib: str) -> list[str]:
    """Directories under ``sitelib`` that the package creates (ours alone)."""
    dirs: set[str] = set()
    for path in installed:
        if path.startswith(sitelib + "/"):
            parts = PurePosixPath(path).relative_to(sitelib).parts[:-1]
            for depth in range(1, len(parts) + 1):
                dirs.add(f"{sitelib}/{'/'.join(parts[:depth])}")
    return sorted(dirs)


def rpm_file_list(payload: Payload, installed: list[str], sitelib: str, python: str) -> str:
    """``%files -f`` lines: our dirs, our files, and the bytecode %post writes (%ghost)."""
    cache_tag = f"cpython-{python.replace('.', '')}"
    lines: list[str] = []
    for directory in python_dirs(installed, sitelib):
        lines.append(f"%dir {directory}")
        if not directory.endswith(".dist-info"):
            lines.append(f"%ghost %dir %attr(0755,root,root) {directory}/__pycache__")
    owned_dirs = {str(PurePosixPath(path).parent) for source, path, _ in payload.files}
    for directory in sorted(owned_dirs):
        if directory.endswith(".d") and directory.startswith(UNITDIR):
            lines.append(f"%dir {directory}")  # our drop-in directory, not upstream's unit
    for path in installed:
        attrs = ""
        group = payload.groups_owning.get(path)
        if group is not None:
            mode = next(m for _, p, m in payload.files if p == path)
            attrs += f"%attr({mode:04o},root,{group}) "
        if path in payload.config_noreplace:
            attrs += "%config(noreplace) "
        elif path in payload.config:
            attrs += "%config "
        lines.append(f"{attrs}{path}")
        if path.startswith(sitelib + "/") and path.endswith(".py"):
            pure = PurePosixPath(path)
            pyc = f"{pure.parent}/__pycache__/{pure.stem}.{cache_tag}.pyc"
            lines.append(f"%ghost %attr(0644,root,root) {pyc}")
    return "\n".join(lines) + "\n"


def build_rpm(payload: Payload, spec_in: Path, wheel: Path, built: Path, out: Path,
              python: str) -> Path:
    sitelib = f"/usr/lib/python{python}/site-packages"
    with tempfile.TemporaryDirectory(prefix="qns-rpm-") as tmp:
        work = Path(tmp)
        root = work / "stage"
        installed = stage(payload, wheel, built, sitelib, "rpm", root)
        file_list = work / "files.list"
        file_list.write_text(rpm_file_list(payload, installed, sitelib, python))
        spec = work / f"{payload.name}.spec"
        spec.write_text(spec_in.read_text().replace("@VERSION@", VERSION)
                        .replace("@RELEASE@", RELEASE))
        out.mkdir(parents=True, exist_ok=True)
        run(["rpmbuild", "-bb", "--quiet",
             "--define", f"_topdir {work / 'top'}",
             "--define", f"_rpmdir {out}",
             "--define", "_build_name_fmt %%{NAME}-%%{VERSION}-%%{RELEASE}.%%{ARCH}.rpm",
             "--define", f"qns_stage {root}",
             "--define", f"qns_files {file_list}",
             "--define", f"python3_version {python}",
             "--define", f"python3_sitelib {sitelib}",
             "--define", f"qns_client {CLIENT}",
             str(spec)])
    return out / f"{payload.name}-{VERSION}-{RELEASE}.noarch.rpm"


def build_deb(payload: Payload, wheel: Path, built: Path, out: Path) -> Path:
    version = f"{VERSION}-{RELEASE}"
    with tempfile.TemporaryDirectory(prefix="qns-deb-") as tmp:
        root = Path(tmp) / "root"
        installed = stage(payload, wheel, built, DEBIAN_SITELIB, "dpkg", root)
        control = root / "DEBIAN"
        control.mkdir()
        size_kib = sum((root / p.lstrip("/")).stat().st_size // 1024 + 1 for p in installed)
        template = (HERE / "template" / "debian" / "control.in").read_text()
        (control / "control").write_text(
            template.replace("@VERSION@", version).replace("@INSTALLED_SIZE@", str(size_kib))
            .replace("@PACKAGE@", payload.name))
        for script in ("postinst", "prerm", "postrm"):
            shutil.copyfile(HERE / "template" / "debian" / script, control / script)
            (control / script).chmod(0o755)
        (control / "md5sums").write_text("".join(
            f"{hashlib.md5((root / p.lstrip('/')).read_bytes()).hexdigest()}  {p.lstrip('/')}\n"
            for p in installed))
        out.mkdir(parents=True, exist_ok=True)
        deb = out / f"{payload.name}_{version}_all.deb"
        run(["dpkg-deb", "--build", "--root-owner-group", "-Zxz", str(root), str(deb)])
    return deb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("rpm", "deb", "man"))
    parser.add_argument("--out", type=Path, default=REPO / "build" / "packages",
                        help="folder receiving the packages (man: the man page file)")
    parser.add_argument("--rpm-python", default=DEFAULT_RPM_PYTHON,
                        help="Python version of dom0 and the Fedora template (default %(default)s)")
    parser.add_argument("--prog", default=CLIENT, help="man: the command name the page documents")
    args = parser.parse_args(argv)
    try:
        if args.what == "man":
            build_man_page(args.prog, args.out)
            return 0
        with tempfile.TemporaryDirectory(prefix="qns-build-") as tmp:
            built = Path(tmp)
            wheel = build_wheel(built / "wheel")
            build_man_page(CLIENT, built / MAN_PAGE)
            if args.what == "rpm":
                made = [
                    build_rpm(DOM0, HERE / "dom0" / f"{DOM0.name}.spec.in", wheel, built,
                              args.out, args.rpm_python),
                    build_rpm(AGENT, HERE / "template" / f"{AGENT.name}.spec.in", wheel, built,
                              args.out, args.rpm_python),
                ]
            else:
                made = [build_deb(AGENT, wheel, built, args.out)]
    except BuildError as err:
        print(f"build.py: error: {err}", file=sys.stderr)
        return 1
    for package in made:
        print(package)
    return 0


if __name__ == "__main__":
    sys.exit(main())

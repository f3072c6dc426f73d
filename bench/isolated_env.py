"""A virtual environment with recon's dependencies only, linked from this interpreter's installation:
`python bench/isolated_env.py DIR [--extra cuda]`, then `python bench/run.py PRESET --python DIR/bin/python`.

A machine's Python often holds far more than recon needs, and some of it costs start-up time in every run: torchmetrics,
which Lightning imports, imports torchvision, transformers and scikit-learn wherever they are installed (about 10 s on
a GPU server, before recon's first step). ``pip install recon`` into a fresh environment brings none of them. This
builds that environment without downloading anything: it walks the requirements of ``pyproject.toml`` (and the
``--extra`` groups asked for) through the installed distributions' metadata, markers and extras included, and links
each distribution of that closure (its top-level packages, modules and ``.dist-info``) into the new environment's
site-packages. The versions are the installed ones, so a run in it measures the same code with fewer imports.
Requirements that are not installed are reported and left out (recon imports its optional ones where it uses them).
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import venv
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser as the tomli package
    try:
        import tomli as tomllib
    except ModuleNotFoundError as err:
        raise SystemExit("bench/isolated_env.py reads pyproject.toml: it needs Python 3.11+ or `pip install tomli`.") from err

ROOT = Path(__file__).resolve().parents[1]


def normalize(name: str) -> str:
    """A distribution name as pip compares them (PEP 503): lower case, runs of ``-_.`` as one ``-``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def project_requirements(pyproject: Path = ROOT / "pyproject.toml", extras: tuple[str, ...] = ()) -> list[Requirement]:
    """``[project] dependencies`` of ``pyproject`` and those of its optional groups ``extras``."""
    project = tomllib.loads(pyproject.read_text())["project"]
    groups = project.get("optional-dependencies", {})
    unknown = [e for e in extras if e not in groups]
    if unknown:
        raise ValueError(f"{pyproject} has no optional dependency group {unknown}; it has {sorted(groups)}.")
    reqs = list(project.get("dependencies", []))
    for extra in extras:
        reqs += groups[extra]
    return [Requirement(r) for r in reqs]


def _applies(req: Requirement, extras: set[str]) -> bool:
    """Whether ``req`` applies on this interpreter and platform when its parent was asked with ``extras``."""
    return req.marker is None or any(req.marker.evaluate({"extra": e}) for e in ({""} | extras))


def dependency_closure(reqs: list[Requirement]) -> tuple[dict[str, metadata.Distribution], list[str]]:
    """The installed distributions that ``reqs`` need, transitively (markers evaluated here, extras followed), by
    normalized name; and the requirements that are not installed (as written)."""
    found: dict[str, metadata.Distribution] = {}
    followed: dict[str, set[str]] = {}  # per distribution visited: the extras whose requirements were followed
    missing: list[str] = []
    todo = [r for r in reqs if _applies(r, set())]
    while todo:
        req = todo.pop()
        name, want = normalize(req.name), set(req.extras)
        done = followed.get(name)
        if done is not None and want <= done:
            continue
        followed[name] = (done or set()) | want
        if name not in found:
            try:
                found[name] = metadata.distribution(req.name)
            except metadata.PackageNotFoundError:
                missing.append(str(req))
                continue
        new = want - (done or set())  # extras asked for the first time
        for sub in map(Requirement, found[name].requires or []):
            if sub.marker is None:
                todo += [sub] if done is None else []  # a plain requirement: on the first visit
            elif (done is None and sub.marker.evaluate({"extra": ""})) or any(sub.marker.evaluate({"extra": e}) for e in new):
                todo.append(sub)
    return found, sorted(set(missing))


def top_level_entries(dist: metadata.Distribution) -> list[Path]:
    """The files and folders that ``dist`` installed directly into its site-packages (packages, modules, extension
    modules, its ``.dist-info``), as absolute paths; scripts and data outside site-packages are left out."""
    base = Path(dist.locate_file(""))
    names = {Path(f).parts[0] for f in (dist.files or []) if Path(f).parts and Path(f).parts[0] not in ("..", "__pycache__")}
    info = getattr(dist, "_path", None)  # the .dist-info folder itself (always there for an installed distribution)
    if info is not None:
        names.add(Path(info).name)
    if not dist.files:  # no RECORD: fall back on top_level.txt
        names |= {n.strip() for n in (dist.read_text("top_level.txt") or "").split() if n.strip()}
    return sorted(p for p in (base / n for n in names) if p.exists() or p.is_symlink())


def link_into(src: Path, dst: Path) -> None:
    """Link ``src`` at ``dst``. Where ``dst`` is already a folder from another installation (a namespace package
    such as ``nvidia`` or ``google`` spread over several site-packages), merge: ``dst`` becomes a real folder of
    links to both sides' entries."""
    if not dst.exists() and not dst.is_symlink():
        dst.symlink_to(src, target_is_directory=src.is_dir())
        return
    if dst.resolve() == src.resolve():
        return
    if not (src.is_dir() and dst.is_dir()):
        raise FileExistsError(f"{dst} is linked to {dst.resolve()} and {src} wants the same name: two installed "
                              f"distributions provide it; uninstall one of them.")
    if dst.is_symlink():  # unlink the other side's folder and link its entries one by one
        other = dst.resolve()
        dst.unlink()
        dst.mkdir()
        for child in other.iterdir():
            link_into(child, dst / child.name)
    for child in src.iterdir():
        link_into(child, dst / child.name)


def site_packages(python: Path) -> Path:
    out = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         check=True, capture_output=True, text=True)
    return Path(out.stdout.strip())


def build(env_dir: Path, extras: tuple[str, ...] = ()) -> dict:
    """Create the environment in ``env_dir`` (which must not exist yet); returns its python, site-packages, the
    distributions linked and the requirements missing here."""
    env_dir = Path(env_dir)
    if env_dir.exists():
        raise FileExistsError(f"{env_dir} exists; give a new folder (the environment is built from scratch).")
    dists, missing = dependency_closure(project_requirements(extras=extras))
    venv.EnvBuilder(with_pip=False, symlinks=True, system_site_packages=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = site_packages(python)
    for name in sorted(dists):
        for entry in top_level_entries(dists[name]):
            link_into(entry, site / entry.name)
    return {"python": str(python), "site_packages": str(site),
            "linked": {name: dists[name].version for name in sorted(dists)}, "missing": missing}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("env_dir", type=Path, help="the new environment's folder (must not exist)")
    ap.add_argument("--extra", action="append", default=[], help="also the optional dependency group (cuda, test, ...)")
    args = ap.parse_args(argv)
    info = build(args.env_dir, tuple(args.extra))
    print(f"{info['python']}: {len(info['linked'])} distributions linked into {info['site_packages']}")
    print("  " + ", ".join(f"{k} {v}" for k, v in info["linked"].items()))
    if info["missing"]:
        print(f"  not installed here, left out: {', '.join(info['missing'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

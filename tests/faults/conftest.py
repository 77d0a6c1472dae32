"""The fault suite records every fault it injects; a summary is printed at the end of the session:
faults injected, survived, data lost (must be 0)."""
from __future__ import annotations

import pytest

RECORDS: list[dict] = []


@pytest.fixture
def fault_log():
    def record(fault: str, survived: bool, data_lost: int = 0) -> None:
        RECORDS.append({"fault": fault, "survived": survived, "data_lost": data_lost})

    return record


def pytest_terminal_summary(terminalreporter):
    if not RECORDS:
        return
    tr = terminalreporter
    tr.write_sep("=", "fault suite")
    for r in RECORDS:
        tr.write_line(f"  {r['fault']:<44} survived={r['survived']!s:<5} data_lost={r['data_lost']}")
    tr.write_line(f"faults injected: {len(RECORDS)}, survived: {sum(r['survived'] for r in RECORDS)}, "
                  f"data lost: {sum(r['data_lost'] for r in RECORDS)}")

"""Settings loading: misspelled ``INFERQ_*`` variables are named at start instead of silently ignored."""

from __future__ import annotations

import pytest
from support import Env

from inferq.shared.config.settings import known_variables, misspelled_variables


def test_a_misspelled_variable_is_matched_to_the_nearest_setting_of_any_process() -> None:
    environ = {
        "INFERQ_PREFECH": "64",  # a worker setting
        "INFERQ_AMPQ_URL": "amqp://x",  # every process's
        "INFERQ_CONFIRM_WINDOWS": "10",  # a producer setting
        "INFERQ_JOBS_QUEUE": "ok",  # spelled right
        "INFERQ_TEST_AMQP_URL": "amqp://y",  # the test suite's own
        "INFERQ_SOMETHING_ELSE_ENTIRELY": "1",  # resembles nothing: not a typo of ours
        "PATH": "/bin",
    }
    assert misspelled_variables(environ) == [
        ("INFERQ_AMPQ_URL", "INFERQ_AMQP_URL"),
        ("INFERQ_CONFIRM_WINDOWS", "INFERQ_CONFIRM_WINDOW"),
        ("INFERQ_PREFECH", "INFERQ_PREFETCH"),
    ]


def test_known_variables_cover_every_settings_class() -> None:
    known = known_variables()
    assert {"INFERQ_AMQP_URL", "INFERQ_PREFETCH", "INFERQ_CONFIRM_WINDOW", "INFERQ_MANAGEMENT_URL"} <= known


@pytest.mark.broker
def test_the_command_warns_on_stderr_naming_the_setting_and_keeps_stdout_clean(env: Env) -> None:
    done = env.inferq("results", "get", "nothing-here", INFERQ_RESULT_STOR="/elsewhere")
    assert done.stdout == ""
    assert done.stderr.splitlines()[0] == (
        "inferq: warning: INFERQ_RESULT_STOR is not a setting (ignored); did you mean INFERQ_RESULT_STORE?"
    )

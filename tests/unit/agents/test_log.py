import io
import json

from agents.log import get_logger, setup_logging

EARLY = get_logger("tests.early")  # created at import time, like every module-level logger


def test_json_lines_when_not_a_tty_even_for_loggers_made_before_setup():
    buf = io.StringIO()
    setup_logging("unit", stream=buf)
    EARLY.info("hello", answer=42)
    EARLY.debug("not shown at info level")
    lines = [json.loads(x) for x in buf.getvalue().splitlines()]
    assert len(lines) == 1
    rec = lines[0]
    assert rec["event"] == "hello" and rec["answer"] == 42 and rec["component"] == "unit"
    assert rec["module"] == "tests.early" and rec["level"] == "info" and rec["timestamp"].endswith("Z")


def test_debug_flag_and_console_renderer():
    buf = io.StringIO()
    setup_logging("unit", debug=True, json=False, stream=buf)
    get_logger("x").debug("details", k="v")
    out = buf.getvalue()
    assert "details" in out and "k=v" in out and not out.lstrip().startswith("{")

"""rkan_dist.log: the root handler follows sys.stderr instead of keeping the stream it was set up with."""

import ast
import contextlib
import gc
import io
import logging

import pytest

from rkan_dist.log import setup_logging


@pytest.fixture
def set_up_while_redirected():
    """setup_logging run while stderr was redirected to a stream that has since closed, as a Trainer
    built inside a notebook cell's capture or a test's capsys leaves it."""
    captured = io.StringIO()
    with contextlib.redirect_stderr(captured):
        setup_logging("INFO", rank=0)
    captured.close()  # conftest's root_logging_restored undoes the set-up afterwards


def test_records_go_to_the_current_stderr_not_the_closed_one(set_up_while_redirected, capsys):
    logging.getLogger("rkan_dist.test").warning("after the redirect ended")
    err = capsys.readouterr().err
    assert "[rank0]" in err and "WARNING rkan_dist.test: after the redirect ended" in err
    assert "Logging error" not in err


class LogsWhenCollected:
    def __del__(self):
        logging.getLogger("rkan_dist.test").warning("logged from a finalizer")


def test_a_record_from_a_finalizer_during_ast_parse_does_not_break_the_parse(set_up_while_redirected, capsys):
    """What failed CI in the Triton interpreter test: a finalizer logged during ast.parse through a
    handler on a closed stream; formatting the "Logging error" traceback parses source again (3.11's
    caret anchors), which CPython 3.11 reports as "AST constructor recursion depth mismatch"."""
    source = "\n".join(f"def f{i}(a):\n    return [a * {i} for _ in range(3)] + [{{'k': (a, {i})}}]"
                       for i in range(200))
    threshold = gc.get_threshold()
    gc.set_threshold(50)  # collect often, so a cycle's finalizer runs inside the parse
    try:
        for _ in range(5):
            cycle = [LogsWhenCollected()]
            cycle.append(cycle)
            del cycle
            ast.parse(source)
    finally:
        gc.set_threshold(*threshold)
        gc.collect()
    err = capsys.readouterr().err
    assert "logged from a finalizer" in err and "Logging error" not in err

"""The markdown table every bench report is written with, and the figures in its cells."""

import pytest

from freemerge.benchmarks.tables import markdown_table, median_and_range, with_unit


def test_a_table_is_its_header_an_alignment_row_and_a_line_per_row():
    assert markdown_table(["task", "accuracy"], [["a", "0.500"], ["b", 1]]) == [
        "| task | accuracy |",
        "|---|---|",
        "| a | 0.500 |",
        "| b | 1 |",
    ]
    assert markdown_table(["only a header"], []) == ["| only a header |", "|---|"]


def test_the_alignment_row_follows_align():
    lines = markdown_table(["a", "b", "c", "d"], [], align=["left", "right", "center", None])
    assert lines[1] == "|:---|---:|:---:|---|"
    with pytest.raises(ValueError, match="2 alignments for 4 columns"):
        markdown_table(["a", "b", "c", "d"], [], align=["left", "right"])
    with pytest.raises(KeyError):
        markdown_table(["a"], [], align=["middle"])


def test_cells_are_strings_an_empty_one_stays_one_space_and_a_pipe_is_escaped():
    lines = markdown_table(["x", "y", "z"], [[True, "", None], ["a | b", 2.5, "c"]])
    assert lines[2] == "| True | | None |"
    assert lines[3] == "| a \\| b | 2.5 | c |"  # still three cells for a renderer
    assert markdown_table(["a \\ b"], [])[0] == "| a \\ b |"  # a backslash alone is kept


def test_a_row_of_the_wrong_width_is_refused():
    with pytest.raises(ValueError, match="a row of 1 cells in a table of 2 columns"):
        markdown_table(["a", "b"], [["1", "2"], ["1"]])


def test_median_and_range():
    spread = {"median": 1.0512, "min": 0.98, "max": 1234.5}
    assert median_and_range(spread, ".2f") == "1.05 (0.98..1234.50)"
    assert median_and_range(spread, ".2f", "x") == "1.05x (0.98..1234.50)"
    assert median_and_range(spread, ",.0f", " ms") == "1 ms (1..1,234)"


def test_with_unit():
    assert with_unit(0.0512, "%") == "5.1%"
    assert with_unit(1.0, "x") == "1.00x"
    assert with_unit(12.345, "ms") == "12.35 ms"
    assert with_unit(None, "%") == "-"


def test_the_machine_line_names_the_cpu_and_its_vector_instructions_where_recorded():
    """Results from machines of different CPUs are told apart; older results lack the two."""
    from freemerge.benchmarks.machine import describe_machine, machine_line

    machine = describe_machine()
    assert machine["cpu_capability"] in machine_line(machine)
    older = {k: v for k, v in machine.items() if k not in ("cpu_model", "cpu_capability")}
    assert f"CPU cores ({machine['processor']})," in machine_line(older)

"""One style for numbers in every table, and a footer that explains the columns."""

from __future__ import annotations

from resnet_deploy.core.render import (Column, cell, format_markdown, format_table, share,
                                       significant)


def test_significant_figures() -> None:
    assert significant(9.798e-07) == "9.80e-07"
    assert significant(0.0409031) == "0.0409"
    assert significant(10.13) == "10.1"
    assert significant(181.0) == "181"
    assert significant(1.0) == "1.00"
    assert significant(9.9996) == "10.0"  # rounding that carries keeps 3 figures
    assert significant(1663.3) == "1663"
    assert significant(0.0) == "0"


def test_shares_and_kinds() -> None:
    assert share(0.99458) == "99.46%" and share(1.0) == "100.00%"
    assert cell(0.814, "share") == "81.40%"
    assert cell(0.999305, "cosine") == "0.999305" and cell(1.0, "cosine") == "1.000000"
    assert cell(0.3534, "ratio") == "0.353x"
    assert cell(None, "ms") == "-" and cell(True) == "yes"


def test_table_footer_explains_columns() -> None:
    rows = [{"name": "a", "agree": 0.9946, "err": 0.0409031},
            {"name": "bb", "agree": 1.0, "err": 9.798e-07}]
    columns = [Column("name", "model"), Column("agree", "matches on top-1", "share",
                                                "images where both pick the same class"),
               Column("err", "largest abs diff", "error")]
    lines = format_table(rows, columns).splitlines()
    assert lines[0].split() == ["model", "matches", "on", "top-1", "largest", "abs", "diff"]
    assert lines[2].split() == ["a", "99.46%", "0.0409"]
    assert lines[3].split() == ["bb", "100.00%", "9.80e-07"]
    assert lines[-1] == "columns: matches on top-1 = images where both pick the same class"
    assert "columns:" not in format_table(rows, columns[:1])
    assert format_markdown(rows, columns).splitlines()[2] == "| a | 99.46% | 0.0409 |"

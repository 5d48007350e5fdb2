from aggregator.model import SiteError
from aggregator.text_table import error_lines, table_lines


def test_columns_align_and_a_rule_can_separate_the_header() -> None:
    assert table_lines(("site", "n"), [("a.com", 1), ("bb.org", 22)], rule=True) == [
        "site    n",
        "------  --",
        "a.com   1",
        "bb.org  22",
    ]


def test_identical_errors_collapse_into_one_line_naming_a_few_sites() -> None:
    revoked = "Google refused the refresh token of account a@x: reconnect it"
    errors = [SiteError(f"s{n}.com", "gsc", revoked) for n in range(5)]
    errors.insert(2, SiteError("m.com", "matomo", "no access"))
    assert error_lines(errors) == [
        f"gsc      s0.com, s1.com, s2.com and 2 more: {revoked}",
        "matomo   m.com: no access",
    ]

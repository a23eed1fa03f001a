"""Just enough PromQL lexing for tests/test_observability.py: which series an expression reads,
its comparisons turned into `bool` ones, and Grafana's dashboard variables substituted.

Not a parser: it needs only to tell a series name from a function, keyword, label name or
literal, and a comparison operator from a label matcher. Strings, `{...}` label matchers and
`[...]` ranges are lexed as single tokens, so nothing inside them is mistaken for either.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk",
                "quantile", "limitk", "limit_ratio"}
KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
            "atan2", "inf", "nan", "start", "end"}
# Followed by a parenthesised list of label names, not of expressions.
LABEL_LISTS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
COMPARISONS = {"==", "!=", ">", "<", ">=", "<="}
_OPERATORS = ("==", "!=", ">=", "<=", "=~", "!~", ">", "<", "+", "-", "*", "/", "%", "^", "@", "(", ")", ",")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_NUMBER = re.compile(r"(0x[0-9a-fA-F]+|[0-9][0-9A-Za-z_.]*(?:[eE][+-]?[0-9]+)?)")


@dataclass
class Token:
    kind: str  # ident, number, string, matchers, range, op
    text: str
    start: int
    end: int


def _closing(expr: str, i: int, close: str) -> int:
    """Index just past the `close` that ends the group opened at i, skipping quoted strings."""
    j = i + 1
    while j < len(expr):
        c = expr[j]
        if c in "\"'`":
            j = _string_end(expr, j)
            continue
        if c == close:
            return j + 1
        j += 1
    raise ValueError(f"unclosed {expr[i]!r} at {i} in {expr!r}")


def _string_end(expr: str, i: int) -> int:
    quote = expr[i]
    j = i + 1
    while j < len(expr):
        if expr[j] == "\\" and quote != "`":
            j += 2
            continue
        if expr[j] == quote:
            return j + 1
        j += 1
    raise ValueError(f"unclosed string at {i} in {expr!r}")


def tokens(expr: str) -> list[Token]:
    out: list[Token] = []
    i = 0
    while i < len(expr):
        c = expr[i]
        if c.isspace():
            i += 1
        elif c == "#":  # a comment runs to the end of the line
            nl = expr.find("\n", i)
            i = len(expr) if nl < 0 else nl
        elif c in "\"'`":
            j = _string_end(expr, i)
            out.append(Token("string", expr[i:j], i, j))
            i = j
        elif c == "{":
            j = _closing(expr, i, "}")
            out.append(Token("matchers", expr[i:j], i, j))
            i = j
        elif c == "[":
            j = _closing(expr, i, "]")
            out.append(Token("range", expr[i:j], i, j))
            i = j
        elif c.isdigit() or (c == "." and i + 1 < len(expr) and expr[i + 1].isdigit()):
            m = _NUMBER.match(expr, i) if c != "." else re.compile(r"\.[0-9]+(?:[eE][+-]?[0-9]+)?").match(expr, i)
            out.append(Token("number", m.group(0), i, m.end()))
            i = m.end()
        elif (m := _IDENT.match(expr, i)) is not None:
            out.append(Token("ident", m.group(0), i, m.end()))
            i = m.end()
        else:
            for op in _OPERATORS:
                if expr.startswith(op, i):
                    out.append(Token("op", op, i, i + len(op)))
                    i += len(op)
                    break
            else:
                raise ValueError(f"unexpected {c!r} at {i} in {expr!r}")
    return out


def selectors(expr: str) -> list[tuple[str, str]]:
    """(series name, its `{...}` matchers or "") for every series the expression reads."""
    toks = tokens(expr)
    out = []
    i = 0
    while i < len(toks):
        t = toks[i]
        nxt = toks[i + 1] if i + 1 < len(toks) else None
        if t.kind == "ident" and t.text in LABEL_LISTS and nxt is not None and nxt.text == "(":
            while i < len(toks) and toks[i].text != ")":  # label names up to the closing parenthesis
                i += 1
        elif (t.kind == "ident" and t.text not in KEYWORDS and t.text not in AGGREGATIONS
              and not (nxt is not None and nxt.text == "(")):
            out.append((t.text, nxt.text if nxt is not None and nxt.kind == "matchers" else ""))
        i += 1
    return out


def metric_names(expr: str) -> set[str]:
    return {name for name, _ in selectors(expr)}


def with_bool_comparisons(expr: str) -> str:
    """The expression with `bool` after every comparison operator: where the original filters
    series out (an alert that is not firing), this one keeps them with the value 0 or 1, so
    "does the alert's expression see any series at all" becomes a query that returns data."""
    toks = tokens(expr)
    out = expr
    for i in reversed(range(len(toks))):
        t = toks[i]
        if t.kind == "op" and t.text in COMPARISONS:
            if i + 1 < len(toks) and toks[i + 1].text == "bool":
                continue
            out = out[:t.end] + " bool" + out[t.end:]
    return out


_VAR = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")


def substitute(expr: str, variables: dict[str, str]) -> str:
    """Grafana's `$name` / `${name}` substitution; an unknown variable is an error, not left in."""
    def one(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        if name not in variables:
            raise KeyError(f"dashboard variable ${name} has no value in the test (in {expr!r})")
        return variables[name]

    return _VAR.sub(one, expr)


def exposition_families(text: str) -> dict[str, str]:
    """{family name: type} from the `# TYPE` lines of a Prometheus text exposition."""
    out = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(None, 3)
            out[name] = kind.strip()
    return out


def series_names(families: dict[str, str]) -> set[str]:
    """The sample names a scrape of those families yields (a histogram's _bucket, _count, _sum)."""
    out = set()
    for name, kind in families.items():
        if kind == "histogram":
            out |= {f"{name}_bucket", f"{name}_count", f"{name}_sum"}
        elif kind == "summary":
            out |= {name, f"{name}_count", f"{name}_sum"}
        else:
            out.add(name)
    return out

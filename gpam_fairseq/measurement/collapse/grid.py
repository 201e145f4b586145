"""What the collapse analysis measures: the attention settings, and the lambda map's grid.

daGPAM is measured at every point of the product grid --lambda-pos x --lambda-neg, per W_Q-
initialisation, the other attention types once as references; points that break the row-sum
rule (lambda- >= 1 + lambda+) are refused in one line before anything runs (or dropped with
``--skip-invalid``).
"""

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from gpam_fairseq.options import DEFAULTS, GPAMConfigError, GPAMOptions


@dataclass(frozen=True)
class MeasuredAttention:
    """One attention setting to measure: a type, and for daGPAM its lambdas and W_Q- start
    (None: the type's defaults, or whatever a checkpoint / --fairseq-args says)."""

    attention_type: str
    lambda_pos: Optional[float] = None
    lambda_neg: Optional[float] = None
    neg_query_init: Optional[str] = None
    label: str = ""

    def options(self) -> GPAMOptions:
        """The GPAM options of a pure stack for this setting."""
        given = {k: v for k, v in (("lambda_pos", self.lambda_pos), ("lambda_neg", self.lambda_neg),
                                   ("neg_query_init", self.neg_query_init)) if v is not None}
        return GPAMOptions(attention_type=self.attention_type, **given)

    def fairseq_flags(self) -> List[str]:
        """The fairseq-train flags that set this setting (after --fairseq-args, so they win)."""
        flags = []
        for value, flag in ((self.lambda_pos, "--gpam-lambda-pos"), (self.lambda_neg, "--gpam-lambda-neg"),
                            (self.neg_query_init, "--gpam-neg-query-init")):
            if value is not None:
                flags += [flag, repr(value) if isinstance(value, float) else value]
        return flags

    def columns(self) -> dict:
        return dict(lambda_pos=self.lambda_pos, lambda_neg=self.lambda_neg, neg_query_init=self.neg_query_init)


def parse_floats(text: str, flag: str) -> List[float]:
    """A comma list of finite numbers >= 0 (a lambda list), in the order given, without repeats."""
    values = []
    for item in text.split(","):
        if not item.strip():
            continue
        try:
            v = float(item)
        except ValueError:
            raise SystemExit(f"{flag}: expected a comma list of numbers >= 0, got {item.strip()!r}") from None
        if not math.isfinite(v) or v < 0:
            raise SystemExit(f"{flag}: every value must be a finite number >= 0, got {item.strip()!r}")
        if v not in values:
            values.append(v)
    if not values:
        raise SystemExit(f"{flag}: empty list")
    return values


def breaks_row_sum(lambda_pos: float, lambda_neg: float) -> bool:
    """Whether P_G's rows would sum to 1 + lambda+ - lambda- <= 0 (refused, as --gpam-lambda-neg is)."""
    return lambda_neg >= 1 + lambda_pos


def lambda_grid(pos: Sequence[float], neg: Sequence[float], skip_invalid: bool = False) -> List[Tuple[float, float]]:
    """The product grid of (lambda+, lambda-), lambda+ first. Points that break the row-sum rule
    (lambda- >= 1 + lambda+) are refused by name before anything is measured, in one line;
    ``skip_invalid`` drops them instead (the valid region of a rectangular grid is a triangle)."""
    points = [(p, n) for p in pos for n in neg]
    invalid = [(p, n) for p, n in points if breaks_row_sum(p, n)]
    if invalid and not skip_invalid:
        named = ", ".join(f"(lambda+ {p:g}, lambda- {n:g})" for p, n in invalid)
        raise GPAMConfigError(
            f"--lambda-neg: {len(invalid)} grid point(s) break the row-sum rule lambda- < 1 + lambda+ (rows of P_G "
            f"would sum to 1 + lambda+ - lambda- <= 0): {named}; remove them from --lambda-pos/--lambda-neg, or pass "
            f"--skip-invalid to measure only the valid points")
    valid = [pt for pt in points if pt not in invalid]
    if not valid:
        raise GPAMConfigError("--lambda-neg: no grid point satisfies lambda- < 1 + lambda+; lower --lambda-neg")
    return valid


def grid_label(lambda_pos: float, lambda_neg: float, neg_query_init: Optional[str]) -> str:
    return f"dagpam l+={lambda_pos:g} l-={lambda_neg:g}" + (f" {neg_query_init}" if neg_query_init else "")


def settings_for(types: Sequence[str], grid: Optional[List[Tuple[float, float]]],
                 inits: Optional[Sequence[str]]) -> List[MeasuredAttention]:
    """What to measure: every type of ``types``; daGPAM once per grid point (without a grid:
    once, with the lambdas it is configured with) and per W_Q- initialisation of ``inits``
    (None: the one it is configured with); the other types once, as references."""
    out = []
    for t in types:
        if t != "dagpam":
            out.append(MeasuredAttention(t, label=t))
            continue
        for init in inits or [None]:
            if grid is None:
                out.append(MeasuredAttention(t, neg_query_init=init, label=t if init is None else f"{t} {init}"))
            else:
                out.extend(MeasuredAttention(t, p, n, init, grid_label(p, n, init)) for p, n in grid)
    return out


def default_marks(grid: List[Tuple[float, float]]) -> List[Tuple[float, float]]:
    """The points whose per-layer curves are drawn: the defaults (0.2, 0.2), the row-sum-1
    diagonal lambda+ = lambda-, and for every lambda+ the largest lambda- of the grid (the one
    closest to its limit 1 + lambda+), where they are grid points."""
    marks = []
    defaults = (DEFAULTS["gpam_lambda_pos"], DEFAULTS["gpam_lambda_neg"])
    candidates = [defaults] + sorted(pt for pt in grid if pt[0] == pt[1])
    for p in sorted({p for p, _ in grid}):
        candidates.append((p, max(n for q, n in grid if q == p)))
    for pt in candidates:
        if pt in grid and pt not in marks:
            marks.append(pt)
    return marks


def parse_marks(text: str, grid: List[Tuple[float, float]]) -> List[Tuple[float, float]]:
    marks = []
    for item in text.split(","):
        if not item.strip():
            continue
        try:
            p, n = (float(x) for x in item.split(":"))
        except ValueError:
            raise SystemExit(f"--mark: expected LAMBDA_POS:LAMBDA_NEG pairs separated by commas, got {item.strip()!r}") from None
        if (p, n) not in grid:
            raise SystemExit(f"--mark: ({p:g}, {n:g}) is not a point of the grid --lambda-pos x --lambda-neg")
        marks.append((p, n))
    return marks

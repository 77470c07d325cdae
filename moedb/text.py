"""Text checks shared by every place text enters moedb, and the English function words that carry no
topic (skipped by full-text matching and by routing explanations)."""
from __future__ import annotations

import re

STOPWORDS = frozenset("""a an and are as at be been but by can could did do does for from had has have how i if in
into is it its me my of on or our please so than that the their them then there these they this to was we were
what when where which who why will with would you your""".split())
_WORD = re.compile(r"\w+", re.UNICODE)


def words(text: str) -> list[str]:
    """The distinct lower-cased words of ``text``, in order."""
    return list(dict.fromkeys(w.lower() for w in _WORD.findall(text or "")))


def content_words(text: str) -> list[str]:
    """The distinct words of ``text`` that are not function words (:data:`STOPWORDS`)."""
    return [w for w in words(text) if w not in STOPWORDS]


def is_unicode(text: str) -> bool:
    """True when ``text`` can be stored (UTF-8 encodable: no lone surrogates, which invalid UTF-8 command-line
    arguments and some JSON escapes produce)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True

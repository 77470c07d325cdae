"""Text checks shared by every place text enters moedb."""
from __future__ import annotations


def is_unicode(text: str) -> bool:
    """True when ``text`` can be stored (UTF-8 encodable: no lone surrogates, which invalid UTF-8 command-line
    arguments and some JSON escapes produce)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True

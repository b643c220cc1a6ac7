"""CIDEr-D exactly as coco-caption computes it, without Java.

coco-caption (and its pip package `pycocoevalcap`) scores captions in two steps:

1. `PTBTokenizer` pipes every caption through the Stanford CoreNLP 3.4.1 `PTBTokenizer` (Java, options
   `-preserveLines -lowerCase`) and then drops the tokens in its `PUNCTUATIONS` list.
2. `Cider` computes CIDEr-D: n-grams up to 4, TF-IDF vectors whose document frequencies come from the references
   of the evaluated images only, clipped cosine similarity, a Gaussian length penalty (sigma 6), times 10.

`ptb_tokenize` / `ptb_tokenize_lines` re-implement step 1 as a small longest-match lexer whose rules follow the
JFlex grammar of that CoreNLP release (`PTBLexer.flex`), with the details of 3.4.1 measured on the jar itself. It
gives the jar's output on all 40,460 Flickr8k captions and on some 300,000 generated captions and random strings
(punctuation, quotes, numbers, abbreviations, URLs, non-ASCII). One deliberate difference: a line break inside a
caption ("\r", U+2028, ...) is read as a space, where Java would start a new line and shift every later caption
onto the wrong image. `corpus_cider` implements step 2 with the same arithmetic, so scores agree with the Java
pipeline to floating-point rounding (about 1e-15 on Flickr8k).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from ..utils.io import preview_names

__all__ = ["CiderResult", "corpus_cider", "ptb_tokenize", "ptb_tokenize_lines", "PUNCTUATIONS"]

# Tokens pycocoevalcap removes after tokenizing. The bracket names are upper case here but the Java tokenizer
# lower-cases its output, so "-lrb-" and friends survive: that quirk is part of the published metric.
PUNCTUATIONS = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-",
                          "--", "...", ";"])


# ---------------------------------------------------------------------------------------------------------------
# Step 1: the Stanford PTB tokenizer (CoreNLP 3.4.1, default "ptb3Escaping" options, as pycocoevalcap runs it).
# ---------------------------------------------------------------------------------------------------------------

def _char_class(predicate: Callable[[str], bool]) -> str:
    """The body of a regex character class holding every BMP character for which `predicate` is true.

    The Java lexer works on UTF-16 code units, so characters outside the BMP never match its letter classes;
    they fall through to "untokenizable" and are deleted, which is what happens to emoji.
    """
    ranges, start, previous = [], None, None
    for code in range(0x10000):
        if 0xD800 <= code <= 0xDFFF or not predicate(chr(code)):
            continue
        if start is None or code != previous + 1:
            if start is not None:
                ranges.append((start, previous))
            start = code
        previous = code
    ranges.append((start, previous))
    return "".join(re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in ranges)


def _caseless(word: str) -> str:
    """JFlex `%caseless` makes literal text case-insensitive but leaves `[...]` classes exact."""
    return f"(?i:{word})"


_L = _char_class(str.isalpha)  # JFlex [:letter:] (Java Character.isLetter: Lu, Ll, Lt, Lm, Lo)
_UPPER = f"[{_char_class(str.isupper)}]"
_LETTER = f"(?:[{_L}\u00ad\u0300-\u036f]|&[aeiouAEIOU]{_caseless('acute|grave|uml')};)"
_ALNUM = f"[{_L}\\d]"
_SPACE_CHARS = " \t\u00a0\u2000-\u200a\u3000"
_SPACE = f"[{_SPACE_CHARS}]"
# U+0085 (NEL) ends a line in the look-ahead of most rules, but as a token the CP1252 ellipsis rule claims it
# first, and the opening-quote rule's "followed by a non-space" accepts it: both as measured on the Java jar.
_NEWLINE = "(?:\r\n|[\r\n\u2028\u2029\x0b\x0c\x85])"
_SPACENL = f"[{_SPACE_CHARS}\r\n\u2028\u2029\x0b\x0c\x85]"
_NOT_SPACENL = f"[^{_SPACE_CHARS}\r\n\u2028\u2029\x0b\x0c]"
_SGML = (r"<(?:[!?][A-Za-z\-][^>\r\n]*|[A-Za-z][A-Za-z0-9_:.\-]*(?:[ ]+(?:[A-Za-z][A-Za-z0-9_:.\-]*"
         r"|[A-Za-z][A-Za-z0-9_:.\-]*[ ]*=[ ]*(?:'[^']*'|\"[^\"]*\"|[A-Za-z][A-Za-z0-9_:.\-]*)))*[ ]*/?"
         r"|/[A-Za-z][A-Za-z0-9_:.\-]*)[ ]*>")
_NUM = r"\d*(?:[.:,\u00ad\u066b\u066c]\d+)+|\d+"
_NUMBER = f"[-+]?(?:{_NUM})"
_HYPHEN = "[-_\u058a\u2010\u2011]"
_APOS = "(?:['\x92\u2019]|&apos;)"
_APOS_ETC = "(?:['\x92\u2019`\x91\u2018\u201b]|&apos;)"  # also seen inside words, rightly or wrongly
_WORD = f"{_LETTER}(?:{_LETTER}|\\d)*(?:[.!?]{_LETTER}(?:{_LETTER}|\\d)*)*"
_REDAUX = f"{_APOS}(?:[msdMSD]|{_caseless('re|ve|ll')})"  # 's 'm 'd 're 've 'll
_SWORD = "[A-Za-z\u00ad]*[A-MO-Za-mo-z]\u00ad*"  # a word that can take n't: it cannot itself end in n
_SREDAUX = f"{_caseless('n')}{_APOS_ETC}{_caseless('t')}"
_APOWORD = [  # words with an apostrophe inside that stay whole: o'clock, rock 'n' roll, '90s
    f"{_APOS}{_caseless('n')}{_APOS}?", f"[lLdDjJ]{_APOS}", f"{_caseless('dunkin')}{_APOS}",
    f"{_caseless('somethin')}{_APOS}", f"{_caseless('ol')}{_APOS}", f"{_APOS}{_caseless('em')}",
    f"[A-HJ-XZn]{_APOS_ETC}[{_L}]{{2}}[{_L}]*", f"{_APOS}[2-9]0{_caseless('s')}", f"{_APOS}{_caseless('till?')}",
    f"[{_L}][{_L}]*[aeiouyAEIOUY]{_APOS_ETC}[aeiouA-Z][{_L}]*", f"{_APOS}{_caseless('cause')}",
    _caseless("cont'd\\.|nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l"),
    f"{_caseless('o')}{_APOS_ETC}{_caseless('o')}",
]
_FULL_URL = (_caseless("ftp|svn|svn\\+ssh|http|https|mailto") +
             r"://[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){},\-]")
_LIKELY_URL = [
    _caseless("www") + r"\.(?:[^ \t\n\f\r\"<>|.!?(){},]+\.)+[a-zA-Z]{2,4}"
                       r"(?:/[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){},\-])?",
    # upstream wrote ",-_" here, which is the range "," to "_" (digits and capitals excluded); kept as it behaves
    r"(?:[^ \t\n\f\r\"`'<>|.!?(){}\x2c-\x5f$]+\.)+" + _caseless("com|net|org|edu"),
]
_EMAIL = (r"(?:&lt;|<)?[a-zA-Z0-9][^ \t\n\f\r\"<>|(){}\u00a0]*@(?:[^ \t\n\f\r\"<>|(){}.\u00a0]+\.)*"
          r"[^ \t\n\f\r\"<>|(){}.\u00a0]+(?:&gt;|>)?")
_TWITTER = f"@[a-zA-Z_][a-zA-Z_0-9]*|#{_LETTER}+"
_DATE = r"\d{1,2}[\-/]\d{1,2}[\-/]\d{2,4}"
_FILENAME = (f"{_ALNUM}+(?:\\.{_ALNUM}+)*\\." +
             _caseless("(?:bat|bmp|c|class|cgi|cpp|dll|docx?|exe|gif|gz|h|html?|jar|java|jpe?g|mov|mp3|pdf|php|pl|png"
                       "|ppt|ps|py|sql|tar|txt|wav|x|xml|zip)"))
_FRACTION = "(?:\\d{1,4}[- \u00a0])?\\d{1,4}(?:\\\\?/|\u2044)\\d{1,4}"
_THING = f"(?:[dDoOlL]{_APOS_ETC}{_ALNUM})?{_ALNUM}+(?:{_HYPHEN}(?:[dDoOlL]{_APOS_ETC}{_ALNUM})?{_ALNUM}+)*"
_THING_AMP = f"[A-Z]+(?:(?:{_caseless('&amp;')}|[+&])[A-Z]+)+"  # AT&T, R&D
# and/or, a/b/c; like _HTHING below, ASCII-only in that release ("a/bé" splits before the "é")
_THING_SLASH = "[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}"
_COUNTRY_ACRO = _caseless("(?:canada|sino|korean|eu|japan|non)-u\\.s|u\\.s\\.-(?:u\\.k|u\\.s\\.s\\.r)")
_ACRO = f"{_COUNTRY_ACRO}|[A-Za-z](?:\\.[A-Za-z])*"  # U.S, e.g, a (the final period is matched separately)
_ACRO2 = f"{_COUNTRY_ACRO}|[A-Za-z](?:\\.[A-Za-z])+"
_HTHING = f"[A-Za-z0-9][A-Za-z0-9.,\u00ad]*(?:-(?:(?:{_ACRO2})\\.|[A-Za-z0-9\u00ad]+))+"  # ASCII only


def _abbreviations(words: str) -> str:
    """`|`-separated abbreviations, caseless except a leading `[X]`, which JFlex matches case-sensitively."""
    parts = []
    for word in words.split("|"):
        if word.startswith("["):
            parts.append(word[1] + _caseless(word[3:]))
        else:
            parts.append(_caseless(word))
    return "(?:" + "|".join(parts) + ")"


# Abbreviations usually followed by a lower-case word: before an upper-case word they also end the sentence.
_ABBREV1_WORDS = _abbreviations(
    "jan|feb|mar|apr|jun|jul|aug|sep|sept|oct|nov|dec|mon|tue|tues|wed|thu|thurs|fri"
    "|ala|ariz|[A]z|[A]rk|calif|colo|conn|ct|dak|[D]el|fla|ga|[I]ll|ind|kans?|ky|[L]a|[M]ass|md|mich|minn|[M]iss"
    "|mo|mont|neb|nev|okla|[O]re|[P]a|penn|tenn|[T]ex|va|vt|[W]ash|wisc?|wyo"
    "|inc|cos?|corp|ltd|plc|rt|bancorp|bhd|assn|univ|intl|sys|blvd|rd|tel|est|ext|sq|jr|sr|bros|(?:ed|ph)\\.d|esq"
    "|etc|al|seq|bldg"
)
_ABBREV1 = f"(?:{_ABBREV1_WORDS}|{_caseless('pp?t')}[ye]{_caseless('s')}?)\\."  # ... plus Pty., Pte.
# Titles and the like, usually followed by a capitalised name: never sentence-final.
_ABBREV4 = [
    _abbreviations(
        "mr|mrs|ms|[M]iss|drs?|profs?|sens?|reps?|attys?|lt|col|gen|messrs|govs?|adm|rev|maj|sgt|cpl|pvt|capt"
        "|ste?|ave|pres|lieut|rt|hon|brig|co?mdr|pfc|spc|supts?|det|mt|ft|adj|adv|asst|assoc|ens|insp|mlle|mme"
        "|msgr|sfc|vs|alex|wm|jos|cie|a\\.k\\.a|cf|treas|ph|invt|elec|natl|dept"),
    f"M[ft]{_caseless('g')}", "v", _ACRO,
]
_ABBREV2 = [f"(?:{abbreviation})\\." for abbreviation in _ABBREV4]
_ABBREV3 = _caseless("(?:ca|figs?|prop|nos?|art|bldg|pp|op)\\.")  # only before a number: "fig. 3", "No. 5"
# After an acronym, these capitalised words signal a sentence end ("... in the U.S. The ...").
_SENTENCE_STARTERS = "|".join(
    word[0] + _caseless(re.escape(word[1:])) for word in (  # first letter upper case only, as upstream
        "About According Additionally After An A As At But Did During Earlier He Her Here How However If In It Last "
        "Many More Mr. Ms. Now Once One Other Our She Since So Some Such That The Their Then There These They This "
        "We When While What Who Why Yet You").split()
)
_PHONE = ("(?:\\([0-9]{2,3}\\)[ \u00a0]?|(?:\\+\\+?)?(?:[0-9]{2,4}[\\- \u00a0])?[0-9]{2,4}[\\- \u00a0])"
          "[0-9]{3,4}[\\- \u00a0]?[0-9]{3,5}|(?:(?:\\+\\+?)?[0-9]{2,4}\\.)?[0-9]{2,4}\\.[0-9]{3,4}\\.[0-9]{3,5}")
_QUOTES = [_APOS, "''", "[`\u2018-\u201f\x91-\x94\u2039\u203a\u00ab\u00bb]{1,2}"]
# The quotes that turn into opening quotes before a word; a right single quote there is read as 's, 'd, ...
_OPENING_QUOTES = ["'", "''", "[`\u2018\u201a-\u201f\x91\x93\x94\u2039\u203a\u00ab\u00bb]"
                   "[`\u2018-\u201f\x91-\x94\u2039\u203a\u00ab\u00bb]?"]
_SMILEY = "[<>]?[:;=][\\-o*']?[()DPdpO\\\\{@|\\[\\]]"
_ASIAN_SMILEY = ("[\\-\\^x=~<>']_[\\-\\^x=~<>']|\\([\\-\\^x=~<>'][_.]?[\\-\\^x=~<>']\\)"
                 "|\\([\\^x=~<>']-[\\^x=~<>'`]\\)")
_MISC_SYMBOL = ("[+%&~^|\\\\=\u00a6\u00a7\u00a8\u00a9\u00ac\u00ae\u00af\u00b0-\u00ba\u00d7\u00f7\u0387\u05be\u05c0"
                "\u05c3\u05c6\u05f3\u05f4\u0600-\u0603\u0606-\u060a\u060c\u0614\u061b\u061e\u066a\u066d"
                "\u0703-\u070d\u07f6-\u07f8\u0964\u0965\u0e4f\u1fbd\u2016\u2017\u2020-\u2025\u2030-\u2038\u203b"
                "\u203c\u203e-\u2044\u207a-\u207f\u208a-\u208e\u2100-\u214f\u2190-\u21ff\u2200-\u2bff"
                "\u3001-\u3006\u3008-\u3020\u30fb\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65]")
_CURRENCY = "[\u00a2\u00a3\u00a4\u00a5\x80\u20a0\u20ac\u060b\u0e3f\u20a4\uffe0\uffe1\uffe5\uffe6]"
_FRACTION_CHARS = "\u00bc\u00bd\u00be\u2153-\u215e"

_NEWLINE_TOKEN = "\n"
_TO_NBSP = str.maketrans({" ": "\u00a0"})
_BRACKETS = {"(": "-LRB-", ")": "-RRB-", "{": "-LCB-", "}": "-RCB-", "[": "-LSB-", "]": "-RSB-"}
_PAREN_NAMES = str.maketrans({"(": "-LRB-", ")": "-RRB-"})
_CURRENCY_NAMES = str.maketrans({"\u00a2": "cents", "\u00a3": "#", "\x80": "$", "\u00a4": "$", "\u20a0": "$",
                                 "\u20ac": "$"})
_FRACTION_NAMES = str.maketrans({"\u00bc": "1/4", "\u00bd": "1/2", "\u00be": "3/4", "\u2153": "1/3",
                                 "\u2154": "2/3"})
# Curly, CP1252 and guillemet quotes become LaTeX-style quotes whatever their context.
_QUOTE_NAMES = str.maketrans({"\u2018": "`", "\u201b": "`", "\u2039": "`", "\x91": "`", "\u2019": "'",
                              "\u203a": "'", "\x92": "'", "\u201c": "``", "\u00ab": "``", "\x93": "``",
                              "\u201d": "''", "\u00bb": "''", "\x94": "''"})
_ASSIMILATION_WORDS = frozenset(["cannot", "gonna", "gotta", "lemme", "gimme", "wanna", "nno"])


def _latex_quotes(token: str, opening: bool) -> str:
    """Straight quotes become `` / ` before a word and '' / ' elsewhere; typographic quotes map by shape."""
    if token == "''":
        return token
    token = token.replace("&apos;", "'").replace("&quot;", '"')
    token = token.replace('"', "``" if opening else "''")
    if opening:
        token = token.replace("'", "`")
    return token.translate(_QUOTE_NAMES)


_Action = Callable[[str], "tuple[str | None, int]"]


def _keep(token: str) -> tuple[str | None, int]:
    return token, len(token)


def _emit(make: Callable[[str], str | None]) -> _Action:
    return lambda token: (make(token), len(token))


def _split_off_last(count: int) -> _Action:
    """`cannot` -> `can` + `not`: JFlex `yypushback(count)` re-scans the tail as the next token."""
    return lambda token: (token[:-count], len(token) - count)


def _emit_and_rescan_period(token: str) -> tuple[str | None, int]:
    """A sentence-final abbreviation keeps its period and the period is ALSO returned as the next token."""
    return token, len(token) - 1


def _acronym_at_sentence_end(token: str) -> tuple[str | None, int]:
    # "I." before "The": the period is only the full stop; "U.S." keeps it and adds a full stop.
    if len(token) == 2:
        return token[0], 1
    return token, len(token) - 1


def _hyphens(token: str) -> tuple[str | None, int]:
    return ("--" if 3 <= len(token) <= 4 else token), len(token)


def _drop(token: str) -> tuple[str | None, int]:
    return None, len(token)


def _drop_one_char(token: str) -> tuple[str | None, int]:
    return None, 1


@dataclass(frozen=True)
class _Rule:
    pattern: re.Pattern  # group "token" is the token; text after it is JFlex trailing context (r1/r2)
    action: _Action


def _rules(alternatives: str | list[str], action: _Action = _keep, context: str = "") -> list[_Rule]:
    """One rule per top-level alternative: Python's `|` takes the first alternative that matches, JFlex the
    longest, and the lexer below compares whole matches by length."""
    if isinstance(alternatives, str):
        alternatives = [alternatives]
    return [_Rule(re.compile(f"(?P<token>{token}){context}", re.DOTALL), action) for token in alternatives]


# soft hyphens only mark where a line may break; a token made of nothing else becomes a plain hyphen
_strip_soft_hyphens = _emit(lambda token: token.replace("\u00ad", "") or "-")
_closing_quotes = _emit(lambda token: _latex_quotes(token, opening=False))
_opening_quotes = _emit(lambda token: _latex_quotes(token, opening=True))
_nbsp = _emit(lambda token: token.translate(_TO_NBSP))
_normalize_ampersand = _emit(lambda token: re.sub("(?i)&amp;", "&", token))

# Ordered as in PTBLexer.flex: the longest match wins (trailing context counts), ties go to the earlier rule.
_RULES = [
    *_rules(_caseless("c\\+\\+|[cf]#")),
    *_rules(_caseless("cannot|'twas"), _split_off_last(3)),
    *_rules(_caseless("'tis|gonna|gotta|lemme|gimme|wanna|nno"), _split_off_last(2)),
    *_rules(_SGML, _nbsp),
    *_rules(f"&{_caseless('md|mdash|ndash')};|[\x96\x97\u2013\u2014\u2015]", _emit(lambda token: "--")),
    *_rules(_caseless("&amp;"), _emit(lambda token: "&")),
    *_rules(f"&(?:{_caseless('ht|tl|ur|lr|qc|ql|qr|odq|cdq')}|#[0-9]+);"),
    *_rules(_WORD, _strip_soft_hyphens, context=_REDAUX),
    *_rules(_SWORD, _strip_soft_hyphens, context=_SREDAUX),
    *_rules(_WORD, _strip_soft_hyphens),
    *_rules(_APOWORD),
    *_rules(f"[yY]{_APOS}", context=f"[{_L}]"),
    *_rules(_FULL_URL),
    *_rules(_LIKELY_URL),
    *_rules(_EMAIL),
    *_rules(_TWITTER),
    *_rules(_REDAUX, _closing_quotes, context="[^A-Za-z]"),
    *_rules(_SREDAUX, _closing_quotes, context="[^A-Za-z]"),
    *_rules(_DATE),
    *_rules(_NUMBER, _emit(lambda token: token.replace("\u00ad", ""))),
    *_rules("[\u207a\u207b\u208a\u208b]?(?:[\u2070\u00b9\u00b2\u00b3\u2074-\u2079]+|[\u2080-\u2089]+)"),
    *_rules(_FRACTION, _nbsp),
    *_rules(f"[{_FRACTION_CHARS}]", _emit(lambda token: token.translate(_FRACTION_NAMES))),
    *_rules("-" + _caseless("rrb|lrb|rcb|lcb|rsb|lsb") + "-|" +
            _caseless(f"c\\.d\\.s|pro-|anti-|s(?:&|&amp;)p-500|s(?:&|&amp;)ls|cap{_APOS}n|c{_APOS}est"),
            _normalize_ampersand),
    *_rules(_THING_SLASH),
    *_rules("[A-Z]*\\$|#"),
    *_rules(_CURRENCY, _emit(lambda token: token.translate(_CURRENCY_NAMES))),
    *_rules(f"(?:{_ACRO})\\.", _acronym_at_sentence_end,
            context=f"{_SPACENL}+(?:{_SENTENCE_STARTERS}|{_SGML}){_SPACENL}"),
    *_rules(_ABBREV3, context=f"{_SPACENL}?\\d"),
    *_rules(_caseless("(?:pt[ey]|co)\\."), context=f"{_SPACE}{_caseless('ltd|lim')}"),
    *_rules(_ABBREV1, _emit_and_rescan_period, context=f"{_SPACENL}(?:{_SPACENL}|{_UPPER}|{_SGML})"),
    *_rules(_ABBREV1, context=".."),
    *_rules(_ABBREV1, _emit_and_rescan_period),
    *_rules(_ABBREV2),
    *_rules(_ABBREV4, context=_SPACE),
    *_rules(_ACRO, context=_SPACENL),
    *_rules(f"{_APOS}[0-9][0-9]", context=_SPACENL),
    *_rules(_FILENAME, context=f"(?:{_SPACENL}|[.?!,])"),
    *_rules(f"{_WORD}\\.", _strip_soft_hyphens, context="[,;:\u3001]"),
    *_rules(_PHONE, _emit(lambda token: token.translate(_TO_NBSP).translate(_PAREN_NAMES))),
    *_rules(f'"|{_caseless("&quot;")}', _opening_quotes, context="[A-Za-z0-9$]"),
    *_rules(f'"|{_caseless("&quot;")}', _closing_quotes),
    *_rules("\x7f", _drop),
    *_rules(_caseless("<|&lt;"), _emit(lambda token: "<")),
    *_rules(_caseless(">|&gt;"), _emit(lambda token: ">")),
    *_rules(_SMILEY, _emit(lambda token: token.translate(_PAREN_NAMES)), context="[^A-Za-z0-9]"),
    *_rules(_ASIAN_SMILEY, _emit(lambda token: token.translate(_PAREN_NAMES))),
    *_rules("[{}\\[\\]()]", _emit(_BRACKETS.__getitem__)),
    *_rules("-+", _hyphens),
    *_rules(["\\.{3,5}", "(?:\\.[ \u00a0]){2,4}\\.", "[\x85\u2026]"], _emit(lambda token: "...")),
    *_rules("@+|#+|_+"),
    *_rules("\\*+|(?:\\\\\\*){1,3}"),
    *_rules("[,;:\u3001]"),
    *_rules("[?!]+"),
    *_rules("[.\u00a1\u00bf\u037e\u0589\u061f\u06d4\u0700-\u0702\u07fa\u3002]"),
    *_rules("/"),
    *_rules(_HTHING, _strip_soft_hyphens),
    *_rules(f"{_HTHING}\\.", _strip_soft_hyphens, context="[,;:\u3001]"),
    *_rules(f"{_THING}\\.", context="[,;:\u3001]"),
    *_rules(_THING),
    *_rules(f"{_THING_AMP}\\.", _normalize_ampersand, context="[,;:\u3001]"),
    *_rules(_THING_AMP, _normalize_ampersand),
    *_rules(_OPENING_QUOTES, _opening_quotes, context=f"[A-Za-z]{_NOT_SPACENL}"),
    *_rules(_QUOTES, _closing_quotes),
    *_rules(_REDAUX, _closing_quotes),
    *_rules(_SREDAUX, _closing_quotes),
    *_rules("<<|>>"),
    *_rules(_MISC_SYMBOL),
    *_rules(f"\x00|{_SPACE}+|[\u200b\u200e\u200f\ufeff]|{_caseless('&nbsp;')}", _drop),
    *_rules(_NEWLINE, _emit(lambda token: _NEWLINE_TOKEN)),
    *_rules(".", _drop_one_char),  # untokenizable (control characters, emoji): deleted, as the Java default does
]

# Most caption tokens are plain words or a lone full stop or comma followed by a space or a line end. No other
# rule can claim those (a sequence of spaced dots could, hence the look-ahead), so they skip the rule scan.
_PLAIN_TOKEN = re.compile("(?:[A-Za-z]+|[,;:])(?=[ \n]|\\Z)|\\.(?=\n|\\Z| (?!\\.))")
_SPACES = re.compile("[ \t]+")


def _lex(text: str) -> list[str]:
    """Tokenizes `text` as one stream (newlines become "\\n" tokens), before lower-casing."""
    tokens: list[str] = []
    position, end = 0, len(text)
    while position < end:
        plain = _PLAIN_TOKEN.match(text, position)
        if plain and plain.group().lower() not in _ASSIMILATION_WORDS:
            tokens.append(plain.group())
            position = plain.end()
            continue
        if text[position] == "\n":  # captions are joined with "\n"; only this rule can start there
            tokens.append(_NEWLINE_TOKEN)
            position += 1
            continue
        spaces = _SPACES.match(text, position)
        if spaces:
            position = spaces.end()
            continue
        best_rule, best_match = None, None
        for rule in _RULES:
            match = rule.pattern.match(text, position)
            if match and (best_match is None or match.end() > best_match.end()):
                best_rule, best_match = rule, match
        token, consumed = best_rule.action(best_match.group("token"))
        if token is not None:
            tokens.append(token)
        position += consumed
    return tokens


# pycocoevalcap replaces only "\n" inside a caption; Java would treat these as line breaks too and shift every
# later caption onto the wrong image, so they are read as spaces here.
_LINE_BREAKS = str.maketrans({"\n": " ", "\r": " ", "\u2028": " ", "\u2029": " ", "\x0b": " ", "\x0c": " "})


def _remove_punctuation(line: str) -> str:
    return " ".join(word for word in line.rstrip().split(" ") if word not in PUNCTUATIONS)


def ptb_tokenize_lines(texts: Sequence[str]) -> list[str]:
    """Tokenizes captions as pycocoevalcap's `PTBTokenizer` does: one Java run over all of them, one per line.

    Returns one string per caption: PTB tokens, lower-cased, joined by spaces, with the `PUNCTUATIONS` tokens
    removed. Captions are lexed as one newline-separated stream, like the Java run, because a few rules look past
    the end of a line (an abbreviation followed by a capitalised word on the next line).
    """
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"captions must be strings, got {type(text).__name__}: {text!r}")
    stream = "\n".join(text.translate(_LINE_BREAKS) for text in texts)
    lines, current = [], []
    for token in _lex(stream):
        if token == _NEWLINE_TOKEN:
            lines.append(current)
            current = []
        else:
            current.append(token.lower())
    lines.append(current)
    return [_remove_punctuation(" ".join(tokens)) for tokens in lines[:len(texts)]]


def ptb_tokenize(text: str) -> str:
    """Tokenizes one caption like coco-caption's Java PTB tokenizer: "A Dog's toy." -> "a dog 's toy"."""
    return ptb_tokenize_lines([text])[0]


# ---------------------------------------------------------------------------------------------------------------
# Step 2: CIDEr-D.
# ---------------------------------------------------------------------------------------------------------------

class CiderResult(NamedTuple):
    """Corpus CIDEr-D and the per-image scores (a dict keyed like the references, or a list in input order).

    A named tuple, so both `score, per_image = corpus_cider(...)` and `result.score` work.
    """

    score: float
    per_image: dict | list


def _ngram_counts(caption: str, max_n: int) -> list[Counter]:
    """Counts of the 1..max_n-grams of a tokenized caption, one Counter per order."""
    words = caption.split()
    return [Counter(zip(*(words[k:] for k in range(n)))) for n in range(1, max_n + 1)]


class _TfIdf(NamedTuple):
    weights: list  # per n-gram order: {ngram: tf * idf}
    norms: list  # per n-gram order: Euclidean norm of `weights`
    length: int  # coco-caption's length term counts BIGRAMS, not words; kept so that scores stay identical


def _tf_idf(counts: list[Counter], idf: dict, unseen_idf: float) -> _TfIdf:
    weights = [{ngram: float(tf) * idf.get(ngram, unseen_idf) for ngram, tf in order.items()} for order in counts]
    norms = [math.sqrt(sum(weight * weight for weight in order.values())) for order in weights]
    bigrams = sum(counts[1].values()) if len(counts) > 1 else 0
    return _TfIdf(weights, norms, bigrams)


def _similarity(candidate: _TfIdf, reference: _TfIdf, sigma: float) -> float:
    """Sum over n-gram orders of the clipped cosine similarity, times the Gaussian length penalty."""
    delta = float(candidate.length - reference.length)
    penalty = math.exp(-(delta ** 2) / (2 * sigma ** 2))
    total = 0.0
    for candidate_weights, reference_weights, candidate_norm, reference_norm in zip(
            candidate.weights, reference.weights, candidate.norms, reference.norms):
        dot = 0.0
        for ngram, weight in candidate_weights.items():
            if ngram in reference_weights:  # n-grams the reference lacks add 0
                reference_weight = reference_weights[ngram]
                dot += min(weight, reference_weight) * reference_weight  # clipped: repeats earn nothing extra
        if candidate_norm != 0 and reference_norm != 0:
            dot /= candidate_norm * reference_norm
        total += dot * penalty
    return total


def _as_keyed(predictions, references) -> tuple[list, list[str], list[list[str]], bool]:
    """Validates the inputs; returns image keys, predictions, reference lists (in reference order) and whether
    the inputs were dicts."""
    keyed = isinstance(predictions, Mapping) or isinstance(references, Mapping)
    if keyed:
        if not (isinstance(predictions, Mapping) and isinstance(references, Mapping)):
            raise TypeError("predictions and references must both be dicts keyed by image, or both be lists")
        if not predictions:
            raise ValueError("no predictions to score: the predictions dict is empty")
        missing = [key for key in references if key not in predictions]
        extra = [key for key in predictions if key not in references]
        if missing or extra:
            raise ValueError(
                "predictions and references must cover the same images; "
                f"missing predictions for {len(missing)} image(s): {preview_names(missing)}; "
                f"predictions without references for {len(extra)} image(s): {preview_names(extra)}. "
                "Generate captions for exactly the evaluated images (or drop the extra ones).")
        keys = list(references)
        candidates = [predictions[key] for key in keys]
        reference_lists = [references[key] for key in keys]
    else:
        candidates, reference_lists = list(predictions), list(references)
        if not candidates:
            raise ValueError("no predictions to score: the predictions list is empty")
        if len(candidates) != len(reference_lists):
            raise ValueError(f"got {len(candidates)} predictions but {len(reference_lists)} reference lists; "
                             "give one list of reference captions per prediction")
        keys = list(range(len(candidates)))
    checked_references = []
    for key, candidate, refs in zip(keys, candidates, reference_lists):
        if not isinstance(candidate, str):
            raise TypeError(f"prediction for image {key!r} must be a string, got {type(candidate).__name__}")
        if isinstance(refs, str) or not isinstance(refs, Iterable):
            raise TypeError(f"references for image {key!r} must be a list of strings, got {type(refs).__name__}")
        refs = list(refs)
        if not refs:
            raise ValueError(f"image {key!r} has no reference captions; CIDEr needs at least one per image")
        for ref in refs:
            if not isinstance(ref, str):
                raise TypeError(f"references for image {key!r} must be strings, got {type(ref).__name__}")
        checked_references.append(refs)
    return keys, candidates, checked_references, keyed




def corpus_cider(
    predictions: Mapping[str, str] | Sequence[str],
    references: Mapping[str, Sequence[str]] | Sequence[Sequence[str]],
    *,
    tokenize: bool = True,
    max_n: int = 4,
    sigma: float = 6.0,
) -> CiderResult:
    """Corpus CIDEr-D as coco-caption reports it (x10 scale, e.g. 0.77, not 77).

    Args:
        predictions: one caption per image, as `{image: caption}` or a list.
        references: the reference captions per image, as `{image: [captions]}` (same keys as `predictions`) or a
            list of lists in the order of `predictions`.
        tokenize: run the PTB tokenizer first (as coco-caption does). Pass False for captions that are already
            tokenized, lower-cased and stripped of punctuation.
        max_n, sigma: CIDEr-D's n-gram order and length-penalty width; coco-caption uses 4 and 6.

    Returns:
        `CiderResult(score, per_image)`; `per_image` is `{image: score}` for dict inputs, a list otherwise.
        Document frequencies come from the references of the images scored here, so a score depends on the
        whole evaluated set, not only on the image itself.
    """
    if max_n < 1 or sigma <= 0:
        raise ValueError(f"need max_n >= 1 and sigma > 0, got max_n={max_n}, sigma={sigma}")
    keys, candidates, reference_lists, keyed = _as_keyed(predictions, references)
    if tokenize:
        candidates = ptb_tokenize_lines(candidates)
        # one stream for all references, in image order, as pycocoevalcap feeds them to Java
        tokenized = iter(ptb_tokenize_lines([ref for refs in reference_lists for ref in refs]))
        reference_lists = [[next(tokenized) for _ in refs] for refs in reference_lists]
    candidate_counts = [_ngram_counts(caption, max_n) for caption in candidates]
    reference_counts = [[_ngram_counts(ref, max_n) for ref in refs] for refs in reference_lists]

    # document frequency: in how many images' references an n-gram occurs (any order, any reference)
    document_frequency: Counter = Counter()
    for refs in reference_counts:
        document_frequency.update({ngram for ref in refs for order in ref for ngram in order})
    log_num_images = math.log(float(len(reference_counts)))
    idf = {ngram: log_num_images - math.log(max(1.0, df)) for ngram, df in document_frequency.items()}
    unseen_idf = log_num_images  # n-grams no reference has count as if one image had them: log(N) - log(1)

    scores = []
    for candidate, refs in zip(candidate_counts, reference_counts):
        candidate_vector = _tf_idf(candidate, idf, unseen_idf)
        total = sum(_similarity(candidate_vector, _tf_idf(ref, idf, unseen_idf), sigma) for ref in refs)
        scores.append(total / max_n / len(refs) * 10.0)
    corpus = sum(scores) / len(scores)
    per_image = dict(zip(keys, scores)) if keyed else scores
    return CiderResult(corpus, per_image)

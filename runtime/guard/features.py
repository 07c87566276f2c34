"""Text normalisation and hashed n-gram features for the screening classifier (numpy only).

A prompt becomes a bag of hashed features, each tagged with the index of the word it
starts in, so that a linear model can score the whole text *and* every sliding window
of it from one pass (prefix sums over per-word contributions). Three kinds of feature:

- word unigrams and bigrams of the normalised text,
- character 3/4/5-grams of the normalised text (robust to misspelling and inflection),
- a handful of dense jailbreak-wrapper signals (role-play personas, "ignore previous
  instructions", fiction/hypothetical framing, obfuscation) computed on the whole text.

Normalisation undoes the cheap obfuscations attackers use: Unicode compatibility forms
(NFKC: full-width letters, ligatures), zero-width characters, leetspeak inside words
("b0mb", "m3th"), letters spaced or dotted apart ("b o m b", "k.i.l.l"), base64 blobs
(decoded and appended so the payload is screened too), and hex, URL-encoded, numeric-entity and \\u-escaped blobs
(decoded in place).

Hashing is deterministic across processes (crc32 and fixed multipliers, never Python's
salted ``hash``), so shipped weights mean the same thing everywhere.
"""

from __future__ import annotations

import base64
import binascii
import html
import re
import unicodedata
import urllib.parse
import zlib
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

__all__ = ["N_HASH", "DENSE_NAMES", "LEXICON", "Features", "StaticEmbedding", "decode_escapes", "normalize", "featurize",
           "dense_signals"]

N_HASH = 1 << 18  # hashed feature space; weights are stored as float16 to stay small
# Value of one occurrence by kind. Character n-grams are many per word and mostly redundant; the
# lexicon groups are few and are what carries a never-seen hazard word, so they weigh more.
_KIND_VALUE = {"word": 1.0, "bigram": 1.0, "char": 0.3, "lex": 3.0}
_PAIR_SPAN = 12  # words: two lexicon hits this close form a conjunction feature
_MAX_PAIRS_FROM = 400  # bound the quadratic pair step on hostile input (hits beyond this pair with none)
_CHAR_NS = (3, 4, 5)
_MAX_CHARS = 200_000  # hard limit on untrusted input; longer text is truncated (screened in parts by the caller)

_ZERO_WIDTH = re.compile("[\u200b-\u200f\u2060-\u2064\ufeff\u00ad]")
_LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s", "!": "i", "|": "l"})
_LEET_WORD = re.compile(r"(?<![\w@$!|])(?=[a-z0-9@$!|]*[a-z])(?=[a-z0-9@$!|]*[0-9@$!|])[a-z0-9@$!|]{3,}(?![\w@$!|])")
_SPACED = re.compile(r"\b(?:[a-z][ .\-_*]){2,}[a-z]\b")
_B64 = re.compile(r"[A-Za-z0-9+/]{16,}={0,2}")
# hex-encoded bytes: 12 or more pairs, bare ("676976"), spaced or colon/comma separated ("67 69 76"), or prefixed
# ("\\x67\\x69", "0x67 0x69"). Hashes and long numbers decode to non-text and are dropped
_HEX = re.compile(r"(?<![0-9A-Za-z])(?:(?:\\x|0x)?[0-9A-Fa-f]{2}[ ,:]?){12,}")  # from a word's start only
_HEX_NOISE = re.compile(r"\\x|0x|[ ,:]")
# other escapes that hide a request's words: URL-encoding (3+ %XX in one run of non-spaces: "how%20do%20I..."), numeric
# HTML entities (6+: "&#104;&#111;&#119;") and \\u escapes (6+: "\\u0068\\u006f")
_URL = re.compile(r"(?<!\S)(?:[^\s%]*%[0-9A-Fa-f]{2}){3,}[^\s%]*")  # from a token's start only: linear time
_ENTITIES = re.compile(r"(?:&#(?:[0-9]{2,7}|[xX][0-9A-Fa-f]{2,6});\s?){6,}")
_U_ESCAPES = re.compile(r"(?:\\u[0-9A-Fa-f]{4}){6,}")
_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?")
_REPEAT = re.compile(r"(.)\1{2,}")

# Dense jailbreak-wrapper signals: (name, pattern). Matched on the normalised text.
_DENSE: tuple[tuple[str, str], ...] = (
    ("persona", r"\b(?:dan|stan|aim|dude|maximum|jailbroken|evilbot|basedgpt|do anything now|developer mode|god mode|unfiltered|uncensored|unrestricted|no restrictions|without restrictions|no limits)\b"),
    ("override", r"\b(?:ignore|disregard|forget|override|bypass)\b.{0,40}\b(?:instructions|directives|rules|guidelines|policy|policies|programming|training|filters?|safety|restrictions)\b"),
    ("no_ethics", r"\b(?:no|without|free of|broken free|beyond)\b.{0,30}\b(?:ethic\w*|moral\w*|rules|filters?|censorship|guidelines|limitations|refus\w*|warnings|disclaimers)\b"),
    ("never_refuse", r"\b(?:never|not|don't|do not|won't)\b.{0,20}\b(?:refuse|decline|say (?:no|sorry)|apologi[sz]e|mention (?:policies|ethics))\b"),
    ("roleplay", r"\b(?:pretend|role ?play|act as|you are now|stay in character|from now on|imagine you are|play the role|in character)\b"),
    ("fiction", r"\b(?:hypothetical\w*|fiction\w*|novel|screenplay|story|movie|script|thought experiment|simulation|game)\b"),
    ("authority", r"\b(?:i am your (?:developer|creator|admin\w*)|authori[sz]ed|red team|system override|admin(?:istrator)? mode|sudo)\b"),
    ("detail", r"\b(?:step[- ]by[- ]step|in (?:full |complete |great )?detail|detailed|exact (?:steps|amounts|quantities|recipe)|complete instructions)\b"),
)
# plus: "obfuscated" (normalize() undid leetspeak, spacing, zero-width, base64 or an escape)
DENSE_NAMES: tuple[str, ...] = tuple(name for name, _ in _DENSE) + ("obfuscated",)
_DENSE_RE = tuple(re.compile(p) for _, p in _DENSE)


# Hazard lexicon: each group adds one shared feature ("lex:<group>") at the word where it matches,
# so a word never seen in training still carries its group's weight (a poor man's word embedding).
# Groups are deliberately broad; the benign near-boundary data teaches the model when they are harmless.
_W = r"\w*"
LEXICON: tuple[tuple[str, str], ...] = (
    ("violence", rf"\b(?:kill{_W}|murder{_W}|stab{_W}|strangl{_W}|chok{_W}|smother{_W}|shoot{_W}|behead{_W}|tortur{_W}|maim{_W}|assault{_W}|beat(?:ing)? (?:up|someone|him|her|them)|hurt{_W}|injur{_W}|attack{_W}|assassin{_W}|kidnap{_W}|abduct{_W}|massacre{_W}|slaughter{_W}|lynch{_W}|drown{_W}|dismember{_W}|bleed out|break (?:his|her|their) (?:legs?|arms?|neck)|hit ?man|hitmen|arson{_W}|set (?:\w+ )?on fire|burn (?:down|alive))\b"),
    ("weapon", rf"\b(?:bomb{_W}|explosi{_W}|detonat{_W}|grenade{_W}|ied|napalm|thermite|molotov|tatp|anfo|c-?4|semtex|nitroglycerin{_W}|gunpowder|black powder|silencer{_W}|suppressor{_W}|full[- ]auto{_W}|ghost gun{_W}|untraceable (?:gun|firearm|weapon)s?|firearm{_W}|rifle{_W}|pistol{_W}|ammunition|shrapnel|fuse|warhead{_W}|nuclear weapon{_W}|dirty bomb{_W}|uranium|plutonium|radioactive|nerve (?:gas|agent){_W}|sarin|vx|tabun|novichok|mustard gas|chlorine gas|phosgene|ricin|abrin|anthrax|botulinum|botulism|smallpox|plague|pathogen{_W}|bioweapon{_W}|biological weapon{_W}|chemical weapon{_W}|weaponi[sz]{_W}|toxin{_W})\b"),
    ("poison", rf"\b(?:poison{_W}|cyanide|arsenic|thallium|strychnine|antifreeze|ethylene glycol|lethal (?:dose|amount|injection)|overdos{_W}|untraceable poison|spik{_W} (?:a |her |his |their )?drink|roofie{_W}|ghb|rohypnol|date rape drug{_W}|sedat{_W} (?:her|him|someone))\b"),
    ("drugs", rf"\b(?:meth|methamphetamine|crystal meth|cocaine|crack|heroin|fentanyl|carfentanil|lsd|mdma|ecstasy|ketamine|pseudoephedrine|ephedrine|red phosphorus|precursor{_W}|opioid{_W}|oxycodone|oxy|xanax|cook{_W} (?:meth|crack|drugs)|drug (?:lab|deal{_W}|traffick{_W}|smuggl{_W}))\b"),
    ("cyber", rf"\b(?:hack{_W}|malware|ransomware|keylogger{_W}|spyware|stalkerware|trojan{_W}|rootkit{_W}|botnet{_W}|ddos{_W}|exploit{_W}|zero[- ]day{_W}|phish{_W}|brute[- ]?forc{_W}|crack(?:ing)? (?:passwords?|wifi|the password|a password)|sql injection|backdoor{_W}|reverse shell|exfiltrat{_W}|credential{_W} (?:theft|stuffing|harvest{_W})|skimmer{_W}|sim[- ]swap{_W}|bypass{_W} (?:security|authentication|2fa|drm|the license|antivirus))\b"),
    ("crime", rf"\b(?:steal{_W}|stole{_W}|theft|thie(?:f|ves)|rob{_W}|burglar{_W}|shoplift{_W}|launder{_W}|counterfeit{_W}|forg(?:e|ed|ing|ery)|fraud{_W}|scam{_W}|embezzl{_W}|extort{_W}|blackmail{_W}|bribe{_W}|smuggl{_W}|traffick{_W}|ponzi|pyramid scheme|tax evasion|evad{_W} (?:taxes|police|the police|arrest)|fake (?:id{_W}|passport{_W}|diploma{_W}|invoice{_W}|charity|ballots?)|identity theft|hotwir{_W}|carjack{_W}|break into|breaking into|break in|pick{_W} (?:the |a )?lock (?:on|of) (?:someone|my neighbou?r|a house|their)|poach{_W}|pirat{_W}|keygen{_W}|crack{_W} (?:the )?licen[cs]e)\b"),
    ("evasion", r"\b(?:without (?:getting |being )?(?:caught|detected|noticed|traced|found out|leaving (?:a )?(?:trace|marks|evidence|dna|fingerprints))|without (?:anyone|anybody|them|her|him|the police|my (?:wife|husband|parents)) (?:knowing|noticing|finding out|suspecting)|get(?:ting)? away with|undetect\w*|untraceabl\w*|leave no trace|cover (?:my|our) tracks|hide (?:the )?(?:body|evidence|bodies)|dispose of (?:a |the )?(?:body|bodies|corpse)|look like an accident|looks like (?:an accident|natural causes|suicide)|destroy (?:the )?evidence|so (?:that )?(?:nobody|no one|they|the police|the cops|nobody else) (?:\\w+ ){0,2}(?:finds?|knows?|notices?|suspects?|can tell|will know|traces?)|make it look|dead bod(?:y|ies)|corpses?|disappear (?:forever|permanently|for good)|secretly|covertly|anonymous(?:ly)?|on the dark ?web|avoid (?:the )?(?:police|cops|detection|getting caught))\b"),
    ("sexual", rf"\b(?:sex{_W}|sexual{_W}|porn{_W}|nude{_W}|naked|erotic{_W}|explicit|orgasm{_W}|genital{_W}|penis|vagina|breasts?|nsfw|hardcore|fetish{_W}|masturbat{_W}|intercourse|rape{_W}|raping|molest{_W}|grope{_W}|upskirt{_W}|voyeur{_W}|sextort{_W}|revenge porn|prostitut{_W}|escort{_W} (?:ring|service))\b"),
    ("minor", rf"\b(?:child{_W}|kids?|minor{_W}|underage|teen{_W}|preteen{_W}|little (?:girl|boy)s?|schoolgirl{_W}|schoolboy{_W}|toddler{_W}|infant{_W}|bab(?:y|ies)|(?:[1-9]|1[0-7])[- ]?(?:year|yr)s?[- ]?old|stepdaughter|stepson|groom{_W}|csam|loli{_W}|pedo{_W}|paedo{_W})\b"),
    ("selfharm", r"\b(?:suicid\w*|kill (?:myself|herself|himself|yourself|themselves)|end (?:my|her|his|your) (?:own )?life|take my (?:own )?life|self[- ]harm\w*|cut(?:ting)? myself|hurt(?:ing)? myself|hang (?:myself|yourself)|slit (?:my|your) wrists?|jump(?:ing)? off (?:a |the )?(?:bridge|building|roof)|want to die|starv\w* myself|purg\w*|pro[- ]?ana|thinspo\w*|calories a day)\b"),
    ("hate", rf"\b(?:inferior|subhuman|vermin|master race|white (?:power|supremac{_W}|pride)|great replacement|ethnic cleansing|genocide|nazi{_W}|neo-?nazi{_W}|kkk|holocaust|slur{_W}|racist{_W}|deport{_W} (?:all|them|every)|(?:all|every) (?:jews|muslims|blacks|black people|mexicans|immigrants|gays|arabs|asians|women)|(?:jews|muslims|immigrants|gays|blacks|trans people|women) (?:are|should) )"),
    ("privacy", rf"\b(?:dox{_W}|home address|where (?:she|he|they) lives?|social security number{_W}|ssn|track{_W} (?:her|his|their|my (?:wife|husband|girlfriend|boyfriend|ex|partner))|spy(?:ing)? on|stalk{_W}|read (?:her|his|my (?:wife|husband|partner)'?s?) (?:texts|messages|emails)|gps tracker|hidden camera{_W}|medical records|phone number of|personal (?:data|information) of|unmask{_W})\b"),
    ("misinfo", rf"\b(?:fake news|false(?:ly)? (?:claim{_W}|rumou?r{_W}|stor{_W}|accus{_W}|say{_W})|fabricat{_W}|made[- ]up (?:story|scandal|quotes?)|make up (?:a )?(?:scandal|rumou?r|story|quotes?)|disinformation|misinformation|propaganda|defam{_W}|smear{_W}|hoax{_W}|rigged|voter fraud|election (?:day|date) (?:has )?(?:moved|changed)|stuff{_W} ballot{_W}|hack{_W} (?:a |the )?voting)\b"),
    ("tech", r"\b(?:process\w*|thread\w*|server\w*|code|coding|script\w*|python|java\w*|linux|ubuntu|windows|mac ?os|terminal|bash|shell script|docker|kubernetes|git|sql|css|html|api|database|app|laptop|cpu|benchmark|compiler|segfault|bug\w*|error|exception|function|variable|port|container|cron|daemon|pid|sigkill|kill -9|pkill|killall|task manager)\b"),
    ("leisure", r"\b(?:photo\w*|camera|lens|portrait|recipe\w*|bake|baking|cook(?:ing)? (?:dinner|pasta|rice|chicken)|oven|garden\w*|game\w*|gaming|video game|elden ring|minecraft|call of duty|skyrim|gta|hitman|fortnite|chess|poker|board game|karaoke|concert|workout|marathon|guitar|piano|movie night|halloween|costume)\b"),
    ("learn", r"\b(?:history|historical|world war|ww[12i]+|essay|thesis|homework|class|course|lecture|documentary|textbook|museum|explain why|what (?:is|was|were|are) the|definition|meaning of|causes of|effects of|why did|how did)\b"),
    ("protect", r"\b(?:protect\w*|prevent\w*|report(?:ing)? (?:it|a|the|this|abuse|scam)|recogni[sz]e|warning signs|signs of|awareness|safety|safely|safe(?:ly)? dispos\w*|dispose of (?:old |expired |leftover )?(?:medic\w*|pills|batteries|prescriptions?)|support (?:a|my)|help (?:my|a) (?:friend|child|son|daughter|kid|teen)|therapist|counsel\w*|hotline|victim\w*|survivor\w*|legal(?:ly)?|lawful\w*|defend myself|self-defen[cs]e|stay safe|keep (?:my|our) (?:kids|family|children) safe)\b"),
    ("target", r"\b(?:my (?:neighbou?r|wife|husband|ex|girlfriend|boyfriend|boss|coworker|co-worker|teacher|classmate|roommate|sister|brother|mother|father|mom|dad|stepmother|stepfather|landlord|partner|son|daughter|uncle|aunt|in-laws?)|(?:a|the|some) (?:woman|man|girl|boy|person|people|child|kid|crowd|family|cop|police officer|teacher|student|stranger)|someone|somebody|people|him|her|them)\b"),
)
_LEXICON_RE = tuple((name, re.compile(p)) for name, p in LEXICON)
_LEX_IDS = tuple(zlib.crc32(f"lex:{name}".encode()) for name, _ in LEXICON)


@dataclass(frozen=True)
class Features:
    """Hashed features of one text: ``idx`` (hash ids), ``pos`` (word index), ``dense`` signals."""

    idx: np.ndarray  # int64, hashed feature ids in [0, N_HASH)
    pos: np.ndarray  # int64, word index each feature belongs to (non-decreasing not required)
    val: np.ndarray  # float64, value of each occurrence (its kind's weight, see _KIND_VALUE)
    n_words: int
    dense: np.ndarray  # float64, len(DENSE_NAMES)
    words: tuple[str, ...] = ()  # the normalised words (pos indexes into these)
    lex_group: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # lexicon hits: index into LEXICON
    lex_pos: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # and the word each hit is at


def _despace(match: re.Match[str]) -> str:
    return re.sub(r"[ .\-_*]", "", match.group(0))


def _as_text(raw: bytes) -> str | None:
    """``raw`` as UTF-8 text when it reads as text (printable, with a word in it), else None."""
    try:
        plain = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if plain and sum(ch.isprintable() for ch in plain) / len(plain) > 0.95 and re.search(r"[^\W\d_]{3}", plain):
        return plain
    return None


def _decode_b64(text: str) -> list[str]:
    decoded: list[str] = []
    for blob in _B64.findall(text)[:8]:
        if not re.search(r"[0-9+/=]|[A-Z].*[a-z].*[A-Z]", blob):
            continue  # a long plain word, not base64
        try:
            raw = base64.b64decode(blob + "=" * (-len(blob) % 4), validate=True)
        except (binascii.Error, ValueError):
            continue
        plain = _as_text(raw)
        if plain is not None:
            decoded.append(plain)
    return decoded


def _hex_bytes(blob: str) -> bytes:
    digits = _HEX_NOISE.sub("", blob)
    return bytes.fromhex(digits[: len(digits) // 2 * 2])


def _code_points(blob: str) -> bytes:
    return re.sub(r"\\u([0-9A-Fa-f]{4})", lambda m: chr(int(m.group(1), 16)), blob).encode("utf-8", "surrogatepass")


# (pattern, a string every blob holds, blob -> bytes): each blob that decodes to text is replaced by it
_ESCAPES = (
    (_HEX, "", _hex_bytes),
    (_URL, "%", lambda blob: urllib.parse.unquote_to_bytes(blob)),
    (_ENTITIES, "&#", lambda blob: html.unescape(blob).encode("utf-8", "surrogatepass")),
    (_U_ESCAPES, "\\u", _code_points),
)


def decode_escapes(text: str) -> tuple[str, bool]:
    """``text`` with each hex, URL-encoded, numeric-entity or \\u-escaped blob that decodes to text replaced by that
    text in place (its digits would fill the encoder's windows and dilute the request), and whether any was."""
    found = False

    def plain(decode, match: re.Match[str]) -> str:
        nonlocal found
        decoded = _as_text(decode(match.group(0)))
        if decoded is None or decoded == match.group(0):
            return match.group(0)
        found = True
        return " " + decoded + " "

    for pattern, marker, decode in _ESCAPES:
        if marker in text:
            text = pattern.sub(lambda m, decode=decode: plain(decode, m), text)
    return text, found


def normalize(text: str) -> tuple[str, bool]:
    """Undo cheap obfuscation; returns (normalised text, whether any obfuscation was found)."""
    text = text[:_MAX_CHARS]
    extra = _decode_b64(text)
    text, unescaped = decode_escapes(text)
    text = unicodedata.normalize("NFKC", text)
    stripped = _ZERO_WIDTH.sub("", text)
    obfuscated = bool(extra) or unescaped or stripped != text
    text = stripped.casefold()
    if extra:
        text = text + "\n" + "\n".join(unicodedata.normalize("NFKC", e).casefold() for e in extra)
    leet = _LEET_WORD.sub(lambda m: m.group(0).translate(_LEET), text)
    spaced = _SPACED.sub(_despace, leet)
    obfuscated = obfuscated or spaced != text
    return _REPEAT.sub(r"\1\1", spaced), obfuscated


def dense_signals(norm: str, obfuscated: bool, n_words: int) -> np.ndarray:
    """Jailbreak-wrapper signals on normalised text, each squashed to [0, 1]."""
    out = np.zeros(len(DENSE_NAMES))
    for i, pattern in enumerate(_DENSE_RE):
        hits = len(pattern.findall(norm[:20_000]))
        out[i] = min(hits, 3) / 3.0
    out[len(_DENSE_RE)] = 1.0 if obfuscated else 0.0
    return out


def _mix(h: np.ndarray, salt: int) -> np.ndarray:
    # murmur-style finaliser on uint64, then fold into the hash space
    h = (h ^ np.uint64(salt)) * np.uint64(0x9E3779B97F4A7C15)
    h ^= h >> np.uint64(29)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(32)
    return (h % np.uint64(N_HASH)).astype(np.int64)


def featurize(text: str) -> Features:
    """Hash ``text`` into features (see module docstring). Never raises on any str input."""
    norm, obfuscated = normalize(text)
    spans = [(m.start(), m.group(0)) for m in _WORD.finditer(norm)]
    words = [w for _, w in spans]
    n = len(words)
    dense = dense_signals(norm, obfuscated, n)
    if n == 0:
        empty = np.zeros(0, dtype=np.int64)
        return Features(empty, empty, np.zeros(0), 0, dense, ())
    wh = np.fromiter((zlib.crc32(w.encode("utf-8")) for w in words), dtype=np.uint64, count=n)
    wpos = np.arange(n, dtype=np.int64)
    parts_idx = [_mix(wh, 1)]
    parts_pos = [wpos]
    parts_val = [np.full(n, _KIND_VALUE["word"])]
    if n > 1:
        bi = wh[:-1] * np.uint64(1_000_003) + wh[1:]
        parts_idx.append(_mix(bi, 2))
        parts_pos.append(wpos[:-1])
        parts_val.append(np.full(n - 1, _KIND_VALUE["bigram"]))
    # character n-grams over the words joined by single spaces (punctuation dropped)
    # hazard-lexicon groups, at the word where they match
    starts = np.array([st for st, _ in spans], dtype=np.int64)
    lex_h: list[int] = []
    lex_at: list[int] = []
    lex_g: list[int] = []
    for g, ((_, pattern), lid) in enumerate(zip(_LEXICON_RE, _LEX_IDS)):
        hits = [m.start() for m in pattern.finditer(norm)]
        lex_h.extend([lid] * len(hits))
        lex_at.extend(hits)
        lex_g.extend([g] * len(hits))
    lex_group = np.array(lex_g, dtype=np.int64)
    lex_pos = np.zeros(0, dtype=np.int64)
    if lex_h:
        lex_p = np.clip(np.searchsorted(starts, np.array(lex_at, dtype=np.int64), side="right") - 1, 0, n - 1)
        lex_pos = lex_p
        lex_ids = np.array(lex_h, dtype=np.uint64)
        parts_idx.append(_mix(lex_ids, 3))
        parts_pos.append(lex_p)
        parts_val.append(np.full(len(lex_h), _KIND_VALUE["lex"]))
        # conjunctions of two groups close together ("my neighbour" + "poison", "child" + "nude"):
        # a linear model cannot learn an AND by itself
        order = np.argsort(lex_p, kind="stable")
        lid, lp = lex_ids[order], lex_p[order]
        near = np.abs(lp[:, None] - lp[None, :]) <= _PAIR_SPAN
        a, b = np.nonzero(np.triu(near & (lid[:, None] != lid[None, :]), k=1)[: _MAX_PAIRS_FROM])
        if a.size:
            lo, hi = np.minimum(lid[a], lid[b]), np.maximum(lid[a], lid[b])
            parts_idx.append(_mix(lo * np.uint64(0x1000193) + hi, 4))
            parts_pos.append(np.minimum(lp[a], lp[b]))
            parts_val.append(np.full(a.size, _KIND_VALUE["lex"]))
    joined = " " + " ".join(words) + " "
    codes = np.frombuffer(joined.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    is_space = codes == 32
    word_of_char = np.cumsum(is_space) - 1  # index of the word a char belongs to
    for k in _CHAR_NS:
        m = len(codes) - k + 1
        if m <= 0:
            continue
        h = np.zeros(m, dtype=np.uint64)
        for j in range(k):
            h = h * np.uint64(0x100000001B3) + codes[j : j + m]
        parts_idx.append(_mix(h, 10 + k))
        parts_pos.append(np.clip(word_of_char[:m], 0, n - 1))
        parts_val.append(np.full(m, _KIND_VALUE["char"]))
    return Features(np.concatenate(parts_idx), np.concatenate(parts_pos), np.concatenate(parts_val), n, dense,
                    tuple(words), lex_group, lex_pos)


_MAX_PIECE_CHARS = 40  # longer "words" are one [UNK] (bounded greedy WordPiece on hostile input)
_CACHE_WORDS = 50_000


class StaticEmbedding:
    """Semantic features: a static vector per WordPiece token, mean-pooled over a span of words.

    The table is distilled at training time from the sentence encoder all-MiniLM-L6-v2 (every
    vocabulary token embedded alone, PCA-reduced, SIF-weighted; see train_screen.py), so at run
    time a text costs one WordPiece split per distinct word and a few numpy sums: no
    transformer forward pass. The WordPiece split is the uncased BERT one (accents stripped,
    greedy longest match with ``##`` continuations) on the words of :func:`featurize`.
    """

    def __init__(self, vocab: Sequence[str], table: np.ndarray) -> None:
        self.index = {tok: i for i, tok in enumerate(vocab)}
        self.table = np.asarray(table, dtype=np.float32)
        self.dims = int(self.table.shape[1])
        self.unk = self.index.get("[UNK]", 0)
        self._cache: dict[str, tuple[int, ...]] = {}

    def _pieces(self, word: str) -> tuple[int, ...]:
        if len(word) > _MAX_PIECE_CHARS:
            return (self.unk,)
        ids: list[int] = []
        start = 0
        while start < len(word):
            end, found = len(word), -1
            while start < end:
                sub = word[start:end] if start == 0 else "##" + word[start:end]
                found = self.index.get(sub, -1)
                if found >= 0:
                    break
                end -= 1
            if found < 0:
                return (self.unk,)
            ids.append(found)
            start = end
        return tuple(ids)

    def word_ids(self, word: str) -> tuple[int, ...]:
        """WordPiece ids of one normalised word (cached)."""
        hit = self._cache.get(word)
        if hit is not None:
            return hit
        plain = "".join(ch for ch in unicodedata.normalize("NFD", word) if unicodedata.category(ch) != "Mn")
        ids: list[int] = []
        for i, part in enumerate(plain.split("'")):
            if i:
                ids.append(self.index.get("'", self.unk))
            if part:
                ids.extend(self._pieces(part))
        out = tuple(ids) or (self.unk,)
        if len(self._cache) >= _CACHE_WORDS:
            self._cache.clear()
        self._cache[word] = out
        return out

    def pooled(self, words: Sequence[str], starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
        """Unit-length mean of the token vectors of words [start, end) for each span: (spans, dims)."""
        per_word = [self.word_ids(w) for w in words]
        tok_start = np.zeros(len(words) + 1, dtype=np.int64)
        if per_word:
            tok_start[1:] = np.cumsum([len(p) for p in per_word])
        ids = np.fromiter((i for p in per_word for i in p), dtype=np.int64, count=int(tok_start[-1]))
        csum = np.zeros((ids.size + 1, self.dims), dtype=np.float64)
        if ids.size:
            np.cumsum(self.table[ids], axis=0, out=csum[1:])
        a, b = tok_start[np.asarray(starts)], tok_start[np.asarray(ends)]
        spans = (csum[b] - csum[a]) / np.maximum(b - a, 1)[:, None]
        norm = np.linalg.norm(spans, axis=1, keepdims=True)
        return spans / np.maximum(norm, 1e-6)

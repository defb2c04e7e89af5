"""What the scripted model builds: the files of ``textstats`` (a small standard-library Python
package with a deliberate bug, its unittest suite, a page on the standard library's HTTP
server, a README), the commands it runs, and its summary."""

TEST_COMMAND = "python -m unittest discover -s tests -v"
BUG = "key=lambda item: (item[1], item[0])"
FIX = "key=lambda item: (-item[1], item[0])"

PACKAGE = f'''"""textstats: count words, lines and characters, and find the most common words."""

from __future__ import annotations

import re
from collections import Counter

__all__ = ["char_count", "line_count", "top_words", "word_count", "words"]

_WORD = re.compile(r"[A-Za-z0-9']+")


def words(text: str) -> list[str]:
    """The words of ``text``, lower-cased."""
    return [w.lower() for w in _WORD.findall(text)]


def word_count(text: str) -> int:
    return len(words(text))


def line_count(text: str) -> int:
    return len(text.splitlines())


def char_count(text: str, *, spaces: bool = True) -> int:
    return len(text) if spaces else len(re.sub(r"\\s", "", text))


def top_words(text: str, n: int = 3) -> list[tuple[str, int]]:
    """The ``n`` most common words with their counts, most common first (ties: alphabetical)."""
    counts = Counter(words(text))
    return sorted(counts.items(), {BUG})[:n]
'''

TESTS = """import unittest

from textstats import char_count, line_count, top_words, word_count

TEXT = "the cat sat on the mat\\nthe dog sat too\\n"


class TextStatsTest(unittest.TestCase):
    def test_word_count(self):
        self.assertEqual(word_count(TEXT), 10)

    def test_line_count(self):
        self.assertEqual(line_count(TEXT), 2)

    def test_char_count(self):
        self.assertEqual(char_count("a b"), 3)
        self.assertEqual(char_count("a b", spaces=False), 2)

    def test_top_words(self):
        self.assertEqual(top_words(TEXT, 2), [("the", 3), ("sat", 2)])

    def test_empty(self):
        self.assertEqual(word_count(""), 0)
        self.assertEqual(top_words(""), [])


if __name__ == "__main__":
    unittest.main()
"""

SERVE_COMMAND = "python -u -m textstats.web --port 0"
MAX_LOOKS = 10  # bash_output calls for the server's address before the script gives up

WEB = '''"""textstats on the web: a page that shows a text's statistics (``python -m textstats.web``).

Standard library only: ``http.server``. ``--port 0`` (the default) takes a free port; the address
is printed on the first line, ``serving textstats on http://127.0.0.1:PORT/``.
"""

from __future__ import annotations

import argparse
import html
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from . import char_count, line_count, top_words, word_count

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>textstats</title>
<style>body{{font:16px system-ui,sans-serif;margin:2em;max-width:40em}}
textarea{{width:100%;height:8em}}td{{padding:.2em 1em}}</style></head>
<body><h1>textstats</h1>
<form method="get" action="./"><textarea name="text">{text}</textarea>
<p><button>Count</button></p></form>
<table id="stats"><tr><td>words</td><td>{words}</td></tr><tr><td>lines</td><td>{lines}</td></tr>
<tr><td>characters</td><td>{chars}</td></tr><tr><td>most common</td><td>{top}</td></tr></table>
</body></html>
"""


def stats(text: str) -> dict[str, object]:
    return {
        "words": word_count(text),
        "lines": line_count(text),
        "chars": char_count(text),
        "top": top_words(text, n=3),
    }


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        url = urlsplit(self.path)
        text = parse_qs(url.query).get("text", ["the cat and the hat"])[0]
        if url.path.endswith("/stats.json"):
            body, kind = json.dumps(stats(text)).encode(), "application/json"
        else:
            s = stats(text)
            top = ", ".join(f"{w} ({n})" for w, n in s["top"])
            body = PAGE.format(
                text=html.escape(text), words=s["words"], lines=s["lines"], chars=s["chars"],
                top=html.escape(top),
            ).encode()
            kind = "text/html; charset=utf-8"
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print(f"serving textstats on http://127.0.0.1:{server.server_port}/", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
'''

CHECK = (
    'python -c "import urllib.request as u; '
    "page = u.urlopen('http://127.0.0.1:{port}/?text=a+b+a', timeout=10).read().decode(); "
    "assert '<h1>textstats</h1>' in page, page[:300]; print('the page answers:', len(page), 'bytes')\""
)

README = f"""# textstats

Word, line and character counts for text, and its most common words. Standard library only.

```python
from textstats import top_words, word_count
word_count("the cat sat")        # 3
top_words("a b a", n=1)          # [("a", 2)]
```

Run the tests: `{TEST_COMMAND}`

See it in a browser: `python -m textstats.web` (it prints its address).
"""

SUMMARY = (
    "Built `textstats`, a small standard-library Python package: `word_count`, `line_count`, "
    "`char_count` and `top_words` in `textstats/__init__.py`, a unittest suite in "
    "`tests/test_textstats.py` and a README. The first test run caught a bug in `top_words` "
    "(least common words came first); it is fixed and all tests pass. "
    f"Run them with `{TEST_COMMAND}`. `textstats/web.py` serves a page that counts a text's "
    "words (`python -m textstats.web`); it is running in the background now."
)

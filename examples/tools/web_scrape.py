"""Fetch a page and save its text (a tool the Seed agent runs for `tool: web-scrape`)."""
import html
import re
import sys
import urllib.request

url, out = sys.argv[1], sys.argv[2]
with urllib.request.urlopen(url, timeout=20) as response:
    page = response.read().decode("utf-8", "replace")
text = html.unescape(re.sub(r"<[^>]+>", " ", page))
with open(out, "w", encoding="utf-8") as f:
    f.write(re.sub(r"\s+", " ", text).strip() + "\n")

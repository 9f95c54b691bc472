"""MkDocs hook: include the README as the home page with its links fixed up.

`docs/index.md` is the single line `--8<-- "README.md"`. The README lives at the repo root
and links to the docs as `docs/guides/learning_rates.md` (the form that works on GitHub).
On the site the home page *is* `docs/index.md`, so those links must lose their `docs/`
prefix, which has to happen before MkDocs validates links (strict mode). This hook
inlines the README at that point and strips the prefix. Other repo-relative links (e.g.
`examples/quickstart.py`) become `repo_url/blob/main/...` links when `repo_url` is set.
"""

import pathlib
import re


_SNIPPET = re.compile(r'^--8<--\s+"README\.md"\s*$', re.MULTILINE)
# `](target)` of inline links/images, `[ref]: target` definitions, and href/src attributes.
_LINK = re.compile(
    r"(?P<pre>\]\(\s*<?|^\s*\[[^\]]+\]:\s*<?|(?:href|src)=[\"'])(?P<target>[^)\s>\"']+)",
    re.MULTILINE,
)


def _fix_target(target: str, repo_url: str | None) -> str:
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith(("#", "/")):
        return target  # absolute URL, anchor or site-absolute path
    bare = target[2:] if target.startswith("./") else target
    if bare.startswith("docs/"):
        return bare[len("docs/") :]
    if repo_url:
        return f"{repo_url.rstrip('/')}/blob/main/{bare}"
    return target


def on_page_markdown(markdown, page, config, files):
    if page.file.src_uri != "index.md" or not _SNIPPET.search(markdown):
        return markdown
    root = pathlib.Path(config.config_file_path).parent
    readme = (root / "README.md").read_text(encoding="utf-8")
    repo_url = config.repo_url

    def fix(m: re.Match) -> str:
        return m.group("pre") + _fix_target(m.group("target"), repo_url)

    readme = _LINK.sub(fix, readme)
    return _SNIPPET.sub(lambda _: readme, markdown)

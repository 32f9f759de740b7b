"""mkdocs hook: the Python API page documents irank's public names, wherever their code lives.

`reference/python-api.md` names each object by its public name (`::: irank.score`). irank imports those
lazily (`irank.__getattr__`), which static analysis cannot follow, and the modules behind them are being
reorganized; so on every build this hook imports each name from `irank`, finds the module that defines it
(`obj.__module__`) and hands mkdocstrings that path, with the public name as the heading. A name that is not
public (not in `irank.__all__`) stops the build, and a public name the page leaves out is a warning (which
`mkdocs build --strict` turns into a failure).
"""

from __future__ import annotations

import logging
import re

PAGE = "reference/python-api.md"
DIRECTIVE = re.compile(r"^:::[ \t]+irank\.([\w.]+)[ \t]*$", re.MULTILINE)  # irank.NAME; a dotted path is refused
log = logging.getLogger("mkdocs.hooks.public_api")


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri != PAGE:
        return markdown
    from mkdocs.exceptions import PluginError

    import irank

    public = set(irank.__all__) - {"__version__"}
    named = DIRECTIVE.findall(markdown)
    for name in named:
        if name not in public:
            raise PluginError(f"{PAGE}: irank.{name} is not in irank.__all__; document public names only")
    for name in sorted(public - set(named)):
        log.warning("%s does not document the public irank.%s", PAGE, name)

    def resolve(match: re.Match) -> str:
        name = match.group(1)
        obj = getattr(irank, name)
        return (f'<span id="irank.{name}"></span>\n\n'
                f"::: {obj.__module__}.{obj.__qualname__}\n"
                f"    options:\n"
                f'      heading: "irank.{name}"\n'
                f'      toc_label: "irank.{name}"')

    return DIRECTIVE.sub(resolve, markdown)

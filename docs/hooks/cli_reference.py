"""mkdocs hook: the CLI reference, generated at build time from irank's typer app.

`reference/cli.md` holds only a marker; on every build this hook imports `irank.cli.app`, turns it into its
click command with `typer.main.get_command` and writes, for every command, its usage line, its docstring and
a table of its arguments and options (flags, type or choices, default, help), grouped by the help panel
(`rich_help_panel`) the option names. So the page says what `irank COMMAND --help` says, for the installed code.

Recent typer vendors its own click (`typer._click`): its parameters carry a `type_descriptor` and a
`display_type(ctx)` instead of click's `type`. Both kinds are read here, by what a parameter has.
"""

from __future__ import annotations

import enum
import inspect
import re

MARKER = "<!-- irank-cli-reference -->"
PAGE = "reference/cli.md"
ARGUMENTS, OPTIONS = "Arguments", "Options"


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        from mkdocs.exceptions import PluginError

        raise PluginError(f"{PAGE} lost its marker {MARKER!r}: nothing to put the CLI reference into")
    return markdown.replace(MARKER, render())


def render() -> str:
    import typer.main

    from irank.cli import app

    root = typer.main.get_command(app)
    context_class = root.context_class  # click's Context, or typer's vendored one
    root_ctx = context_class(root, info_name="irank")
    out = [paragraphs(root.help), ""]
    commands = subcommands(root, root_ctx)
    if commands:
        out += ["| command | what it does |", "|---|---|"]
        for name, command in commands:
            out.append(f"| [`irank {name}`](#{anchor('irank ' + name)}) | {cell(short_help(command))} |")
        out.append("")
    for name, command in commands:
        out += render_command(command, context_class(command, info_name=name, parent=root_ctx), f"irank {name}")
    return "\n".join(out)


def subcommands(group, ctx) -> list:
    names = group.list_commands(ctx) if hasattr(group, "list_commands") else []
    found = [(name, group.get_command(ctx, name)) for name in names]
    return [(name, command) for name, command in found if command is not None and not getattr(command, "hidden", False)]


def render_command(command, ctx, path: str, level: int = 2) -> list[str]:
    out = [f"{'#' * level} `{path}` {{ #{anchor(path)} }}", ""]
    if getattr(command, "deprecated", False):
        out += ["*Deprecated.*", ""]
    out += ["```text", usage(command, ctx, path), "```", ""]
    text = paragraphs(command.help)
    if text:
        out += [text, ""]
    panels: dict[str, list] = {}
    for param in command.get_params(ctx):
        if getattr(param, "hidden", False) or param.name == "help":
            continue
        default_panel = ARGUMENTS if is_argument(param) else OPTIONS
        panels.setdefault(getattr(param, "rich_help_panel", None) or default_panel, []).append(param)
    order = [name for name in (ARGUMENTS, OPTIONS) if name in panels] + [
        name for name in panels if name not in (ARGUMENTS, OPTIONS)]
    for name in order:
        first = "argument" if name == ARGUMENTS else "option"
        out += [f"**{escape(name)}**", "", f"| {first} | type | default | what it does |", "|---|---|---|---|"]
        for param in panels[name]:
            out.append(f"| {flags(param)} | {type_of(param, ctx)} | {default_of(param, ctx)} | {cell(param_help(param))} |")
        out.append("")
    if getattr(command, "epilog", None):
        out += [paragraphs(command.epilog), ""]
    for name, sub in subcommands(command, ctx):
        out += render_command(sub, type(ctx)(sub, info_name=name, parent=ctx), f"{path} {name}", min(level + 1, 6))
    return out


def usage(command, ctx, path: str) -> str:
    """The usage line as click writes it: [OPTIONS], then the arguments in capitals ([NAME] when optional)."""
    params = [param for param in command.get_params(ctx) if not getattr(param, "hidden", False)]
    pieces = [path]
    if any(not is_argument(param) for param in params):
        pieces.append("[OPTIONS]")
    for param in params:
        if is_argument(param):
            name = (param.metavar or param.name).upper()
            name = name if param.required else f"[{name}]"
            pieces.append(name + ("..." if param.nargs != 1 else ""))
    if subcommands(command, ctx):
        pieces.append("COMMAND [ARGS]...")
    return " ".join(pieces)


def is_argument(param) -> bool:
    return getattr(param, "param_type_name", None) == "argument" or type(param).__name__.endswith("Argument")


def flags(param) -> str:
    if is_argument(param):
        return f"`{(param.metavar or param.name).upper()}`"
    names = ", ".join(f"`{opt}`" for opt in param.opts)
    if getattr(param, "secondary_opts", None):
        names += " / " + ", ".join(f"`{opt}`" for opt in param.secondary_opts)
    return names


def type_of(param, ctx) -> str:
    if getattr(param, "is_flag", False) and not getattr(param, "count", False):
        return "flag"
    if getattr(param, "metavar", None):
        return f"`{param.metavar}`"
    if hasattr(param, "display_type"):  # typer's vendored click
        label = param.display_type(ctx).strip("<>")
    else:  # click
        kind = param.type
        label = "|".join(map(str, kind.choices)) if hasattr(kind, "choices") else kind.name
    # choices as `a | b | c`: a pipe inside a code span does not split a table cell here
    label = label.replace("|", " | ")
    return f"`{label}`" if label else ""


def default_of(param, ctx) -> str:
    if param.required:
        return "required"
    show = getattr(param, "show_default", True)
    if isinstance(show, str):
        return cell(show)
    if show is False or getattr(param, "is_bool_flag", False) and not param.default:
        return ""
    value = param.get_default(ctx, call=False) if hasattr(param, "get_default") else param.default
    if value is None or value == () or value == []:
        return ""
    if callable(value):
        return "(dynamic)"
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, (list, tuple)):
        value = ", ".join(str(item.value if isinstance(item, enum.Enum) else item) for item in value)
    return f"`{value}`"


def param_help(param) -> str:
    return escape(" ".join((getattr(param, "help", None) or "").split("\f")[0].split()))


def short_help(command) -> str:
    text = getattr(command, "short_help", None) or inspect.cleandoc(command.help or "").split("\f")[0]
    return escape(" ".join(re.split(r"\n\s*\n", text)[0].split()))


def paragraphs(text: str | None) -> str:
    """Help text as markdown paragraphs: click's \\f cuts it, \\b lines go, lines of a paragraph are joined."""
    if not text:
        return ""
    text = inspect.cleandoc(text).split("\f")[0]
    blocks = [block for block in re.split(r"\n\s*\n", text) if block.strip()]
    joined = [" ".join(line.strip() for line in block.splitlines() if line.strip() != "\b") for block in blocks]
    return "\n\n".join(example(block[len("Example: "):]) if block.startswith("Example: ") else escape(block)
                       for block in joined)


def example(command_line: str) -> str:
    return f"Example:\n\n```text\n{command_line}\n```"


def escape(text: str) -> str:
    """Markdown-escape text outside `code spans`: help texts are plain text, not markdown."""
    parts = re.split(r"(`[^`]*`)", text)
    for index in range(0, len(parts), 2):
        parts[index] = re.sub(r"([\\*_\[\]<>#|])", r"\\\1", parts[index])
    return "".join(parts)


def cell(text: str) -> str:
    """Text for one table cell: one line (escape() has escaped the pipes outside code spans)."""
    return " ".join(text.split())


def anchor(path: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", path.lower()).strip("-")

"""Settings resolved once, the result carried: after preflight (or the centralized path's
resolution) every module reads what :class:`fedtrak.wire.job.Resolved` holds from it, never the raw
setting it was resolved from (an unset k read as ``None``, a noise multiplier of 0 under a target
epsilon, the ``auto`` kernel source...)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("shared", "server", "client", "simulations")

#: The raw settings each of Resolved's values is resolved from, by section.
RESOLVED_FROM = {
    "projection": {"proj_dim", "projector"},  # Resolved.proj_dim, Resolved.projector ("auto" decided)
    "privacy": {"noise_multiplier", "clip_norm", "budget"},  # noise_multiplier, clip_norm, budget_scales
    "training": {"local_epochs"},  # Resolved.local_epochs
    "kernel": {"kernel_source"},  # Resolved.kernel_source ("auto" decided)
}
#: The resolution code, which may read them: the settings themselves, the server's preflight and the
#: privacy plan, the centralized path's own resolution (simulations/attribute.py: central_resolved),
#: the kernel source's and the projector's rules, and the DP-SGD noise a device derives from the job (the noise
#: multiplier as given, privacy/training.py: given_train_sigma).
RESOLUTION = ("shared/config/", "server/preflight.py", "shared/privacy/plan.py", "simulations/attribute.py",
              "shared/trak/kernel_sources.py", "shared/privacy/training.py", "shared/trak/projectors/__init__.py")
#: Reads that record the setting as given, next to the resolved value, and why.
AS_GIVEN = {
    ("server/summary.py", "clip_norm"): "the summary says whether C was given or the task's default",
    ("server/summary.py", "budget"): "the summary records the budget weights as given beside the scales",
}


def _settings_like(node: ast.expr, aliases: set[str]) -> bool:
    """Whether ``node`` names a Settings: ``settings``, ``job.settings``, ``self.base_settings``, or a
    name bound to one in the same function."""
    if isinstance(node, ast.Name):
        return "settings" in node.id.lower() or node.id in aliases
    return isinstance(node, ast.Attribute) and "settings" in node.attr.lower()


def _own_nodes(scope: ast.AST) -> list[ast.AST]:
    """The nodes of ``scope`` (a module or a function), not those of the functions and classes in it."""
    out, todo = [], list(ast.iter_child_nodes(scope))
    while todo:
        node = todo.pop()
        out.append(node)
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            todo += ast.iter_child_nodes(node)
    return out


def _bindings(scope: ast.AST) -> list[tuple[str, ast.expr]]:
    """``(name, value)`` of every plain assignment in ``scope``, tuples paired element by element."""
    out = []
    for node in _own_nodes(scope):
        if not isinstance(node, ast.Assign):
            continue
        for target in node.targets:
            if isinstance(target, ast.Name):
                out.append((target.id, node.value))
            elif isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):
                out += [(t.id, v) for t, v in zip(target.elts, node.value.elts) if isinstance(t, ast.Name)]
    return out


def raw_reads(source: str) -> list[tuple[int, str]]:
    """``(line, "section.field")`` of each read of a raw setting that Resolved holds resolved:
    ``settings.privacy.clip_norm``, or ``p.clip_norm`` after ``p = settings.privacy`` (or
    ``s = job.settings``) in the same function."""
    tree = ast.parse(source)
    found = set()
    scopes = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)
    for scope in [tree, *(n for n in ast.walk(tree) if isinstance(n, scopes))]:
        bindings = _bindings(scope)
        settings = {name for name, value in bindings if _settings_like(value, set())}
        sections = {name: value.attr for name, value in bindings
                    if isinstance(value, ast.Attribute) and value.attr in RESOLVED_FROM
                    and _settings_like(value.value, settings)}
        for node in _own_nodes(scope):
            if not isinstance(node, ast.Attribute):
                continue
            base = node.value
            if isinstance(base, ast.Attribute) and base.attr in RESOLVED_FROM and _settings_like(base.value, settings):
                section = base.attr
            elif isinstance(base, ast.Name) and base.id in sections:
                section = sections[base.id]
            else:
                continue
            if node.attr in RESOLVED_FROM[section]:
                found.add((node.lineno, f"{section}.{node.attr}"))
    return sorted(found)


def test_no_module_reads_a_raw_setting_that_resolved_holds():
    """Outside the resolution code, k, sigma, C, the budget split, the local epochs and the kernel
    source come from Resolved (``job.resolved``, ``plan.resolved``), not from the settings."""
    problems = []
    for path in sorted(p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py")):
        where = path.relative_to(ROOT).as_posix()
        if where.startswith(RESOLUTION):
            continue
        problems += [f"{where}:{line}: reads the raw setting {what}" for line, what in raw_reads(path.read_text())
                     if (where, what.split(".")[1]) not in AS_GIVEN]
    assert not problems, "\n".join(problems)


def test_the_scan_finds_a_planted_raw_read():
    """The check above is not vacuous: it finds a direct read, and reads through a section or a
    settings alias; it leaves the resolved values and other objects' same-named fields alone."""
    planted = (
        "def featurize(job, settings, summary, dp):\n"
        "    k = job.settings.projection.proj_dim\n"
        "    p = settings.privacy\n"
        "    c = p.clip_norm\n"
        "    s = job.settings\n"
        "    e = s.training.local_epochs\n"
        "    fine = job.resolved.proj_dim, dp.clip_norm, summary.privacy.noise_multiplier, s.projection.batch_size\n"
        "    kind = s.projection.projector\n"
        "    return settings.kernel.kernel_source\n"
    )
    assert raw_reads(planted) == [(2, "projection.proj_dim"), (4, "privacy.clip_norm"),
                                  (6, "training.local_epochs"), (8, "projection.projector"),
                                  (9, "kernel.kernel_source")]

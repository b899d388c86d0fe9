"""The package's architecture, read from its source: layers that only look down (core -> requests
-> runtime -> front doors), no import circle, no module reaching into another's private names, no
reference stack (torch, transformers, qwen_tts) and no environment read below the front doors."""
import ast
import os
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "qwen3_tts_jax")
PKG = "qwen3_tts_jax"

# Each module's layer; a module may import its own layer and the ones below.
LAYERS = {
    0: {  # core: pure math over arrays; no I/O, no environment
        "activations", "buckets", "config", "weights", "layers", "talker", "code_predictor",
        "sampling", "generate", "options", "quantize", "cpu_kernels", "decode_kernels",
        "speaker_encoder", "lru",
        "codec.config", "codec.decoder", "codec.encoder", "codec.streaming"},
    1: {"text", "prompts", "settings", "budget", "voice", "audio", "text_feed",
        "segments"},   # requests
    2: {"checkpoint", "runner", "engine", "cohort", "sharding", "compilation_cache",  # runtime
        "codec", "codec.tokenizer", "lora", "prefix_cache", "text_session"},
    3: {"api", "cli", "batch", "convert", "demo",                                  # front doors
        "server", "server.app", "server.engine", "server.metrics", "server.errors",
        "server.guards", "server.sessions", "server.speech", "server.voices", "server.wire",
        "finetune", "finetune.cli", "finetune.data", "finetune.export", "finetune.train",
        "finetune.plot"},
}
LAYER_OF = {m: n for n, ms in LAYERS.items() for m in ms}
NAMES = {0: "core", 1: "requests", 2: "runtime", 3: "front doors"}
# The only environment variables read, and where: deployment settings at the front doors.
ENV_ALLOWED = {"cli", "server", "server.app", "convert", "finetune.cli", "compilation_cache"}


def _modules() -> dict[str, str]:
    out = {}
    for folder, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out["" if rel == "__init__" else rel.removesuffix(".__init__")] = path
    return out


MODULES = _modules()


def _imports(name: str, path: str):
    """(imported package module, the names taken from it) for every import in the module,
    top-level or inside a function."""
    is_pkg = path.endswith("__init__.py")
    tree = ast.parse(open(path, encoding="utf-8").read())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if name else []
                if not is_pkg:
                    base = base[:-1]
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").startswith(PKG):
                target = node.module[len(PKG) + 1:]
            else:
                yield node.module, [a.name for a in node.names]
                continue
            subs = [a.name for a in node.names
                    if (f"{target}.{a.name}" if target else a.name) in MODULES]
            for s in subs:
                yield (f"{target}.{s}" if target else s), []
            rest = [a.name for a in node.names if a.name not in subs]
            if rest:
                yield target, rest
        elif isinstance(node, ast.Import):
            for a in node.names:
                n = a.name
                yield (n[len(PKG) + 1:] if n.startswith(PKG + ".") else n), []


def _graph() -> dict[str, set]:
    g = {}
    for name, path in MODULES.items():
        g[name] = {t for t, _ in _imports(name, path) if t in MODULES and t != name and t != ""}
    return g


def test_every_module_has_a_layer():
    missing = sorted(set(MODULES) - set(LAYER_OF) - {""})
    assert not missing, f"modules without a layer in tests/test_package.py: {missing}"


def test_no_import_circle():
    g, color, stack, cycles = _graph(), {}, [], []

    def visit(u):
        color[u] = 1
        stack.append(u)
        for v in sorted(g[u]):
            if color.get(v) == 1:
                cycles.append(stack[stack.index(v):] + [v])
            elif not color.get(v):
                visit(v)
        stack.pop()
        color[u] = 2

    for u in sorted(g):
        if not color.get(u):
            visit(u)
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_layers_only_look_down():
    bad = [f"{m} ({NAMES[LAYER_OF[m]]}) imports {t} ({NAMES[LAYER_OF[t]]})"
           for m, targets in _graph().items() if m in LAYER_OF
           for t in targets if t in LAYER_OF and LAYER_OF[t] > LAYER_OF[m]]
    assert not bad, bad


def test_no_private_names_across_modules():
    bad = []
    for name, path in MODULES.items():
        for target, names in _imports(name, path):
            if target in MODULES and target != name:
                bad += [f"{name} imports {target}.{n}" for n in names if n.startswith("_")]
        # attribute reads of private names that the module itself does not define
        tree = ast.parse(open(path, encoding="utf-8").read())
        own = {n.name for n in ast.walk(tree)
               if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
        own |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
                and isinstance(n.ctx, ast.Store)}
        own |= {t.id for n in ast.walk(tree) if isinstance(n, (ast.Assign, ast.AnnAssign))
                for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
                if isinstance(t, ast.Name)}
        own |= {n.args[1].value for n in ast.walk(tree)      # object.__setattr__(x, "_name", v)
                if isinstance(n, ast.Call) and len(n.args) > 1 and isinstance(n.args[1], ast.Constant)
                and ast.unparse(n.func).endswith("setattr__") or False}
        for n in ast.walk(tree):
            if (isinstance(n, ast.Attribute) and n.attr.startswith("_")
                    and not n.attr.startswith("__") and n.attr not in own
                    and n.attr not in ("_replace", "_asdict", "_fields", "_make",   # NamedTuple
                                       "_exit",                # os._exit
                                       "_cache_size")):        # a jax.jit's program count
                bad.append(f"{name}:{n.lineno} reads {ast.unparse(n)}")
    assert not bad, bad


def test_library_never_imports_the_reference_stack():
    bad = [f"{name} imports {t}" for name, path in MODULES.items() for t, _ in _imports(name, path)
           if t and t.split(".")[0] in ("torch", "transformers", "qwen_tts", "torchaudio")]
    assert not bad, bad


def test_environment_is_read_only_at_the_front_doors():
    bad = []
    for name, path in MODULES.items():
        if name in ENV_ALLOWED:
            continue
        src = open(path, encoding="utf-8").read()
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv") \
                    and isinstance(node.value, ast.Name) and node.value.id == "os":
                line = src.splitlines()[node.lineno - 1]
                if '"CXX"' not in line:      # the C++ compiler, as every build tool reads it
                    bad.append(f"{name}:{node.lineno}: {line.strip()}")
    assert not bad, bad


@pytest.mark.parametrize("case", ["circle", "upward", "private", "torch", "environ"])
def test_the_checks_can_fail(case, monkeypatch, tmp_path):
    """Each check above fails on code that breaks its rule."""
    me = sys.modules[__name__]
    fake = tmp_path / "fake.py"
    fake.write_text({"private": "def f(tts):\n    return tts._text_feed()\n",
                     "torch": "def f():\n    import torch\n",
                     "environ": "import os\nX = os.environ.get('QWEN3_TTS_JAX_X')\n"}.get(case, ""))
    monkeypatch.setattr(me, "MODULES", {"fake": str(fake)})
    if case == "circle":
        monkeypatch.setattr(me, "_graph", lambda: {"a": {"b"}, "b": {"a"}})
        with pytest.raises(AssertionError, match="a -> b -> a"):
            test_no_import_circle()
    elif case == "upward":
        monkeypatch.setattr(me, "_graph", lambda: {"generate": {"api"}})
        with pytest.raises(AssertionError, match="generate .core. imports api"):
            test_layers_only_look_down()
    elif case == "private":
        with pytest.raises(AssertionError, match="reads tts._text_feed"):
            test_no_private_names_across_modules()
    elif case == "torch":
        with pytest.raises(AssertionError, match="fake imports torch"):
            test_library_never_imports_the_reference_stack()
    else:
        with pytest.raises(AssertionError, match="fake:2"):
            test_environment_is_read_only_at_the_front_doors()

"""The package's import graph goes down the layers (README "## Layout"): a module imports only
from its own layer or the layers below it, and no import chain ever comes back to a module it has
left (the graph has no cycle). Checked on the source with `ast` (every import, also those inside
functions): no module is imported, so this test costs milliseconds.
"""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "softvq_jax"

# Bottom to top. A module may import from its own layer and the ones listed before it.
LAYERS = (
    ("foundations", ("paths", "axes", "pixels", "variants", "hardware", "diffaugment", "losses",
                     "optim", "visualize", "progress", "metrics")),
    ("models", ("models", "models.vit", "models.quantizer", "models.tokenizer", "models.lpips",
                "models.discriminator", "models.inception", "models.repa", "models.sit")),
    ("config and infrastructure", ("config_lib", "sharding", "data_sources", "data",
                                   "token_data")),
    ("weight conversion", ("convert", "convert.safetensors_io", "convert.state_dict",
                           "convert.resample", "convert.timm_vit", "convert.dino_weights",
                           "convert.lpips_weights", "convert.inception_weights",
                           "convert.official", "convert.generator_official")),
    ("pretrained networks", ("fetch", "pretrained")),
    ("objective", ("objective", "generator_objective", "sampling")),
    ("train state", ("train_state",)),
    ("train step", ("steps",)),
    ("checkpoints", ("checkpoint",)),
    ("public API", ("api",)),
    ("generators", ("generator", "generate")),
    ("evaluation and latents", ("evaluate", "gen_eval", "latents")),
    ("training loop", ("generator_task", "train")),
    ("cost model", ("cost_model",)),
    ("tools over the trainer", ("compile_plan", "preflight")),
    ("command line", ("main",)),
)
# A module not listed yet counts as the top layer: it may import anything, nothing listed may
# import it. (Place new modules in LAYERS.)
TOP = len(LAYERS)


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for path in PACKAGE.rglob("*.py"):
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts = parts[:-1]
    if parts:  # the package's own __init__ is the public facade above everything
      out[".".join(parts)] = path
  return out


def _imports(path: pathlib.Path, modules) -> set[str]:
  """The package modules `path` imports (module-level or inside functions)."""
  deps = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      # `from softvq_jax.convert import timm_vit` imports the submodule, `from softvq_jax.models.vit
      # import VIT_SIZES` the module (resolved below by dropping the last part)
      names = [f"{node.module}.{a.name}" for a in node.names]
    for name in names:
      if not name.startswith("softvq_jax."):
        continue
      name = name[len("softvq_jax."):]
      while name and name not in modules:  # `from softvq_jax.models.vit import X` -> models.vit
        name = name.rpartition(".")[0]
      if name:
        deps.add(name)
  return deps


def _graph():
  modules = _modules()
  return {m: _imports(p, modules) - {m} for m, p in modules.items()}


def _layer(module: str) -> int:
  for i, (_, members) in enumerate(LAYERS):
    if module in members:
      return i
  return TOP


def test_layers_list_only_existing_modules():
  modules = set(_modules())
  listed = [m for _, members in LAYERS for m in members]
  assert len(listed) == len(set(listed)), "a module is listed in two layers"
  assert set(listed) <= modules, f"LAYERS names modules that do not exist: {set(listed) - modules}"


def test_no_module_imports_from_a_layer_above_it():
  upward = []
  for module, deps in sorted(_graph().items()):
    for dep in sorted(deps):
      if _layer(dep) > _layer(module):
        upward.append(f"{module} ({_name(module)}) imports {dep} ({_name(dep)})")
  assert not upward, "imports that climb the layers:\n  " + "\n  ".join(upward)


def _name(module: str) -> str:
  i = _layer(module)
  return LAYERS[i][0] if i < TOP else "unlisted: top"


def test_the_import_graph_has_no_cycle():
  graph = _graph()
  state: dict[str, int] = {}  # 1: on the current path, 2: done

  def visit(m, path):
    state[m] = 1
    for d in sorted(graph.get(m, ())):
      if state.get(d) == 1:
        pytest.fail("import cycle: " + " -> ".join(path[path.index(d):] + [d]))
      if d not in state:
        visit(d, path + [d])
    state[m] = 2

  for m in sorted(graph):
    if m not in state:
      visit(m, [m])


def test_the_checker_sees_an_upward_import(tmp_path):
  """The checker itself: an import of a higher layer's module is found (the test can fail)."""
  src = tmp_path / "vit.py"
  src.write_text("def f():\n  from softvq_jax.convert import timm_vit\n  return timm_vit\n")
  deps = _imports(src, set(_modules()))
  assert deps == {"convert.timm_vit"}
  assert _layer("convert.timm_vit") > _layer("models.vit")

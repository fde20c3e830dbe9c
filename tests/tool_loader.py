"""Test helper: import a command-line program of tools/ as a module (tools/ is not a package)."""
import importlib.util
import os

TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")


def load_tool(name: str):
    """The module of ``tools/<name>.py``, freshly executed."""
    spec = importlib.util.spec_from_file_location(f"_tool_{name}",
                                                  os.path.join(TOOLS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

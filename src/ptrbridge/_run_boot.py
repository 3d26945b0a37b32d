"""The ``sitecustomize`` of ``python -m ptrbridge run`` (copied into the run directory as sitecustomize.py).

It must not change the program under test, so it imports nothing of
ptrbridge (nor cffi, ctypes or anything else outside the interpreter's
start-up set).  It does three things:

1. installs an import finder that starts ptrbridge's run-time side
   (:func:`ptrbridge.runtime.start`) just *before* the process first imports
   ``cffi``, ``_cffi_backend``, ``ctypes`` or ``ptrbridge`` - so checks and
   instrumentation are in place before any C library is loaded, and pytest
   has already installed its assertion rewriter when it is pytest that runs
   (importing ptrbridge earlier makes pytest warn "Module already imported
   so cannot be rewritten", an error under ``filterwarnings = error``);
2. registers an exit handler that writes this process's report, saying so
   when ptrbridge was never loaded (the program used no cffi, ctypes or
   ptrbridge, or this interpreter cannot import ptrbridge: then why);
3. runs the ``sitecustomize`` the process would have found without this
   one (the next one on ``sys.path``) as the ``sitecustomize`` module.

This file is executed as a top-level module, not as part of the package.
"""
import os
import sys

_TRIGGERS = frozenset(("cffi", "_cffi_backend", "ctypes", "ptrbridge"))
_HERE = os.path.dirname(os.path.abspath(__file__))


class _PtrbridgeRunFinder:
    """A meta-path finder that never finds anything: it only notices imports."""

    def __init__(self):
        import _thread

        self.lock = _thread.RLock()
        self.done = False
        self.waiting = False  # a trigger came while ptrbridge itself was being imported
        self.package_dir = None

    def _ptrbridge_initializing(self):
        module = sys.modules.get("ptrbridge")
        spec = getattr(module, "__spec__", None)
        return module is not None and bool(getattr(spec, "_initializing", False))

    def _importer_is_ptrbridge(self):
        """Whether the import comes from ptrbridge's own code (not the program's)."""
        if self.package_dir is None:
            import importlib.machinery

            spec = importlib.machinery.PathFinder.find_spec("ptrbridge")
            locations = getattr(spec, "submodule_search_locations", None) or [""]
            self.package_dir = os.path.join(os.path.realpath(locations[0]), "")
        frame = sys._getframe(2)
        while frame is not None:
            filename = frame.f_code.co_filename
            if not (filename.startswith("<frozen importlib") or filename == __file__
                    or filename.endswith(os.path.join("importlib", "__init__.py"))):
                real = os.path.realpath(filename)
                # The demo's sample programs stand for a user's program: they are not ptrbridge.
                return (bool(self.package_dir) and real.startswith(self.package_dir)
                        and not real.startswith(os.path.join(self.package_dir, "demo_programs", "")))
            frame = frame.f_back
        return False

    def find_spec(self, name, path=None, target=None):
        if self.done:
            return None
        top = name.partition(".")[0]
        if top not in _TRIGGERS and not self.waiting:
            return None
        with self.lock:
            if self.done:
                return None
            parent = sys.modules.get(top)
            if name != top and parent is not None and getattr(getattr(parent, "__spec__", None),
                                                              "_initializing", False):
                # A submodule imported while its package is still initializing (cffi/__init__
                # importing cffi.api): starting now would see a half-made package.  Wait.
                self.waiting = True
                return None
            if self._ptrbridge_initializing() or (top != "ptrbridge" and self._importer_is_ptrbridge()):
                # ptrbridge is importing cffi/ctypes for itself (while it is imported through
                # another finder, e.g. pytest's rewriter, or in the middle of its own work):
                # start at the next import after it has finished.
                self.waiting = True
                return None
            self.done = True
            try:
                sys.meta_path.remove(self)
            except ValueError:
                pass
            activate()
            # Starting imported the module this import is looking for (ptrbridge imports ctypes
            # and cffi).  Hand the import that module as it is: if it found it in sys.modules,
            # the import system would run the module's code a second time and the program would
            # get a new ctypes, whose CDLL is not the one instrumented.
            module = sys.modules.pop(name, None)
            if module is not None:
                return _existing_spec(name, module)
        return None


class _ExistingLoader:
    """Loads an already executed module: the import puts it back in sys.modules unchanged."""

    def __init__(self, module):
        self.module = module
        self.spec = getattr(module, "__spec__", None)
        self.loader = getattr(module, "__loader__", None)

    def create_module(self, spec):
        return self.module

    def exec_module(self, module):
        # The import system set __spec__ (and __loader__ if unset) to this loader's: restore them.
        if self.spec is not None:
            module.__spec__ = self.spec
        if self.loader is not None:
            module.__loader__ = self.loader


def _existing_spec(name, module):
    import importlib.util

    return importlib.util.spec_from_loader(name, _ExistingLoader(module),
                                           is_package=hasattr(module, "__path__"))


_finder = None
_activated = False
_unavailable = None  # why ptrbridge could not be imported here, when the program needed it


def activate():
    """Start ptrbridge's run-time side in this process (at most once)."""
    global _activated, _unavailable
    if _activated:
        return
    _activated = True
    try:
        import ptrbridge.runtime as runtime
    except ImportError as exc:
        # Another interpreter than the one ptrbridge is installed in (a `python` on PATH that
        # is not the venv's, say): nothing here can be checked, and the report says why.
        _unavailable = "%s: %s" % (type(exc).__name__, exc)
        return
    runtime.start()


def _at_exit():
    if _finder is not None and not _finder.done:
        _finder.done = True
        if "ptrbridge" in sys.modules and not _finder._ptrbridge_initializing():
            activate()  # ptrbridge was imported through another finder and nothing was imported since
    runtime = sys.modules.get("ptrbridge.runtime")
    if runtime is not None and getattr(runtime, "_started", False):  # started here or by the pytest plugin
        runtime.write_report()
        return
    _write_unloaded_report()


def _write_unloaded_report():
    """The report of a process that never loaded ptrbridge (written without importing it)."""
    import json

    pid = os.getpid()
    process = {"pid": pid, "argv": [str(a) for a in sys.argv], "activated": False, "check_level": None,
               "checked": {"calls": 0, "callbacks": 0, "lends": 0}, "stats": None, "findings": 0}
    if _unavailable is not None:
        process["unavailable"] = _unavailable
        process["executable"] = sys.executable
    report = {"process": process, "findings": [], "tests": [], "watch_matched": [], "notes": []}
    path = os.path.join(os.environ["PTRBRIDGE_RUN_DIR"], "report-%d.json" % pid)
    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(report, f)
    except OSError as exc:
        sys.stderr.write("ptrbridge: could not write the run report %s: %s\n" % (path, exc))


def _chain_sitecustomize():
    """Run the sitecustomize this one hides, as the module ``sitecustomize``."""
    import importlib.machinery
    import importlib.util

    here = os.path.normcase(os.path.realpath(_HERE))
    path = [p for p in sys.path if os.path.normcase(os.path.realpath(p or os.curdir)) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", path)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["sitecustomize"] = module
    spec.loader.exec_module(module)


def _boot():
    global _finder
    if os.environ.get("PTRBRIDGE_RUN_DIR"):
        import atexit

        _finder = _PtrbridgeRunFinder()
        sys.meta_path.insert(0, _finder)
        atexit.register(_at_exit)
        if _TRIGGERS.intersection(sys.modules):  # already imported by a .pth file
            _finder.find_spec("ptrbridge")
    _chain_sitecustomize()


_boot()

"""Old module paths, kept importable: the modules that moved into subpackages (checkpointing/,
fairseq_glue/, measurement/, recipes/) answer under their former names too, as the same module
objects, so that user code, notebooks and scripts written against the flat layout keep working."""

import importlib
import importlib.abc
import importlib.util
import sys

MOVED = {  # former name -> where the module lives now
    "gpam_fairseq.checkpoints": "gpam_fairseq.checkpointing.checkpoints",
    "gpam_fairseq.checkpoint_glue": "gpam_fairseq.checkpointing.glue",
    "gpam_fairseq.checkpoint_averaging": "gpam_fairseq.checkpointing.averaging",
    "gpam_fairseq.finetune": "gpam_fairseq.checkpointing.finetune",
    "gpam_fairseq.cli_errors": "gpam_fairseq.fairseq_glue.cli_errors",
    "gpam_fairseq.fairseq_tools": "gpam_fairseq.fairseq_glue.tools",
    "gpam_fairseq.compat": "gpam_fairseq.fairseq_glue.compat",
    "gpam_fairseq.precision": "gpam_fairseq.fairseq_glue.precision",
    "gpam_fairseq.collapse_analysis": "gpam_fairseq.measurement.collapse",
    "gpam_fairseq.profiling": "gpam_fairseq.measurement.profiling",
    "gpam_fairseq.peak_memory": "gpam_fairseq.measurement.peak_memory",
    "gpam_fairseq.synthetic_corpus": "gpam_fairseq.recipes.synthetic_corpus",
}


class _FormerName(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports a former name as the module at its new place (one module object, not a copy:
    monkeypatching either name patches both)."""

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in MOVED else None

    def create_module(self, spec):
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module):
        pass  # already executed under its new name


def install_old_module_paths():
    if not any(isinstance(f, _FormerName) for f in sys.meta_path):
        sys.meta_path.append(_FormerName())

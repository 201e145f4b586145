"""Loading a stock softmax checkpoint into a GPAM model (fine-tuning from fairseq assets).

A stock ``transformer*`` / ``transformer_lm*`` checkpoint holds every parameter of the
matching GPAM model except those its attention mechanisms add (the projections keep
fairseq's names): each registered mechanism declares them as ``new_parameters`` (daGPAM's
``W_Q-`` and, with trainable lambdas, its two thetas; diff's lambda vectors and norm scale;
NAP's gain and shift; none for softmax, coda, unnormalized). fairseq's ``load_state_dict``
runs the model's ``upgrade_state_dict_named`` before its strict load, so that is where the
models call :func:`add_missing_mechanism_parameters`: every such parameter the checkpoint
lacks gets the value the freshly built model has (for daGPAM: ``W_Q- = -I`` or random per
``--gpam-neg-query-init``, lambda from ``--gpam-lambda-pos/--gpam-lambda-neg``). Nothing else is
filled in, so any other missing key, and every unexpected one, still fails fairseq's strict load.

With ``--gpam-lambda-pos 0 --gpam-lambda-neg 0`` (fixed) the daGPAM model computes exactly
the softmax model, whatever ``W_Q-`` is: P_G = P+.
"""

import logging
from typing import Dict, List

from torch import Tensor, nn

from gpam_fairseq.attention.mechanisms import Mechanism

logger = logging.getLogger(__name__)


def new_parameter_names(model: nn.Module) -> List[str]:
    """The names (in ``model.state_dict()``) of the parameters the model's mechanisms add."""
    names = []
    for module_name, module in model.named_modules():
        if isinstance(module, Mechanism):
            for param_name, _ in module.named_parameters(recurse=False):
                if param_name in module.new_parameters:
                    names.append(f"{module_name}.{param_name}" if module_name else param_name)
    return names


def add_missing_mechanism_parameters(model: nn.Module, state_dict: Dict[str, Tensor], prefix: str = "") -> List[str]:
    """Put the model's own mechanism parameters into ``state_dict`` where it has none.

    Returns the keys added (logged). ``prefix`` is the model's name inside ``state_dict``
    (fairseq's ``upgrade_state_dict_named`` argument, "" for a whole model).
    """
    prefix = prefix + "." if prefix else ""
    params = dict(model.named_parameters())
    added = []
    for name in new_parameter_names(model):
        key = prefix + name
        if key not in state_dict:
            state_dict[key] = params[name].detach().clone()
            added.append(key)
    if added:
        logger.info(
            "checkpoint has none of %d parameters of the attention mechanisms (a softmax checkpoint?): "
            "initialised as a fresh model (daGPAM: W_Q- per --gpam-neg-query-init, lambda from "
            "--gpam-lambda-pos/--gpam-lambda-neg): %s",
            len(added),
            ", ".join(added[:4]) + (", ..." if len(added) > 4 else ""),
        )
    return added

"""Loading a stock softmax checkpoint into a GPAM model (fine-tuning from fairseq assets).

A stock ``transformer*`` / ``transformer_lm*`` checkpoint holds every parameter of the
matching GPAM model except the GPAM-only ones (``W_Q-`` and, with trainable lambdas, the
two thetas): the projections keep fairseq's names. fairseq's ``load_state_dict`` runs the
model's ``upgrade_state_dict_named`` before its strict load, so that is where the models
call :func:`add_missing_gpam_parameters`: every GPAM-only key the checkpoint lacks gets the
value the freshly built model has (``W_Q- = -I`` or random per ``--gpam-neg-query-init``,
lambda from ``--gpam-lambda-pos/--gpam-lambda-neg``). Nothing else is filled in, so any
other missing key, and every unexpected one, still fails fairseq's strict load.

With ``--gpam-lambda-pos 0 --gpam-lambda-neg 0`` (fixed) the daGPAM model computes exactly
the softmax model, whatever ``W_Q-`` is: P_G = P+.
"""

import logging
from typing import Dict, List

from torch import Tensor, nn

logger = logging.getLogger(__name__)

# parameter names owned by a mechanism that a softmax checkpoint cannot have
GPAM_ONLY_PARAMETERS = ("w_q_neg", "lambda_pos_theta", "lambda_neg_theta")


def is_gpam_only(key: str) -> bool:
    parts = key.split(".")
    return len(parts) >= 2 and parts[-2] == "mechanism" and parts[-1] in GPAM_ONLY_PARAMETERS


def add_missing_gpam_parameters(model: nn.Module, state_dict: Dict[str, Tensor], prefix: str = "") -> List[str]:
    """Put the model's own GPAM-only parameters into ``state_dict`` where it has none.

    Returns the keys added (logged). ``prefix`` is the model's name inside ``state_dict``
    (fairseq's ``upgrade_state_dict_named`` argument, "" for a whole model).
    """
    prefix = prefix + "." if prefix else ""
    added = []
    for name, param in model.named_parameters():
        key = prefix + name
        if is_gpam_only(name) and key not in state_dict:
            state_dict[key] = param.detach().clone()
            added.append(key)
    if added:
        logger.info(
            "checkpoint has no GPAM-only parameters for %d of them (a softmax checkpoint?): "
            "initialised as a fresh model (W_Q- per --gpam-neg-query-init, lambda from "
            "--gpam-lambda-pos/--gpam-lambda-neg): %s",
            len(added),
            ", ".join(added[:4]) + (", ..." if len(added) > 4 else ""),
        )
    return added
